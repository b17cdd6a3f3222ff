"""The KV cache of the compact forwards: one buffer for every layer, each row's tokens from column 0.

Each layer's keys/values live in `kv[layer]` [2, rows, kv_heads, columns, head_dim]. Row r holds its sequence's
tokens in columns [0, lengths[r]); nothing is padded, so attention can read exactly a row's own
tokens as a view. A decode step writes one column per row; a row that leaves is replaced by moving
later rows forward; rows that join are copied into spare rows. The buffer is reallocated only when
rows or columns run out, one layer at a time, so a reallocation holds at most one layer's old and
new buffers together (the transient the KV budget allows for: 1/layers of the cache).

Memory: `allocated_tokens` is rows x columns of capacity (one position = one token's keys and
values in every layer). Columns are allocated in multiples of the decode attention's CHUNK, so
attention reads whole chunks in place (app/engine/attention.py); admission rounds widths the same
way (`Limits.column_multiple`), so it budgets what is allocated. With `columns` set (the widest any row may
grow, which admission budgets), capacity is exactly that wide (rounded) and exactly as many rows
as are live; without it (standalone use)
128 spare columns are kept and rows double. An optional account (anything with `charge(slots)` and
`release(slots)`, slots = rows x columns summed over layers) is charged for every live buffer,
including both sides of a reallocation.
"""

from typing import Protocol

import torch

from app.engine.attention import chunk_width

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
        self.kv = [self._empty(0, 0) for _ in range(layers)]
        self._charged = 0  # slots charged to the account: rows x columns summed over layers

    def _empty(self, rows: int, columns: int) -> torch.Tensor:
        return torch.zeros((2, rows, self.kv_heads, columns, self.head_dim), dtype=self.dtype, device=self.device)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, columns) the buffers hold, spare included."""
        return self.kv[0].shape[1], self.kv[0].shape[3]

    @property
    def allocated_tokens(self) -> int:
        """Capacity in token positions (rows x columns), spare included."""
        rows, columns = self.capacity
        return rows * columns

    def keys(self, layer: int) -> torch.Tensor:
        return self.kv[layer][0]

    def values(self, layer: int) -> torch.Tensor:
        return self.kv[layer][1]

    def reserve(self, rows: int, columns: int) -> None:
        """Room for `rows` rows of `columns` columns; reallocates (copying live rows) if short."""
        have_rows, have_cols = self.capacity
        if rows <= have_rows and columns <= have_cols:
            return
        exact = self.columns is not None
        if self.columns is not None:
            # Exactly the current reservation: columns left over from rows that have gone are dropped,
            # so the new buffers are never larger than the rectangle admission budgeted.
            new_cols = max(columns, self.columns, max(self.lengths, default=0))
        else:
            new_cols = have_cols if columns <= have_cols else columns + _SPARE_COLUMNS
        new_cols = chunk_width(new_cols)
        if exact:  # rows left over from sequences that have gone are dropped too
            new_rows = max(rows, self.rows)
        else:
            new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        if self.account is not None and self._charged:
            self.account.reallocations += 1
        self._replace(new_rows, new_cols, copy=True)

    def _replace(self, rows: int, columns: int, copy: bool) -> None:
        """New buffers of `rows` x `columns`, layer by layer (live rows copied when `copy`)."""
        live, width = self.rows, max(self.lengths, default=0)
        old_slots = self.kv[0].shape[1] * self.kv[0].shape[3]
        new_slots = rows * columns
        for layer in range(self.layers):
            new = self._empty(rows, columns)
            if self.account is not None:
                self.account.charge(new_slots)  # this layer's old buffer is still alive: both count
            if copy and live and width:
                new[:, :live, :, :width] = self.kv[layer][:, :live, :, :width]
            self.kv[layer] = new
            if self.account is not None:
                self.account.release(old_slots)
        self._charged = new_slots * self.layers

    def release(self) -> None:
        """Drop the buffers (and their charge); the cache is empty afterwards."""
        self.lengths = []
        self._replace(0, 0, copy=False)

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
            for kv in self.kv:
                kv[:, dst, :, :width] = kv[:, src, :, :width]
        self.lengths = [self.lengths[i] for i in keep]

    def concatenate(self, other: "RowCache") -> None:
        """Append `other`'s rows after ours."""
        width = max(other.lengths, default=0)
        self.reserve(self.rows + other.rows, width)
        start = self.rows
        for mine, theirs in zip(self.kv, other.kv, strict=True):
            mine[:, start : start + other.rows, :, :width] = theirs[:, : other.rows, :, :width]
        self.lengths = self.lengths + other.lengths
