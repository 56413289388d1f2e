"""TensorRT 10 plans, thin and written to the documented API (TensorRT cannot be installed on the machines this
project is developed on: everything here that needs it is imported lazily, and everything around it -
optimisation profiles derived from the manifest, engine-config checks - is plain Python and tested).

Build: strongly typed networks (precision comes from the graph: an fp16 ONNX for FP16, Q/DQ nodes for INT8/FP8;
never the deprecated implicit INT8 calibrators), one optimisation profile per shape regime (encoder batch;
decoder prefill and decode), a persistent timing cache per GPU and TensorRT version under locpath's cache folder,
and an EngineConfig per plan.
The runner that executes the plans is `runtime/tensorrt_runner.py`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from ..bundle.profiles import optimization_profiles
from ..errors import LocpathError
from ..fsutil import atomic_dir, atomic_file
from ..runtime.cuda import tensorrt_module as _trt
from ..runtime.machine import describe_machine
from .bundle_edit import BundleEdit

TRT_PRECISIONS = ("fp32", "fp16")


# -- build --------------------------------------------------------------------------
def timing_cache_path(machine: dict) -> Path:
    """The persistent timing cache of this GPU and TensorRT version, beside locpath's other caches: later builds
    of any bundle on the same machine reuse its kernel timings (minutes saved per plan on large models)."""
    from ..runtime.slide_cache import cache_root

    dev, libs = machine["device"], machine["libraries"]
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{dev.get('name')}-sm{dev.get('compute_capability')}-trt{libs.get('tensorrt')}")
    return cache_root() / "tensorrt" / f"timing-{slug.strip('-')}.cache"


def build_plan(onnx_path: Path, profiles: list[dict], timing_cache: Path, precision: str = "fp32",
               workspace_gb: float = 4.0) -> bytes:
    """A strongly typed plan (precision comes from the graph). For fp32, TF32 is switched off: TensorRT's default
    would round matmul inputs to 10 mantissa bits, and fp32 plans are what exact-token parity is checked on."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LocpathError(f"{onnx_path}: TensorRT cannot parse the graph ({errors[:500]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise LocpathError(f"{timing_cache}: TensorRT refused the timing cache (delete it to start a new one)")
    for ranges in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in ranges.items():
            prof.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(prof) < 0:
            raise LocpathError(f"{onnx_path}: TensorRT refused optimisation profile {ranges}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LocpathError(f"{onnx_path}: TensorRT failed to build a plan (see the log above)")
    with atomic_file(timing_cache) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def build_tensorrt_bundle(src: Path, out: Path, manifest, precision: str, log=print, **extra) -> Path:
    from . import quantize_ort as q

    if precision not in TRT_PRECISIONS:
        raise LocpathError(f"TensorRT precision must be one of {', '.join(TRT_PRECISIONS)} (strongly typed networks "
                           f"take INT8/FP8 from Q/DQ graphs, not from a flag)")
    machine = describe_machine("tensorrt", "cuda")
    with atomic_dir(out) as tmp:
        edit = BundleEdit(src, tmp, manifest, log)
        edit.drop_fused()  # GroupQueryAttention is an ONNX Runtime contrib op: TensorRT runs the plain graph
        edit.drop_resampler_chunks("the resampler runs on TensorRT in this build")
        timing_cache = timing_cache_path(machine)
        for comp, entry in list(edit.manifest.components.items()):
            onnx_in = edit.source(comp)
            if precision == "fp16":
                onnx_in = tmp / f"{comp}.fp16.onnx"
                q.to_fp16(edit.source(comp), onnx_in)
            plan = tmp / f"{comp}.{precision}.plan"
            t0 = time.time()
            profiles = optimization_profiles(comp, entry)
            plan.write_bytes(build_plan(onnx_in, profiles, timing_cache, precision))
            if onnx_in.parent == tmp:
                onnx_in.unlink()
            info = {"strongly_typed": True, "tf32": precision != "fp32", "timing_cache": str(timing_cache),
                    "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
                    "seconds": round(time.time() - t0, 1)}
            edit.replace(comp, "tensorrt", precision, plan.name, machine, info)
            log(f"build: {comp} -> {plan.name} ({info['seconds']} s)")
        edit.finish(precision, "tensorrt", **extra)
    return out
