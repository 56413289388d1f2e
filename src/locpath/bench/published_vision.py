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


# the published preset's CARA (layers 3, 10, 17, 24; 28 heads) needs 25+ layers and a width divisible by 28:
# Qwen2.5-7B's 28 layers at Qwen2.5-0.5B's width
SMALL_LLM = dict(vocab_size=512, hidden_size=896, intermediate_size=1024, num_hidden_layers=28, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=False)


def encoder_bundle(work: Path, encoder: str, slide: Path | None, log=print, encoder_tiles: int = 16) -> dict:
    """`locpath build --backend openvino --precision int8-safe` on a bundle of another registered encoder at full
    depth (published resampler/TIS/CARA widths, a small random LLM: the encoder is what is measured): the build's
    per-tile checks, and the encoder's tiles/s in the fp32 and the built bundle, each in a child of its own."""
    from ..checkpoints import shipped_checkpoint
    from .child import run_step
    from .random_qwen2 import write_random_hf_folder

    folder, fp32, built = work / "small-llm", work / f"{encoder}-fp32", work / f"{encoder}-openvino-int8-safe"
    if not (folder / "config.json").exists():
        write_random_hf_folder(folder, SMALL_LLM, shipped_checkpoint("reference") / "tokenizer.json", log=log)
    res: dict = {"encoder": encoder}
    if not (fp32 / "manifest.json").exists():
        log(f"published: a bundle of {encoder} at full depth, in a child")
        res["export"] = run_step("locpath.bench.published:build_bundle",
                                 {"folder": str(folder), "bundle": str(fp32), "encoder": encoder,
                                  "size": "published", "block_size": 32})
    if not (built / "manifest.json").exists():
        res["build"] = run_step("locpath.bench.published_vision:build_vision",
                                {"bundle": str(fp32), "out": str(built), "slide": str(slide) if slide else None,
                                 "calibration": str(work / f"{encoder}-calibration.npz")})
    res["tiles_per_s"] = {name: run_step("locpath.bench.published_vision:encoder_rate",
                                         {"bundle": str(b), "tiles": encoder_tiles})
                          for name, b in (("ort_fp32", fp32), ("openvino_int8_safe", built))}
    a, b = (res["tiles_per_s"][k]["tiles_per_s"] for k in ("ort_fp32", "openvino_int8_safe"))
    res["int8_safe_over_ort_fp32"] = round(b / a, 2)
    return res


def encoder_rate(bundle: str, tiles: int) -> dict:
    """(A child step.) The bundle's tile encoder on rendered tissue tiles: tiles/s after one warm call."""
    from ..runtime.options import RuntimeOptions
    from ..runtime.pipeline import Pipeline
    from .encoder_vitb import _tiles

    pipe = Pipeline.from_bundle(bundle, RuntimeOptions(use_cache=False))
    px = pipe.manifest.preprocessing.tile_size
    x = _tiles(tiles, seed=11, px=px)
    pipe.encode_tiles(x[:pipe.tile_batch])
    t0 = time.perf_counter()
    pipe.encode_tiles(x)
    rate = len(x) / (time.perf_counter() - t0)
    enc = pipe.manifest.components["tile_encoder"]
    return {"tiles_per_s": round(rate, 2), "tiles": len(x), "tile_px": px, "backend": enc.backend,
            "precision": enc.precision, "tile_batch": pipe.tile_batch}
