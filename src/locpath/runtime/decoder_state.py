"""What feeds each decoder graph kind one step (onnxruntime-genai's model State): ids, mask, positions and the
cache's K/V in; logits out, the cache advanced. Names come from the decoder contract in the manifest."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..bundle.decoder_io import DecoderContract
from .kv_cache import KVCache, SharedKVCache
from .runner import Runner


@dataclass
class GreedyRun:
    """What `DecoderState.greedy` ran: the tokens after the prompt, optionally each step's last logits, and the
    prefill's and the decode steps' wall time."""
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # with keep_logits: the prompt's last, then each step's
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # decode steps run (model calls after the prefill)


class DecoderState:
    """The plain graph: past K/V from the cache, present K/V back into it."""

    def __init__(self, runner: Runner, contract: DecoderContract):
        self.runner = runner
        self.contract = contract
        self.outputs = ["logits"] + [n for j in range(contract.num_layers) for n in contract.present(j)]

    def capacity(self, max_length: int) -> int:
        """The most positions (prompt + answer) one answer may use."""
        return max_length

    def prepare_cross(self, cross: dict[str, np.ndarray]) -> dict:
        """The question's cross K/V as every step will feed them (once per answer): in the graph's K/V dtype."""
        dt = np.dtype(self.contract.kv_dtype)
        return {k: np.ascontiguousarray(v, dt) for k, v in cross.items()}

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        return KVCache(self.contract, batch, max_length)

    def _feeds(self, input_ids: np.ndarray, cache: KVCache, mask: np.ndarray, cross: dict) -> dict:
        """ids, mask, positions after the cached ones, the cache's past and the cross K/V (room checked)."""
        b, s = input_ids.shape
        p = cache.length
        cache.check_room(p + s)
        feeds = {"input_ids": np.ascontiguousarray(input_ids, np.int64),
                 "attention_mask": np.ascontiguousarray(mask, np.int64),
                 "position_ids": np.arange(p, p + s, dtype=np.int64)[None, :].repeat(b, 0)}
        feeds.update(cache.past)
        feeds.update(cross)
        return feeds

    def step(self, input_ids: np.ndarray, cache: KVCache, mask: np.ndarray, cross: dict[str, np.ndarray]) -> np.ndarray:
        """Logits [batch, S, vocab] of the S new tokens."""
        out = self.runner.run(self._feeds(input_ids, cache, mask, cross), self.outputs)
        cache.update(out, cache.length + input_ids.shape[1])
        return out["logits"]

    def greedy(self, prompt: Sequence[int], cross: dict[str, np.ndarray], new_tokens: int = 0, *,
               forced: Sequence[int] | None = None, stop_ids: Sequence[int] = (),
               keep_logits: bool = False) -> GreedyRun:
        """One answer of argmax tokens straight on the graph, with no sampler, for the checks and measurements that
        compare graphs (export validation, `build`'s prefill choice, the bench). `new_tokens` tokens are chosen
        (the last one is not fed), stopping early on a stop token (not kept); with `forced`, those tokens are fed
        instead (teacher forcing) and every one of them is run. Answers go through runtime/generator.py."""
        cross = self.prepare_cross(cross)
        fed = list(forced) if forced is not None else None
        cache = self.new_cache(1, len(prompt) + (len(fed) if fed is not None else new_tokens) + 1)
        run = GreedyRun()
        t0 = time.perf_counter()
        logits = self.step(np.asarray([list(prompt)], np.int64), cache, np.ones((1, len(prompt)), np.int64), cross)
        run.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        todo = fed if fed is not None else range(new_tokens)
        for n, tok in enumerate(todo):
            if keep_logits:
                run.logits.append(logits[0, -1].copy())
            if fed is None:
                tok = int(logits[0, -1].argmax())
                if tok in stop_ids:
                    break
                run.tokens.append(tok)
                if n + 1 == new_tokens:
                    break
            else:
                run.tokens.append(int(tok))
            logits = self.step(np.asarray([[tok]], np.int64), cache, np.ones((1, cache.length + 1), np.int64), cross)
            run.steps += 1
        else:
            if keep_logits and fed is not None:
                run.logits.append(logits[0, -1].copy())
        run.decode_s = time.perf_counter() - t0
        return run


class FusedDecoderState(DecoderState):
    """The fused graph: ids and mask only (positions and rotary are inside GroupQueryAttention), the K/V buffers
    bound once by the cache; logits of the last position only. With a `prefill_runner` (the bundle's
    decoder_fused_prefill: same contract, e.g. INT8 matmuls on AMX), a step of more than one new token runs there
    and single-token steps on the decoder, both on the same K/V buffers.

    Rows of a batched cache: `prefill_row` fills one row alone (exactly as a batch of one would), `decode_rows`
    advances rows 0..n-1 by one token each, every row at its own length (the mask's ones count it, so ragged
    prompts need no padding inside the cache)."""

    def __init__(self, runner: Runner, contract: DecoderContract, prefill_runner: Runner | None = None):
        super().__init__(runner, contract)
        self.prefill_runner = prefill_runner

    def capacity(self, max_length: int) -> int:
        return min(max_length, self.contract.max_positions)

    def new_cache(self, batch: int, max_length: int) -> SharedKVCache:
        return SharedKVCache(self.runner, self.contract, batch, self.capacity(max_length))

    def _runner_for(self, new_tokens: int) -> Runner | None:
        return self.prefill_runner if new_tokens > 1 and self.prefill_runner is not None else None

    def step(self, input_ids: np.ndarray, cache: SharedKVCache, mask: np.ndarray,
             cross: dict[str, np.ndarray]) -> np.ndarray:
        p, s = cache.length, input_ids.shape[1]
        cache.check_room(p + s)
        feeds = {"input_ids": np.ascontiguousarray(input_ids, np.int64),
                 "attention_mask": np.ascontiguousarray(mask, np.int64)}
        feeds.update(cross)
        return cache.run(feeds, p + s, self._runner_for(s))

    def prefill_row(self, cache: SharedKVCache, row: int, ids: list[int], cross: dict) -> np.ndarray:
        """The prompt of one answer into row `row` (from position 0); its last logits (1, 1, vocab)."""
        cache.check_room(len(ids))
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        feeds.update(cross)
        return cache.run_rows(feeds, (row, 1), self._runner_for(len(ids)))

    def decode_rows(self, cache: SharedKVCache, tokens: np.ndarray, lengths: np.ndarray, cross: dict) -> np.ndarray:
        """One new token for each of rows 0..n-1; `lengths` = each row's positions after this token (a free row
        passes 1: it rewrites its position 0, which no answer reads). Logits (n, 1, vocab)."""
        n = len(tokens)
        cache.check_room(int(lengths.max()))
        mask = (np.arange(int(lengths.max()))[None, :] < lengths[:, None]).astype(np.int64)
        feeds = {"input_ids": np.asarray(tokens, np.int64).reshape(n, 1), "attention_mask": mask}
        feeds.update(cross)
        return cache.run_rows(feeds, (0, n))


class BoundDecoderState(DecoderState):
    """The plain graph with its K/V left where the runner computes them (device memory under the CUDA provider):
    each step binds the previous step's present OrtValues as its past through an IOBinding, and the cross K/V
    are placed on the device once per answer, so a decode step moves only ids, mask, positions and logits across
    the bus. On the CPU provider the same code runs with host OrtValues (how the tests check it)."""

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        cache = KVCache(self.contract, batch, max_length)
        cache.past = {n: self.runner.to_device(a) for n, a in cache.past.items()}
        return cache

    def prepare_cross(self, cross: dict[str, np.ndarray]) -> dict:
        return {k: self.runner.to_device(v) for k, v in super().prepare_cross(cross).items()}

    def step(self, input_ids: np.ndarray, cache: KVCache, mask: np.ndarray, cross: dict) -> np.ndarray:
        out = self.runner.run_bound(self._feeds(input_ids, cache, mask, cross), host_outputs=["logits"],
                                    device_outputs=self.outputs[1:])
        cache.update(out, cache.length + input_ids.shape[1])
        return out["logits"]


def decoder_state(runner: Runner, contract: DecoderContract, prefill_runner: Runner | None = None) -> DecoderState:
    if contract.kind == "fused":
        return FusedDecoderState(runner, contract, prefill_runner)
    if getattr(runner, "device", "cpu") != "cpu" and hasattr(runner, "run_bound"):
        return BoundDecoderState(runner, contract)
    return DecoderState(runner, contract)
