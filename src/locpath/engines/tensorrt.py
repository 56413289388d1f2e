"""TensorRT 10 plans, thin and written to the documented API (TensorRT cannot be installed on the machines this
project is developed on: everything here that needs it is imported lazily, and everything around it -
optimisation profiles derived from the manifest, engine-config checks - is plain Python and tested).

Build: strongly typed networks (precision comes from the graph: an fp16 ONNX for FP16, Q/DQ nodes for INT8/FP8;
never the deprecated implicit INT8 calibrators), one optimisation profile per shape regime (encoder batch;
decoder prefill and decode), a persistent timing cache beside the plans, and an EngineConfig per plan.
Run: cuda-python, name-based I/O with set_input_shape / set_tensor_address / execute_async_v3 on one stream,
pinned host buffers for the copies.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from ..errors import LocpathError
from ..fsutil import atomic_dir, atomic_file
from ..runtime.runners import Runner, RunnerError
from .engine_config import describe_machine
from .manifest import ComponentEntry

TRT_PRECISIONS = ("fp32", "fp16")


def _trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise LocpathError("TensorRT is not installed here (its Python package and libraries are needed to build "
                           "or run plans); use --backend ort") from exc
    return trt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise LocpathError("cuda-python is not installed (pip install cuda-python)") from exc
    return cudart


def _check(result):
    """cuda-python returns (err, *values): raise on an error code, else return the values."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RunnerError(f"CUDA error {int(err)} ({err})")
    return rest[0] if len(rest) == 1 else tuple(rest)


def tensorrt_version() -> str:
    return _trt().__version__


def gpu_description(device: int = 0) -> dict:
    cudart = _cudart()
    count = _check(cudart.cudaGetDeviceCount())
    if count < 1:
        raise LocpathError("no CUDA device found")
    props = _check(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    rt = _check(cudart.cudaRuntimeGetVersion())
    return {"kind": "cuda", "name": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}",
            "cuda_runtime": f"{rt // 1000}.{(rt % 1000) // 10}"}


# -- profiles (pure) ------------------------------------------------------------------
def shape_ranges(entry: ComponentEntry, axes: dict[str, list[int]]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """min/opt/max shape of every input, symbolic axes taken from `axes` (axis -> [min, opt, max])."""
    out = {}
    for spec in entry.inputs:
        dims = []
        for d in spec.shape:
            if isinstance(d, int):
                dims.append((d, d, d))
            elif d in axes:
                dims.append(tuple(axes[d]))
            else:
                raise LocpathError(f"input {spec.name}: no profile range for axis {d!r}")
        out[spec.name] = tuple(tuple(x[i] for x in dims) for i in range(3))
    return out


def optimization_profiles(component: str, entry: ComponentEntry) -> list[dict]:
    """Profiles for one component: one for most graphs; the decoder gets prefill (empty past) and decode (one
    new token) profiles, because their shape regimes differ and one wide profile tunes both badly."""
    p = {k: list(v) for k, v in entry.profiles.items()}
    if component != "decoder":
        return [shape_ranges(entry, p)]
    seq, past = p["sequence"], p["past"]
    prefill = dict(p, sequence=seq, past=[0, 0, 0], total=list(seq))
    decode = dict(p, sequence=[1, 1, 1], past=[1, max(1, past[1]), past[2] - 1], total=[2, max(1, past[1]) + 1, past[2]])
    return [shape_ranges(entry, prefill), shape_ranges(entry, decode)]


# -- build --------------------------------------------------------------------------
def build_plan(onnx_path: Path, profiles: list[dict], timing_cache: Path, workspace_gb: float = 4.0) -> bytes:
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
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for ranges in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in ranges.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LocpathError(f"{onnx_path}: TensorRT failed to build a plan (see the log above)")
    with atomic_file(timing_cache) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def build_tensorrt_bundle(src: Path, out: Path, manifest, precision: str, overwrite: bool = False, log=print) -> Path:
    from . import quantize_ort as q

    if precision not in TRT_PRECISIONS:
        raise LocpathError(f"TensorRT precision must be one of {', '.join(TRT_PRECISIONS)} (strongly typed networks "
                           f"take INT8/FP8 from Q/DQ graphs, not from a flag)")
    machine = describe_machine("tensorrt", "cuda")
    cfg_hashes: dict[str, str] = {}
    t_start = time.time()
    from .build import _copy_bundle, _finish, drop_fused, record_engine

    with atomic_dir(out) as tmp:
        _copy_bundle(src, tmp, manifest)
        drop_fused(tmp, manifest, log)  # GroupQueryAttention is an ONNX Runtime contrib op: TensorRT runs the plain graph
        timing_cache = tmp / "timing.cache"
        for comp, entry in manifest.components.items():
            onnx_in = src / entry.file
            if precision == "fp16":
                onnx_in = tmp / f"{comp}.fp16.onnx"
                q.to_fp16(src / entry.file, onnx_in)
            plan = tmp / f"{comp}.{precision}.plan"
            t0 = time.time()
            profiles = optimization_profiles(comp, entry)
            plan.write_bytes(build_plan(onnx_in, profiles, timing_cache))
            if onnx_in.parent == tmp:
                onnx_in.unlink()
            (tmp / entry.file).unlink()
            info = {"strongly_typed": True, "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
                    "seconds": round(time.time() - t0, 1)}
            record_engine(tmp, entry, comp, "tensorrt", precision, plan.name, machine, info, cfg_hashes)
            log(f"build: {comp} -> {plan.name} ({info['seconds']} s)")
        _finish(tmp, manifest, cfg_hashes, src, precision, "tensorrt", t_start)
    return out


# -- run ----------------------------------------------------------------------------
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8,
       "BOOL": np.bool_, "INT8": np.int8, "BF16": None}


class TrtRunner(Runner):
    """One plan, one execution context per optimisation profile, one CUDA stream, pinned host staging."""

    def __init__(self, path, name: str, device: str = "cuda", threads: int | None = None):
        super().__init__(path, name)
        if device not in ("cuda", "tensorrt"):
            raise RunnerError(f"{path}: TensorRT plans run on a CUDA device (asked for {device!r})")
        self._engine = None

    def load(self) -> "TrtRunner":
        if self._engine is not None:
            return self
        trt, self._cudart = _trt(), _cudart()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(Path(self.path).read_bytes())
        if self._engine is None:
            raise RunnerError(f"{self.path}: TensorRT cannot deserialize the plan; rebuild it here")
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._contexts = []
        for i in range(self._engine.num_optimization_profiles):
            ctx = self._engine.create_execution_context()
            ctx.set_optimization_profile_async(i, self._stream)
            self._contexts.append(ctx)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == mode]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) != mode]
        self._device: dict[str, tuple[int, int]] = {}  # name -> (pointer, capacity bytes)
        self._host: dict[str, tuple[int, int]] = {}
        return self

    @property
    def input_names(self):
        return list(self.load()._inputs)

    @property
    def output_names(self):
        return list(self.load()._outputs)

    def _buffer(self, pool: dict, name: str, nbytes: int, pinned: bool) -> int:
        ptr, cap = pool.get(name, (0, 0))
        if cap < nbytes:
            if ptr:
                _check((self._cudart.cudaFreeHost if pinned else self._cudart.cudaFree)(ptr))
            cap = max(nbytes, 256)
            ptr = _check(self._cudart.cudaMallocHost(cap) if pinned else self._cudart.cudaMalloc(cap))
            pool[name] = (int(ptr), cap)
        return pool[name][0]

    def _pick_context(self, feeds):
        # the decoder's profile 0 is prefill (empty past), profile 1 decode; other graphs have one profile
        if len(self._contexts) > 1 and any(k.startswith("past_") for k in feeds):
            past = next(v for k, v in feeds.items() if k.startswith("past_"))
            return self._contexts[1 if past.shape[2] > 0 else 0]
        return self._contexts[0]

    def run(self, feeds, outputs=None):
        self.load()
        cu = self._cudart
        ctx = self._pick_context(feeds)
        h2d, d2h = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self._inputs:
            arr = np.ascontiguousarray(feeds[name])
            ctx.set_input_shape(name, arr.shape)
            dptr = self._buffer(self._device, name, arr.nbytes, pinned=False)
            hptr = self._buffer(self._host, name, arr.nbytes, pinned=True)
            ctypes.memmove(hptr, arr.ctypes.data, arr.nbytes)
            _check(cu.cudaMemcpyAsync(dptr, hptr, arr.nbytes, h2d, self._stream))
            ctx.set_tensor_address(name, dptr)
        shapes = {}
        for name in self._outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = _NP[str(self._engine.get_tensor_dtype(name)).split(".")[-1]]
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            ctx.set_tensor_address(name, self._buffer(self._device, name, nbytes, pinned=False))
            shapes[name] = (shape, dtype, nbytes)
        if not ctx.execute_async_v3(self._stream):
            raise RunnerError(f"{self.name}: TensorRT execution failed")
        result = {}
        for name in outputs or self._outputs:
            shape, dtype, nbytes = shapes[name]
            hptr = self._buffer(self._host, name, nbytes, pinned=True)
            _check(cu.cudaMemcpyAsync(hptr, self._device[name][0], nbytes, d2h, self._stream))
            result[name] = (shape, dtype, nbytes, hptr)
        _check(cu.cudaStreamSynchronize(self._stream))
        out = {}
        for name, (shape, dtype, nbytes, hptr) in result.items():
            buf = (ctypes.c_byte * nbytes).from_address(hptr)
            out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape).copy()
        return out

    def release(self) -> None:
        if self._engine is None:
            return
        for ptr, _ in self._device.values():
            self._cudart.cudaFree(ptr)
        for ptr, _ in self._host.values():
            self._cudart.cudaFreeHost(ptr)
        self._cudart.cudaStreamDestroy(self._stream)
        self._contexts, self._engine = [], None
