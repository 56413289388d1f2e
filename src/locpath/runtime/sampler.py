"""Search: greedy, temperature, top-k, top-p, repetition penalty (in the manner of onnxruntime-genai's Search)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off (CTRL-style: >1 discourages repeats)
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        """Refuse what would silently give garbage (infinite or NaN temperature, a negative seed, ...)."""
        def number(name, v, lo, hi, lo_open=True):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or (lo_open and v == lo) or v > hi:
                side = f"{'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
                raise ConfigError(f"{name} must be a finite number {side}, got {v!r}")

        def integer(name, v, lo, hi=None):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                raise ConfigError(f"{name} must be an integer >= {lo}" + (f" and <= {hi}" if hi else "") + f", got {v!r}")

        integer("max_new_tokens", self.max_new_tokens, 1)
        number("temperature", self.temperature, 0.0, 100.0)
        integer("top_k", self.top_k, 0)
        number("top_p", self.top_p, 0.0, 1.0)
        number("repetition_penalty", self.repetition_penalty, 0.0, 100.0)
        if self.seed is not None:
            integer("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample must be true or false, got {self.do_sample!r}")
        return self


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        """Next token from one row of logits (V,), given the tokens so far (prompt and generated)."""
        if not self.p.do_sample and self.p.repetition_penalty == 1.0:
            return int(np.argmax(logits))  # plain greedy: no float64 copy of a large vocabulary row
        x = logits.astype(np.float64).copy()
        if self.p.repetition_penalty != 1.0 and history:
            idx = np.unique(np.asarray(history, dtype=np.int64))
            vals = x[idx]
            x[idx] = np.where(vals > 0, vals / self.p.repetition_penalty, vals * self.p.repetition_penalty)
        if not self.p.do_sample:
            return int(np.argmax(x))
        x = x / self.p.temperature
        if self.p.top_k and self.p.top_k < x.size:
            kth = np.partition(x, -self.p.top_k)[-self.p.top_k]
            x[x < kth] = -np.inf
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if self.p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, self.p.top_p) + 1)]
            mask = np.zeros_like(probs, dtype=bool)
            mask[keep] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
