"""`locpath build`: a new bundle whose components are quantized or compiled, and whose manifest records what
was done (precision, recipe, parent fp32 sha256) with an engine config beside every built file.

Precisions (ONNX Runtime): fp32 (copy), int8 (tile encoder dynamic INT8 + decoder INT4), int8-static (tile
encoder static QDQ from a calibration set + decoder INT4), int4 (decoder only), int8-encoder (encoder only),
fp16 (all graphs; GPUs). TensorRT plans are built through `engines/tensorrt_build.py` where TensorRT is installed.
`--precision auto` is a measurement, so it lives above the build tools (`bench/auto.py`) and calls this.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np

from ..bundle import names
from ..bundle.integrity import verify_bundle
from ..bundle.manifest import IOSpec
from ..bundle.names import DECODER, DECODER_FUSED, DECODER_FUSED_PREFILL, TILE_ENCODER
from ..errors import LocpathError
from ..fsutil import atomic_dir
from ..runtime.machine import describe_machine, openvino_version
from . import quantize_ort as q
from .bundle_edit import BundleEdit
from .prefill import PREFILL_WEIGHTS

FUSED = DECODER_FUSED
ORT_RECIPES = {
    "fp32": {},
    "int8": {"tile_encoder": "int8-dynamic", "decoder": "int4", FUSED: "int4-fused"},
    "int8-static": {"tile_encoder": "int8-static", "decoder": "int4", FUSED: "int4-fused"},
    "int4": {"decoder": "int4", FUSED: "int4-fused"},
    "int8-encoder": {"tile_encoder": "int8-dynamic"},
    "fp16": dict({c: "fp16" for c in ("tile_encoder", "resampler", "tis", "cross_kv", "decoder")},
                 **{FUSED: "fp16-fused"}),
}
PRECISIONS = tuple(ORT_RECIPES)


INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)


def build_bundle(src: str | Path, out: str | Path, precision: str, backend: str = "ort", calibration=None,
                 overwrite: bool = False, log=print, int4_block_size: int = 32, record: dict | None = None,
                 prefill: str = "none") -> Path:
    """`prefill` (ONNX Runtime recipes whose fused decoder is INT4): `auto` builds the INT8 prefill graph
    (engines/prefill.py) and adds it as decoder_fused_prefill when it prefills faster than the decode graph with
    the same greedy tokens; a recipe name (int8, int8-nbits, int4) adds that graph unmeasured; `none` adds none.
    `int4_block_size`: weights per INT4 scale in the decoders. 32 (the default, as onnxruntime-genai) keeps
    the most accuracy; 128 reads ~15 % fewer bytes per decoded token, which is what a CPU decode step costs.
    `record`: extra facts stored under the manifest's export.build (what `auto` measured)."""
    src, out = Path(src), Path(out)
    if int4_block_size not in INT4_BLOCK_SIZES:
        raise LocpathError(f"INT4 block size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, "
                           f"not {int4_block_size}")
    manifest = verify_bundle(src)
    for comp in rebuilt_components(manifest, backend, precision):
        c = manifest.components[comp]
        if c.precision != "fp32" or c.backend != "onnxruntime":
            raise LocpathError(f"{src}: its {comp} is already built ({c.backend} {c.precision}); this recipe rebuilds "
                               "it: build from the fp32 bundle")
    if out.exists() and not overwrite:
        raise LocpathError(f"{out}: already exists (pass --overwrite to replace it)")
    if precision == "auto":
        raise LocpathError("precision 'auto' measures candidates: use `locpath build --precision auto` "
                           "(locpath.bench.auto.build_auto)")
    extra = dict(record or {}, calibration=str(calibration.path) if calibration is not None else None)
    if backend == "tensorrt":
        from .tensorrt_build import build_tensorrt_bundle

        return build_tensorrt_bundle(src, out, manifest, precision, log=log, **extra)
    if backend == "openvino":
        return _build_openvino(src, out, manifest, precision, log, calibration, int4_block_size, extra)
    if backend != "ort":
        raise LocpathError(f"unknown backend {backend!r} (ort, openvino or tensorrt)")
    if precision not in ORT_RECIPES:
        raise LocpathError(f"unknown precision {precision!r} for ONNX Runtime (choose from {', '.join(PRECISIONS)})")
    recipe = ORT_RECIPES[precision]
    if "int8-static" in recipe.values() and calibration is None:
        raise LocpathError("int8-static needs a calibration set: pass --calibration NPZ or --slides SLIDE...")
    if prefill not in ("none", "auto") + PREFILL_WEIGHTS:
        raise LocpathError(f"--prefill must be auto, none or one of {', '.join(PREFILL_WEIGHTS)}, not {prefill!r}")
    machine = describe_machine("onnxruntime", "cuda" if precision == "fp16" else "cpu")
    with atomic_dir(out) as tmp:
        edit = BundleEdit(src, tmp, manifest, log)
        fused_fp32 = (edit.source(FUSED), copy.deepcopy(manifest.components[FUSED])) if FUSED in manifest.components else None
        for comp, how in recipe.items():
            if comp in manifest.components:  # bundles without a fused decoder have none to rebuild
                _quantize(edit, comp, how, calibration, machine, log, int4_block_size)
        if prefill != "none" and fused_fp32 and recipe.get(FUSED) == "int4-fused":
            _add_prefill(edit, *fused_fp32, prefill, machine, log, int4_block_size)
        if "resampler" in recipe:
            edit.drop_resampler_chunks(f"the resampler is {recipe['resampler']} in this build")
        edit.finish(precision, "onnxruntime", **extra)
    log(f"build: {out} ({precision}) in {time.time() - edit.t_start:.1f} s")
    return out


def rebuilt_components(manifest, backend: str, precision: str) -> list[str]:
    """The components a recipe replaces, each of which must still be the fp32 ONNX Runtime graph. The others are
    kept as they are: a bundle streamed with its INT4 decoder (the published-scale path, export/streamed.py) can
    still have its vision graphs moved to OpenVINO (`--backend openvino --precision int8-safe`). TensorRT
    rebuilds every graph."""
    if backend == "ort":
        comps = list(ORT_RECIPES.get(precision, {}))
    elif backend == "openvino":
        comps = list(OPENVINO_COMPONENTS) + ([DECODER, FUSED] if precision.endswith("+int4") else [])
    else:
        comps = list(manifest.components)
    return [c for c in comps if c in manifest.components]


def _quantize(edit: BundleEdit, comp: str, how: str, calibration, machine: dict, log, int4_block_size: int = 32):
    """Replace one component's fp32 graph by its ONNX Runtime `how` variant, with an engine config."""
    entry = edit.manifest.components[comp]
    fp32 = edit.source(comp)
    built = edit.tmp / f"{comp}.{how}.onnx"
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
        info = _fused_rebuild(fp32, built, entry, "int4", int4_block_size)
    elif how == "fp16-fused":
        info = _fused_rebuild(fp32, built, entry, "fp16")
    else:  # pragma: no cover - recipes are fixed above
        raise LocpathError(f"unknown recipe {how!r}")
    info["seconds"] = round(time.time() - t0, 1)
    info["bytes"] = {"fp32": q.file_size(fp32), "built": q.file_size(built)}
    edit.replace(comp, "onnxruntime", how, built.name, machine, info)
    if how == "fp16-fused":  # its K/V (and cross K/V) are float16: the manifest's contract says so
        from .fused_graph import FusedDecoderSpec

        contract = FusedDecoderSpec.from_templates(entry.templates).contract("float16")
        entry.templates = dict(entry.templates, **contract.to_templates())
        entry.inputs = [IOSpec.from_decl(d) for d in contract.inputs()]
        entry.outputs = [IOSpec.from_decl(d) for d in contract.outputs()]
    log(f"build: {comp} -> {built.name} ({how}, {info['bytes']['fp32'] / 1e6:.1f} -> "
        f"{info['bytes']['built'] / 1e6:.1f} MB, {info['seconds']} s)")


def _add_prefill(edit: BundleEdit, fp32: Path, fp32_entry, how: str, machine: dict, log, block_size: int) -> None:
    """decoder_fused_prefill from the fused decoder's fp32 weights, with the decode graph's contract (the runtime
    runs prompts on it, single tokens on decoder_fused, both on one K/V cache); with `auto`, kept only when
    measured faster with the same greedy tokens."""
    from .fused_graph import FusedDecoderSpec, weights_from_fused_onnx
    from .prefill import PrefillRecipe, build_prefill_decoder, measure_prefill

    spec = FusedDecoderSpec.from_templates(fp32_entry.templates)
    r = PrefillRecipe("int8" if how == "auto" else how, block_size)
    art = f"{DECODER_FUSED_PREFILL}.{r.name}.onnx"
    t0 = time.time()
    info = build_prefill_decoder(spec, weights_from_fused_onnx(fp32, spec), edit.tmp / art, r, source=str(fp32))
    info["seconds"] = round(time.time() - t0, 1)
    data = [info["data_file"]] if info["data_file"] else []
    m = info["measured"] = measure_prefill(edit.tmp / edit.manifest.components[FUSED].file, edit.tmp / art,
                                           spec.contract())
    if how == "auto" and not m["faster_and_same"]:
        for name in [art, *data]:
            (edit.tmp / name).unlink(missing_ok=True)
        log(f"build: no {DECODER_FUSED_PREFILL} ({r.name} prefilled {m['prompt_tokens']} tokens in "
            f"{m['prefill_graph_ms']} ms vs {m['decode_graph_prefill_ms']} ms, greedy tokens agree: "
            f"{m['greedy_tokens_agree']})")
        return
    entry = copy.deepcopy(fp32_entry)
    entry.file, entry.engine_config, entry.data_files, entry.parent_sha256 = art, None, data, None
    edit.manifest.components[DECODER_FUSED_PREFILL] = entry
    edit.replace(DECODER_FUSED_PREFILL, "onnxruntime", r.name, art, machine, info, data)
    log(f"build: {DECODER_FUSED_PREFILL} -> {art} (prefill {m['prefill_graph_ms']} ms vs "
        f"{m['decode_graph_prefill_ms']} ms on the decode graph, {m['prompt_tokens']} tokens)")


def _fused_rebuild(fp32: Path, built: Path, entry, quant: str, block_size: int = 32) -> dict:
    """Rebuild the fused decoder from its own fp32 weights: `int4` (MatMulNBits everywhere, lm_head included, and
    for a tied embedding GatherBlockQuantized over the same INT4 tensor) or `fp16` (for the CUDA provider, whose
    GroupQueryAttention takes fp16; RMSNorm statistics stay fp32 inside SimplifiedLayerNormalization)."""
    from .fused_graph import FusedDecoderSpec, build_fused_decoder, weights_from_fused_onnx

    spec = FusedDecoderSpec.from_templates(entry.templates)
    return build_fused_decoder(spec, weights_from_fused_onnx(fp32, spec), built, quant=quant, block_size=block_size,
                               source=str(fp32))


OPENVINO_COMPONENTS = (TILE_ENCODER, "resampler")


def _build_openvino(src: Path, out: Path, manifest, precision: str, log, calibration=None,
                    int4_block_size: int = 32, extra: dict | None = None) -> Path:
    """The vision graphs on OpenVINO: bf16/fp32 compile the bundle's ONNX at load (bf16 on AMX); int8 quantizes the
    tile encoder with OpenVINO's own NNCF (post-training, calibrated on the calibration tiles, transformer preset:
    LayerNorm, Softmax and residual adds stay float) into an OpenVINO IR, with the resampler on bf16; int8-safe
    (engines/encoder_int8.py) does the same but checks every calibration and held-out tile, keeps the layer groups
    measured most sensitive in float until the minimum tile cosine is >= 0.995, and refuses to build otherwise.
    The chunked resampler moves to OpenVINO at the resampler's precision and runs slides above the chunk unless
    OpenVINO's one graph measured 1.5x faster here (`build.large_slides` of the resampler's engine config).
    The decoder stays on ONNX Runtime (INT4 MatMulNBits with "+int4"): ORT-made quantized graphs run badly in
    OpenVINO, and decode steps at these sizes are dominated by per-call overhead. "+int4-ov" is the exception
    for large decoders: the INT4 fused graph's MatMulNBits read into OpenVINO's compressed-weight matmuls
    (`_fused_to_openvino`)."""
    from ..runtime.openvino_runner import OpenVinoRunner

    ov_precision, _, decoder = precision.partition("+")
    if ov_precision not in ("bf16", "fp32", "int8", "int8-safe") or decoder not in ("", "int4", "int4-ov"):
        raise LocpathError(f"OpenVINO precision must be bf16, fp32, int8 or int8-safe, optionally +int4 (INT4 decoder "
                           f"on ONNX Runtime) or +int4-ov (INT4 fused decoder on OpenVINO), not {precision!r}")
    if decoder == "int4-ov" and FUSED not in manifest.components:
        raise LocpathError(f"{src}: +int4-ov runs the fused decoder on OpenVINO; this bundle has none")
    if openvino_version() is None:
        raise LocpathError("OpenVINO is not installed (pip install 'locpath[openvino]')")
    if ov_precision.startswith("int8") and calibration is None:
        raise LocpathError(f"OpenVINO {ov_precision} (NNCF) needs a calibration set: pass --calibration NPZ or "
                           "--slides SLIDE...")
    machine = describe_machine("openvino", "cpu")
    with atomic_dir(out) as tmp:
        edit = BundleEdit(src, tmp, manifest, log)
        chunk_graphs = ({c: edit.source(c) for c in names.RESAMPLER_CHUNKS}
                        if all(c in manifest.components for c in names.RESAMPLER_CHUNKS) else {})
        for comp in OPENVINO_COMPONENTS:
            t0 = time.time()
            data_files: list[str] = []
            if ov_precision == "int8-safe" and comp == TILE_ENCODER:  # min tile cosine >= 0.995 or no build
                from .encoder_int8 import build_int8_safe

                info = build_int8_safe(edit.source(comp), tmp, comp, calibration.tiles(), log=log)
                artifact, comp_precision = info.pop("artifact"), "int8"
                data_files = [info["data_file"]]
            elif ov_precision == "int8" and comp == TILE_ENCODER:
                info = nncf_int8(edit.source(comp), tmp, comp, calibration)
                artifact, comp_precision = info.pop("artifact"), "int8"
                data_files = [info["data_file"]]
                info.update(fastest_ov_hint(tmp / artifact, comp, calibration.tiles()))
            else:
                artifact = manifest.components[comp].file
                comp_precision = "bf16" if ov_precision.startswith("int8") else ov_precision
                info = {"method": "OpenVINO compile at load", "inference_precision_hint": comp_precision}
            built = OpenVinoRunner(tmp / artifact, comp, precision=comp_precision,
                                   hint=info.get("ov_hint")).load()  # fails here, not on the appliance
            info["compile_seconds"] = round(time.time() - t0, 2)
            if comp == "resampler" and chunk_graphs:
                info["large_slides"] = _large_slide_route(edit, built, chunk_graphs, comp_precision, machine, log)
            edit.replace(comp, "openvino", comp_precision, artifact, machine, info, data_files)
            log(f"build: {comp} -> OpenVINO {comp_precision} ({info['compile_seconds']} s)")
        if decoder:
            for comp, how in ((DECODER, "int4"), (FUSED, "int4-fused")):
                if comp in manifest.components and manifest.components[comp].precision == "fp32":
                    _quantize(edit, comp, how, None, describe_machine("onnxruntime", "cpu"), log, int4_block_size)
        if decoder == "int4-ov":
            _fused_to_openvino(edit, machine, log)
        edit.finish(precision, "openvino", **(extra or {}))
    log(f"build: {out} (OpenVINO {precision}) in {time.time() - edit.t_start:.1f} s")
    return out


def _large_slide_route(edit: BundleEdit, built, chunk_graphs: dict, precision: str, machine: dict, log) -> dict:
    """The chunked resampler moved to OpenVINO at the resampler's precision, kept for slides above the chunk
    unless OpenVINO's one graph is clearly faster here (engines/resampler_route.py); dropped otherwise."""
    from ..runtime.openvino_runner import OpenVinoRunner
    from .resampler_route import large_slide_route

    chunks, seconds = {}, {}
    try:
        for comp, path in chunk_graphs.items():
            t0 = time.time()
            chunks[comp] = OpenVinoRunner(path, comp, precision=precision).load()  # fails here, not on the appliance
            seconds[comp] = round(time.time() - t0, 2)
        route = large_slide_route(built, chunks, edit.manifest.model_config)
    except LocpathError as exc:  # the chunks are an option: a graph OpenVINO refuses leaves the one graph
        edit.drop_resampler_chunks(f"OpenVINO could not run them ({exc})")
        log(f"build: slides above the chunk run the one graph (the chunked resampler failed on OpenVINO: {exc})")
        return {"keep_chunks": False, "failed": str(exc)}
    times = (f"{route['tokens']} tokens, first/again: one graph {route['whole_graph_first_ms']}/"
             f"{route['whole_graph_again_ms']} ms, chunks {route['chunks_first_ms']}/{route['chunks_again_ms']} ms")
    if route["keep_chunks"]:
        for comp in chunk_graphs:
            edit.replace(comp, "openvino", precision, edit.manifest.components[comp].file, machine,
                         {"method": "OpenVINO compile at load", "inference_precision_hint": precision,
                          "compile_seconds": seconds[comp]})
    else:
        edit.drop_resampler_chunks(f"OpenVINO's one resampler graph was faster here ({times})")
    how = f"the chunked resampler (OpenVINO {precision})" if route["keep_chunks"] else "the one graph"
    log(f"build: slides above the chunk run {how} ({times})")
    return route


def _fused_to_openvino(edit: BundleEdit, machine: dict, log) -> None:
    """The INT4 fused decoder (built above, or streamed INT4 at export) moved to OpenVINO: a graph of its own beside
    the INT4 one, reading the same data file (engines/openvino_fused.py); compiled once here so a graph OpenVINO
    cannot take fails the build, not the appliance. The INT8 prefill graph is dropped: it would hold a second copy
    of the weights for the prompt, which OpenVINO's compressed-weight matmuls now run."""
    from ..runtime.openvino_runner import OpenVinoRunner
    from .fused_graph import FusedDecoderSpec
    from .openvino_fused import openvino_fused_variant

    entry = edit.manifest.components[FUSED]
    if entry.precision not in ("int4-fused", "int4"):  # "int4": streamed INT4 at export (export/streamed.py)
        raise LocpathError(f"{edit.src}: its fused decoder is {entry.backend} {entry.precision}; +int4-ov moves an "
                           "INT4 fused decoder to OpenVINO")
    t0 = time.time()
    spec = FusedDecoderSpec.from_templates(entry.templates)
    artifact = f"{FUSED}.int4-fused.openvino.onnx"
    info = openvino_fused_variant(edit.tmp / entry.file, edit.tmp / artifact, spec.hidden)
    data_files = list(entry.data_files)
    OpenVinoRunner(edit.tmp / artifact, FUSED, precision="int4-fused").load().release()
    info.update(method="the INT4 fused graph, GatherBlockQuantized as plain ops, OpenVINO compile at load",
                inference_precision_hint="f32", int4_weights=(entry.quantization or {}).get("int4_weights"),
                compile_seconds=round(time.time() - t0, 2))
    edit.replace(FUSED, "openvino", "int4-fused", artifact, machine, info, data_files)
    edit.drop(DECODER_FUSED_PREFILL, "the fused decoder prefills on OpenVINO in this build")
    log(f"build: {FUSED} -> OpenVINO int4-fused ({info['compile_seconds']} s)")


def nncf_int8(onnx_path: Path, tmp: Path, comp: str, calibration) -> dict:
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


def fastest_ov_hint(model: Path, comp: str, tiles: np.ndarray, batch: int = 16) -> dict:
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
