"""Write synthetic slides as files OpenSlide opens: Aperio SVS-style or generic pyramidal TIFF.

Level 0 is rendered and written strip by strip (one row of TIFF tiles at a time), so memory is bounded by
one strip plus the coarser levels (1/16 the area and less). Levels are chained IFDs, never SubIFDs
(OpenSlide ignores SubIFD pyramids). Writes go to a temporary file that is renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..fsutil import atomic_file
from .world import SlideSpec, render_region

TIFF_TILE = 256
LEVEL_STEP = 4  # downsample between pyramid levels
MIN_LEVEL_SIDE = 512  # stop adding levels below this size


def _level_downsamples(w: int, h: int) -> list[int]:
    ds = [1]
    while max(w, h) // (ds[-1] * LEVEL_STEP) >= MIN_LEVEL_SIDE:
        ds.append(ds[-1] * LEVEL_STEP)
    return ds


def _tiles_of(img_rows: np.ndarray, width: int):
    """Yield TIFF tiles (padded white) of a strip TIFF_TILE rows high."""
    h = img_rows.shape[0]
    for x in range(0, width, TIFF_TILE):
        tile = np.full((TIFF_TILE, TIFF_TILE, 3), 255, np.uint8)
        part = img_rows[:, x : x + TIFF_TILE]
        tile[:h, : part.shape[1]] = part
        yield tile


def write_slide(
    spec: SlideSpec,
    path: str | os.PathLike,
    fmt: str = "svs",
    quality: int = 85,
    write_truth: bool = True,
) -> Path:
    """Render `spec` into `path` (SVS-style when fmt='svs', generic pyramidal TIFF when fmt='tiff')."""
    import tifffile

    if fmt not in ("svs", "tiff"):
        raise ValueError(f"unknown slide format {fmt!r} (svs or tiff)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = spec.dimensions
    dss = _level_downsamples(w, h)
    coarse = [np.empty((h // d, w // d, 3), np.uint8) for d in dss[1:]]
    res = 1e4 / spec.mpp  # pixels per centimetre
    mag = round(10.0 / spec.mpp)

    def level0_tiles():
        for y in range(0, h, TIFF_TILE):
            rows = render_region(spec, 0, y, w, min(TIFF_TILE, h - y))
            for img, d in zip(coarse, dss[1:]):
                y0, y1 = y // d, min((y + rows.shape[0]) // d, img.shape[0])
                if y1 > y0:
                    part = rows[: (y1 - y0) * d, : img.shape[1] * d]
                    img[y0:y1] = part.reshape(y1 - y0, d, img.shape[1], d, 3).mean(axis=(1, 3)).astype(np.uint8)
            yield from _tiles_of(rows, w)

    def desc(kind: str, lw: int, lh: int) -> str:
        if fmt != "svs":
            return ""
        head = "Aperio Image Library v12.0.15 (locpath synthetic)\r\n"
        if kind == "level":
            body = f"{w}x{h} [0,0 {lw}x{lh}] ({TIFF_TILE}x{TIFF_TILE}) JPEG/RGB Q={quality}"
        elif kind == "thumbnail":
            body = f"{w}x{h} -> {lw}x{lh} - "
        else:
            return f"{head}{kind} {lw}x{lh}"
        return f"{head}{body}|AppMag = {mag}|MPP = {spec.mpp:.4f}|Filename = synthetic-{spec.seed}|ScanScope ID = LOCPATH"

    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": quality}, metadata=None)
    with atomic_file(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=w * h * 3 > 2**31) as tif:
            tif.write(
                level0_tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE),
                description=desc("level", w, h), resolution=(res, res), resolutionunit="CENTIMETER", **common,
            )
            if fmt == "svs":
                # Aperio puts a stripped thumbnail second, then the reduced levels, then label and macro
                src = coarse[-1] if coarse else None
                thumb = _thumbnail(src if src is not None else render_region(spec, 0, 0, w, h), 768)
                tif.write(thumb, description=desc("thumbnail", thumb.shape[1], thumb.shape[0]), **common)
            for img, d in zip(coarse, dss[1:]):
                tif.write(
                    img, tile=(TIFF_TILE, TIFF_TILE), description=desc("level", img.shape[1], img.shape[0]),
                    resolution=(res / d, res / d), resolutionunit="CENTIMETER", subfiletype=1, **common,
                )
            if fmt == "svs":
                label = _label_image(spec)
                tif.write(label, description=desc("label", label.shape[1], label.shape[0]), subfiletype=1,
                          photometric="rgb", compression="lzw", metadata=None)
                macro = _thumbnail(coarse[-1] if coarse else thumb, 1024)
                tif.write(macro, description=desc("macro", macro.shape[1], macro.shape[0]), subfiletype=9, **common)
    if write_truth:
        write_ground_truth(spec, path)
    return path


def truth_path(slide_path: str | os.PathLike) -> Path:
    p = Path(slide_path)
    return p.with_name(p.stem + ".truth.json")


def write_ground_truth(spec: SlideSpec, slide_path: str | os.PathLike, questions: list[dict] | None = None) -> Path:
    from .qa import questions_for

    out = truth_path(slide_path)
    data = spec.ground_truth()
    data["slide"] = Path(slide_path).name
    data["questions"] = questions if questions is not None else questions_for(spec)
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(data, indent=2))
    return out


def _thumbnail(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(1.0, max_side / max(h, w))
    return np.asarray(Image.fromarray(img).resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.BILINEAR))


def _label_image(spec: SlideSpec) -> np.ndarray:
    """A plain label: white with a black band whose width encodes the seed (no text rendering needed)."""
    img = np.full((300, 300, 3), 255, np.uint8)
    bits = [(spec.seed >> i) & 1 for i in range(16)]
    for i, b in enumerate(bits):
        if b:
            img[40:260, 20 + 16 * i : 30 + 16 * i] = 0
    return img
