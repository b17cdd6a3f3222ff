"""A KV cache whose layers live in preallocated slabs, so steps and batch changes copy little.

transformers' DynamicLayer concatenates the whole cache on every decode step, and rebuilding it
whenever a row joins or leaves copies every row again: at batch 32 and a few hundred tokens that
is hundreds of MB per event, as costly as a decode step. Here each layer owns a buffer
[rows, heads, columns, dim] with spare rows and columns. The live cache is the view
[:n, :, start:end]: a decode step writes one column; a row that leaves is replaced by moving a
later row into its place; a row that joins is written into a spare row; padding columns no row
needs are dropped by moving `start`. Whole buffers are copied only when they run out of room.

Memory is honest when the cache is given a `KVAccount` and a column target (`SlabCache.columns`,
the widest its live region may grow, which admission has budgeted): buffers then get no columns
beyond the target and spare rows only up to `SlabCache.max_rows` (what the budget allows), and
every buffer alive is counted, including both sides of a copy. Without a target (standalone use)
they keep 128 spare columns and double their rows.
"""

import math
from collections.abc import Callable
from typing import cast

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

_SPARE_COLUMNS = 128


class KVAccount:
    """KV positions held by every cache of one engine, now and at the peak. One position is one
    token's keys and values in every layer; a layer's buffer of rows x columns counts
    rows x columns / layers. Only the engine thread charges and releases."""

    def __init__(self, layers: int) -> None:
        self.layers = max(layers, 1)
        self._slots = 0  # rows x columns summed over every live layer buffer
        self._peak = 0
        self.reallocations = 0  # buffers replaced by larger or compacted ones (per layer)

    @property
    def allocated(self) -> int:
        return math.ceil(self._slots / self.layers)

    @property
    def peak(self) -> int:
        return math.ceil(self._peak / self.layers)

    def reset_peak(self) -> None:
        self._peak = self._slots

    def charge(self, slots: int) -> None:
        self._slots += slots
        self._peak = max(self._peak, self._slots)

    def release(self, slots: int) -> None:
        self._slots -= slots


def _refuse(name: str) -> Callable[..., None]:
    def refused(self: object, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"{type(self).__name__}.{name} is not supported: the engine's batch changes rows with "
            "select/concatenate, which keep the preallocated buffers consistent"
        )

    refused.__name__ = name
    return refused


class SlabLayer(DynamicLayer):
    def __init__(self, cache: "SlabCache | None" = None) -> None:
        super().__init__()
        self.cache = cache
        self._charged = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.rows = key_states.shape[0]
        self.start = self.end = 0
        self._k = key_states.new_zeros((self.rows, key_states.shape[1], 0, key_states.shape[-1]))
        self._v = value_states.new_zeros((self.rows, value_states.shape[1], 0, value_states.shape[-1]))
        self.is_initialized = True

    def _columns(self, needed: int) -> int:
        """Column capacity for a live region of `needed` columns that will keep growing."""
        target = self.cache.columns if self.cache is not None else None
        return needed + _SPARE_COLUMNS if target is None else max(needed, target)

    @property
    def _exact(self) -> bool:
        return self.cache is not None and self.cache.columns is not None

    def _row_capacity(self, needed: int) -> int:
        """Rows for buffers that must hold `needed`: doubling, so joins rarely copy, but in
        budgeted use never past `max_rows`."""
        doubled = max(needed, 2 * self._k.shape[0])
        if not self._exact:
            return doubled
        limit = self.cache.max_rows if self.cache is not None else None
        return max(needed, min(doubled, limit or needed))

    def _set_buffers(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Adopt new buffers; the caller built them while the old ones were alive (both counted)."""
        slots = k.shape[0] * k.shape[2]
        account = self.cache.account if self.cache is not None else None
        if account is not None:
            account.charge(slots)
            account.reallocations += self._charged > 0
        self._k, self._v = k, v
        if account is not None:
            account.release(self._charged)
        self._charged = slots

    def release(self) -> None:
        """Drop the buffers (and their charge); the layer is empty afterwards."""
        account = self.cache.account if self.cache is not None else None
        if account is not None and self._charged:
            account.release(self._charged)
        self._charged = 0
        if self.is_initialized:
            self._k = self._k[:0, :, :0]
            self._v = self._v[:0, :, :0]
            self.rows = self.start = self.end = 0
            self._expose()

    def __del__(self) -> None:
        account = self.cache.account if self.cache is not None else None
        if account is not None and self._charged:
            account.release(self._charged)
            self._charged = 0

    def reset(self) -> None:
        self.release()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest `-tokens_to_remove` columns (transformers' negative convention)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of columns to remove, not {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.end = max(self.start, self.end + tokens_to_remove)
        self._expose()

    batch_repeat_interleave = _refuse("batch_repeat_interleave")
    batch_select_indices = _refuse("batch_select_indices")
    reorder_cache = _refuse("reorder_cache")
    offload = _refuse("offload")
    prefetch = _refuse("prefetch")

    @property
    def length(self) -> int:
        return self.end - self.start

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        added = key_states.shape[-2]
        if self.end + added > self._k.shape[2]:
            rows = self._k.shape[0]
            if self._exact:  # spare rows only while the budget still allows them
                rows = max(self.rows, min(rows, (self.cache.max_rows if self.cache else None) or self.rows))
            self._reallocate(rows, self._columns(self.length + added), left=0)
        self._k[: self.rows, :, self.end : self.end + added] = key_states
        self._v[: self.rows, :, self.end : self.end + added] = value_states
        self.end += added
        self._expose()
        assert self.keys is not None and self.values is not None  # _expose set both
        return self.keys, self.values

    def _reallocate(self, row_capacity: int, column_capacity: int, left: int) -> None:
        """Fresh buffers; the live region is copied to columns [left, left + length)."""
        k, v = self._k[: self.rows, :, self.start : self.end], self._v[: self.rows, :, self.start : self.end]
        new_k = k.new_zeros((row_capacity, k.shape[1], column_capacity, k.shape[-1]))
        new_v = v.new_zeros((row_capacity, v.shape[1], column_capacity, v.shape[-1]))  # V's head size may differ
        length = self.length
        new_k[: self.rows, :, left : left + length] = k
        new_v[: self.rows, :, left : left + length] = v
        del k, v
        self._set_buffers(new_k, new_v)
        self.start, self.end = left, left + length

    def _expose(self) -> None:
        self.keys = self._k[: self.rows, :, self.start : self.end]
        self.values = self._v[: self.rows, :, self.start : self.end]

    def select(self, keep: list[int], drop_columns: int) -> None:
        """Keep rows `keep` (ascending) and drop the first `drop_columns` live columns."""
        moves = [(dst, src) for dst, src in enumerate(keep) if dst != src]
        if moves:
            # Every source is at or after its destination, so later moves never read overwritten rows.
            dst = torch.tensor([d for d, _ in moves], device=self.device)
            src = torch.tensor([s for _, s in moves], device=self.device)
            self._k[dst, :, self.start : self.end] = self._k[src, :, self.start : self.end]
            self._v[dst, :, self.start : self.end] = self._v[src, :, self.start : self.end]
        self.rows = len(keep)
        self.start += drop_columns
        self._expose()

    def concatenate(self, other: "SlabLayer") -> None:
        """Append `other`'s rows, right-aligned with ours (left padding is zeros, and masked)."""
        grow_left = max(0, other.length - self.length)
        rows = self.rows + other.rows
        if rows > self._k.shape[0] or grow_left > self.start:
            columns = self._columns(grow_left + self.length)
            if not self._exact:
                columns = max(self._k.shape[2], columns)
            self._reallocate(self._row_capacity(rows), columns, left=grow_left)
        if grow_left:
            self._k[: self.rows, :, self.start - grow_left : self.start] = 0
            self._v[: self.rows, :, self.start - grow_left : self.start] = 0
            self.start -= grow_left
        new = slice(self.rows, rows)
        pad = self.length - other.length
        self._k[new, :, self.start : self.start + pad] = 0
        self._v[new, :, self.start : self.start + pad] = 0
        assert other.keys is not None and other.values is not None  # `other` has been written
        self._k[new, :, self.start + pad : self.end] = other.keys
        self._v[new, :, self.start + pad : self.end] = other.values
        self.rows = rows
        self._expose()


class SlabCache(Cache):
    """One SlabLayer per decoder layer, created as the model first writes to each.

    `account` counts what the buffers hold; `columns`, when set, is the widest the live region
    may grow (the longest reservation among the rows) and sizes every buffer's columns exactly;
    `max_rows` then caps spare rows (None: none)."""

    def __init__(
        self, config: PretrainedConfig | None = None, account: KVAccount | None = None, columns: int | None = None
    ) -> None:
        # transformers types this as a class but only calls it, so a factory serves.
        super().__init__(layer_class_to_replicate=lambda: SlabLayer(self))  # type: ignore[arg-type]
        self.account = account
        self.columns = columns
        self.max_rows: int | None = None

    @property
    def allocated_tokens(self) -> int:
        """Rows x columns of the first layer's buffers (every layer has the same shape)."""
        layer = self.layers[0] if self.layers else None
        return layer._charged if isinstance(layer, SlabLayer) else 0

    @property
    def slabs(self) -> list[SlabLayer]:
        """`layers`, typed: every layer is made by the factory given to `Cache.__init__`."""
        return cast(list[SlabLayer], self.layers)

    def release(self) -> None:
        for layer in self.slabs:
            layer.release()

    def reset(self) -> None:
        self.release()

    def select(self, keep: list[int], drop_columns: int) -> None:
        """Keep rows `keep` (ascending) and drop the first `drop_columns` columns."""
        for layer in self.slabs:
            layer.select(keep, drop_columns)

    def concatenate(self, other: "SlabCache") -> None:
        for mine, theirs in zip(self.slabs, other.slabs, strict=True):
            mine.concatenate(theirs)
