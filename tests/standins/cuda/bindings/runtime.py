"""Stand-in for `cuda.bindings.runtime` (cuda-python 13): every call returns (error, *values) like the real one."""

from __future__ import annotations

import ctypes
import enum


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class _Props:
    name = b"Stand-in GPU (ONNX Runtime CPU underneath)"
    major, minor = 9, 0


OK = cudaError_t.cudaSuccess
DEVICE: dict[int, bytearray] = {}  # fake device pointer -> its memory
HOST: dict[int, ctypes.Array] = {}  # pinned host pointer -> its buffer (kept alive)
COUNTS = {"cudaMalloc": 0, "cudaMallocHost": 0, "cudaFree": 0, "cudaFreeHost": 0}
_next = [0x7F0000000000]


def reset_counts() -> None:
    for k in COUNTS:
        COUNTS[k] = 0


def device_view(ptr: int) -> bytearray:
    """The memory of a device allocation (the tensorrt stand-in reads and writes tensors through it)."""
    return DEVICE[ptr]


def cudaGetDeviceCount():
    return OK, 1


def cudaGetDeviceProperties(device: int):
    return OK, _Props()


def cudaRuntimeGetVersion():
    return OK, 13000


def cudaStreamCreate():
    return OK, 1


def cudaStreamSynchronize(stream):
    return (OK,)


def cudaStreamDestroy(stream):
    return (OK,)


def cudaMalloc(size: int):
    if size <= 0:
        return cudaError_t.cudaErrorInvalidValue, 0
    COUNTS["cudaMalloc"] += 1
    ptr = _next[0]
    _next[0] += (size + 0xFFFF) & ~0xFFFF
    DEVICE[ptr] = bytearray(size)
    return OK, ptr


def cudaFree(ptr: int):
    COUNTS["cudaFree"] += 1
    DEVICE.pop(ptr, None)
    return (OK,)


def cudaMallocHost(size: int):
    if size <= 0:
        return cudaError_t.cudaErrorInvalidValue, 0
    COUNTS["cudaMallocHost"] += 1
    buf = (ctypes.c_byte * size)()
    HOST[ctypes.addressof(buf)] = buf
    return OK, ctypes.addressof(buf)


def cudaFreeHost(ptr: int):
    COUNTS["cudaFreeHost"] += 1
    HOST.pop(ptr, None)
    return (OK,)


def cudaMemcpyAsync(dst: int, src: int, count: int, kind, stream):
    if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
        mem = DEVICE.get(dst)
        if mem is None or count > len(mem):
            return (cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove((ctypes.c_char * len(mem)).from_buffer(mem), src, count)
    elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
        mem = DEVICE.get(src)
        if mem is None or count > len(mem):
            return (cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(dst, (ctypes.c_char * len(mem)).from_buffer(mem), count)
    else:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (OK,)
