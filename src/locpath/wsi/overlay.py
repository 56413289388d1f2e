"""Pictures a user checks by eye: a thumbnail with the tissue mask tinted and the kept tiles outlined, and a
thumbnail with the evidence of an answer (per-tile weights) drawn as a heatmap."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import SlideError
from ..fsutil import atomic_file
from .slide import Slide


def overlay_image(slide: Slide, plan, max_size: int = 1024) -> tuple[Image.Image, float]:
    """(thumbnail with mask and grid, its level-0 downsample)."""
    thumb, ds = slide.thumbnail(max_size)
    img = thumb.astype(np.float32)
    mask = np.asarray(Image.fromarray(plan.tissue.mask.astype(np.uint8) * 255).resize(
        (thumb.shape[1], thumb.shape[0]), Image.Resampling.NEAREST)) > 0
    img[mask] = img[mask] * 0.7 + np.array([0, 160, 0], np.float32) * 0.3
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    s = plan.grid.size_level0 / ds
    for x, y in plan.grid.coords:
        x0, y0 = x / ds, y / ds
        draw.rectangle([x0, y0, x0 + s, y0 + s], outline=(0, 0, 255))
    return pil, ds


def evidence_image(slide: Slide, coords: np.ndarray, weights: np.ndarray, tile_size_level0: int,
                   max_size: int = 1024) -> Image.Image:
    """The thumbnail with each tile tinted red in proportion to its evidence weight (the strongest fully)."""
    thumb, ds = slide.thumbnail(max_size)
    heat = np.zeros(thumb.shape[:2], np.float32)
    s = max(1, int(round(tile_size_level0 / ds)))
    top = float(np.max(weights)) if len(weights) else 0.0
    for (x, y), w in zip(np.asarray(coords), np.asarray(weights)):
        if w > 0 and top > 0:
            x0, y0 = int(x / ds), int(y / ds)
            heat[y0:y0 + s, x0:x0 + s] = np.maximum(heat[y0:y0 + s, x0:x0 + s], w / top)
    img = thumb.astype(np.float32) * (1 - 0.65 * heat[..., None]) + np.array([230, 20, 20], np.float32) * 0.65 * heat[..., None]
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _save_png(pil: Image.Image, out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise SlideError(f"{out}: the picture must be a .png file")
    with atomic_file(out, suffix=".png") as tmp:
        pil.save(tmp, format="PNG")
    return out


def write_overlay(slide: Slide, plan, out: str | os.PathLike, max_size: int = 1024) -> Path:
    return _save_png(overlay_image(slide, plan, max_size)[0], out)


def write_evidence(slide: Slide, coords: np.ndarray, weights: np.ndarray, tile_size_level0: int,
                   out: str | os.PathLike, max_size: int = 1024) -> Path:
    return _save_png(evidence_image(slide, coords, weights, tile_size_level0, max_size), out)
