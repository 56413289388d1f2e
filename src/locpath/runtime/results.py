"""What the pipeline hands back: a slide's latents (Compressed, SlideContext), one question's view of it (QuestionKV)
and answers (Answer, StreamedAnswer). Their own module so the answering layers (answer_batch.py) and the pipeline
both use them without importing each other."""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..wsi.features import FeatureFile
from .evidence import Evidence
from .question import Question


def peak_rss_mb() -> float:
    """This process's own peak resident set, MB: VmHWM (its address space's high-water mark), not ru_maxrss, which
    Linux carries over across fork and exec (a child would report its parent's peak); ru_maxrss without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


@dataclass
class Compressed:
    """A slide after STM and the resampler."""

    latents: np.ndarray  # (1, L, D)
    attention: np.ndarray  # (L, T): what each latent read of the T STM tokens (mean over heads and blocks)
    assignment: np.ndarray  # (N,): the STM token of each tile

    @property
    def tokens(self) -> int:
        return int(self.attention.shape[1])


@dataclass
class SlideContext:
    """What every question about one slide shares."""

    source: str
    latents: np.ndarray  # (1, L, D)
    tiles: int
    tokens: int  # after STM
    cache_hit: bool
    tiles_read: int
    timings_ms: dict = field(default_factory=dict)
    attention: np.ndarray | None = None  # (L, T)
    assignment: np.ndarray | None = None  # (N,)
    coords: np.ndarray | None = None  # (N, 2) level-0 x, y of each tile
    tile_size_level0: int = 0
    features: FeatureFile | None = None  # with prepare(keep_features=True): the tile features (never kept in memory)
    spatial: bool = True  # False: the tiles' positions are unknown (a SlideChat CSV); coords are placeholders
    trust: dict | None = None  # out-of-distribution score and tissue check (runtime/trust.py slide_trust)

    def again(self, timings: dict) -> "SlideContext":
        """The same slide served from memory."""
        return dataclasses.replace(self, cache_hit=True, tiles_read=0, timings_ms=timings)


@dataclass
class QuestionKV:
    """One question's view of a slide: the CARA layers' cross K/V of the top-M latents the TIS picked."""

    cross: dict[str, np.ndarray]
    selected: np.ndarray  # latent indices, in latent order
    scores: np.ndarray  # TIS score of every latent (L,)


@dataclass
class Answer:
    question: str
    answer: str
    token_ids: list
    timings_ms: dict
    peak_rss_mb: float
    slide: dict
    generation: dict
    evidence: Evidence | None = None
    trust: dict | None = None  # confidence, slide checks, warnings, abstained (runtime/trust.py answer_trust)
    kept_logits: list | None = field(default=None, repr=False)  # fitting only: GenerationStats.kept_logits

    def to_dict(self, evidence_tiles: int = 16) -> dict:
        d = {"question": self.question, "answer": self.answer, "timings_ms": self.timings_ms,
             "peak_rss_mb": round(self.peak_rss_mb, 1), "slide": self.slide, "generation": self.generation}
        if self.trust is not None:
            d["trust"] = self.trust
        if self.evidence is not None:
            d["evidence"] = self.evidence.to_dict(evidence_tiles)
        return d


class StreamedAnswer:
    """Iterate for text pieces as they are decoded; `.result` holds the Answer once iteration ends."""

    def __init__(self, gen: Iterator[str], question: Question):
        self._gen = gen
        self.question = question
        self.result: Answer | None = None

    def __iter__(self):
        self.result = yield from self._gen
