"""TensorRT 10 plans behind the Runner interface, thin and written to the documented API (TensorRT cannot be
installed on the machines this project is developed on): cuda-python, name-based I/O with set_input_shape /
set_tensor_address / execute_async_v3 on one stream, pinned host buffers for the copies."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .cuda import check as _check
from .cuda import cudart_module as _cudart
from .cuda import tensorrt_module as _trt
from .runner import Runner, RunnerError

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
