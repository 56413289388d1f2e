"""A thumbnail with the tissue mask tinted and the kept tiles outlined: what a user checks by eye."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import SlideError
from ..fsutil import atomic_file
from .slide import Slide


def write_overlay(slide: Slide, plan, out: str | os.PathLike, max_size: int = 1024) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise SlideError(f"{out}: overlay must be a .png file")
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
    with atomic_file(out, suffix=".png") as tmp:
        pil.save(tmp, format="PNG")
    return out
