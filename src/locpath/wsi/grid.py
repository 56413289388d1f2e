"""A tile grid at a target resolution: which level to read, how large a region, which tiles hold tissue."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SlideError
from .slide import Slide
from .tissue import TissueMask


@dataclass(frozen=True)
class GridConfig:
    target_mpp: float = 0.5  # microns per pixel of the tiles handed to the encoder (0.5 = 20x)
    tile_size: int = 224  # tile side in pixels at target_mpp
    overlap: int = 0  # overlap between neighbouring tiles, pixels at target_mpp
    min_tissue: float = 0.25  # drop tiles whose tissue fraction is below this

    def validate(self) -> None:
        if not self.target_mpp > 0:
            raise SlideError(f"target mpp must be positive, got {self.target_mpp}")
        if self.tile_size < 8:
            raise SlideError(f"tile size must be at least 8 px, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise SlideError(f"overlap must be in [0, tile size), got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise SlideError(f"min tissue fraction must be in [0, 1], got {self.min_tissue}")


@dataclass
class TileGrid:
    """Tiles of one slide. coords are level-0 top-left corners, in row-major order."""

    coords: np.ndarray  # int64 (N, 2): x, y
    tissue: np.ndarray  # float32 (N,): tissue fraction per tile
    size_level0: int  # tile side in level-0 pixels
    stride_level0: int
    read_level: int  # pyramid level the tiles are read from
    read_size: int  # tile side in pixels at read_level (resized to tile_size afterwards)
    tile_size: int
    target_mpp: float
    slide_mpp: float
    grid_shape: tuple[int, int]  # columns, rows of the full grid before tissue filtering

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def grid_index(self) -> np.ndarray:
        """(N, 2) column/row of each tile in the full grid: what STM uses for adjacency."""
        return self.coords // self.stride_level0


def build_grid(slide: Slide, tissue: TissueMask | None, cfg: GridConfig = GridConfig()) -> TileGrid:
    cfg.validate()
    mpp = slide.require_mpp()
    scale = cfg.target_mpp / mpp  # level-0 pixels per target pixel
    size0 = int(round(cfg.tile_size * scale))
    stride0 = int(round((cfg.tile_size - cfg.overlap) * scale))
    w0, h0 = slide.dimensions
    if size0 < 1 or stride0 < 1:
        raise SlideError(f"{slide.path}: tile size {cfg.tile_size} at {cfg.target_mpp} mpp is below one pixel")
    if w0 < size0 or h0 < size0:
        raise SlideError(
            f"{slide.path}: slide is {w0}x{h0} px at {mpp:g} mpp, smaller than one {cfg.tile_size} px tile at "
            f"{cfg.target_mpp:g} mpp ({size0} px at level 0)"
        )
    cols = (w0 - size0) // stride0 + 1
    rows = (h0 - size0) // stride0 + 1
    xs = np.arange(cols, dtype=np.int64) * stride0
    ys = np.arange(rows, dtype=np.int64) * stride0
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)

    if tissue is None:
        frac = np.ones(len(coords), dtype=np.float32)
    else:
        frac = tile_tissue_fraction(tissue, coords, size0)
    keep = frac >= cfg.min_tissue if tissue is not None else np.ones(len(coords), bool)
    level = slide.best_level_for_downsample(scale)
    read_size = max(1, int(round(size0 / slide.level_downsamples[level])))
    return TileGrid(
        coords=coords[keep],
        tissue=frac[keep].astype(np.float32),
        size_level0=size0,
        stride_level0=stride0,
        read_level=level,
        read_size=read_size,
        tile_size=cfg.tile_size,
        target_mpp=cfg.target_mpp,
        slide_mpp=mpp,
        grid_shape=(int(cols), int(rows)),
    )


def tile_tissue_fraction(tissue: TissueMask, coords: np.ndarray, size0: int) -> np.ndarray:
    """Fraction of each tile covered by tissue, from the mask's summed-area table."""
    sat = tissue.integral()
    mh, mw = tissue.mask.shape
    ds = tissue.downsample
    x0 = np.clip(np.floor(coords[:, 0] / ds).astype(np.int64), 0, mw)
    y0 = np.clip(np.floor(coords[:, 1] / ds).astype(np.int64), 0, mh)
    x1 = np.clip(np.ceil((coords[:, 0] + size0) / ds).astype(np.int64), 0, mw)
    y1 = np.clip(np.ceil((coords[:, 1] + size0) / ds).astype(np.int64), 0, mh)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    total = sat[y1, x1].astype(np.int64) - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (total / area).astype(np.float32)
