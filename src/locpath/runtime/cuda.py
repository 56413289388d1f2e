"""CUDA and TensorRT modules, imported lazily: neither can be installed on the machines locpath is developed on,
so every caller gets one clear LocpathError where they are missing."""

from __future__ import annotations

from ..errors import LocpathError
from .runner import RunnerError


def tensorrt_module():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise LocpathError("TensorRT is not installed here (its Python package and libraries are needed to build "
                           "or run plans); use --backend ort") from exc
    return trt


def cudart_module():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise LocpathError("cuda-python is not installed (pip install cuda-python)") from exc
    return cudart


def check(result):
    """cuda-python returns (err, *values): raise on an error code, else return the values."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RunnerError(f"CUDA error {int(err)} ({err})")
    return rest[0] if len(rest) == 1 else tuple(rest)


def tensorrt_version() -> str:
    return tensorrt_module().__version__


def gpu_description(device: int = 0) -> dict:
    cudart = cudart_module()
    count = check(cudart.cudaGetDeviceCount())
    if count < 1:
        raise LocpathError("no CUDA device found")
    props = check(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    rt = check(cudart.cudaRuntimeGetVersion())
    return {"kind": "cuda", "name": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}",
            "cuda_runtime": f"{rt // 1000}.{(rt % 1000) // 10}"}
