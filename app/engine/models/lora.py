"""LoRA adapters served unmerged: read with peft's loaders, applied per token row in the compact forward.

Why not peft's mixed-adapter batch (`adapter_names=` per row): it works by hooking the
`nn.Module.forward` of each adapted layer, and the compact forward (app/engine/models/) never
calls those, it reads the weights and runs `linear()` itself. So the adapter is read and validated
with peft's own code (`PeftConfig.from_pretrained`, `load_peft_weights`, its scaling rule
`lora_alpha / r`, or `/ sqrt(r)` with rslora) and applied the way peft's mixed batch does: the
token rows are grouped by adapter and each group gets `(x @ A.T) @ B.T * scale` added to the base
layer's output. Nothing is precomputed from the base weights, so an adapter costs only its A and
B matrices (rank x (in + out) per adapted layer).

Models on the transformers forward (not GPT-2/Llama) serve no unmerged adapter: loading one is
refused (`AdapterRefusedError`) and `--adapter` merges into them as before.
"""

import itertools
import math
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from app.engine.core.types import AdapterRef, EngineError
from app.engine.models.activations import ACTIVATIONS
from app.engine.models.base import CompactModel, Weight, linear, pad_rows


class AdapterError(EngineError):
    """Base for adapter errors raised to callers."""


class UnknownAdapterError(AdapterError):
    """No adapter of that name is loaded (or it is being unloaded): 404 (OpenAI) / 422 (TGI)."""


class AdapterRefusedError(AdapterError):
    """The adapter cannot be served on this base (wrong base, rank, target modules, format): 400/422."""


class AdapterLimitError(AdapterError):
    """TEXTGEN_MAX_LORAS adapters are loaded already: 409."""


class AdapterExistsError(AdapterError):
    """An adapter of that name is loaded (or loading) already: 400, as vLLM answers it."""


@dataclass(frozen=True)
class LoraWeights:
    """One adapted layer: a [rank, in], b [out, rank], scale = lora_alpha / rank (or / sqrt(rank))."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


_LOADS = itertools.count(1)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what peft's load_peft_weights reads


@dataclass(eq=False)
class Adapter:
    """A loaded adapter. `modules` maps (layer index, slot) to its weights, the slot being the
    module path inside a block (`attn.c_attn`, `self_attn.q_proj`)."""

    name: str
    path: str
    rank: int
    modules: dict[tuple[int, str], LoraWeights]
    in_flight: int = field(default=0)
    unloading: bool = field(default=False)
    # Unique per load (names and paths can be reused after an unload): the prefix cache's namespace.
    load_id: int = field(default_factory=lambda: next(_LOADS))


def read_adapter(name: str, path: str, model: CompactModel, max_rank: int, base_name: str = "") -> Adapter:
    """Read a PEFT LoRA adapter directory and check it fits `model`.

    Raises AdapterRefusedError naming the mismatch: not a LoRA adapter, a variant we do not apply
    (DoRA, LoRA bias, per-module rank/alpha patterns, modules_to_save), a rank above `max_rank`,
    a target module the base does not have, or a weight shape that is not the base's (an adapter
    for another base model)."""
    from peft import LoraConfig, PeftConfig
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise AdapterRefusedError(f"'{path}' is not a PEFT adapter directory: {_first_line(exc)}") from exc
    if not isinstance(config, LoraConfig):
        raise AdapterRefusedError(f"'{path}' is a {config.peft_type} adapter; only LoRA adapters are served")
    unsupported = [
        flag
        for flag, on in (
            ("use_dora", config.use_dora),
            ("lora_bias", config.lora_bias),
            ("rank_pattern", bool(config.rank_pattern)),
            ("alpha_pattern", bool(config.alpha_pattern)),
            ("modules_to_save", bool(config.modules_to_save)),
        )
        if on
    ]
    if unsupported:
        raise AdapterRefusedError(
            f"adapter '{name}' uses {', '.join(unsupported)}, which unmerged serving does not apply"
        )
    # peft reads adapter_config.json without checking types or ranges; a bad value would be a 500.
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r < 1:
        raise AdapterRefusedError(
            f"adapter '{name}' has r={config.r!r} in adapter_config.json; it must be an integer >= 1"
        )
    alpha = config.lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterRefusedError(
            f"adapter '{name}' has lora_alpha={alpha!r} in adapter_config.json; it must be a number"
        )
    if config.r > max_rank:
        raise AdapterRefusedError(
            f"adapter '{name}' has rank {config.r}, above the ceiling TEXTGEN_MAX_LORA_RANK={max_rank}"
        )
    trained_on = f" (trained on base_model_name_or_path={config.base_model_name_or_path!r})"
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in WEIGHT_FILES):
        raise AdapterRefusedError(
            f"adapter '{name}' has no weights: '{path}' holds neither {' nor '.join(WEIGHT_FILES)}"
        )
    try:
        tensors = load_peft_weights(path, device="cpu")
    except Exception as exc:  # safetensors' SafetensorError, pickle errors in a .bin: all a bad file
        raise AdapterRefusedError(f"cannot read the weights of adapter '{name}': {_first_line(exc)}") from exc
    targets = model.lora_targets()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, sep, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise AdapterRefusedError(f"adapter '{name}' has a tensor unmerged serving does not apply: {key}")
        if module not in targets:
            raise AdapterRefusedError(
                f"adapter '{name}' targets module '{module}', which the base model {base_name} does not have"
                f"{trained_on}"
            )
        pairs.setdefault(module, {})[part[0]] = tensor
    if not pairs:
        raise AdapterRefusedError(f"adapter '{name}' holds no LoRA weights")
    scale_of = (lambda r: alpha / math.sqrt(r)) if config.use_rslora else (lambda r: alpha / r)
    modules: dict[tuple[int, str], LoraWeights] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterRefusedError(f"adapter '{name}' has lora_A or lora_B missing for module '{module}'")
        layer, slot, out_features, in_features = targets[module]
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise AdapterRefusedError(
                f"adapter '{name}' has lora_B {list(b.shape)} and lora_A {list(a.shape)} at '{module}', "
                "which do not multiply (lora_B must be [out, r] and lora_A [r, in])"
            )
        rank = a.shape[0]
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise AdapterRefusedError(
                f"adapter '{name}' does not fit the base model {base_name}: module '{module}' takes "
                f"[{out_features}, {in_features}] but the adapter's lora_B @ lora_A is "
                f"[{b.shape[0]}, {a.shape[1]}]{trained_on}"
            )
        if rank != config.r:
            # peft scales by lora_alpha / r from the config; a mismatch means a broken adapter.
            raise AdapterRefusedError(
                f"adapter '{name}' has rank {rank} at '{module}' but r={config.r} in adapter_config.json"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterRefusedError(f"adapter '{name}' has NaN or infinite weights at '{module}'")
        modules[(layer, slot)] = LoraWeights(
            a.to(model.device, model.dtype).contiguous(),
            b.to(model.device, model.dtype).contiguous(),
            scale_of(rank),
        )
    return Adapter(name, path, config.r, modules)


class LoraRows:
    """Which token rows of one packed forward use which adapter; applies their deltas.

    Batch invariance: each adapter's rows are gathered into their own sub-batch, padded with zero
    rows to the forward's row multiple like every other GEMM, so a row's delta has the same bits
    whatever its batchmates are; base rows never see an adapter op, so they stay bitwise what they
    are without adapters."""

    def __init__(self, row_multiple: int, groups: list[tuple[Adapter, torch.Tensor]]) -> None:
        self.row_multiple = row_multiple
        self.groups = groups

    @classmethod
    def build(
        cls, model: CompactModel, adapters: Seq[AdapterRef | None], counts: list[int], row_multiple: int
    ) -> "LoraRows | None":
        """`adapters[r]` is sequence r's adapter (an `Adapter`: the registry hands out no other),
        `counts[r]` its token rows (packed in order); each adapter's rows are padded to a multiple
        of `row_multiple` (the runner's `ForwardOptions.row_multiple`, 1 when not batch invariant)."""
        if not any(adapters):
            return None
        rows: dict[int, tuple[Adapter, list[int]]] = {}
        start = 0
        for adapter, count in zip(adapters, counts, strict=True):
            if adapter is not None:
                rows.setdefault(id(adapter), (cast(Adapter, adapter), []))[1].extend(range(start, start + count))
            start += count
        device = model.device
        return cls(row_multiple, [(a, torch.tensor(r, dtype=torch.long, device=device)) for a, r in rows.values()])

    @staticmethod
    def _delta(xs: torch.Tensor, count: int, w: LoraWeights) -> torch.Tensor:
        """The LoRA delta of the first `count` of the (padded) rows `xs`."""
        return linear(linear(xs, w.a, None), w.b, None)[:count] * w.scale

    def apply(
        self,
        layer: int,
        slot: str,
        x: torch.Tensor,
        weight: Weight,
        bias: torch.Tensor | None,
        activation: str,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """`out` (= activation(linear(x))) with the adapters' deltas added before the activation."""
        for adapter, rows in self.groups:
            w = adapter.modules.get((layer, slot))
            if w is None:
                continue
            count = rows.shape[0]
            xs = pad_rows(x.index_select(0, rows), self.row_multiple)
            if activation == "none":
                out.index_add_(0, rows, self._delta(xs, count, w))
                continue
            # The activation is fused into the base GEMM, so these rows redo the GEMM unfused and
            # take the activation one row at a time: an elementwise op's bits may depend on where a
            # row falls in the tensor (vector body vs scalar tail), and one row is always the same.
            pre = linear(xs, weight, bias)[:count] + self._delta(xs, count, w)
            act = ACTIVATIONS[activation]
            out.index_copy_(0, rows, torch.cat([act(pre[i : i + 1]) for i in range(pre.shape[0])]))
        return out


class AdapterRegistry:
    """The adapters loaded on one compact model, by name; thread-safe.

    Loading reads and checks files on the caller's thread (never the engine's). Requests hold an
    adapter from `acquire` (at submit) to `release` (when they finish); `unload` refuses new
    requests for the name at once and waits for the held ones to finish before dropping it."""

    def __init__(
        self,
        model: CompactModel | None,
        base_name: str,
        max_loras: int,
        max_rank: int,
        on_change: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.model = model
        self.base_name = base_name
        self.max_loras = max_loras
        self.max_rank = max_rank
        self._on_change = on_change  # (event "load"/"unload", name, seconds)
        self._cond = threading.Condition()
        self._adapters: dict[str, Adapter] = {}
        self._loading: set[str] = set()

    def names(self) -> list[str]:
        with self._cond:
            return [n for n, a in self._adapters.items() if not a.unloading]

    def __len__(self) -> int:
        with self._cond:
            return len(self._adapters)

    def get(self, name: str) -> Adapter | None:
        with self._cond:
            adapter = self._adapters.get(name)
            return None if adapter is None or adapter.unloading else adapter

    def load(self, name: str, path: str | Path) -> Adapter:
        """Read, check and add adapter `name` from `path`. Raises AdapterRefusedError (does not
        fit, or this model serves no unmerged adapter), AdapterExistsError (name taken) or
        AdapterLimitError (TEXTGEN_MAX_LORAS loaded)."""
        started = time.perf_counter()
        if self.model is None:
            raise AdapterRefusedError(
                "unmerged adapters need the compact forward (GPT-2 or Llama with TEXTGEN_COMPACT_FORWARD=true); "
                "this model runs on the transformers forward: merge one adapter with --adapter instead"
            )
        if not name or name == self.base_name:
            raise AdapterRefusedError(f"adapter name {name!r} is empty or the base model's name")
        with self._cond:
            if name in self._adapters or name in self._loading:
                raise AdapterExistsError(f"an adapter named '{name}' is already loaded; unload it first")
            if len(self._adapters) + len(self._loading) >= self.max_loras:
                raise AdapterLimitError(f"{self.max_loras} adapters are loaded (TEXTGEN_MAX_LORAS); unload one first")
            self._loading.add(name)
        try:
            adapter = read_adapter(name, str(path), self.model, self.max_rank, self.base_name)
        finally:
            with self._cond:
                self._loading.discard(name)
        with self._cond:
            self._adapters[name] = adapter
        if self._on_change is not None:
            self._on_change("load", name, time.perf_counter() - started)
        return adapter

    def unload(self, name: str, timeout: float | None = None) -> None:
        """Stop new requests for `name`, wait for its in-flight ones, then drop it. Raises
        UnknownAdapterError, or TimeoutError (the adapter stays, refusing new requests, until
        its requests end; a later unload finishes the job)."""
        started = time.perf_counter()
        with self._cond:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise UnknownAdapterError(f"no adapter named '{name}' is loaded")
            adapter.unloading = True
            if not self._cond.wait_for(lambda: adapter.in_flight == 0, timeout):
                raise TimeoutError(f"adapter '{name}' still has {adapter.in_flight} requests in flight")
            if self._adapters.get(name) is not adapter:
                # A concurrent unload of the same adapter removed it first: one removal, one
                # success (as vLLM: the other finds no such adapter), and one "unload" event.
                raise UnknownAdapterError(f"no adapter named '{name}' is loaded")
            del self._adapters[name]
        if self._on_change is not None:
            self._on_change("unload", name, time.perf_counter() - started)

    def acquire(self, name: str) -> Adapter:
        """Hold adapter `name` for one request. Raises UnknownAdapterError."""
        with self._cond:
            adapter = self._adapters.get(name)
            if adapter is None or adapter.unloading:
                known = ", ".join(sorted(n for n, a in self._adapters.items() if not a.unloading)) or "none"
                raise UnknownAdapterError(
                    f"the model '{name}' does not exist: serving '{self.base_name}' and adapters: {known}"
                )
            adapter.in_flight += 1
            return adapter

    def release(self, adapter: AdapterRef) -> None:
        """Let go of an adapter `acquire` handed out (a sequence holds it as an `AdapterRef`)."""
        with self._cond:
            cast(Adapter, adapter).in_flight -= 1
            self._cond.notify_all()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
