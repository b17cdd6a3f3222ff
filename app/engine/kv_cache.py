"""A KV cache whose layers write into preallocated slabs instead of concatenating.

transformers' DynamicLayer copies the whole cache on every decode step (`torch.cat`), which at
batch 32 costs a large share of a CPU step. Here each layer keeps a buffer with spare columns
and hands attention a view of the filled part; the buffer is reallocated only when it is full
or when rows join or leave the batch.
"""

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

_HEADROOM = 64


class SlabLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.length = 0
        self._k = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[-1]))
        self._v = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._set(self._k[:, :, : self.length], self._v[:, :, : self.length], spare=end - self.length)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def _set(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 0) -> None:
        """Copy `keys`/`values` into fresh buffers with room for `spare` + headroom columns."""
        length = keys.shape[-2]
        capacity = length + spare + _HEADROOM
        self._k = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        self._v = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        self._k[:, :, :length] = keys
        self._v[:, :, :length] = values
        self.length = length
        self._expose()

    def _expose(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def select(self, index: torch.Tensor, start: int) -> None:
        self._set(self.keys[index, :, start:], self.values[index, :, start:])

    def concatenate(self, other: "SlabLayer") -> None:
        length = max(self.length, other.length)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, 0, length - t.shape[-2], 0))

        self._set(torch.cat([pad(self.keys), pad(other.keys)]), torch.cat([pad(self.values), pad(other.values)]))


class SlabCache(Cache):
    """One SlabLayer per decoder layer, created as the model first writes to each."""

    def __init__(self, config: PretrainedConfig | None = None) -> None:
        super().__init__(layer_class_to_replicate=SlabLayer)

    def select(self, index: torch.Tensor, start: int) -> None:
        """Keep rows `index` and drop the first `start` columns."""
        for layer in self.layers:
            layer.select(index, start)

    def concatenate(self, other: "SlabCache") -> None:
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.concatenate(theirs)
