"""The self-attention KV cache: one buffer per layer, preallocated to a capped max length.

The exported decoder takes past K/V of length P and returns present K/V of length P+S (concat inside the
graph). The cache keeps the authoritative copy in its buffers and writes only the S new positions back, so
memory is allocated once per question, never grown; a prompt plus answer beyond the cap is an error.
Cross-attention K/V are not here: they are fixed per question and passed unchanged every step.
"""

from __future__ import annotations

import numpy as np

from ..errors import LocpathError


class _KVBuffers:
    """What both caches share: one buffer per layer and kind of the capped max length, the filled length, and
    the "cache full" refusal."""

    def __init__(self, alloc, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_length: int, dtype):
        self.num_layers = num_layers
        self.max_length = max_length
        shape = (batch, kv_heads, max_length, head_dim)
        self.keys = [alloc(shape, dtype) for _ in range(num_layers)]
        self.values = [alloc(shape, dtype) for _ in range(num_layers)]
        self.nbytes = 2 * num_layers * int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.length = 0

    def check_room(self, total: int) -> None:
        if total > self.max_length:
            raise LocpathError(f"KV cache full: {total} positions exceed the cap of {self.max_length} "
                               "(shorten the question or lower max_new_tokens)")

    def advance(self, new_length: int) -> None:
        self.length = new_length

    def reset(self) -> None:
        self.length = 0


class KVCache(_KVBuffers):
    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_length: int,
                 dtype=np.float32):
        super().__init__(np.zeros, num_layers, batch, kv_heads, head_dim, max_length, dtype)

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.length
        return (np.ascontiguousarray(self.keys[layer][:, :, :n]), np.ascontiguousarray(self.values[layer][:, :, :n]))

    def append(self, layer: int, present_k: np.ndarray, present_v: np.ndarray) -> None:
        """Store the new positions of a present tensor (length P+S) after position P."""
        total = present_k.shape[2]
        self.check_room(total)
        self.keys[layer][:, :, self.length : total] = present_k[:, :, self.length :]
        self.values[layer][:, :, self.length : total] = present_v[:, :, self.length :]


class SharedKVCache(_KVBuffers):
    """The fused decoder's self-attention K/V, bound as both the graph's past and present (GroupQueryAttention
    writes the new positions in place). Nothing is copied between steps. The buffers come from the runner
    (`new_buffer`), so a device runner could keep them in device memory; today the fused graph runs on the CPU
    provider only."""

    def __init__(self, runner, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_length: int,
                 dtype=np.float32):
        super().__init__(runner.new_buffer, num_layers, batch, kv_heads, head_dim, max_length, dtype)
