"""Which runner serves a loaded model (the Engine and the load-time self-test use the same one)."""

from app.engine.kv.kv_cache import KVAccount
from app.engine.load.loader import LoadedModel
from app.engine.runner.compact_runner import CompactRunner
from app.engine.runner.speculative import SpeculativeConfig
from app.engine.runner.transformers_runner import TransformersRunner


def make_runner(
    loaded: LoadedModel,
    kv: KVAccount,
    prefix_cache_tokens: int = 0,
    speculative: SpeculativeConfig | None = None,
    kv_pages: int | None = None,
) -> CompactRunner | TransformersRunner:
    """The compact forward's runner for GPT-2 and Llama (unless TEXTGEN_COMPACT_FORWARD=false),
    the transformers forward's for every other causal LM. Its KV buffers are charged to `kv`;
    `kv_pages` bounds the compact runner's KV pool (None: unbounded)."""
    if loaded.compact is not None:
        assert loaded.forward_options is not None  # the loader sets it with `compact`
        return CompactRunner(
            loaded.compact,
            loaded.forward_options,
            kv,
            kv_pages=kv_pages,
            prefix_cache_tokens=prefix_cache_tokens,
            speculative=speculative,
        )
    return TransformersRunner(loaded.model, kv, speculative)
