"""`locpath build`: a new bundle whose components are quantized or compiled, and whose manifest records what
was done (precision, recipe, parent fp32 sha256) with an engine config beside every built file.

Precisions (ONNX Runtime): fp32 (copy), int8 (tile encoder dynamic INT8 + decoder INT4), int8-static (tile
encoder static QDQ from a calibration set + decoder INT4), int4 (decoder only), fp16 (all graphs; GPUs).
TensorRT plans are built through `engines/tensorrt.py` where TensorRT is installed.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import time
from pathlib import Path

from ..errors import LocpathError
from ..fsutil import atomic_dir
from . import quantize_ort as q
from .engine_config import EngineConfig, describe_machine
from .manifest import load_manifest, sha256_file

ORT_RECIPES = {
    "fp32": {},
    "int8": {"tile_encoder": "int8-dynamic", "decoder": "int4"},
    "int8-static": {"tile_encoder": "int8-static", "decoder": "int4"},
    "int4": {"decoder": "int4"},
    "fp16": {c: "fp16" for c in ("tile_encoder", "resampler", "tis", "cross_kv", "decoder")},
}
PRECISIONS = tuple(ORT_RECIPES)


def build_bundle(src: str | Path, out: str | Path, precision: str, backend: str = "ort", calibration=None,
                 overwrite: bool = False, log=print) -> Path:
    src, out = Path(src), Path(out)
    manifest = load_manifest(src, verify=True)
    if any(c.precision != "fp32" for c in manifest.components.values()):
        raise LocpathError(f"{src}: build from an fp32 bundle (this one is already built)")
    if out.exists() and not overwrite:
        raise LocpathError(f"{out}: already exists (pass --overwrite to replace it)")
    if backend == "tensorrt":
        from .tensorrt import build_tensorrt_bundle

        return build_tensorrt_bundle(src, out, manifest, precision, overwrite=overwrite, log=log)
    if backend != "ort":
        raise LocpathError(f"unknown backend {backend!r} (ort or tensorrt)")
    if precision not in ORT_RECIPES:
        raise LocpathError(f"unknown precision {precision!r} for ONNX Runtime (choose from {', '.join(PRECISIONS)})")
    recipe = ORT_RECIPES[precision]
    if "int8-static" in recipe.values() and calibration is None:
        raise LocpathError("int8-static needs a calibration set: pass --calibration NPZ or --slides SLIDE...")
    t_start = time.time()
    device_kind = "cuda" if precision == "fp16" else "cpu"
    machine = describe_machine("onnxruntime", device_kind)
    cfg_hashes: dict[str, str] = {}
    with atomic_dir(out) as tmp:
        for name in list(manifest.files()) + ["chat_template.jinja"]:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        for comp, how in recipe.items():
            entry = manifest.components[comp]
            fp32 = src / entry.file
            built = tmp / f"{comp}.{how}.onnx"
            t0 = time.time()
            if how == "int8-dynamic":
                info = q.encoder_int8_dynamic(fp32, built)
            elif how == "int8-static":
                info = q.encoder_int8_static(fp32, built, calibration.tiles())
            elif how == "int4":
                info = q.decoder_int4(fp32, built)
            elif how == "fp16":
                info = q.to_fp16(fp32, built)
            else:  # pragma: no cover - recipes are fixed above
                raise LocpathError(f"unknown recipe {how!r}")
            (tmp / entry.file).unlink()
            info["seconds"] = round(time.time() - t0, 1)
            info["bytes"] = {"fp32": q.file_size(fp32), "built": q.file_size(built)}
            art_sha = sha256_file(built)
            ec = EngineConfig(component=comp, backend="onnxruntime", precision=how, artifact=built.name,
                              artifact_sha256=art_sha, onnx_sha256=entry.sha256, device=machine["device"],
                              libraries=machine["libraries"], build=info)
            ec_name = f"{comp}.{how}.engine.json"
            ec.save(tmp / ec_name)
            cfg_hashes[ec_name] = sha256_file(tmp / ec_name)
            entry.parent_sha256 = entry.sha256
            entry.file, entry.sha256, entry.precision = built.name, art_sha, how
            entry.quantization, entry.engine_config = info, ec_name
            log(f"build: {comp} -> {built.name} ({how}, {info['bytes']['fp32'] / 1e6:.1f} -> "
                f"{info['bytes']['built'] / 1e6:.1f} MB, {info['seconds']} s)")
        manifest.export = dict(manifest.export, engine_config_sha256=cfg_hashes, build={
            "precision": precision, "backend": "onnxruntime", "source_bundle": str(src),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - t_start, 1),
            "calibration": str(calibration.path) if calibration is not None else None})
        manifest.save(tmp)
    log(f"build: {out} ({precision}) in {time.time() - t_start:.1f} s")
    return out
