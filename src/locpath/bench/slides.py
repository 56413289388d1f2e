"""Synthetic bench slides of about N tissue tiles, written once into the work folder and reused (the stages
slide, the scaling curve and the headline's features all start from them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def scaling_slide(workdir: Path, n: int, log) -> Path:
    """A synthetic slide with about n tissue tiles, written once and reused."""
    from ..synth import make_spec, write_slide

    path = workdir / f"scaling_{n}.tiff"
    if path.exists():
        return path
    side = max(8, int(np.ceil(np.sqrt(n / 0.5))))
    spec = None
    for _ in range(4):
        spec = make_spec(7000 + n, tiles=(side, side), diagnosis="adenocarcinoma", grade="high grade")
        got = spec.meta["tissue_tiles"]
        if abs(got - n) <= 0.1 * n:
            break
        side = max(8, int(round(side * np.sqrt(n / max(got, 1)))))
    log(f"writing a {side}x{side}-tile synthetic slide ({spec.meta['tissue_tiles']} tissue tiles) to {path}")
    return write_slide(spec, path, fmt="tiff")
