"""Search: greedy, temperature, top-k, top-p, repetition penalty (in the manner of onnxruntime-genai's Search)."""

from __future__ import annotations

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
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
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
