"""Training data from the synthetic world, seen the way `locpath eval` sees it.

Every training and validation slide is written as a real slide file (the eval writer and quality, SVS and
generic TIFF alternating), opened with `open_slide`, tissue-detected and tiled with `plan_tiles`, and read
with the TileReader: the model learns on the JPEG-compressed tiles and detected grid it is tested on, not on
clean renders and the ground-truth tissue. Files live in a temporary folder, one at a time.

Training slides come in balanced cycles whose benign slides are twins of tumour slides (`balanced_spec`).

Seeds: slide i of split s is SeedSequence([base_seed, split_id, i]), so training and evaluation slides
never coincide whatever the seeds asked for.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..synth.seeds import split_seed
from ..synth.qa import QUESTION_TYPES, TEMPLATES, answer, report
from ..synth.world import (BACKGROUND, CELLS_PER_TILE, CLASS, DIAGNOSES, GRADES, ORGANS, TUMOUR_CLASSES, SlideSpec,
                           make_spec, render_region)
from ..synth.writer import write_slide
from ..wsi import Slide, TileReader, open_slide
from ..wsi.extract import TilePlan, plan_tiles

TILE = 224
SLIDE_FORMATS = ("svs", "tiff")  # alternated slide by slide, as `locpath eval` does


TUMOUR_KINDS = tuple((d, g) for d in DIAGNOSES[1:] for g in GRADES)
CYCLE = len(TUMOUR_KINDS) + 2  # the four tumour kinds, then benign twins of two of them


def balanced_spec(base: int, split: str, index: int, tiles: tuple[int, int] | None = None) -> SlideSpec:
    """Slides in cycles of six: one of each tumour kind, then the benign twins of two of them.

    Every diagnosis and grade answer is then equally common (a third benign, as at eval), and a benign
    slide differs from its tumour twin only in the sparse region, so neither the organ's texture variant
    nor the stain can stand in for the diagnosis. Necrosis alternates by cycle; which kinds get twins
    alternates every two cycles, so twins are not tied to necrosis.
    """
    cycle, pos = divmod(index, CYCLE)
    if pos >= len(TUMOUR_KINDS):
        source = 2 * (pos - len(TUMOUR_KINDS)) + cycle // 2 % 2
        return benign_twin(balanced_spec(base, split, cycle * CYCLE + source, tiles))
    seed = split_seed(base, split, index)
    d, g = TUMOUR_KINDS[pos]
    organ = ORGANS[np.random.default_rng(seed).integers(len(ORGANS))]
    return make_spec(seed, tiles, diagnosis=d, grade=g, organ=organ, necrosis=bool(cycle % 2))


def benign_twin(spec: SlideSpec) -> SlideSpec:
    """The same slide (shape, textures, stain, necrosis) with its tumour turned into the organ's tissue."""
    labels = spec.labels.copy()
    labels[np.isin(labels, TUMOUR_CLASSES)] = CLASS[spec.organ]
    meta = {k: v for k, v in spec.meta.items() if not k.startswith("_")}
    meta.update(diagnostic_tiles=0, diagnostic_fraction=0.0)
    return dataclasses.replace(spec, diagnosis="benign", grade=None, labels=labels, meta=meta)


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


@dataclass
class FileSlide:
    """One spec written to a slide file and opened as `locpath eval` opens it: tissue detected, grid planned."""

    spec: SlideSpec
    slide: Slide
    plan: TilePlan

    @property
    def grid(self) -> np.ndarray:
        """(N, 2) column, row of the detected tiles: the positions the model sees at eval."""
        return self.plan.grid.grid_index

    def class_frac(self) -> np.ndarray:
        """(N, classes) label shares of each detected tile, from the spec's label map.

        At 0.5 um/px the grid's 224 px tiles start at 0 with stride 224, so grid column/row are exactly the
        spec's tile cells (checked here rather than assumed).
        """
        g = self.plan.grid
        if self.spec.mpp != 0.5 or g.size_level0 != TILE or g.stride_level0 != TILE:
            raise ValueError(f"grid of {g.size_level0}/{g.stride_level0} px at {self.spec.mpp} mpp is not the label grid")
        frac, (rows, cols) = self.spec.tile_labels(CELLS_PER_TILE)
        col, row = self.grid.T
        if len(col) and (col.max() >= cols or row.max() >= rows):
            raise ValueError(f"detected tile outside the {cols}x{rows} label grid")
        return frac[row, col]

    def read(self, index: np.ndarray) -> np.ndarray:
        """uint8 (len(index), 224, 224, 3): the chosen detected tiles, through the real tile reader."""
        g = self.plan.grid
        sub = dataclasses.replace(g, coords=g.coords[index], tissue=g.tissue[index])
        return np.concatenate([b.tiles for b in TileReader(self.slide, sub)])


@contextmanager
def slide_file(spec: SlideSpec, workdir: Path, index: int) -> Iterator[FileSlide]:
    """Write `spec` as `locpath eval` does (writer default quality, format by index), open and plan it; the
    file is deleted on exit."""
    fmt = SLIDE_FORMATS[index % len(SLIDE_FORMATS)]
    path = write_slide(spec, Path(workdir) / f"slide_{index:05d}.{fmt}", fmt=fmt, write_truth=False)
    spec.meta.pop("_textures", None)  # the render cache (2.4 MB) need not outlive the file
    try:
        with open_slide(path) as slide:
            yield FileSlide(spec, slide, plan_tiles(slide))
    finally:
        path.unlink(missing_ok=True)


def file_slides(specs: Iterable[SlideSpec]) -> Iterator[FileSlide]:
    """Each spec as an opened slide file, one at a time in a temporary folder (disk and memory stay flat)."""
    with tempfile.TemporaryDirectory(prefix="locpath-train-") as tmp:
        for i, spec in enumerate(specs):
            with slide_file(spec, Path(tmp), i) as fs:
                yield fs


def qa_pairs(spec: SlideSpec, rng: np.random.Generator, with_report: bool = True) -> list[tuple[str, str, str]]:
    """(type, question, answer) for every question type with a random phrasing, plus the report."""
    out = [(t, TEMPLATES[t][rng.integers(len(TEMPLATES[t]))], answer(spec, t)) for t in QUESTION_TYPES]
    if with_report:
        from ..synth.qa import REPORT_PROMPT

        out.append(("report", REPORT_PROMPT, report(spec)))
    return out
