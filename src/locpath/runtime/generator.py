"""The decoding loop, in the manner of onnxruntime-genai's Generator: answers are rows of one batch (a single answer
is a batch of one row). A memory-bound decoder reads its weights once per step whatever the batch, so the questions
of one slide, or of concurrent clients, share each step (continuous batching).

    gen = Generator(state, rows=4, max_length=..., stop_ids=...)
    slot = gen.add(cross, prompt_ids, params)      # prefill in a free row; the others keep decoding
    while gen.active:
        for slot, token in gen.step(): ...         # token None: that answer ended (see its stats.stop_reason)

One code path samples and stops: each row keeps its own search (sampler, seed, history), stop tokens,
max_new_tokens and finite-logits check (a row whose logits are not finite ends alone with stats.error; the others go
on). Two feed the decoder:
- shared: the rows of one K/V cache, each prompt prefilled alone in its own row exactly as a batch of one would,
  every step one decoder run over the rows. Rows are ragged: each keeps its own length, carried to
  GroupQueryAttention by the attention mask, with no padding in the cache. Only for the fused graph, and only when
  its batched steps are bit-exact against one row (`rows_are_exact`, probed once: ONNX Runtime's MatMulNBits at block
  128 is not), so batching never changes an answer. A batch of one row sizes its cache per answer (prompt plus
  max_new_tokens), as an answer alone always did.
- interleaved: every other case (the plain graph, TensorRT plans, inexact rows): each row its own cache, stepped one
  after another: same answers, no batching gain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import LocpathError
from .decoder_state import DecoderState, FusedDecoderState
from .sampler import Sampler, SamplingParams
from .trust import kept_logits, token_logprob


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0  # the decoder's share of the time to first token
    decode_ms: list = field(default_factory=list)
    kv_cache_bytes: int = 0  # measured: the cache's allocated bytes (its largest, for the growing plain cache)
    stop_reason: str = ""
    batch_peak: int = 1  # the most answers decoded together in one step while this one decoded
    error: str = ""  # an answer that failed alone (non-finite logits) says why here; its batch goes on
    token_logprobs: list = field(default_factory=list)  # log-softmax at the confidence temperature of each chosen
    # token, the stop token included (runtime/trust.py: the answer's confidence); decoding never reads it
    kept_logits: list | None = None  # fitting only (a list): each step's chosen logit and largest logits

    @property
    def decode_ms_per_token(self) -> float:
        return float(np.median(self.decode_ms)) if self.decode_ms else 0.0


NON_FINITE = ("the decoder produced non-finite logits (NaN or inf): the slide's latents or the bundle's weights are "
              "damaged")


def check_finite(logits: np.ndarray) -> None:
    """NaN latents or weights would otherwise answer "" or token 0, silently."""
    if not np.isfinite(logits).all():
        raise LocpathError(NON_FINITE)


@dataclass
class _Row:
    params: SamplingParams
    search: Sampler
    stats: GenerationStats
    cross: dict  # the question's cross K/V as the graph takes them (prepared once)
    history: list  # prompt and generated ids (repetition penalty)
    logits: np.ndarray | None = None  # (vocab,) the last logits of this answer
    length: int = 0  # positions of this answer in its cache row
    pending: int | None = None  # the token chosen last step, fed at this step
    cache: object = None  # interleaved: this answer's own cache


class Generator:
    def __init__(self, state: DecoderState, rows: int, max_length: int, stop_ids: list[int],
                 shared: bool | None = None, confidence_temperature: float = 1.0):
        """`rows`: the most answers at once; `shared`: force (True, fused graphs only) or refuse the shared cache
        (None: shared when the graph runs rows alone and exactly); `confidence_temperature`: the temperature of the
        chosen tokens' log-probabilities kept in each answer's stats (its confidence; never its decoding)."""
        if rows < 1:
            raise LocpathError(f"a decoding batch needs at least 1 row, got {rows}")
        self.state = state
        self.max_length = state.capacity(max_length)
        self.stop_ids = set(stop_ids)
        self.confidence_temperature = float(confidence_temperature)
        self.rows: list[_Row | None] = [None] * rows
        if shared is None:
            shared = isinstance(state, FusedDecoderState) and (rows == 1 or rows_are_exact(state, rows))
        self.shared = shared
        self.cache = state.new_cache(rows, self.max_length) if shared and rows > 1 else None
        self._cross: dict | None = None  # shared: the cross K/V of rows 0..n-1 stacked, rebuilt when rows change

    @property
    def free(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def active(self) -> bool:
        return any(r is not None for r in self.rows)

    def add(self, cross: dict, prompt, params: SamplingParams, stats: GenerationStats | None = None) -> int:
        """Prefill `prompt` in a free row; returns the row (slot). The first token is sampled at the next step."""
        prompt = [int(i) for i in prompt]
        if not prompt:
            raise LocpathError("an empty prompt cannot be decoded")
        slot = next((i for i, r in enumerate(self.rows) if r is None), None)
        if slot is None:
            raise LocpathError(f"the decoding batch is full ({len(self.rows)} rows)")
        stats = stats if stats is not None else GenerationStats()
        row = _Row(params, Sampler(params), stats, self.state.prepare_cross(cross), list(prompt))
        size = min(self.max_length, len(prompt) + params.max_new_tokens)  # an answer's own cache
        t0 = time.perf_counter()
        if self.shared:
            if len(self.rows) == 1:
                self.cache = self.state.new_cache(1, size)
            logits = self.state.prefill_row(self.cache, slot, prompt, row.cross)
            stats.kv_cache_bytes = self.cache.nbytes // len(self.rows)  # this answer's row of the cache
        else:
            row.cache = self.state.new_cache(1, size)
            logits = self.state.step(np.asarray([prompt], np.int64), row.cache, np.ones((1, len(prompt)), np.int64),
                                     row.cross)
            stats.kv_cache_bytes = row.cache.nbytes
        stats.prompt_tokens = len(prompt)
        stats.prefill_ms = (time.perf_counter() - t0) * 1000
        row.logits, row.length = logits[0, -1].copy(), len(prompt)
        self.rows[slot] = row
        self._cross = None
        return slot

    def release(self, slot: int) -> None:
        """Drop an answer (cancelled, or ended): its row is free for the next one."""
        if self.rows[slot] is not None:
            self.rows[slot] = None
            self._cross = None
            if len(self.rows) == 1:
                self.cache = None  # a batch of one row sizes its cache per answer

    def step(self) -> list[tuple[int, int | None]]:
        """Choose one token for every answer; feed the ones that go on to the decoder. Returns (slot, token) per
        answer, token None when it ended (its row is then free; stats.stop_reason says why, and stats.error when it
        failed alone)."""
        events: list[tuple[int, int | None]] = []
        feed: list[int] = []
        for slot, row in enumerate(self.rows):
            if row is None:
                continue
            tok = self._choose(row)
            if tok is not None:
                events.append((slot, tok))
            if row.stats.stop_reason:
                events.append((slot, None))
                self.release(slot)
            else:
                feed.append(slot)
        self._feed(feed)
        return events

    def _choose(self, row: _Row) -> int | None:
        """The row's next token (None when it stops before one), its stop_reason set when it ends."""
        if not np.isfinite(row.logits).all():  # one damaged slide's answer fails alone; the batch goes on
            row.stats.stop_reason, row.stats.error = "error", NON_FINITE
            return None
        tok = row.search(row.logits, row.history)
        row.stats.token_logprobs.append(token_logprob(row.logits, tok, self.confidence_temperature))
        if row.stats.kept_logits is not None:
            row.stats.kept_logits.append(kept_logits(row.logits, tok))
        if tok in self.stop_ids:
            row.stats.stop_reason = "stop_token"
            return None
        row.stats.new_tokens += 1
        row.history.append(tok)
        row.pending = tok
        if row.stats.new_tokens >= row.params.max_new_tokens:
            row.stats.stop_reason = "max_new_tokens"
        return tok

    def force(self, slot: int, token: int) -> None:
        """Feed `token` to a row instead of a sampled one (forced decoding: measurements)."""
        row = self.rows[slot]
        row.history.append(int(token))
        row.pending = int(token)
        self._feed([slot])

    def _feed(self, feed: list[int]) -> None:
        if not feed:
            return
        if self.shared:
            self._decode_rows(feed)
            return
        for slot in feed:
            self._decode_alone(self.rows[slot])

    def _decode_alone(self, row: _Row) -> None:
        t0 = time.perf_counter()
        logits = self.state.step(np.asarray([[row.pending]], np.int64), row.cache,
                                 np.ones((1, row.cache.length + 1), np.int64), row.cross)
        row.stats.decode_ms.append((time.perf_counter() - t0) * 1000)
        row.stats.kv_cache_bytes = max(row.stats.kv_cache_bytes, row.cache.nbytes)
        row.length += 1
        row.logits = logits[0, -1].copy()

    def _decode_rows(self, feed: list[int]) -> None:
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


def rows_are_exact(state: FusedDecoderState, rows: int) -> bool:
    """Whether a decode step over `rows` rows gives each row the very logits it gets alone (measured once per
    state and row count, then remembered). Some kernels take another path for several rows: ONNX Runtime's
    MatMulNBits at block size 128 does, and its last-bit differences flip near-tied greedy tokens. The probe: two
    rows, then `rows`, of the same short prompt, decoded one step, compared bit for bit with one row."""
    if not getattr(state.runner, "runs_rows_together", True):  # OpenVINO's fused decoder: one row at a time
        return False
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


# -- compatibility: removed once bench/ drives answers through Generator.add/step/force --------------------------
class OneAnswer:
    """One prefilled answer driven by hand, as `Pipeline.generator` returned it: `next_token()` (sample, no model
    run), `append_tokens(ids)` (forced steps), `tokens()` (sample to the end), `.logits`, `.stats`."""

    def __init__(self, gen: Generator, slot: int, stats: GenerationStats):
        self.gen, self.slot, self.stats = gen, slot, stats
        self._row = gen.rows[slot]

    @property
    def logits(self) -> np.ndarray:
        return self._row.logits[None, None]  # (1, 1, vocab): the last position

    @property
    def cache(self):
        """The K/V cache this answer lives in (its own, or the batch's shared one): measurements read its buffers."""
        return self._row.cache if self._row.cache is not None else self.gen.cache

    def next_token(self) -> int:
        check_finite(self._row.logits)
        return self._row.search(self._row.logits, self._row.history)

    def append_tokens(self, ids) -> None:
        for tok in ids:
            self.gen.force(self.slot, tok)

    def tokens(self):
        while self.gen.rows[self.slot] is self._row:
            for _, tok in self.gen.step():
                if tok is not None:
                    yield tok
        if self.stats.error:
            raise LocpathError(self.stats.error)
