"""The out-of-distribution slides `locpath eval --trust` measures the OOD detector on, each written as a real slide
file (Aperio SVS-style TIFF, read through OpenSlide like any slide):
- real: real H&E (the test data's CMU-1 region: whole, rotated, mirrored, and its halves);
- stain: held-out synthetic slides with their stain far outside the training range (optical density per channel
  scaled by 0.35-0.55 or 1.8-2.4, where training slides vary by 0.85-1.15);
- blur: held-out synthetic slides out of focus (Gaussian blur, radius 4-6 px at 0.5 um/px);
- pen: held-out synthetic slides with thick marker strokes (green, blue or black) across the tissue;
- nontissue: held-out synthetic slides' tissue outline filled with smooth coloured debris (no tissue at all).
The synthetic ones come from split "eval" of the seed, indices from 5000 (never the in-distribution slides measured
beside them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..synth.seeds import split_seed
from ..synth.world import BACKGROUND, make_spec, render_region
from ..wsi import open_slide

KINDS = ("real", "stain", "blur", "pen", "nontissue")
FIRST_INDEX = 5000
REAL_SLIDE = "cmu_small_region.svs"


def write_image_slide(img: np.ndarray, path: Path, mpp: float, quality: int = 85) -> Path:
    """One RGB image as a one-level Aperio SVS-style TIFF (as the test data's real region is stored)."""
    import tifffile

    from ..fsutil import atomic_file

    h, w = img.shape[:2]
    desc = (f"Aperio Image Library v12.0.15 (locpath ood set)\r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB "
            f"Q={quality}|AppMag = {round(10.0 / mpp)}|MPP = {mpp:.4f}")
    with atomic_file(path) as tmp:
        with tifffile.TiffWriter(tmp) as tif:
            tif.write(img, tile=(256, 256), photometric="rgb", compression="jpeg",
                      compressionargs={"level": quality}, description=desc, resolution=(1e4 / mpp, 1e4 / mpp),
                      resolutionunit="CENTIMETER", metadata=None)
    return path


def _stain(img: np.ndarray, rng) -> np.ndarray:
    scale = np.where(rng.random(3) < 0.5, rng.uniform(0.35, 0.55, 3), rng.uniform(1.8, 2.4, 3))
    od = 255.0 - img.astype(np.float32)
    return np.clip(255.0 - od * scale, 0, 255).astype(np.uint8)


def _blur(img: np.ndarray, rng) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(float(rng.uniform(4, 6)))))


def _pen(img: np.ndarray, rng) -> np.ndarray:
    h, w = img.shape[:2]
    colour = [(30, 140, 60), (30, 60, 170), (20, 20, 20)][int(rng.integers(3))]
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(4, 7))):
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(4)]
        draw.line(pts, fill=255, width=int(rng.uniform(0.05, 0.08) * min(w, h)), joint="curve")
    a = (np.asarray(mask, np.float32) / 255.0 * 0.8)[..., None]
    return (img * (1 - a) + np.asarray(colour, np.float32) * a).astype(np.uint8)


def _nontissue(img: np.ndarray, rng, tissue: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    small = rng.uniform(0, 1, (max(2, h // 64), max(2, w // 64), 3)).astype(np.float32)
    noise = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC))
    base = np.asarray([rng.uniform(60, 200) for _ in range(3)], np.float32)
    debris = np.clip(base + (noise.astype(np.float32) - 128) * 0.8, 0, 255).astype(np.uint8)
    return np.where(tissue[..., None], debris, img)


def _tissue_pixels(spec, w: int, h: int) -> np.ndarray:
    lab = spec.labels != BACKGROUND
    img = Image.fromarray(lab.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(img) > 0


def synthetic_variant(kind: str, seed: int, index: int, work: Path) -> Path:
    """One held-out synthetic slide, rendered whole, changed as `kind` says, written as a slide file."""
    spec = make_spec(split_seed(seed, "eval", FIRST_INDEX + index))
    w, h = spec.dimensions
    img = render_region(spec, 0, 0, w, h)
    rng = np.random.default_rng([seed, index, KINDS.index(kind)])
    if kind == "nontissue":
        img = _nontissue(img, rng, _tissue_pixels(spec, w, h))
    else:
        img = {"stain": _stain, "blur": _blur, "pen": _pen}[kind](img, rng)
    return write_image_slide(img, work / f"ood_{kind}_{seed}_{index:03d}.svs", spec.mpp)


def real_slides(source: Path, work: Path) -> list[Path]:
    """The real H&E region whole, rotated, mirrored and halved: real tissue in several arrangements."""
    with open_slide(source) as s:
        w, h = s.dimensions
        img = np.asarray(s.read_region(0, 0, 0, w, h))[..., :3]
        mpp = float(s.mpp)
    half = h // 2
    views = {"whole": img, "rot90": np.rot90(img).copy(), "mirror": img[:, ::-1].copy(),
             "top": img[:half].copy(), "bottom": img[half:].copy()}
    return [write_image_slide(v, work / f"ood_real_{name}.svs", mpp) for name, v in views.items()]


def ood_set(seed: int, per_kind: int, work: Path, real_source: Path | None) -> list[tuple[str, Path]]:
    """(kind, slide file) of the OOD set: real H&E (when `real_source` is given) and `per_kind` of each synthetic
    variant."""
    out = [("real", p) for p in (real_slides(real_source, work) if real_source else [])]
    for kind in KINDS[1:]:
        out += [(kind, synthetic_variant(kind, seed, i, work)) for i in range(per_kind)]
    return out
