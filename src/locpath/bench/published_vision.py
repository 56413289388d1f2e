"""`bench --published`: the published bundle with its vision graphs on OpenVINO, and a synthetic 1k-tile slide.

The streamed 7B bundle keeps CONCH v1 and the resampler as fp32 ONNX Runtime graphs. `locpath build --backend
openvino --precision int8-safe` moves them (engines/build.py keeps the INT4 decoder as it is): the tile encoder
quantized by NNCF with every calibration and held-out tile checked (min cosine >= 0.995 or no build,
engines/encoder_int8.py), the resampler compiled at bf16. Measured here as a user would run it: the build in a
child of its own, then the same from-features and from-slide steps as the fp32 bundle, and the parity of the two
(latents cosine and greedy tokens from the same features).

The synthetic slide is written by `locpath.synth` (a pyramidal SVS, JPEG tiles) until its tissue grid at the
bundle's tile size holds at least the asked tile count, so the from-slide figures include a slide of the size a
pathologist sends, not only the 13-tile real region.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..errors import LocpathError


def calibration_file(out: Path, slide: Path | None, px: int) -> Path:
    """The int8-safe build's tiles as a calibration set file: the encoder-conch suite's mix (rendered tissue and
    half of the real region's tiles; the other half joins them here, as the build holds out its own)."""
    from ..fsutil import atomic_file
    from .encoder_vitb import _calibration

    if not out.exists():
        tiles = _calibration(24, 12, slide, px=px)[2]
        with atomic_file(out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{"tile_encoder.tiles": tiles})
    return out


def build_vision(bundle: str, out: str, slide: str | None, calibration: str) -> dict:
    """(A child step.) The OpenVINO int8-safe vision build of `bundle` into `out`, timed, with what the int8-safe
    check measured."""
    from ..calibration.sets import CalibrationSet
    from ..engines.build import build_bundle
    from ..bundle.integrity import verify_bundle

    src = Path(bundle)
    px = verify_bundle(src, check_files=False).preprocessing.tile_size
    cal = CalibrationSet.load(calibration_file(Path(calibration), Path(slide) if slide else None, px))
    t0 = time.time()
    build_bundle(src, Path(out), "int8-safe", backend="openvino", calibration=cal, overwrite=True,
                 log=lambda m: print(m, flush=True))
    m = verify_bundle(Path(out), check_files=False)
    enc = m.components["tile_encoder"]
    rounds = enc.quantization.get("rounds", [])
    last = rounds[-1]["checks"] if rounds else {}
    return {"seconds": round(time.time() - t0, 1), "calibration_tiles": int(len(cal.tiles())),
            "tile_encoder": {"backend": enc.backend, "precision": enc.precision,
                             "float_groups": rounds[-1]["float_groups"] if rounds else None, "checks": last},
            "resampler": {"backend": m.components["resampler"].backend,
                          "precision": m.components["resampler"].precision},
            "bundle_bytes": sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file())}


def synthetic_slide(work: Path, tiles: int, tile_px: int, log=print, seed: int = 7) -> dict:
    """A synthetic SVS whose tissue grid at `tile_px` (0.5 um/px) holds at least `tiles` tiles, cached in `work`."""
    from ..synth import make_spec, write_slide
    from ..wsi import GridConfig, open_slide
    from ..wsi.extract import plan_tiles

    side = int(math.ceil(math.sqrt(tiles / 0.5))) * (tile_px // 224)  # in 224 px tiles; ~half of it tissue
    for _ in range(4):
        path = work / f"synthetic-{tiles}-{side}.svs"
        if not path.exists():
            t0 = time.time()
            log(f"published: writing a synthetic slide of {side}x{side} 224-px tiles")
            write_slide(make_spec(seed, tiles=(side, side)), path, write_truth=False)
            log(f"published: written in {time.time() - t0:.0f} s")
        with open_slide(path) as s:
            n = len(plan_tiles(s, GridConfig(target_mpp=0.5, tile_size=tile_px)).grid)
        if n >= tiles:
            return {"path": str(path), "grid_tiles": n, "dimensions": list(s.dimensions),
                    "bytes": path.stat().st_size}
        path.unlink()
        side = int(math.ceil(side * math.sqrt(tiles / max(n, 1) * 1.1)))
    raise LocpathError(f"bench --published: no synthetic slide reached {tiles} tissue tiles")


def parity(work: Path, base: dict, other: dict, tiles) -> dict:
    """Latents cosine and greedy tokens of two bundles from the same features (saved by measure_runtime)."""
    out = {}
    for n in tiles:
        a = np.load(work / f"latents-{base['name']}-{n}.npy")
        b = np.load(work / f"latents-{other['name']}-{n}.npy")
        a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        cos = np.sum(a2 * b2, 1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1))
        ta = base["time_to_first_token"][str(n)]["greedy_tokens"]
        tb = other["time_to_first_token"][str(n)]["greedy_tokens"]
        out[str(n)] = {"latents_cosine_min": round(float(cos.min()), 6), "greedy_tokens_identical": ta == tb,
                       "tokens_agreeing": int(next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y),
                                                   min(len(ta), len(tb))))}
    return out
