"""One answer, in the manner of onnxruntime-genai's Generator: it owns the decoder state's K/V cache (sized once to
the prompt plus the answer, capped), the fixed cross K/V of the question, and the search (sampler).

    gen = Generator(state, cross, params, max_length, stop_ids)
    gen.append_tokens(prompt_ids)          # prefill
    for tok in gen.tokens(): ...           # sample, stop on a stop token or max_new_tokens, decode step by step
Forced tokens (benchmarks) go through `append_tokens` too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import LocpathError
from .decoder_state import DecoderState
from .sampler import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0  # the decoder's share of the time to first token
    decode_ms: list = field(default_factory=list)
    kv_cache_bytes: int = 0  # measured: the cache's allocated bytes (its largest, for the growing plain cache)
    stop_reason: str = ""
    batch_peak: int = 1  # the most answers decoded together in one step while this one decoded
    error: str = ""  # a batched answer that failed alone (non-finite logits) says why here; its batch goes on

    @property
    def decode_ms_per_token(self) -> float:
        return float(np.median(self.decode_ms)) if self.decode_ms else 0.0


def check_finite(logits: np.ndarray) -> None:
    """NaN latents or weights would otherwise answer "" or token 0, silently."""
    if not np.isfinite(logits).all():
        raise LocpathError("the decoder produced non-finite logits (NaN or inf): the slide's latents or the "
                           "bundle's weights are damaged")


class Generator:
    def __init__(self, state: DecoderState, cross: dict[str, np.ndarray], params: SamplingParams, max_length: int,
                 stop_ids: list[int], stats: GenerationStats | None = None):
        self.state = state
        self.cross = state.prepare_cross(cross)  # in the graph's K/V dtype, on its device: once per answer
        self.params = params
        self.max_length = max_length
        self.stop_ids = set(stop_ids)
        self.stats = stats if stats is not None else GenerationStats()
        self.search = Sampler(params)
        self.history: list[int] = []
        self.cache = None
        self.logits: np.ndarray | None = None

    def append_tokens(self, ids: list[int]) -> None:
        """Run the decoder on `ids` (the first call is the prefill and sizes the cache)."""
        t0 = time.perf_counter()
        if self.cache is None:
            self.stats.prompt_tokens = len(ids)
            self.cache = self.state.new_cache(1, min(self.max_length, len(ids) + self.params.max_new_tokens))
        total = self.cache.length + len(ids)
        self.logits = self.state.step(np.asarray([ids], np.int64), self.cache, np.ones((1, total), np.int64),
                                      self.cross)
        self.history.extend(int(i) for i in ids)
        ms = (time.perf_counter() - t0) * 1000
        if len(self.history) == len(ids):
            self.stats.prefill_ms = ms
        else:
            self.stats.decode_ms.append(ms)
        self.stats.kv_cache_bytes = max(self.stats.kv_cache_bytes, self.cache.nbytes)

    def next_token(self) -> int:
        """Sample the next token from the last logits (no model run)."""
        row = self.logits[0, -1]
        check_finite(row)
        return self.search(row, self.history)

    def tokens(self) -> Iterator[int]:
        """New token ids until a stop token (not yielded) or max_new_tokens."""
        for n in range(self.params.max_new_tokens):
            tok = self.next_token()
            if tok in self.stop_ids:
                self.stats.stop_reason = "stop_token"
                return
            self.stats.new_tokens += 1
            yield tok
            if n + 1 < self.params.max_new_tokens:
                self.append_tokens([tok])
        self.stats.stop_reason = "max_new_tokens"
