"""A key/value cache that writes new positions into a preallocated buffer.

DynamicCache concatenates on every step, which copies the whole cache per token; with hundreds
of decode rows that copy costs more than the model. Used by the EL decoding and the beam search.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _preallocated_layer_class():
    """A DynamicLayer that writes new positions into a preallocated buffer, grown when a caller
    steps further than planned. Built on first use so that importing this module does not
    import transformers."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra: int):
            super().__init__()
            R, H, P, _ = keys.shape
            self.kbuf = keys.new_empty((R, H, P + extra, keys.shape[-1]))
            self.vbuf = values.new_empty((R, H, P + extra, values.shape[-1]))
            self.kbuf[:, :, :P] = keys
            self.vbuf[:, :, :P] = values
            self.n = P
            self.device, self.dtype = keys.device, keys.dtype
            self.is_initialized = True
            self._views()

        def _views(self) -> None:
            self.keys = self.kbuf[:, :, : self.n]
            self.values = self.vbuf[:, :, : self.n]

        def update(self, key_states, value_states, *args, **kwargs):
            t = key_states.shape[-2]
            if self.n + t > self.kbuf.shape[2]:  # more steps than planned: grow
                grow = max(t, self.kbuf.shape[2] // 2)
                self.kbuf = torch.cat([self.kbuf, self.kbuf.new_empty(self.kbuf.shape[:2] + (grow, self.kbuf.shape[3]))], 2)
                self.vbuf = torch.cat([self.vbuf, self.vbuf.new_empty(self.vbuf.shape[:2] + (grow, self.vbuf.shape[3]))], 2)
            self.kbuf[:, :, self.n : self.n + t] = key_states
            self.vbuf[:, :, self.n : self.n + t] = value_states
            self.n += t
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.kbuf = self.kbuf[indices]
            self.vbuf = self.vbuf[indices]
            self._views()

    return PreallocatedLayer


def preallocated_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], extra: int):
    """A DynamicCache holding the given per-layer (keys, values), each (B, heads, L, head_dim),
    with room for ``extra`` more positions written in place."""
    from transformers import DynamicCache

    layer_class = _preallocated_layer_class()
    cache = DynamicCache()
    cache.layers = [layer_class(k, v, extra) for k, v in kv]
    cache.layer_class_to_replicate = None
    return cache
