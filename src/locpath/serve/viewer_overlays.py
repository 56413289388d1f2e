"""What the viewer draws over a slide: a finished question's evidence as a transparent heatmap (placed over the
slide's full extent, its opacity the page's to choose) and the tissue grid of planned tiles (the page draws them as
vector rectangles). Both cached with the viewer's tiles (viewer.py); all functions block."""

from __future__ import annotations

import io
import json
import math

import numpy as np
from PIL import Image

from .errors import ApiError
from .images import question_evidence
from .service import Service
from .viewer import cached

HEAT_RGB = (230, 20, 20)
HEAT_ALPHA = 220  # the strongest tile; the page's opacity control scales the whole image
HEAT_MAX_SIZE = 2048  # long side of the heatmap image, in pixels


def heatmap_rgba(dims: tuple[int, int], coords: np.ndarray, weights: np.ndarray, tile_size_level0: int,
                 max_size: int = HEAT_MAX_SIZE) -> Image.Image:
    """An RGBA image of the slide's aspect ratio: each tile red with alpha in proportion to its weight (the strongest
    HEAT_ALPHA), transparent where there is no evidence."""
    w0, h0 = dims
    ds = max(1.0, max(w0, h0) / max_size)
    w, h = max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))
    heat = np.zeros((h, w), np.float32)
    top = float(np.max(weights)) if len(weights) else 0.0
    s = max(1, round(tile_size_level0 / ds))
    for (x, y), wt in zip(np.asarray(coords), np.asarray(weights)):
        if wt > 0 and top > 0:
            x0, y0 = int(x / ds), int(y / ds)
            heat[y0:y0 + s, x0:x0 + s] = np.maximum(heat[y0:y0 + s, x0:x0 + s], wt / top)
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = HEAT_RGB
    rgba[..., 3] = np.round(heat * HEAT_ALPHA).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def heatmap_png(svc: Service, slide, job, render: bool = True) -> bytes | None:
    """The evidence of a finished question (a job the caller may read) as a transparent PNG."""
    def make(f):
        from ..wsi import open_slide

        ev = question_evidence(svc, slide, job.to_dict(), f)
        if not ev.spatial:
            raise ApiError(409, "conflict", f"the evidence of question {job.id} has no tile positions")
        with open_slide(f, require_mpp=False) as s:
            dims = s.dimensions
        buf = io.BytesIO()
        heatmap_rgba(dims, ev.coords, ev.weights, ev.tile_size_level0).save(buf, format="PNG")
        return buf.getvalue()
    return cached(svc, slide, ("heatmap", job.id), make, render)


def grid_json(svc: Service, slide, render: bool = True) -> bytes | None:
    """The planned tiles (level-0 top-left corners and side), as ingestion plans them with this bundle."""
    def make(f):
        from ..wsi import open_slide

        with open_slide(f) as s:  # as ingestion and the thumbnail open it (the grid needs its resolution)
            plan = svc.pipe.plan_tiles(s)
            w, h = s.dimensions
        return json.dumps({"width": int(w), "height": int(h), "tile_size_level0": int(plan.grid.size_level0),
                           "tiles": np.asarray(plan.grid.coords, np.int64).tolist()}).encode()
    return cached(svc, slide, ("grid",), make, render)
