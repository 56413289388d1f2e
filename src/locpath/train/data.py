"""Training data from the synthetic world, rendered in memory (no slide files: volume, not format, matters
here; the held-out evaluation goes through real slide files).

Seeds: slide i of split s is SeedSequence([base_seed, split_id, i]), so training and evaluation slides
never coincide whatever the seeds asked for.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..synth.qa import QUESTION_TYPES, TEMPLATES, answer, report
from ..synth.world import BACKGROUND, CELLS_PER_TILE, SlideSpec, make_spec, render_region

SPLITS = {"train": 1, "eval": 2, "encoder": 3}
TILE = 224


def split_seed(base: int, split: str, index: int) -> int:
    return int(np.random.SeedSequence([int(base), SPLITS[split], int(index)]).generate_state(1)[0])


def balanced_spec(seed: int, index: int) -> SlideSpec:
    """Cycle through every diagnosis x grade x necrosis combination so all answers are equally common."""
    from ..synth.world import DIAGNOSES, GRADES, ORGANS

    combos = [(d, g) for d in DIAGNOSES for g in ((None,) if d == "benign" else GRADES)]
    d, g = combos[index % len(combos)]
    rng = np.random.default_rng(seed)
    return make_spec(seed, diagnosis=d, grade=g, organ=ORGANS[rng.integers(len(ORGANS))], necrosis=bool(index // len(combos) % 2))


@dataclass
class TissueTiles:
    grid: np.ndarray  # (N, 2) column, row of 224 px tiles at 0.5 um/px
    class_frac: np.ndarray  # (N, classes) share of each label class (background included)


def tissue_tiles(spec: SlideSpec, min_tissue: float = 0.25) -> TissueTiles:
    frac, _ = spec.tile_labels(CELLS_PER_TILE)
    rows, cols = frac.shape[:2]
    tissue = 1.0 - frac[..., BACKGROUND]
    rr, cc = np.nonzero(tissue >= min_tissue)
    return TissueTiles(grid=np.stack([cc, rr], 1).astype(np.int64), class_frac=frac[rr, cc])


def render_tile(spec: SlideSpec, col: int, row: int) -> np.ndarray:
    """A 224 px tile at 0.5 um/px (the specs used for training are rendered at 0.5 mpp)."""
    assert spec.mpp == 0.5
    return render_region(spec, col * TILE, row * TILE, TILE, TILE)


def jpeg_roundtrip(tile: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def qa_pairs(spec: SlideSpec, rng: np.random.Generator, with_report: bool = True) -> list[tuple[str, str, str]]:
    """(type, question, answer) for every question type with a random phrasing, plus the report."""
    out = [(t, TEMPLATES[t][rng.integers(len(TEMPLATES[t]))], answer(spec, t)) for t in QUESTION_TYPES]
    if with_report:
        from ..synth.qa import REPORT_PROMPT

        out.append(("report", REPORT_PROMPT, report(spec)))
    return out
