"""`CompactRunner`: GPT-2 and Llama on textgen's own forward (app/engine/models/).

Rows live in a `CompactBatch` (app/engine/runner/compact_batch.py) over the runner's `KVPool`
(app/engine/kv/kv_pool.py: 16-token pages, a page table per row, reference counts). This runner also
owns what only this forward can do exactly: automatic prefix caching (`prefix_cache.PrefixCache`,
an index of pool pages, seen by the scheduler through `RowPrefixes` as counts) and speculative decoding
(app/engine/runner/speculative.py: drafts verified in one batch-invariant step, tokens reported to the
scheduler offset by offset).
"""

import logging

import torch

from app.engine.core.sequence import Sequence
from app.engine.core.step import Reservation, Update
from app.engine.kv.kv_cache import KVAccount
from app.engine.kv.kv_pool import KVPool
from app.engine.kv.prefix_cache import PrefixCache
from app.engine.models.base import CompactModel
from app.engine.runner import speculative as spec
from app.engine.runner.compact_batch import CompactBatch
from app.engine.runner.forward_options import ForwardOptions
from app.engine.runner.invariants import check_compact_batch
from app.engine.runner.runner import BatchRunner
from app.engine.runner.speculative import SpeculativeConfig

log = logging.getLogger("textgen.engine")


class RowPrefixes:
    """The scheduler's view of a `PrefixCache` (`scheduler.PrefixIndex`: counts only) and the
    runner's (the pages of a hit, the stores after a prefill). Keys are per block of a prompt's
    token ids, namespaced by the adapter's load (`_namespace`)."""

    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache

    @property
    def held_tokens(self) -> int:
        """Positions in cached pages no row references (evictable, so they count as free)."""
        return self.cache.tokens

    def _keys(self, seq: Sequence) -> list[bytes]:
        if seq.prefix_keys is None:
            # Prompt logprobs need the logits of every position they cover: only the tokens before
            # `prefill_details_from - 1` may come from the cache (prompt_keys leaves out the last).
            request = seq.request
            ids = request.prompt_ids[: request.prefill_details_from] if request.prefill_details else request.prompt_ids
            seq.prefix_keys = self.cache.prompt_keys(ids, _namespace(seq))
        return seq.prefix_keys

    def cached_tokens(self, seq: Sequence) -> int:
        return self.cache.cached_tokens(self._keys(seq))

    def evict_to(self, tokens: int) -> None:
        self.cache.evict_to(tokens)

    def hit(self, seq: Sequence) -> list[int]:
        """`seq`'s cached pages (one more reference each, for its row), now the most recently
        used; sets its `cached_tokens`."""
        pages = self.cache.match(self._keys(seq))
        seq.cached_tokens = seq.cacheable_tokens = len(pages) * self.cache.block_size
        return pages

    def store(self, batch: CompactBatch) -> None:
        """Index the full prompt pages of the rows just prefilled (no copy; it costs no room: the
        rows hold them). A row whose prompt pages are indexed already (n > 1 choices, twins in one
        prefill) shares those and frees its own."""
        for row, seq in enumerate(batch.seqs):
            self.cache.insert(seq.request.prompt_ids, batch.cache.tables[row], _namespace(seq))


def _namespace(seq: Sequence) -> bytes:
    """The prefix cache's namespace for `seq`'s K/V: the base model's (empty) or its adapter's load."""
    return b"" if seq.adapter is None else f"lora:{seq.adapter.load_id}".encode()


class CompactRunner(BatchRunner[CompactBatch]):
    def __init__(
        self,
        model: CompactModel,
        options: ForwardOptions,
        kv: KVAccount,
        *,
        kv_pages: int | None = None,
        prefix_cache_tokens: int = 0,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        super().__init__(model.device, kv)
        self.model = model
        self.options = options  # how this runner runs the model: kernels, KV dtype, compiled step
        # Every row, n > 1 choice and cached prefix lives in this pool; each page handed out is
        # charged to `kv`. `kv_pages`: its budget in pages (None: unbounded, standalone use).
        self._pool = KVPool(model.layers, model.kv_heads, model.head_dim, options.kv_dtype, model.device, kv_pages, kv)
        self.pool = self._pool
        self.prefixes: RowPrefixes | None = None
        if prefix_cache_tokens > 0:
            # Pages no row references stay cached only within what the live requests' planned peak
            # leaves of the budget (`StepPlan.prefix_room`, via `evict_to`), and the pool evicts
            # them when it runs short, so live requests win.
            self.prefix = PrefixCache(self._pool, prefix_cache_tokens)
            self.prefixes = self.prefix_index = RowPrefixes(self.prefix)
        self._drafter: spec.Drafter | None = None
        if speculative is not None:
            reason = spec.unsupported_reason(options)
            if reason is None:
                self.speculative = speculative
                self._drafter = spec.Drafter(speculative)
            else:
                log.warning("TEXTGEN_SPECULATIVE is off: exact verification is not possible on %s", reason)

    def prefill(
        self, seqs: list[Sequence], all_logits: bool = False, prefix_room: int = 0
    ) -> tuple[CompactBatch, torch.Tensor, torch.Tensor | None]:
        if self.prefixes is None:
            return CompactBatch.prefill(self.model, self.options, seqs, all_logits, self._pool)
        prefixes = []
        for seq in seqs:
            prefixes.append(self.prefixes.hit(seq))
            # A request that asked for every prompt token's logprob bypasses the cache (not counted).
            if not seq.request.prefill_details or seq.request.prefill_details_from:
                self._stats.prefix.append((seq.prompt_len, seq.cached_tokens))
        out = CompactBatch.prefill(self.model, self.options, seqs, all_logits, self._pool, prefixes)
        self.prefixes.store(out[0])
        return out

    def decode(self, batch: CompactBatch) -> torch.Tensor:
        return batch.decode(self.model, self.options)

    def _decode(self, batch: CompactBatch, update: Update) -> None:
        drafts = self._drafts(batch)
        if drafts is None:
            super()._decode(batch, update)
            return
        try:
            logits = spec.verify(batch, self.model, self.options, drafts)
        except torch.OutOfMemoryError as exc:
            self._decode_out_of_memory(batch, update, exc)
            return
        self._stats.count_step("decode")
        self._stats.decode_rows += len(batch)
        self._stats.speculative.append((sum(len(d) > 0 for d in drafts), sum(len(d) for d in drafts), 0))
        offset = 0

        def emit(rows: list[int], logits: torch.Tensor) -> list[int | None]:
            nonlocal offset
            tokens = self._emit([batch.seqs[r] for r in rows], batch.sampling.select(rows), logits, update)
            # Drafts accepted at this offset, counted now so they ride on the next report: a
            # request's last event never waits on them (its finishing token is no acceptance).
            j, offset = offset, offset + 1
            hits = sum(
                t is not None and j < len(drafts[r]) and t == drafts[r][j] for r, t in zip(rows, tokens, strict=True)
            )
            self._stats.speculative.append((0, 0, hits))
            return tokens

        keep, accepted = spec.accept(batch, drafts, logits, emit)
        assert self._drafter is not None  # drafts come from it
        self._drafter.record(batch.seqs, drafts, accepted)
        self.batch = self._keep(batch, keep)

    def _drafts(self, batch: CompactBatch) -> list[list[int]] | None:
        """Each row's draft tokens for this step, or None when speculation is off or no row has one."""
        if self._drafter is None:
            return None
        drafts = self._drafter.drafts(batch.seqs)
        return drafts if any(drafts) else None

    def join(self, batch: CompactBatch, joined: CompactBatch) -> None:
        batch.extend(joined)
        joined.cache.release()

    def reserve(self, batch: CompactBatch, seqs: list[Sequence], reservation: Reservation) -> None:
        """Nothing to size: rows take pages from the pool as they grow."""

    def free(self, batch: CompactBatch) -> None:
        batch.cache.release()

    def check(self) -> None:
        if self.batch is not None:
            check_compact_batch(self.batch)
