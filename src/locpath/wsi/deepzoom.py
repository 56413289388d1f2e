"""Deep Zoom tiles of any slide this package opens (OpenSlide, tiffslide, a DICOM series through wsidicom), made by
OpenSlide's own `DeepZoomGenerator`. The generator takes any object with OpenSlide's interface; SlideAsOpenSlide
gives the package's Slide that interface, so every backend's tiles go through the same reads as ingestion (a
corrupt tile retried on a fresh handle and through tiffslide, one error line naming the file).

A Deep Zoom level coarser than any pyramid level is read from a finer one: a slide without a low-resolution level
would read (and hold) its whole level 0 for one coarse tile, so a tile whose read exceeds MAX_READ_PIXELS is refused
before anything is read (TileTooCostly).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..errors import SlideError
from .slide import Slide

TILE_SIZE, OVERLAP = 254, 1  # 256-px tiles with their 1-px overlap: the sizes OpenSeadragon draws best
FORMAT = "jpeg"
JPEG_QUALITY = 80
MAX_READ_PIXELS = 4096 * 4096  # one tile's read from the slide (64 MiB as RGBA)


class TileTooCostly(SlideError):
    """The slide has no pyramid level near this Deep Zoom level: the tile would read too much of a finer one."""


class SlideAsOpenSlide:
    """OpenSlide's reading interface over a package Slide: what DeepZoomGenerator calls, nothing more."""

    def __init__(self, slide: Slide):
        self._slide = slide
        self.properties: dict[str, str] = {}  # no bounds, white background: DeepZoomGenerator's defaults

    @property
    def level_count(self) -> int:
        return self._slide.level_count

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._slide.dimensions

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._slide.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._slide.level_downsamples

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return self._slide.best_level_for_downsample(downsample)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA, as OpenSlide gives it (the package's reads are RGB, already over white)."""
        (x, y), (w, h) = location, size
        rgb = self._slide.read_region(level, int(x), int(y), int(w), int(h))
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("RGBA")


def deep_zoom(slide: Slide):
    from openslide.deepzoom import DeepZoomGenerator

    return DeepZoomGenerator(SlideAsOpenSlide(slide), tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)


def dzi(dz) -> bytes:
    """The .dzi descriptor (XML) of a generator's image."""
    return dz.get_dzi(FORMAT).encode("utf-8")


def tile_jpeg(dz, slide: Slide, level: int, col: int, row: int) -> bytes:
    """One tile as JPEG. The address must be valid (the caller checks it against dz.level_count and dz.level_tiles,
    to answer with its own message); the read is held to MAX_READ_PIXELS before it starts."""
    _, slide_level, (w, h) = dz.get_tile_coordinates(level, (col, row))
    if w * h > MAX_READ_PIXELS:
        raise TileTooCostly(f"{slide.path}: Deep Zoom level {level} would read {w}x{h} pixels of pyramid level "
                            f"{slide_level} for one tile (the slide has no level near this resolution); zoom in")
    buf = io.BytesIO()
    dz.get_tile(level, (col, row)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
