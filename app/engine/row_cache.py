"""The KV cache of the compact forwards: one buffer for every layer, each row's tokens from column 0.

keys/values live in `kv` [2, layers, rows, kv_heads, columns, head_dim]. Row r holds its sequence's
tokens in columns [0, lengths[r]); nothing is padded, so attention can read exactly a row's own
tokens as a view. A decode step writes one column per row; a row that leaves is replaced by moving
later rows forward; rows that join are copied into spare rows. The buffer is reallocated only when
rows or columns run out.

Memory: `allocated_tokens` is rows x columns of capacity (one position = one token's keys and
values in every layer). With `columns` set (the widest any row may grow, which admission budgets),
capacity is exactly that wide and exactly as many rows as are live; without it (standalone use)
128 spare columns are kept and rows double. An optional account (anything with `charge(slots)` and
`release(slots)`, slots = rows x columns summed over layers) is charged for every live buffer,
including both sides of a reallocation.
"""

from typing import Protocol

import torch

_SPARE_COLUMNS = 128


class Account(Protocol):
    reallocations: int  # buffers replaced by larger ones (live rows copied)

    def charge(self, slots: int) -> None: ...
    def release(self, slots: int) -> None: ...


class RowCache:
    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        account: Account | None = None,
        columns: int | None = None,
    ) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.account = account
        self.columns = columns  # the widest a row may grow; sizes buffers exactly when set
        self.lengths: list[int] = []
        self.kv = torch.zeros((2, layers, 0, kv_heads, 0, head_dim), dtype=dtype, device=device)
        self._charged = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def allocated_tokens(self) -> int:
        """Capacity in token positions (rows x columns), spare included."""
        return self.kv.shape[2] * self.kv.shape[4]

    def keys(self, layer: int) -> torch.Tensor:
        return self.kv[0, layer]

    def values(self, layer: int) -> torch.Tensor:
        return self.kv[1, layer]

    def reserve(self, rows: int, columns: int) -> None:
        """Room for `rows` rows of `columns` columns; reallocates (copying live rows) if short."""
        have_rows, have_cols = self.kv.shape[2], self.kv.shape[4]
        if rows <= have_rows and columns <= have_cols:
            return
        exact = self.columns is not None
        new_cols = have_cols if columns <= have_cols else max(columns, self.columns or 0)
        if columns > have_cols and not exact:
            new_cols = columns + _SPARE_COLUMNS
        new_rows = have_rows if rows <= have_rows else (rows if exact else max(rows, 2 * have_rows))
        kv = self.kv.new_zeros((2, self.layers, new_rows, self.kv_heads, new_cols, self.head_dim))
        live, width = self.rows, max(self.lengths, default=0)
        if live and width:
            kv[:, :, :live, :, :width] = self.kv[:, :, :live, :, :width]
        if self.account is not None and self._charged:
            self.account.reallocations += 1
        self._adopt(kv)

    def _adopt(self, kv: torch.Tensor) -> None:
        slots = kv.shape[2] * kv.shape[4] * self.layers
        if self.account is not None:
            self.account.charge(slots)  # the old buffer is still alive: both are counted
            self.account.release(self._charged)
        self.kv, self._charged = kv, slots

    def release(self) -> None:
        """Drop the buffer (and its charge); the cache is empty afterwards."""
        self.lengths = []
        self._adopt(self.kv[:, :, :0, :, :0])

    def __del__(self) -> None:
        if self.account is not None and self._charged:
            self.account.release(self._charged)
            self._charged = 0

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep` (ascending); they move forward to rows 0..len(keep)-1."""
        moves = [(dst, src) for dst, src in enumerate(keep) if dst != src]
        if moves:
            width = max(self.lengths[src] for _, src in moves)
            # Every source is at or after its destination, so later moves never read overwritten rows.
            dst = torch.tensor([d for d, _ in moves], device=self.device)
            src = torch.tensor([s for _, s in moves], device=self.device)
            self.kv[:, :, dst, :, :width] = self.kv[:, :, src, :, :width]
        self.lengths = [self.lengths[i] for i in keep]

    def concatenate(self, other: "RowCache") -> None:
        """Append `other`'s rows after ours."""
        width = max(other.lengths, default=0)
        self.reserve(self.rows + other.rows, width)
        start = self.rows
        self.kv[:, :, start : start + other.rows, :, :width] = other.kv[:, :, : other.rows, :, :width]
        self.lengths = self.lengths + other.lengths
