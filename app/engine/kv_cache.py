"""A KV cache whose layers live in preallocated slabs, so steps and batch changes copy little.

transformers' DynamicLayer concatenates the whole cache on every decode step, and rebuilding it
whenever a row joins or leaves copies every row again: at batch 32 and a few hundred tokens that
is hundreds of MB per event, as costly as a decode step. Here each layer owns a buffer
[rows, heads, columns, dim] with spare rows and columns. The live cache is the view
[:n, :, start:end]: a decode step writes one column; a row that leaves is replaced by moving a
later row into its place; a row that joins is written into a spare row; padding columns no row
needs are dropped by moving `start`. Whole buffers are copied only when they run out of room.
"""

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

_SPARE_COLUMNS = 128


class SlabLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.rows = key_states.shape[0]
        self.start = self.end = 0
        self._k = key_states.new_zeros((self.rows, key_states.shape[1], 0, key_states.shape[-1]))
        self._v = value_states.new_zeros((self.rows, value_states.shape[1], 0, value_states.shape[-1]))
        self.is_initialized = True

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
            self._reallocate(self._k.shape[0], self.length + added + _SPARE_COLUMNS, left=0)
        self._k[: self.rows, :, self.end : self.end + added] = key_states
        self._v[: self.rows, :, self.end : self.end + added] = value_states
        self.end += added
        self._expose()
        return self.keys, self.values

    def _reallocate(self, row_capacity: int, column_capacity: int, left: int) -> None:
        """Fresh buffers; the live region is copied to columns [left, left + length)."""
        k, v = self._k[: self.rows, :, self.start : self.end], self._v[: self.rows, :, self.start : self.end]
        shape = (row_capacity, k.shape[1], column_capacity, k.shape[-1])
        self._k, self._v = k.new_zeros(shape), v.new_zeros(shape)
        length = self.length
        self._k[: self.rows, :, left : left + length] = k
        self._v[: self.rows, :, left : left + length] = v
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
            columns = max(self._k.shape[2], grow_left + self.length + _SPARE_COLUMNS)
            self._reallocate(max(rows, 2 * self._k.shape[0]), columns, left=grow_left)
        if grow_left:
            self._k[: self.rows, :, self.start - grow_left : self.start] = 0
            self._v[: self.rows, :, self.start - grow_left : self.start] = 0
            self.start -= grow_left
        new = slice(self.rows, rows)
        pad = self.length - other.length
        self._k[new, :, self.start : self.start + pad] = 0
        self._v[new, :, self.start : self.start + pad] = 0
        self._k[new, :, self.start + pad : self.end] = other.keys
        self._v[new, :, self.start + pad : self.end] = other.values
        self.rows = rows
        self._expose()


class SlabCache(Cache):
    """One SlabLayer per decoder layer, created as the model first writes to each."""

    def __init__(self, config: PretrainedConfig | None = None) -> None:
        super().__init__(layer_class_to_replicate=SlabLayer)

    def select(self, keep: list[int], drop_columns: int) -> None:
        """Keep rows `keep` (ascending) and drop the first `drop_columns` columns."""
        for layer in self.layers:
            layer.select(keep, drop_columns)

    def concatenate(self, other: "SlabCache") -> None:
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.concatenate(theirs)
