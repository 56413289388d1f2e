"""Stand-in for the `tensorrt` Python package (TensorRT 10 API shape), for tests without a GPU: a plan is the ONNX graph
and its optimisation profiles; an execution context runs it on ONNX Runtime's CPU provider, reading and writing
tensors through the cuda-python stand-in's device memory. See ../README.md."""

from __future__ import annotations

import base64
import enum
import json

import numpy as np

__version__ = "10.13.0.standin"
MAGIC = "locpath-trt-standin/1"


class Logger:
    WARNING = 2
    ERROR = 1

    def __init__(self, severity=2):
        self.severity = severity


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT8 = "int8"
    INT32 = "int32"
    INT64 = "int64"
    UINT8 = "uint8"
    BOOL = "bool"
    FP8 = "fp8"
    INT4 = "int4"


def nptype(dt: DataType):
    """As TensorRT's: the numpy type of a DataType; none for bfloat16, FP8 and INT4."""
    if dt in (DataType.BF16, DataType.FP8, DataType.INT4):
        raise TypeError(f"Could not resolve TensorRT datatype {dt} to an equivalent numpy datatype.")
    return np.dtype(dt.value).type


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5


class BuilderFlag(enum.Enum):
    FP16 = 0
    TF32 = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 3: DataType.INT8, 6: DataType.INT32,
               7: DataType.INT64, 2: DataType.UINT8, 9: DataType.BOOL}


# -- build --------------------------------------------------------------------------------------------------
class _Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.onnx: bytes | None = None
        self.inputs: dict = {}


class OnnxParser:
    def __init__(self, network: _Network, logger: Logger):
        self.network = network
        self.errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        model = onnx.load(path)
        g = model.graph
        uint8 = {i.name for i in g.input if i.type.tensor_type.elem_type == 2}
        for node in g.node:
            for t in node.input:
                if t in uint8 and node.op_type not in ("Cast", "Shape"):  # metadata only: no UINT8 math
                    self.errors.append(f"{node.name} ({node.op_type}): UINT8 tensor {t} may only be a network input or "
                                       "output (cast it first)")
        if self.errors:
            return False
        self.network.onnx = model.SerializeToString()
        self.network.inputs = {i.name: [d.dim_value if d.HasField("dim_value") else -1
                                        for d in i.type.tensor_type.shape.dim] for i in g.input}
        return True


class _Profile:
    def __init__(self):
        self.shapes: dict = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class TimingCache:
    def __init__(self, data: bytes):
        self.entries = int(data.decode().split(":")[1]) if data else 0

    def serialize(self) -> bytes:
        return f"standin-timing-cache:{self.entries}".encode()


class _Config:
    def __init__(self):
        self.flags = {BuilderFlag.TF32}  # TensorRT's default
        self.profiles: list[_Profile] = []
        self.cache: TimingCache | None = None

    def set_memory_pool_limit(self, pool, size):
        pass

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def get_flag(self, flag) -> bool:
        return flag in self.flags

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> TimingCache:
        return self.cache

    def add_optimization_profile(self, profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config):
        dynamic = [n for n, dims in network.inputs.items() if -1 in dims]
        for p in config.profiles:
            if any(n not in p.shapes for n in dynamic):
                return None  # TensorRT: every dynamic input needs a range in every profile
        if config.cache is not None:
            config.cache.entries += 1
        body = {"magic": MAGIC, "onnx": base64.b64encode(network.onnx).decode(),
                "profiles": [p.shapes for p in config.profiles], "tf32": BuilderFlag.TF32 in config.flags,
                "strongly_typed": bool(network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))}
        return json.dumps(body).encode()


# -- run ------------------------------------------------------------------------------------------------------
class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes):
        try:
            body = json.loads(data)
            assert body["magic"] == MAGIC
        except Exception:
            return None
        return ICudaEngine(body)


class ICudaEngine:
    def __init__(self, body: dict):
        import onnx
        import onnxruntime as ort

        self.body = body
        onnx_bytes = base64.b64decode(body["onnx"])
        g = onnx.load_from_string(onnx_bytes).graph
        self.io = [(i.name, TensorIOMode.INPUT, _ONNX_TYPES[i.type.tensor_type.elem_type]) for i in g.input]
        self.io += [(o.name, TensorIOMode.OUTPUT, _ONNX_TYPES[o.type.tensor_type.elem_type]) for o in g.output]
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.shape_cache: dict = {}
        self.executions = 0

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.body["profiles"])

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def _entry(self, name):
        for e in self.io:
            if e[0] == name:
                return e
        raise KeyError(name)

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._entry(name)[1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._entry(name)[2]

    def get_tensor_profile_shape(self, name: str, index: int):
        return [tuple(s) for s in self.body["profiles"][index][name]]

    def create_execution_context(self):
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.profile: int | None = None
        self.shapes: dict = {}
        self.addresses: dict = {}

    def _inputs(self):
        return [n for n, mode, _ in self.engine.io if mode == TensorIOMode.INPUT]

    def set_optimization_profile_async(self, index: int, stream) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        if self.profile is None or name not in self._inputs():
            return False
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str):
        if name in self.shapes:
            return self.shapes[name]
        if any(n not in self.shapes for n in self._inputs()):
            return (-1,)
        key = tuple(self.shapes[n] for n in self._inputs())
        if key not in self.engine.shape_cache:
            feeds = {n: np.zeros(self.shapes[n], nptype(self.engine.get_tensor_dtype(n))) for n in self._inputs()}
            names = [o.name for o in self.engine.session.get_outputs()]
            outs = self.engine.session.run(names, feeds)
            self.engine.shape_cache[key] = {n: o.shape for n, o in zip(names, outs)}
        return self.engine.shape_cache[key][name]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        from cuda.bindings import runtime as cudart

        if name not in [e[0] for e in self.engine.io] or ptr not in cudart.DEVICE:
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream) -> bool:
        from cuda.bindings import runtime as cudart

        eng = self.engine
        if any(n not in self.shapes or n not in self.addresses for n in self._inputs()):
            return False
        feeds = {}
        for n in self._inputs():
            dt = np.dtype(nptype(eng.get_tensor_dtype(n)))
            count = int(np.prod(self.shapes[n]))
            mem = cudart.device_view(self.addresses[n])
            if count * dt.itemsize > len(mem):
                return False
            feeds[n] = np.frombuffer(mem, dtype=dt, count=count).reshape(self.shapes[n]).copy()
        names = [o.name for o in eng.session.get_outputs()]
        if any(n not in self.addresses for n in names):
            return False
        for n, arr in zip(names, eng.session.run(names, feeds)):
            mem = cudart.device_view(self.addresses[n])
            raw = np.ascontiguousarray(arr).tobytes()
            if len(raw) > len(mem):
                return False  # real TensorRT would write past the buffer
            mem[: len(raw)] = raw
        eng.executions += 1
        return True
