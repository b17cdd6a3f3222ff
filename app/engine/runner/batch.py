"""The running batch: sequences, their shared left-padded KV cache, masks and positions.

Sequences join (`extend`) and leave (`filter`) between decode steps. The cache is one
rectangle [batch, heads, length, dim] per layer, left-padded so every row ends at the same
column; padding is masked out and position ids count only real tokens, so a row decodes exactly
as it would alone. After rows leave, columns that are padding in every remaining row are cut.
"""

from collections.abc import Sequence as Seq

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from app.engine.core.sequence import Sequence
from app.engine.kv.kv_cache import KVAccount, SlabCache
from app.engine.sample.sampling import SamplingState


class Batch:
    def __init__(
        self,
        seqs: list[Sequence],
        cache: SlabCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        self.seqs = seqs
        self.cache = cache
        self.mask = mask  # [batch, cache length], 1 for real tokens
        self.positions = positions  # [batch], position id of each row's next token
        self.next_ids = torch.zeros(len(seqs), dtype=torch.long, device=mask.device)
        self.sampling = SamplingState.of(seqs)  # built once per row; follows filter and extend

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @classmethod
    def prefill(
        cls, model: PreTrainedModel, seqs: list[Sequence], all_logits: bool, account: KVAccount | None = None
    ) -> tuple["Batch", torch.Tensor, torch.Tensor | None]:
        """Run the prompts of `seqs` (left-padded together). Returns the batch, the last
        position's logits [batch, vocab], and every position's logits when `all_logits`.
        With an `account`, the cache is charged to it and sized exactly to the prompts."""
        device = model.device
        longest = max(s.prompt_len for s in seqs)
        ids = torch.zeros((len(seqs), longest), dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, longest - seq.prompt_len :] = torch.tensor(seq.request.prompt_ids)
            mask[row, longest - seq.prompt_len :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = SlabCache(model.config, account, longest if account is not None else None)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        next_positions = positions[:, -1] + 1
        batch = cls(list(seqs), cache, mask, next_positions)
        return batch, out.logits[:, -1, :], out.logits if all_logits else None

    def decode(self, model: PreTrainedModel) -> torch.Tensor:
        """One step for every row: feed `next_ids`, return next-token logits [batch, vocab]."""
        ones = torch.ones((len(self), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        out = model(
            input_ids=self.next_ids[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def set_next(self, ids: Seq[int]) -> None:
        self.next_ids = torch.tensor(list(ids), dtype=torch.long, device=self.mask.device)

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep`, then cut columns that no remaining row uses."""
        if len(keep) == len(self.seqs):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.seqs = [self.seqs[i] for i in keep]
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        self.next_ids = self.next_ids[index]
        self.sampling = self.sampling.filter(keep)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.length
        self.mask = self.mask[:, start:]
        self.cache.select(keep, start)

    def extend(self, other: "Batch") -> None:
        """Append `other`'s rows, left-padding whichever cache is shorter."""
        length = max(self.length, other.length)
        self.mask = torch.cat(
            [F.pad(self.mask, (length - self.length, 0)), F.pad(other.mask, (length - other.length, 0))]
        )
        self.cache.concatenate(other.cache)
        self.seqs += other.seqs
        self.positions = torch.cat([self.positions, other.positions])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.sampling = self.sampling.concat(other.sampling)
