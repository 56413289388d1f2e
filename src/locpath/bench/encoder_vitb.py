"""The tile-encoder recipes of `locpath build` at a ViT-B/16 shape (random weights, 512-d head), measured back to
back in one process: ORT fp32, ORT dynamic INT8, ORT static INT8 (QDQ), OpenVINO bf16, OpenVINO NNCF INT8, with
PyTorch eager fp32/bf16 as baselines. The reference model's 96-wide ViT is too small to say which recipe wins on
a real encoder (UNI, CONCH, Virchow are ViT-B/L), so this is the number a deployment should look at.

Calibration and test tiles are rendered synthetic tissue (no slide file needed); the ONNX graph and quantized
variants are cached under the work folder.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .report import _median_time, row_cosines


def _tiles(n: int, seed: int = 5) -> np.ndarray:
    from ..synth import make_spec
    from ..train.data import render_tile, tissue_tiles

    out, i = [], 0
    while len(out) < n:
        spec = make_spec(seed * 1000 + i)
        out += [render_tile(spec, c, r) for c, r in tissue_tiles(spec).grid[: n - len(out)]]
        i += 1
    return np.stack(out)


def _cos(a: np.ndarray, b: np.ndarray) -> dict:
    c = row_cosines(a, b)
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}


def bench_encoder_vitb(work: Path, log, batch: int = 16, calib: int = 64, repeats: int = 3) -> dict:
    import torch

    from ..config import TileEncoderConfig
    from ..engines import quantize_ort as q
    from ..engines.build import fastest_ov_hint, nncf_int8
    from ..export.configs import tile_encoder_config
    from ..export.exporter import export_component
    from ..models.encoders import build_tile_encoder
    from ..runtime.machine import openvino_version
    from ..runtime.openvino_runner import OpenVinoRunner
    from ..runtime.ort_runner import OrtRunner

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = TileEncoderConfig(out_dim=512, name="vit-b16-random")
    enc = build_tile_encoder(cfg).eval()
    holder = SimpleNamespace(tile_encoder=enc, cfg=SimpleNamespace(tile_encoder=cfg))
    fp32 = work / "tile_encoder.onnx"
    tiles = _tiles(calib + batch)
    cal, x = tiles[:calib], np.ascontiguousarray(tiles[calib:])
    if not fp32.exists():
        log("exporting a random ViT-B/16 tile encoder")
        export_component(tile_encoder_config(holder), holder, work)
    variants: dict = {"ort_fp32": OrtRunner(fp32, "enc")}
    dyn, static = work / "tile_encoder.int8-dynamic.onnx", work / "tile_encoder.int8-static.onnx"
    if not dyn.exists():
        log("ORT dynamic INT8")
        q.encoder_int8_dynamic(fp32, dyn)
    variants["ort_int8_dynamic"] = OrtRunner(dyn, "enc")
    if not static.exists():
        log("ORT static INT8 (QDQ, MinMax on the calibration tiles)")
        q.encoder_int8_static(fp32, static, cal)
    variants["ort_int8_static"] = OrtRunner(static, "enc")
    skipped = {}
    if openvino_version() is not None:
        variants["openvino_bf16"] = OpenVinoRunner(fp32, "enc", precision="bf16")
        xml = work / "tile_encoder.openvino-int8.xml"
        try:
            if not xml.exists():
                log("OpenVINO NNCF INT8")
                nncf_int8(fp32, work, "tile_encoder", SimpleNamespace(tiles=lambda: cal))
            hint = fastest_ov_hint(xml, "enc", cal)["ov_hint"]  # as `locpath build` decides it
            variants["openvino_nncf_int8"] = OpenVinoRunner(xml, "enc", precision="int8", hint=hint)
        except Exception as exc:  # NNCF missing or failing: the other rows still stand
            skipped["openvino_nncf_int8"] = str(exc).splitlines()[0][:200]
    else:
        skipped["openvino"] = "OpenVINO is not installed"

    def ort_like(r):
        return lambda t: r.run({"tiles": t}, ["features"])["features"]

    runs = {k: ort_like(r) for k, r in variants.items()}
    with torch.no_grad():
        xt = torch.from_numpy(x)
        runs["pytorch_fp32"] = lambda t: enc.forward_uint8(torch.from_numpy(t)).numpy()
        enc16 = build_tile_encoder(cfg).eval()
        enc16.load_state_dict(enc.state_dict())
        enc16 = enc16.to(torch.bfloat16)
        runs["pytorch_bf16"] = lambda t: enc16.forward_uint8(torch.from_numpy(t)).float().numpy()
        ref = enc.forward_uint8(xt).numpy()
        res = {k: _cos(run(x), ref) for k, run in runs.items()}
        log(f"timing {len(runs)} encoders back to back, batch {batch}")
        for _ in range(2):  # alternating rounds spread machine noise
            for k, run in runs.items():
                tps = len(x) / _median_time(lambda run=run: run(x), warmup=1, repeats=repeats)
                res[k].setdefault("tiles_per_s_runs", []).append(round(tps, 2))
    for v in res.values():
        v["tiles_per_s"] = float(np.median(v["tiles_per_s_runs"]))
    for v in res.values():
        v["vs_ort_fp32"] = v["tiles_per_s"] / res["ort_fp32"]["tiles_per_s"]
        v["vs_pytorch_bf16"] = v["tiles_per_s"] / res["pytorch_bf16"]["tiles_per_s"]
    for r in variants.values():
        r.release()
    return {"shape": "ViT-B/16, 512-d head (random weights)", "batch": batch, "calibration_tiles": calib,
            "variants": res, "skipped": skipped}
