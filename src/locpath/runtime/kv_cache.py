"""Self-attention K/V caches, one per decoder graph kind (bundle/decoder_io.py):

- `KVCache` (plain graph): the graph takes past K/V of length P and returns present K/V of length P+S (the concat
  happens inside the graph). The present arrays simply become the next step's past: no copy on our side.
- `SharedKVCache` (fused graph): one buffer per layer and kind, preallocated to the capped max length and bound
  once as both past and present through an IOBinding the cache owns; GroupQueryAttention writes the new
  positions in place, so a step moves nothing.
Either refuses a prompt plus answer beyond its cap ("KV cache full"); cross-attention K/V are not here (fixed per
question, passed unchanged every step).
"""

from __future__ import annotations

import numpy as np

from ..bundle.decoder_io import DecoderContract
from ..errors import LocpathError


def _nbytes(a) -> int:
    """Bytes of a numpy array or an ONNX Runtime OrtValue (device-resident K/V)."""
    if isinstance(a, np.ndarray):
        return a.nbytes
    return int(np.prod(a.shape())) * _ORT_SIZES.get(a.data_type(), 4)


_ORT_SIZES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2}


class _Capped:
    def __init__(self, max_length: int):
        self.max_length = max_length
        self.length = 0

    def check_room(self, total: int) -> None:
        if total > self.max_length:
            raise LocpathError(f"KV cache full: {total} positions exceed the cap of {self.max_length} "
                               "(shorten the question or lower max_new_tokens)")


class KVCache(_Capped):
    def __init__(self, contract: DecoderContract, batch: int, max_length: int, dtype=np.float32):
        super().__init__(max_length)
        self.contract = contract
        empty = np.zeros((batch, contract.num_kv_heads, 0, contract.head_dim), dtype)
        self.past = {n: empty for j in range(contract.num_layers) for n in contract.past(j)}

    @property
    def nbytes(self) -> int:
        return int(sum(_nbytes(a) for a in self.past.values()))

    def update(self, outputs: dict[str, np.ndarray], new_length: int) -> None:
        """Take the graph's present K/V as the past of the next step."""
        for j in range(self.contract.num_layers):
            for past, present in zip(self.contract.past(j), self.contract.present(j)):
                self.past[past] = outputs[present]
        self.length = new_length


class SharedKVCache(_Capped):
    """Buffers come from the runner (`new_buffer`: host memory on the CPU provider, device memory elsewhere).

    Rows of the batch may be bound alone (`rows`): a batched answer prefills its prompt in its own row, then
    decodes with the other rows. Bindings are kept per (runner, rows): a step rebinds only ids and mask. A second
    runner (the prefill graph, same contract) binds the same buffers, so it fills the cache the decoder reads."""

    def __init__(self, runner, contract: DecoderContract, batch: int, max_length: int):
        super().__init__(max_length)
        self.runner = runner
        self.contract = contract
        self.batch = batch
        dtype = np.dtype(contract.kv_dtype)
        shape = (batch, contract.num_kv_heads, max_length, contract.head_dim)
        self.keys = [runner.new_buffer(shape, dtype) for _ in range(contract.num_layers)]
        self.values = [runner.new_buffer(shape, dtype) for _ in range(contract.num_layers)]
        self.nbytes = 2 * contract.num_layers * int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.logits = np.zeros((batch, 1, contract.vocab), np.float32)
        self._binders: dict = {}

    def binder(self, runner=None, rows: tuple[int, int] | None = None):
        """The binding of `rows` (start, count; None = every row) on `runner` (default: the decoder's)."""
        runner = runner or self.runner
        key = (id(runner), rows)
        b = self._binders.get(key)
        if b is None:
            state = {}
            for j in range(self.contract.num_layers):
                (pk, pv), (ok, ov) = self.contract.past(j), self.contract.present(j)
                state[pk], state[pv] = (self.keys[j], ok), (self.values[j], ov)
            start, count = rows if rows is not None else (0, self.batch)
            logits = self.logits[start:start + count]
            b = self._binders[key] = runner.binder(state, {"logits": logits}, rows)
        return b

    def run(self, feeds: dict[str, np.ndarray], new_length: int, runner=None) -> np.ndarray:
        logits = self.binder(runner).run(feeds)["logits"]
        self.length = new_length
        return logits

    def run_rows(self, feeds: dict[str, np.ndarray], rows: tuple[int, int], runner=None) -> np.ndarray:
        """Run on `rows` only (each row keeps its own length: the caller tracks it, the mask carries it)."""
        return self.binder(runner, rows).run(feeds)["logits"]
