"""What a report records of one answer, taken from `Answer.to_dict()` (the same dict a job stores): the question,
the answer, the evidence tiles (level-0 top-left corners, side and weight) and, when the answer carries them, the
trust fields (confidence, warnings, abstained; read with .get: older answers have none)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import DicomOutError

EVIDENCE_TILES = 16  # the tiles each report and annotation records per answer (as a job's answer lists them)
MAX_TEXT = 10_000  # characters of a question or answer kept (DICOM UT holds far more; an answer is short)


@dataclass
class Tile:
    x: int
    y: int
    size: int
    weight: float


@dataclass
class ReportedAnswer:
    question: str
    answer: str
    tiles: list[Tile] = field(default_factory=list)
    confidence: float | None = None
    warnings: list[str] = field(default_factory=list)  # "code: message"
    abstained: bool | None = None

    @classmethod
    def from_dict(cls, d: dict, tiles: int = EVIDENCE_TILES) -> "ReportedAnswer":
        if not isinstance(d, dict) or not isinstance(d.get("question"), str) or not isinstance(d.get("answer"), str):
            raise DicomOutError("an answer to report must hold its question and answer")
        trust = d.get("trust") if isinstance(d.get("trust"), dict) else {}
        conf = trust.get("confidence")
        conf = float(conf) if isinstance(conf, (int, float)) and math.isfinite(conf) else None
        warnings = [f"{w.get('code', 'warning')}: {w.get('message', '')}"[:1000] for w in trust.get("warnings") or []
                    if isinstance(w, dict)]
        abstained = trust.get("abstained") if isinstance(trust.get("abstained"), bool) else None
        return cls(d["question"][:MAX_TEXT], d["answer"][:MAX_TEXT], _tiles(d.get("evidence"), tiles), conf,
                   warnings, abstained)


def _tiles(ev, k: int) -> list[Tile]:
    """The top `k` evidence tiles with positions (none for a feature file without them)."""
    if not isinstance(ev, dict) or not isinstance(ev.get("tile_size_level0"), int) or ev["tile_size_level0"] <= 0:
        return []
    out = []
    for t in (ev.get("top") or [])[:k]:
        if isinstance(t, dict) and all(isinstance(t.get(c), int) for c in ("x", "y")):
            out.append(Tile(int(t["x"]), int(t["y"]), int(ev["tile_size_level0"]), float(t.get("weight", 0.0))))
    return out
