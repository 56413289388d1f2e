"""The tile-encoder recipes of `locpath build` at real encoder shapes, measured back to back in one process.

ViT-B/16 (random timm-init weights, 512-d head): ORT fp32, ORT dynamic INT8, ORT static INT8 (QDQ), OpenVINO bf16,
OpenVINO NNCF INT8 (plain), OpenVINO int8-safe (engines/encoder_int8.py), with PyTorch eager fp32/bf16 as baselines.
ViT-L/16 at UNI's shape (`--encoder-vit-l`): the recipes that matter at that size (OpenVINO bf16, NNCF INT8,
int8-safe, ORT dynamic INT8) against PyTorch bf16; its weights are drawn per tensor (fan-in scaled matrices, norms
near 1, layer scale 0.5-1) because timm's init leaves UNI's layer scale at 1e-5, which would hide all 24 blocks
from quantization. Random weights have no outlier channels (trained ViTs do): a recipe that holds the bound here
must still be checked on the real weights, which is what int8-safe does at build time.

Cosines are per tile against PyTorch fp32, over the calibration tiles and held-out tiles (never calibrated on):
`cosine_min` is the worst tile of both, `cosine_min_held_out` of the held-out ones. Calibration and held-out tiles
are rendered synthetic tissue, plus real tiles of `slide` when given (half to each); the ONNX graphs and quantized
variants are cached under the work folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .report import _median_time, row_cosines


@dataclass(frozen=True)
class EncoderShape:
    key: str  # baselines entry: encoder_vit_b / encoder_vit_l
    title: str
    registered: str | None  # locpath.encoders name (None: the plain ViT-B config)
    variants: tuple[str, ...]  # which recipes are timed (the pytorch baselines always are)
    batch: int
    calib: int  # synthetic calibration tiles
    held_out: int  # synthetic held-out tiles
    tile_px: int = 224


VIT_B = EncoderShape("encoder_vit_b", "ViT-B/16, 512-d head (random timm-init weights)", None,
                     ("ort_fp32", "ort_int8_dynamic", "ort_int8_static", "openvino_bf16", "openvino_nncf_int8",
                      "openvino_int8_safe"), 16, 64, 32)
VIT_L = EncoderShape("encoder_vit_l", "ViT-L/16 at UNI's shape (uni_v1), 1024-d CLS (random drawn weights)", "uni_v1",
                     ("ort_int8_dynamic", "openvino_bf16", "openvino_nncf_int8", "openvino_int8_safe"), 8, 32, 16)
CONCH = EncoderShape("encoder_conch", "CONCH v1 at full depth, 448 px tiles (conch_v1; random drawn weights)",
                     "conch_v1", ("ort_fp32", "ort_int8_dynamic", "openvino_int8_safe"), 4, 24, 12, tile_px=448)
SHAPES = {"vit_b": VIT_B, "vit_l": VIT_L, "conch_v1": CONCH}
INT8_VARIANTS = ("ort_int8_dynamic", "ort_int8_static", "openvino_nncf_int8", "openvino_int8_safe")


def _tiles(n: int, seed: int = 5, px: int = 224) -> np.ndarray:
    from ..synth import make_spec
    from ..synth.world import render_region
    from ..train.data import TILE, render_tile, tissue_tiles

    out, i = [], 0
    while len(out) < n:
        spec = make_spec(seed * 1000 + i)
        grid = tissue_tiles(spec).grid[: n - len(out)]
        out += [render_tile(spec, c, r) if px == TILE else render_region(spec, c * TILE, r * TILE, px, px)
                for c, r in grid]
        i += 1
    return np.stack(out)


def slide_tiles(slide: Path, n: int = 32, px: int = 224) -> np.ndarray:
    """Up to n tissue tiles of a real slide at px pixels, 0.5 um/px, spread over the slide."""
    from ..wsi import GridConfig, TileReader, open_slide
    from ..wsi.extract import plan_tiles

    with open_slide(slide) as s:
        plan = plan_tiles(s, GridConfig(target_mpp=0.5, tile_size=px, min_tissue=0.5))
        pick = np.unique(np.linspace(0, len(plan.grid) - 1, min(n, len(plan.grid))).astype(int))
        reader = TileReader(s, plan.grid)
        return np.stack([reader.read_tile(s, int(x), int(y)) for x, y in plan.grid.coords[pick]])


def _cos(a: np.ndarray, b: np.ndarray, held: np.ndarray) -> dict:
    c = row_cosines(a, b)
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()),
            "cosine_min_calibration": float(c[~held].min()), "cosine_min_held_out": float(c[held].min())}


def _build_encoder(shape: EncoderShape):
    import torch

    from ..config import TileEncoderConfig
    from ..models.encoders import build_tile_encoder, encoder_config, random_state_dict

    torch.manual_seed(0)
    cfg = encoder_config(shape.registered) if shape.registered else TileEncoderConfig(out_dim=512, name="vit-b16-random")
    enc = build_tile_encoder(cfg).eval()
    if shape.registered:
        enc.load_state_dict(random_state_dict(enc, 1))
    return cfg, enc


def _calibration(calib: int, held_out: int, slide: Path | None, px: int = 224):
    """(calibration tiles, held-out tiles, all of them, held-out mask): rendered tissue, plus half each of the
    real slide's tiles when given."""
    syn = _tiles(calib + held_out, px=px)
    cal, x = syn[:calib], syn[calib:]
    if slide is not None:
        real = slide_tiles(Path(slide), px=px)
        cal, x = np.concatenate([cal, real[0::2]]), np.concatenate([x, real[1::2]])
    every = np.concatenate([cal, x])
    return cal, np.ascontiguousarray(x), every, np.arange(len(every)) >= len(cal)


def _ort_variants(sh: EncoderShape, work: Path, fp32: Path, cal: np.ndarray, log) -> dict:
    from ..engines import quantize_ort as q
    from ..runtime.ort_runner import OrtRunner

    variants = {}
    if "ort_fp32" in sh.variants:
        variants["ort_fp32"] = OrtRunner(fp32, "enc")
    dyn, static = work / "tile_encoder.int8-dynamic.onnx", work / "tile_encoder.int8-static.onnx"
    if "ort_int8_dynamic" in sh.variants:
        if not dyn.exists():
            log("ORT dynamic INT8")
            q.encoder_int8_dynamic(fp32, dyn)
        variants["ort_int8_dynamic"] = OrtRunner(dyn, "enc")
    if "ort_int8_static" in sh.variants:
        if not static.exists():
            log("ORT static INT8 (QDQ, MinMax on the calibration tiles)")
            q.encoder_int8_static(fp32, static, cal)
        variants["ort_int8_static"] = OrtRunner(static, "enc")
    return variants


def _openvino_variants(work: Path, fp32: Path, cal: np.ndarray, real: bool, log) -> tuple[dict, dict, dict]:
    """(variants, skipped, recipes) of OpenVINO bf16, NNCF INT8 and int8-safe (each cached in the work folder)."""
    from ..engines.build import fastest_ov_hint, nncf_int8
    from ..engines.encoder_int8 import build_int8_safe
    from ..runtime.machine import openvino_version
    from ..runtime.openvino_runner import OpenVinoRunner

    if openvino_version() is None:
        return {}, {"openvino": "OpenVINO is not installed"}, {}
    variants, skipped, recipes = {"openvino_bf16": OpenVinoRunner(fp32, "enc", precision="bf16")}, {}, {}
    xml = work / "tile_encoder.openvino-int8.xml"
    try:
        if not xml.exists():
            log("OpenVINO NNCF INT8")
            nncf_int8(fp32, work, "tile_encoder", SimpleNamespace(tiles=lambda: cal))
        hint = fastest_ov_hint(xml, "enc", cal)["ov_hint"]  # as `locpath build` decides it
        variants["openvino_nncf_int8"] = OpenVinoRunner(xml, "enc", precision="int8", hint=hint)
    except Exception as exc:  # NNCF missing or failing: the other rows still stand
        skipped["openvino_nncf_int8"] = str(exc).splitlines()[0][:200]
    safe = work / ("int8-safe-real" if real else "int8-safe")  # calibrated on other tiles
    try:
        safe.mkdir(exist_ok=True)
        if (safe / "info.json").exists():
            info = json.loads((safe / "info.json").read_text())
        else:
            log("OpenVINO int8-safe (NNCF, sensitive layer groups float until every tile holds cosine 0.995)")
            info = build_int8_safe(fp32, safe, "tile_encoder", cal, log=log)
            (safe / "info.json").write_text(json.dumps(info))
        recipes["openvino_int8_safe"] = {k: info[k] for k in ("float_groups", "ov_hint", "cosine_min",
                                                                "calibration_min", "held_out_min", "rounds")}
        variants["openvino_int8_safe"] = OpenVinoRunner(safe / info["artifact"], "enc", precision="int8",
                                                        hint=info["ov_hint"])
    except Exception as exc:  # the bound unreachable (LocpathError) or NNCF missing
        skipped["openvino_int8_safe"] = str(exc).splitlines()[0][:300]
    return variants, skipped, recipes


def _measure(runs: dict, ref, every: np.ndarray, held: np.ndarray, x: np.ndarray, batch: int, repeats: int,
             log) -> dict:
    """Per-tile cosines against `ref` (fp32 eager), then tiles/s in two alternating rounds (medians), and each
    variant's speed against ORT fp32 (when timed) and PyTorch bf16."""

    def batched(run, t):
        return np.concatenate([run(np.ascontiguousarray(t[i:i + batch])) for i in range(0, len(t), batch)])

    ref = batched(ref, every)
    res = {k: _cos(batched(run, every), ref, held) for k, run in runs.items()}
    xb = x[:batch]
    log(f"timing {len(runs)} encoders back to back, batch {batch}")
    for _ in range(2):  # alternating rounds spread machine noise
        for k, run in runs.items():
            tps = len(xb) / _median_time(lambda run=run: run(xb), warmup=1, repeats=repeats)
            res[k].setdefault("tiles_per_s_runs", []).append(round(tps, 2))
    for v in res.values():
        v["tiles_per_s"] = float(np.median(v["tiles_per_s_runs"]))
    for v in res.values():
        if "ort_fp32" in res:
            v["vs_ort_fp32"] = v["tiles_per_s"] / res["ort_fp32"]["tiles_per_s"]
        v["vs_pytorch_bf16"] = v["tiles_per_s"] / res["pytorch_bf16"]["tiles_per_s"]
    return res


def bench_encoder_vitb(work: Path, log, batch: int | None = None, calib: int | None = None, repeats: int = 3,
                       shape: str = "vit_b", slide: Path | None = None, held_out: int | None = None) -> dict:
    """One encoder shape's recipes, timed in alternating rounds; see the module docstring."""
    import torch

    from ..export.configs import tile_encoder_config
    from ..export.exporter import export_component
    from ..models.encoders import build_tile_encoder

    sh = SHAPES[shape]
    batch, calib, held_out = batch or sh.batch, calib or sh.calib, held_out or sh.held_out
    work.mkdir(parents=True, exist_ok=True)
    cfg, enc = _build_encoder(sh)
    fp32 = work / "tile_encoder.onnx"
    cal, x, every, held = _calibration(calib, held_out, slide, sh.tile_px)
    if not fp32.exists():
        log(f"exporting a {sh.title} tile encoder")
        holder = SimpleNamespace(tile_encoder=enc, cfg=SimpleNamespace(tile_encoder=cfg))
        export_component(tile_encoder_config(holder), holder, work)
    variants = _ort_variants(sh, work, fp32, cal, log)
    ov, skipped, recipes = _openvino_variants(work, fp32, cal, slide is not None, log)
    variants.update(ov)
    runs = {k: (lambda r: lambda t: r.run({"tiles": t}, ["features"])["features"])(r) for k, r in variants.items()}
    with torch.no_grad():
        if "ort_fp32" in sh.variants:  # ViT-L's fp32 eager takes minutes per round: reference only
            runs["pytorch_fp32"] = lambda t: enc.forward_uint8(torch.from_numpy(t)).numpy()
        enc16 = build_tile_encoder(cfg).eval()
        enc16.load_state_dict(enc.state_dict())
        enc16 = enc16.to(torch.bfloat16)
        runs["pytorch_bf16"] = lambda t: enc16.forward_uint8(torch.from_numpy(t)).float().numpy()
        res = _measure(runs, lambda t: enc.forward_uint8(torch.from_numpy(t)).numpy(), every, held, x, batch,
                       repeats, log)
    for k, info in recipes.items():
        res[k]["recipe"] = info
    for r in variants.values():
        r.release()
    return {"shape": sh.title, "batch": batch, "calibration_tiles": int(len(cal)), "held_out_tiles": int(len(x)),
            "real_tiles": slide is not None, "variants": res, "skipped": skipped}


def int8_summary(vb: dict, bound: float = 0.995) -> dict | None:
    """The fastest INT8 variant whose worst tile holds `bound` (else the fastest INT8 one, not met)."""
    int8 = {k: v for k, v in vb["variants"].items() if k in INT8_VARIANTS}
    if not int8 or "pytorch_bf16" not in vb["variants"]:
        return None
    ok = {k: v for k, v in int8.items() if v["cosine_min"] >= bound}
    pool = ok or int8
    best = max(pool, key=lambda k: pool[k]["tiles_per_s"])
    return {"variant": best, "vs_pytorch_bf16": pool[best]["vs_pytorch_bf16"], "cosine_min": pool[best]["cosine_min"],
            "cosine_mean": pool[best]["cosine_mean"], "holds_bound": bool(ok)}


def best_accurate(vb: dict) -> tuple[str, dict]:
    """The fastest non-PyTorch variant whose mean cosine holds 0.999: (name, its entry)."""
    ok = {k: v for k, v in vb["variants"].items() if not k.startswith("pytorch") and v["cosine_mean"] >= 0.999}
    best = max(ok, key=lambda k: ok[k]["tiles_per_s"])
    return best, ok[best]


def int8_ratios(vb: dict, size: str) -> tuple[dict, dict]:
    """(ratios, targets) of the INT8 encoder at shape `size` ("b" or "l"): the fastest INT8 variant whose worst
    tile holds cosine 0.995, met at 1.3x PyTorch bf16."""
    s = int8_summary(vb)
    if s is None:
        return {}, {}
    return ({f"encoder_vit_{size}_int8_vs_pytorch_bf16": s["vs_pytorch_bf16"]},
            {f"encoder_vit_{size}_int8_1.3x_pytorch_bf16_at_min_cosine_0.995": dict(
                s, target=1.3, value=s["vs_pytorch_bf16"], met=s["holds_bound"] and s["vs_pytorch_bf16"] >= 1.3)})
