"""Slide -> tissue -> grid -> streamed tiles -> features, with any encoder callable (torch or an engine)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import SlideError, warn
from .features import FeatureFile
from .grid import GridConfig, TileGrid, build_grid
from .reader import TileReader
from .slide import Slide
from .tissue import TissueConfig, TissueMask, detect_tissue


@dataclass
class TilePlan:
    tissue: TissueMask
    grid: TileGrid
    seconds: float


def plan_tiles(slide: Slide, grid_cfg: GridConfig = GridConfig(), tissue_cfg: TissueConfig = TissueConfig()) -> TilePlan:
    """Tissue mask and tile grid; a SlideError when no tile holds enough tissue."""
    t0 = time.perf_counter()
    tissue = detect_tissue(slide, tissue_cfg)
    grid = build_grid(slide, tissue, grid_cfg)
    if len(grid) == 0:
        raise SlideError(
            f"{slide.path}: no tissue found (tissue fraction {tissue.tissue_fraction:.3f}; no tile reaches "
            f"{grid_cfg.min_tissue:.0%} tissue)"
        )
    return TilePlan(tissue, grid, time.perf_counter() - t0)


@dataclass
class ExtractStats:
    tiles: int = 0
    read_s: float = 0.0  # time the consumer waited for tiles
    encode_s: float = 0.0
    unreadable: int = 0  # tiles skipped: the libraries could not decode them


def extract_features(
    slide: Slide,
    encode: Callable[[np.ndarray], np.ndarray],
    plan: TilePlan,
    encoder_name: str,
    batch_size: int = 64,
    workers: int = 2,
    progress=None,
    check: Callable[[], None] | None = None,
) -> tuple[FeatureFile, ExtractStats]:
    """Run `encode` (uint8 NHWC batch -> (B, D) features) over every tissue tile of `plan`. `progress`: True/False/
    None for a terminal bar (None: when on a terminal and the slide is large), or a callable(done, total) called
    after each batch (a service's job progress). `check`: called before each batch; it raises to stop the run (a
    service stopping, a time bound). Tiles the libraries cannot decode are left out, with one warning."""
    stats = ExtractStats()
    feats, keep = [], []
    report = progress if callable(progress) else None
    reader = TileReader(slide, plan.grid, batch_size=batch_size, workers=workers,
                        progress=None if report else progress, desc="encode")
    t_wait = time.perf_counter()
    if check is not None:
        check()
    for batch in reader:
        if check is not None:
            check()
        stats.read_s += time.perf_counter() - t_wait
        t0 = time.perf_counter()
        ok = batch.ok if batch.ok is not None else np.ones(len(batch.tiles), bool)
        keep.append(ok)
        if ok.any():
            feats.append(np.asarray(encode(batch.tiles[ok] if not ok.all() else batch.tiles), dtype=np.float32))
        stats.encode_s += time.perf_counter() - t0
        stats.tiles += len(batch.tiles)
        if report is not None:
            report(stats.tiles, len(plan.grid))
        t_wait = time.perf_counter()
    g = plan.grid
    kept = np.concatenate(keep) if keep else np.ones(len(g), bool)
    if reader.unreadable:
        if not kept.any():
            raise SlideError(f"{slide.path}: none of its {len(g)} tiles could be decoded (corrupt data)")
        warn(f"{slide.path}: {reader.unreadable} of {len(g)} tiles unreadable (corrupt data); they were skipped")
    stats.unreadable = reader.unreadable
    ff = FeatureFile(
        features=np.concatenate(feats),
        coords=g.coords[kept].copy(),
        patch_size=g.tile_size,
        patch_size_level0=g.size_level0,
        level0_mpp=g.slide_mpp,
        target_mpp=g.target_mpp,
        encoder=encoder_name,
        name=slide.path,
    )
    return ff, stats
