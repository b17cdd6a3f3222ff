"""The engine's KV pool, asserted through its counters on a real tiny model: n > 1 choices hold their
prompt's pages once, a prefix-cache hit allocates only the pages it does not share and copies no
K/V (and gives the bits of a run without the cache), and the usage ratio is pages in use over the
budget's pages."""

import random
import threading
from pathlib import Path

import pytest

from app.engine.core.types import Completion, Event, GenerationRequest, SamplingParams, StoppingParams
from app.engine.engine import Engine
from app.engine.kv.kv_pool import PAGE_SIZE
from app.engine.load.loader import LoadedModel, load_model
from tests.unit.engine.test_engine_prefix import make_engine, outputs


@pytest.fixture(scope="module")
def lm(stories260k_dir: Path) -> LoadedModel:
    """stories260k (Llama, grouped-query attention): its 512-token context holds a 500-token prompt."""
    return load_model(str(stories260k_dir))


def prompt(lm: LoadedModel, length: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, lm.model.config.vocab_size) for _ in range(length)]


class Watched:
    """Requests whose every token event records (rows running, pool pages in use, usage ratio),
    read on the engine thread between steps."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[tuple[int, int, float]] = []
        self.done: dict[int, Completion] = {}
        self.all_done = threading.Event()
        self.expected = 0

    def submit(self, key: int, ids: list[int], n: int) -> None:
        self.expected += 1
        self.all_done.clear()

        def on_event(event: Event) -> None:
            pool = self.engine.pool
            assert pool is not None
            if event.token is not None:
                self.seen.append((self.engine.running, pool.used_pages, self.engine.kv_cache_usage))
            if event.completion is not None:
                self.done[key] = event.completion
                if len(self.done) == self.expected:
                    self.all_done.set()

        self.engine.submit(GenerationRequest(ids, SamplingParams(), StoppingParams(n, min_new_tokens=n), on_event))

    def wait(self) -> None:
        assert self.all_done.wait(300), f"{len(self.done)} of {self.expected} done"


def test_four_choices_of_a_500_token_prompt_hold_its_pages_once(lm: LoadedModel) -> None:
    ids = prompt(lm, 500)
    engine = make_engine(lm, 4096, max_batch_size=8)
    pool = engine.pool
    assert pool is not None and pool.max_pages is not None
    try:
        runs = Watched(engine)
        with engine._cond:  # the four choices arrive together, as the API submits n > 1
            for key in range(4):
                runs.submit(key, ids, 8)
        runs.wait()
    finally:
        engine.stop()
    assert all(outputs(runs.done[k]) == outputs(runs.done[0]) for k in range(4))
    full = 500 // PAGE_SIZE  # 31 full prompt pages; each choice owns the page of tokens 496..511
    together = [(pages, usage) for rows, pages, usage in runs.seen if rows == 4]
    assert together, "the four choices ran together"
    assert max(pages for pages, _ in together) == full + 4, "the prompt's full pages are held once"
    budget_pages = engine.limits.max_batch_tokens / PAGE_SIZE
    assert all(usage == (full + 4) / budget_pages for _, usage in together), "usage: pages in use / budget pages"
    assert engine.kv_cache_usage == 0.0, "idle: the cached pages count as free"


def test_a_hit_references_the_cached_pages_copies_no_kv_and_keeps_the_bits(lm: LoadedModel) -> None:
    first, second = prompt(lm, 300), prompt(lm, 320)
    second[:300] = first  # shares the first prompt's 18 full pages (288 tokens)
    off = make_engine(lm, 0)
    try:
        runs = Watched(off)
        runs.submit(0, second, 8)
        runs.wait()
        expected = runs.done[0]
    finally:
        off.stop()
    engine = make_engine(lm, 4096)
    pool = engine.pool
    assert pool is not None
    try:
        runs = Watched(engine)
        runs.submit(0, first, 8)
        runs.wait()
        allocations, copies = pool.allocations, pool.copies
        runs.submit(1, second, 8)
        runs.wait()
    finally:
        engine.stop()
    got = runs.done[1]
    assert got.cached_tokens == 288
    # Tokens 288..327 (the prompt's rest and 8 new ones): three pages of its own; the hit's 18 are shared.
    assert pool.allocations - allocations == 3, "a hit allocates only the pages past the shared prefix"
    assert pool.copies == copies == 0, "no K/V is copied, on a hit or anywhere else"
    assert outputs(got) == outputs(expected), "a hit gives the bits of a run without the cache"
