"""`locpath build`: a new bundle whose components are quantized or compiled, and whose manifest records what
was done (precision, recipe, parent fp32 sha256) with an engine config beside every built file.

Precisions (ONNX Runtime): fp32 (copy), int8 (tile encoder dynamic INT8 + decoder INT4), int8-static (tile
encoder static QDQ from a calibration set + decoder INT4), int4 (decoder only), int8-encoder (encoder only),
fp16 (all graphs; GPUs); `auto` measures the CPU candidates per stage and builds the winner (engines/auto.py).
TensorRT plans are built through `engines/tensorrt.py` where TensorRT is installed.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import LocpathError
from ..fsutil import atomic_dir
from . import quantize_ort as q
from .engine_config import EngineConfig, describe_machine
from .manifest import load_manifest, sha256_file

FUSED = "decoder_fused"
ORT_RECIPES = {
    "fp32": {},
    "int8": {"tile_encoder": "int8-dynamic", "decoder": "int4", FUSED: "int4-fused"},
    "int8-static": {"tile_encoder": "int8-static", "decoder": "int4", FUSED: "int4-fused"},
    "int4": {"decoder": "int4", FUSED: "int4-fused"},
    "int8-encoder": {"tile_encoder": "int8-dynamic"},
    "fp16": {c: "fp16" for c in ("tile_encoder", "resampler", "tis", "cross_kv", "decoder")},
}
# the fused decoder is an fp32 ONNX Runtime graph with CPU-tuned contrib ops: recipes for other devices drop it
DROP_FUSED = ("fp16",)
PRECISIONS = tuple(ORT_RECIPES)


INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)


def build_bundle(src: str | Path, out: str | Path, precision: str, backend: str = "ort", calibration=None,
                 overwrite: bool = False, log=print, int4_block_size: int = 32) -> Path:
    """`int4_block_size`: weights per INT4 scale in the decoders. 32 (the default, as onnxruntime-genai) keeps
    the most accuracy; 128 reads ~15 % fewer bytes per decoded token, which is what a CPU decode step costs."""
    src, out = Path(src), Path(out)
    if int4_block_size not in INT4_BLOCK_SIZES:
        raise LocpathError(f"INT4 block size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, "
                           f"not {int4_block_size}")
    manifest = load_manifest(src, verify=True)
    if any(c.precision != "fp32" or c.backend != "onnxruntime" for c in manifest.components.values()):
        raise LocpathError(f"{src}: build from an fp32 bundle (this one is already built)")
    if out.exists() and not overwrite:
        raise LocpathError(f"{out}: already exists (pass --overwrite to replace it)")
    if precision == "auto":
        from .auto import build_auto

        return build_auto(src, out, calibration, overwrite, log, int4_block_size)
    if backend == "tensorrt":
        from .tensorrt import build_tensorrt_bundle

        return build_tensorrt_bundle(src, out, manifest, precision, overwrite=overwrite, log=log)
    if backend == "openvino":
        return _build_openvino(src, out, manifest, precision, log, calibration, int4_block_size)
    if backend != "ort":
        raise LocpathError(f"unknown backend {backend!r} (ort, openvino or tensorrt)")
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
        _copy_bundle(src, tmp, manifest)
        if precision in DROP_FUSED:
            drop_fused(tmp, manifest, log)
        for comp, how in recipe.items():
            if comp in manifest.components:  # bundles exported before the fused decoder have none
                _quantize(src, tmp, manifest.components[comp], comp, how, calibration, machine, cfg_hashes, log,
                          int4_block_size)
        _finish(tmp, manifest, cfg_hashes, src, precision, "onnxruntime", t_start,
                calibration=str(calibration.path) if calibration is not None else None)
    log(f"build: {out} ({precision}) in {time.time() - t_start:.1f} s")
    return out


def _copy_bundle(src: Path, tmp: Path, manifest) -> None:
    """Every file of the source bundle, into the bundle being built (components are replaced afterwards)."""
    for name in list(manifest.files()) + ["chat_template.jinja"]:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)


def drop_fused(tmp: Path, manifest, log) -> None:
    """Remove the fused decoder from a bundle being built for a backend or device it does not serve."""
    entry = manifest.components.pop(FUSED, None)
    if entry is not None:
        (tmp / entry.file).unlink(missing_ok=True)
        log("build: fused decoder dropped (ONNX Runtime CPU graph; this build runs the plain decoder)")


def record_engine(tmp: Path, entry, comp: str, backend: str, precision: str, artifact: str, machine: dict,
                  info: dict, cfg_hashes: dict) -> None:
    """Write the component's EngineConfig beside it and point its manifest entry at the built artifact."""
    art_sha = sha256_file(tmp / artifact)
    ec_name = f"{comp}.{backend}-{precision}.engine.json"
    EngineConfig(component=comp, backend=backend, precision=precision, artifact=artifact, artifact_sha256=art_sha,
                 onnx_sha256=entry.sha256, device=machine["device"], libraries=machine["libraries"],
                 build=info).save(tmp / ec_name)
    cfg_hashes[ec_name] = sha256_file(tmp / ec_name)
    entry.parent_sha256 = entry.sha256
    entry.file, entry.sha256, entry.backend, entry.precision = artifact, art_sha, backend, precision
    entry.quantization, entry.engine_config = info, ec_name


def _finish(tmp: Path, manifest, cfg_hashes: dict, src: Path, precision: str, backend: str, t_start: float,
            **extra) -> None:
    manifest.export = dict(manifest.export, engine_config_sha256=cfg_hashes, build=dict(
        precision=precision, backend=backend, source_bundle=str(src),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.time() - t_start, 1), **extra))
    manifest.save(tmp)


def _quantize(src: Path, tmp: Path, entry, comp: str, how: str, calibration, machine: dict, cfg_hashes: dict, log,
              int4_block_size: int = 32):
    """Replace one component's fp32 graph in `tmp` by its ONNX Runtime `how` variant, with an engine config."""
    fp32 = src / entry.file
    built = tmp / f"{comp}.{how}.onnx"
    t0 = time.time()
    if how == "int8-dynamic":
        info = q.encoder_int8_dynamic(fp32, built)
    elif how == "int8-static":
        info = q.encoder_int8_static(fp32, built, calibration.tiles())
    elif how == "int4":
        info = q.decoder_int4(fp32, built, block_size=int4_block_size)
    elif how == "fp16":
        info = q.to_fp16(fp32, built)
    elif how == "int4-fused":
        info = _fused_int4(fp32, built, entry, int4_block_size)
    else:  # pragma: no cover - recipes are fixed above
        raise LocpathError(f"unknown recipe {how!r}")
    (tmp / entry.file).unlink()
    info["seconds"] = round(time.time() - t0, 1)
    info["bytes"] = {"fp32": q.file_size(fp32), "built": q.file_size(built)}
    record_engine(tmp, entry, comp, "onnxruntime", how, built.name, machine, info, cfg_hashes)
    log(f"build: {comp} -> {built.name} ({how}, {info['bytes']['fp32'] / 1e6:.1f} -> "
        f"{info['bytes']['built'] / 1e6:.1f} MB, {info['seconds']} s)")


def _fused_int4(fp32: Path, built: Path, entry, block_size: int = 32) -> dict:
    """Rebuild the fused decoder from its own fp32 weights with INT4 MatMulNBits everywhere (lm_head included)
    and, for a tied embedding, GatherBlockQuantized over the same INT4 tensor."""
    from .fused_graph import FusedDecoderSpec, build_fused_decoder, weights_from_fused_onnx

    spec = FusedDecoderSpec.from_dict(entry.templates["spec"])
    return build_fused_decoder(spec, weights_from_fused_onnx(fp32, spec), built, quant="int4", block_size=block_size,
                               source=str(fp32))


OPENVINO_COMPONENTS = ("tile_encoder", "resampler")


def _build_openvino(src: Path, out: Path, manifest, precision: str, log, calibration=None,
                    int4_block_size: int = 32) -> Path:
    """The vision graphs on OpenVINO: bf16/fp32 compile the bundle's ONNX at load (bf16 on AMX); int8 quantizes the
    tile encoder with OpenVINO's own NNCF (post-training, calibrated on the calibration tiles, transformer preset:
    LayerNorm, Softmax and residual adds stay float) into an OpenVINO IR, with the resampler on bf16.
    The decoder stays on ONNX Runtime (INT4 MatMulNBits with "+int4"): ORT-made quantized graphs run badly in
    OpenVINO, and decode steps at these sizes are dominated by per-call overhead."""
    from ..runtime.openvino_runner import OpenVinoRunner, openvino_version

    ov_precision, _, decoder = precision.partition("+")
    if ov_precision not in ("bf16", "fp32", "int8") or decoder not in ("", "int4"):
        raise LocpathError(f"OpenVINO precision must be bf16, fp32 or int8, optionally +int4 (decoder), not {precision!r}")
    if openvino_version() is None:
        raise LocpathError("OpenVINO is not installed (pip install 'locpath[openvino]')")
    if ov_precision == "int8" and calibration is None:
        raise LocpathError("OpenVINO int8 (NNCF) needs a calibration set: pass --calibration NPZ or --slides SLIDE...")
    machine = describe_machine("openvino", "cpu")
    cfg_hashes: dict[str, str] = {}
    t_start = time.time()
    with atomic_dir(out) as tmp:
        _copy_bundle(src, tmp, manifest)
        for comp in OPENVINO_COMPONENTS:
            entry = manifest.components[comp]
            t0 = time.time()
            if ov_precision == "int8" and comp == "tile_encoder":
                info = _nncf_int8(src / entry.file, tmp, comp, calibration)
                artifact, comp_precision = info.pop("artifact"), "int8"
                (tmp / entry.file).unlink()
                info.update(_fastest_hint(tmp / artifact, comp, calibration.tiles()))
            else:
                artifact, comp_precision = entry.file, ("bf16" if ov_precision == "int8" else ov_precision)
                info = {"method": "OpenVINO compile at load", "inference_precision_hint": comp_precision}
            OpenVinoRunner(tmp / artifact, comp, precision=comp_precision,
                           hint=info.get("ov_hint")).load()  # fails here, not on the appliance
            info["compile_seconds"] = round(time.time() - t0, 2)
            data = info.get("data_file")
            record_engine(tmp, entry, comp, "openvino", comp_precision, artifact, machine, info, cfg_hashes)
            entry.data_files = {data: sha256_file(tmp / data)} if data else {}
            log(f"build: {comp} -> OpenVINO {comp_precision} ({info['compile_seconds']} s)")
        if decoder == "int4":
            for comp, how in (("decoder", "int4"), (FUSED, "int4-fused")):
                if comp in manifest.components:
                    _quantize(src, tmp, manifest.components[comp], comp, how, None,
                              describe_machine("onnxruntime", "cpu"), cfg_hashes, log, int4_block_size)
        _finish(tmp, manifest, cfg_hashes, src, precision, "openvino", t_start,
                calibration=str(calibration.path) if calibration is not None else None)
    log(f"build: {out} (OpenVINO {precision}) in {time.time() - t_start:.1f} s")
    return out


def _nncf_int8(onnx_path: Path, tmp: Path, comp: str, calibration) -> dict:
    """NNCF post-training INT8 of an ONNX graph through OpenVINO, saved as IR (.xml + .bin) in `tmp`."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise LocpathError("OpenVINO int8 needs NNCF (pip install 'locpath[openvino]')") from exc
    tiles = calibration.tiles()
    items = [np.ascontiguousarray(tiles[i:i + 1]) for i in range(len(tiles))]
    model = ov.Core().read_model(str(onnx_path))
    quantized = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(items), preset=nncf.QuantizationPreset.PERFORMANCE)
    xml = f"{comp}.openvino-int8.xml"
    ov.save_model(quantized, str(tmp / xml), compress_to_fp16=False)
    return {"method": "NNCF post-training quantization (OpenVINO backend), transformer preset",
            "nncf": getattr(nncf, "__version__", "?"), "calibration_tiles": len(items), "artifact": xml,
            "data_file": xml[:-4] + ".bin"}


def _fastest_hint(model: Path, comp: str, tiles: np.ndarray, batch: int = 16) -> dict:
    """Time an INT8 model under the f32 and bf16 precision hints (the float ops between the INT8 ones run at the
    hint) in alternating rounds on calibration tiles; the faster one is recorded and used at run time."""
    from ..runtime.openvino_runner import OpenVinoRunner

    x = np.ascontiguousarray(tiles[:batch])
    runners = {h: OpenVinoRunner(model, comp, precision="int8", hint=h).load() for h in ("f32", "bf16")}
    times: dict[str, list] = {h: [] for h in runners}
    for r in runners.values():
        r.run({"tiles": x})
    for _ in range(3):
        for h, r in runners.items():
            t0 = time.perf_counter()
            r.run({"tiles": x})
            times[h].append(time.perf_counter() - t0)
    tps = {h: round(len(x) / float(np.median(t)), 1) for h, t in times.items()}
    for r in runners.values():
        r.release()
    return {"ov_hint": max(tps, key=tps.get), "ov_hint_tiles_per_s": tps}
