"""Several answers decoded as one batch: a memory-bound decoder reads its weights once per step whatever the
batch, so the questions of one slide, or of concurrent clients, share each step (continuous batching, scaled
down from onnxruntime-genai's batched Generator).

    batch = batch_generator(state, rows=4, max_length=..., stop_ids=...)
    slot = batch.add(cross, prompt_ids, params)      # prefill in a free row; the others keep decoding
    while batch.active:
        for slot, token in batch.step(): ...         # token None: that answer ended (see its stats.stop_reason)

Each answer keeps its own search (sampler, seed, history), stop tokens and max_new_tokens; its prompt is
prefilled alone in its own cache row, exactly as a batch of one would, so answers equal batch-1 answers as far
as the decoder's batched matmuls equal its single-row ones (tests check it token for token). Rows are ragged:
each keeps its own length, carried to GroupQueryAttention by the attention mask, with no padding in the cache.
A row freed by a finished answer is taken by the next one. Graphs that cannot run rows alone (the plain decoder,
TensorRT plans), or whose batched steps are not bit-exact against one row (`rows_are_exact`, probed once: ONNX
Runtime's MatMulNBits at block 128 is not), interleave per-answer Generators behind the same interface: same
answers, no batching gain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import LocpathError
from .decoder_state import DecoderState, FusedDecoderState
from .generator import GenerationStats, Generator, check_finite
from .sampler import Sampler, SamplingParams


@dataclass
class _Row:
    params: SamplingParams
    search: Sampler
    cross: dict
    stats: GenerationStats
    logits: np.ndarray  # (vocab,) the last logits of this answer
    length: int  # positions of this answer in its cache row
    history: list = field(default_factory=list)
    pending: int | None = None  # the token sampled last step, fed at this step


class _Rows:
    """What both batch generators keep: a fixed number of rows, each free (None) or holding one answer."""

    def __init__(self, rows: int):
        if rows < 1:
            raise LocpathError(f"a decoding batch needs at least 1 row, got {rows}")
        self.rows: list = [None] * rows

    @property
    def free(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def active(self) -> bool:
        return any(r is not None for r in self.rows)

    def _free_slot(self) -> int:
        slot = next((i for i, r in enumerate(self.rows) if r is None), None)
        if slot is None:
            raise LocpathError(f"the decoding batch is full ({len(self.rows)} rows)")
        return slot


class BatchGenerator(_Rows):
    """Rows of one shared K/V cache on a fused decoder graph."""

    def __init__(self, state: FusedDecoderState, rows: int, max_length: int, stop_ids: list[int]):
        super().__init__(rows)
        self.state = state
        self.max_length = state.capacity(max_length)
        self.cache = state.new_cache(rows, self.max_length)
        self.stop_ids = set(stop_ids)
        self._cross: dict | None = None  # the cross K/V of rows 0..n-1 stacked, rebuilt when rows change

    def add(self, cross: dict, prompt: list[int], params: SamplingParams, stats: GenerationStats | None = None) -> int:
        """Prefill `prompt` in a free row; returns the row (slot). The first token is sampled at the next step."""
        if not prompt:
            raise LocpathError("an empty prompt cannot be decoded")
        slot = self._free_slot()
        stats = stats if stats is not None else GenerationStats()
        cross = self.state.prepare_cross(cross)
        t0 = time.perf_counter()
        logits = self.state.prefill_row(self.cache, slot, list(prompt), cross)
        stats.prompt_tokens = len(prompt)
        stats.prefill_ms = (time.perf_counter() - t0) * 1000
        stats.kv_cache_bytes = self.cache.nbytes // len(self.rows)  # this answer's row of the cache
        self.rows[slot] = _Row(params, Sampler(params), cross, stats, logits[0, -1].copy(), len(prompt),
                               [int(i) for i in prompt])
        self._cross = None
        return slot

    def release(self, slot: int) -> None:
        """Drop an answer (cancelled, or ended): its row is free for the next one."""
        if self.rows[slot] is not None:
            self.rows[slot] = None
            self._cross = None

    def step(self) -> list[tuple[int, int | None]]:
        """Sample one token for every answer; feed the ones that go on through one decoder run. Returns (slot,
        token) per answer, token None when it ended (its row is then free; stats.stop_reason says why, and
        stats.error when it failed alone)."""
        events: list[tuple[int, int | None]] = []
        feed: list[int] = []
        for slot, row in enumerate(self.rows):
            if row is None:
                continue
            try:
                check_finite(row.logits)  # one damaged slide's answer fails alone; the batch goes on
            except LocpathError as exc:
                row.stats.stop_reason, row.stats.error = "error", str(exc)
                events.append((slot, None))
                self.release(slot)
                continue
            tok = row.search(row.logits, row.history)
            if tok in self.stop_ids:
                row.stats.stop_reason = "stop_token"
                events.append((slot, None))
                self.release(slot)
                continue
            row.stats.new_tokens += 1
            row.history.append(tok)
            events.append((slot, tok))
            if row.stats.new_tokens >= row.params.max_new_tokens:
                row.stats.stop_reason = "max_new_tokens"
                events.append((slot, None))
                self.release(slot)
                continue
            row.pending = tok
            feed.append(slot)
        if feed:
            self._decode(feed)
        return events

    def _decode(self, feed: list[int]) -> None:
        n = max(feed) + 1  # rows 0..n-1 run; a free row among them rewrites its own position 0
        tokens = np.zeros(n, np.int64)
        lengths = np.ones(n, np.int64)
        for slot in feed:
            row = self.rows[slot]
            tokens[slot] = row.pending
            lengths[slot] = row.length + 1
        cross = self._stacked_cross(n)
        t0 = time.perf_counter()
        logits = self.state.decode_rows(self.cache, tokens, lengths, cross)
        ms = (time.perf_counter() - t0) * 1000
        for slot in feed:
            row = self.rows[slot]
            row.length += 1
            row.logits = logits[slot, -1].copy()
            row.stats.decode_ms.append(ms)
            row.stats.batch_peak = max(row.stats.batch_peak, len(feed))

    def _stacked_cross(self, n: int) -> dict:
        if self._cross is not None and len(next(iter(self._cross.values()), ())) == n:
            return self._cross
        live = next(r for r in self.rows if r is not None)
        out = {}
        for name, ref in live.cross.items():
            arr = np.zeros((n,) + ref.shape[1:], ref.dtype)
            for slot in range(n):
                if self.rows[slot] is not None:
                    arr[slot] = self.rows[slot].cross[name][0]
            out[name] = arr
        self._cross = out
        return out


class InterleavedGenerator(_Rows):
    """The same interface over per-answer Generators, for decoder graphs that cannot run rows alone: each step
    advances every answer by one token, one after another."""

    def __init__(self, state: DecoderState, rows: int, max_length: int, stop_ids: list[int]):
        super().__init__(rows)
        self.state, self.max_length, self.stop_ids = state, max_length, stop_ids

    def add(self, cross: dict, prompt: list[int], params: SamplingParams, stats: GenerationStats | None = None) -> int:
        slot = self._free_slot()
        gen = Generator(self.state, cross, params, self.max_length, self.stop_ids, stats)
        gen.append_tokens(list(prompt))
        gen.stream = gen.tokens()
        self.rows[slot] = gen
        return slot

    def release(self, slot: int) -> None:
        self.rows[slot] = None

    def step(self) -> list[tuple[int, int | None]]:
        events = []
        for slot, gen in enumerate(self.rows):
            if gen is None:
                continue
            tok = next(gen.stream, None)
            events.append((slot, tok))
            if tok is None:
                self.release(slot)
            elif gen.stats.new_tokens >= gen.params.max_new_tokens:
                events.append((slot, None))  # ended on max_new_tokens: say so now, not one step later
                gen.stats.stop_reason = "max_new_tokens"
                self.release(slot)
        return events


def rows_are_exact(state: FusedDecoderState, rows: int) -> bool:
    """Whether a decode step over `rows` rows gives each row the very logits it gets alone (measured once per
    state and row count, then remembered). Some kernels take another path for several rows: ONNX Runtime's
    MatMulNBits at block size 128 does, and its last-bit differences flip near-tied greedy tokens. The probe: two
    rows, then `rows`, of the same short prompt, decoded one step, compared bit for bit with one row."""
    memo = state.__dict__.setdefault("_rows_exact", {})
    if rows not in memo:
        c = state.contract
        cross = {n: np.full((1, c.cara_heads, 4, c.cara_head_dim), 0.5, c.kv_dtype) for i in c.cara_layers
                 for n in c.cross(i)}
        prompt, tok = [1, 2, 3, 4, 5, 6, 7], 9

        def logits(n: int) -> np.ndarray:
            cache = state.new_cache(n, len(prompt) + 2)
            for r in range(n):
                state.prefill_row(cache, r, prompt, cross)
            stacked = {k: np.repeat(v, n, axis=0) for k, v in cross.items()}
            return state.decode_rows(cache, np.full(n, tok), np.full(n, len(prompt) + 1), stacked).copy()

        one = logits(1)[0]
        memo[rows] = all(np.array_equal(logits(n)[i], one) for n in sorted({2, rows}) for i in range(n))
    return memo[rows]


def batch_generator(state: DecoderState, rows: int, max_length: int, stop_ids: list[int]):
    """Rows of one cache when the decoder graph runs rows alone (the fused graph) and its batched steps are exact
    (`rows_are_exact`), else interleaved answers: batching never changes an answer."""
    if isinstance(state, FusedDecoderState) and (rows == 1 or rows_are_exact(state, rows)):
        return BatchGenerator(state, rows, max_length, stop_ids)
    return InterleavedGenerator(state, rows, max_length, stop_ids)
