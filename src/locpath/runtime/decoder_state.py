"""What feeds each decoder graph kind one step (onnxruntime-genai's model State): ids, mask, positions and the
cache's K/V in; logits out, the cache advanced. Names come from the decoder contract in the manifest."""

from __future__ import annotations

import numpy as np

from ..bundle.decoder_io import DecoderContract
from .kv_cache import KVCache, SharedKVCache
from .runner import Runner


class DecoderState:
    """The plain graph: past K/V from the cache, present K/V back into it."""

    def __init__(self, runner: Runner, contract: DecoderContract):
        self.runner = runner
        self.contract = contract
        self.outputs = ["logits"] + [n for j in range(contract.num_layers) for n in contract.present(j)]

    def capacity(self, max_length: int) -> int:
        """The most positions (prompt + answer) one answer may use."""
        return max_length

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        return KVCache(self.contract, batch, max_length)

    def step(self, input_ids: np.ndarray, cache: KVCache, mask: np.ndarray, cross: dict[str, np.ndarray]) -> np.ndarray:
        """Logits [batch, S, vocab] of the S new tokens."""
        b, s = input_ids.shape
        p = cache.length
        cache.check_room(p + s)
        feeds = {"input_ids": np.ascontiguousarray(input_ids, np.int64),
                 "attention_mask": np.ascontiguousarray(mask, np.int64),
                 "position_ids": np.arange(p, p + s, dtype=np.int64)[None, :].repeat(b, 0)}
        feeds.update(cache.past)
        feeds.update(cross)
        out = self.runner.run(feeds, self.outputs)
        cache.update(out, p + s)
        return out["logits"]


class FusedDecoderState(DecoderState):
    """The fused graph: ids and mask only (positions and rotary are inside GroupQueryAttention), the K/V buffers
    bound once by the cache; logits of the last position only."""

    def capacity(self, max_length: int) -> int:
        return min(max_length, self.contract.max_positions)

    def new_cache(self, batch: int, max_length: int) -> SharedKVCache:
        return SharedKVCache(self.runner, self.contract, batch, self.capacity(max_length))

    def step(self, input_ids: np.ndarray, cache: SharedKVCache, mask: np.ndarray,
             cross: dict[str, np.ndarray]) -> np.ndarray:
        p, s = cache.length, input_ids.shape[1]
        cache.check_room(p + s)
        feeds = {"input_ids": np.ascontiguousarray(input_ids, np.int64),
                 "attention_mask": np.ascontiguousarray(mask, np.int64)}
        feeds.update(cross)
        return cache.run(feeds, p + s)


def decoder_state(runner: Runner, contract: DecoderContract) -> DecoderState:
    return FusedDecoderState(runner, contract) if contract.kind == "fused" else DecoderState(runner, contract)
