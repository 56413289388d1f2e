"""TensorRT 10 plans behind the Runner interface, thin and written to the documented API (TensorRT cannot be
installed on the machines this project is developed on; tests drive this module through stand-in `tensorrt` and
cuda-python modules that run the graphs on ONNX Runtime).

- One execution context per optimisation profile (the decoder has a prefill and a decode profile), bound to its
  profile once; each call picks the first profile whose ranges hold every input shape, or refuses naming the
  component, the tensor and the shape.
- Device and pinned host buffers are allocated once per tensor at load, at the largest shape any profile allows
  (outputs: the shape TensorRT infers from the profile's maximum inputs), so a decode step allocates nothing and
  an empty past (prefill) is a valid zero-byte tensor.
- Every TensorRT call that reports failure by its return value is checked; output shapes are checked for
  unresolved (-1) dimensions; dtypes come from TensorRT's own `nptype`, and feeds must already have them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cuda import check as _check
from .cuda import cudart_module as _cudart
from .cuda import tensorrt_module as _trt
from .runner import Runner, RunnerError


@dataclass
class _Profile:
    index: int
    context: object
    ranges: dict  # input name -> (min shape, max shape)

    def holds(self, shapes: dict[str, tuple]) -> bool:
        for name, shape in shapes.items():
            lo, hi = self.ranges[name]
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                return False
        return True


class TrtRunner(Runner):
    def __init__(self, path, name: str, device: str = "cuda", threads: int | None = None):
        super().__init__(path, name)
        if device not in ("cuda", "tensorrt"):
            raise RunnerError(f"{path}: TensorRT plans run on a CUDA device (asked for {device!r})")
        self._engine = None

    # -- load ------------------------------------------------------------------------------------------
    def load(self) -> "TrtRunner":
        if self._engine is not None:
            return self
        trt, self._cudart = _trt(), _cudart()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(Path(self.path).read_bytes())
        if self._engine is None:
            raise RunnerError(f"{self.path}: TensorRT cannot deserialize the plan; rebuild it here with `locpath build`")
        eng = self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        self._inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._dtypes = {n: self._numpy_dtype(trt, n) for n in names}
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._profiles = [self._profile(i) for i in range(eng.num_optimization_profiles)]
        capacity = {n: 1 for n in names}
        for prof in self._profiles:
            for n, nbytes in self._max_bytes(prof).items():
                capacity[n] = max(capacity[n], nbytes)
        self._device = {n: int(_check(self._cudart.cudaMalloc(c))) for n, c in capacity.items()}
        self._host = {n: int(_check(self._cudart.cudaMallocHost(c))) for n, c in capacity.items()}
        self._capacity = capacity
        return self

    def _numpy_dtype(self, trt, name: str) -> np.dtype:
        dt = self._engine.get_tensor_dtype(name)
        try:
            return np.dtype(trt.nptype(dt))
        except TypeError:
            raise RunnerError(f"{self.path}: tensor {name} is {dt}, which has no numpy equivalent on the host side; "
                              "rebuild the plan with float32/float16 I/O") from None

    def _profile(self, index: int) -> _Profile:
        ctx = self._engine.create_execution_context()
        if not ctx.set_optimization_profile_async(index, self._stream):
            raise RunnerError(f"{self.name}: TensorRT refused optimisation profile {index}")
        ranges = {}
        for n in self._inputs:
            lo, _opt, hi = self._engine.get_tensor_profile_shape(n, index)
            ranges[n] = (tuple(lo), tuple(hi))
        return _Profile(index, ctx, ranges)

    def _max_bytes(self, prof: _Profile) -> dict[str, int]:
        """Bytes of every tensor at this profile's largest inputs (outputs as TensorRT infers them)."""
        out = {}
        for n in self._inputs:
            hi = prof.ranges[n][1]
            self._set_shape(prof.context, n, hi)
            out[n] = int(np.prod(hi)) * self._dtypes[n].itemsize
        for n in self._outputs:
            out[n] = int(np.prod(self._output_shape(prof.context, n))) * self._dtypes[n].itemsize
        return out

    # -- run ---------------------------------------------------------------------------------------------
    @property
    def input_names(self):
        return list(self.load()._inputs)

    @property
    def output_names(self):
        return list(self.load()._outputs)

    def _set_shape(self, ctx, name: str, shape) -> None:
        if not ctx.set_input_shape(name, tuple(int(s) for s in shape)):
            raise RunnerError(f"{self.name}: TensorRT refused shape {tuple(shape)} for input {name}")

    def _output_shape(self, ctx, name: str) -> tuple:
        shape = tuple(int(s) for s in ctx.get_tensor_shape(name))
        if any(s < 0 for s in shape):
            raise RunnerError(f"{self.name}: TensorRT could not infer the shape of output {name} ({shape})")
        return shape

    def _pick(self, feeds: dict[str, np.ndarray]) -> _Profile:
        shapes = {n: tuple(feeds[n].shape) for n in self._inputs}
        for prof in self._profiles:
            if prof.holds(shapes):
                return prof
        bad = {n: s for n, s in shapes.items() if not any(p.holds({n: s}) for p in self._profiles)}
        ranges = {n: [p.ranges[n] for p in self._profiles] for n in bad}
        raise RunnerError(f"{self.name}: input shapes {bad or shapes} fall outside every optimisation profile of "
                          f"{Path(self.path).name} (ranges {ranges}); rebuild with a larger generation.max_length")

    def run(self, feeds, outputs=None):
        self.load()
        cu = self._cudart
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise RunnerError(f"{self.name}: missing inputs {missing}")
        arrays = {}
        for n in self._inputs:
            arr = np.ascontiguousarray(feeds[n])
            if arr.dtype != self._dtypes[n]:
                raise RunnerError(f"{self.name}: input {n} is {arr.dtype}, the engine takes {self._dtypes[n]}")
            arrays[n] = arr
        prof = self._pick(arrays)
        ctx = prof.context
        h2d, d2h = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n, arr in arrays.items():
            self._set_shape(ctx, n, arr.shape)
            if arr.nbytes:
                ctypes.memmove(self._host[n], arr.ctypes.data, arr.nbytes)
                _check(cu.cudaMemcpyAsync(self._device[n], self._host[n], arr.nbytes, h2d, self._stream))
            self._address(ctx, n)
        shapes = {}
        for n in self._outputs:
            shape = self._output_shape(ctx, n)
            nbytes = int(np.prod(shape)) * self._dtypes[n].itemsize
            if nbytes > self._capacity[n]:
                raise RunnerError(f"{self.name}: output {n} {shape} exceeds the buffer sized from the profiles")
            self._address(ctx, n)
            shapes[n] = (shape, nbytes)
        if not ctx.execute_async_v3(self._stream):
            raise RunnerError(f"{self.name}: TensorRT execution failed (profile {prof.index})")
        wanted = outputs or self._outputs
        for n in wanted:
            shape, nbytes = shapes[n]
            if nbytes:
                _check(cu.cudaMemcpyAsync(self._host[n], self._device[n], nbytes, d2h, self._stream))
        _check(cu.cudaStreamSynchronize(self._stream))
        out = {}
        for n in wanted:
            shape, nbytes = shapes[n]
            buf = (ctypes.c_byte * max(nbytes, 1)).from_address(self._host[n])
            out[n] = np.frombuffer(buf, dtype=self._dtypes[n], count=int(np.prod(shape))).reshape(shape).copy()
        return out

    def _address(self, ctx, name: str) -> None:
        if not ctx.set_tensor_address(name, self._device[name]):
            raise RunnerError(f"{self.name}: TensorRT refused the device address of {name}")

    def release(self) -> None:
        if self._engine is None:
            return
        for ptr in self._device.values():
            self._cudart.cudaFree(ptr)
        for ptr in self._host.values():
            self._cudart.cudaFreeHost(ptr)
        self._cudart.cudaStreamDestroy(self._stream)
        self._profiles, self._engine = [], None
