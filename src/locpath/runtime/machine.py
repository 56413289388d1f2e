"""What this machine offers each backend (device kind and name, library versions): recorded by `locpath build`
in every engine config and passed to `bundle.engine_config.check_engine_config` when a bundle loads."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def openvino_version() -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.get_version().split("-")[0]


def describe_machine(backend: str, device_kind: str = "cpu") -> dict:
    """{device: {...}, libraries: {...}} for `backend` ("onnxruntime", "openvino" or "tensorrt")."""
    libs: dict = {}
    dev: dict = {"kind": device_kind}
    if backend == "onnxruntime":
        import onnxruntime as ort

        libs["onnxruntime"] = ort.__version__
        dev["name"] = cpu_name() if device_kind == "cpu" else None
    elif backend == "openvino":
        libs["openvino"] = openvino_version()
        dev["name"] = cpu_name()
    elif backend == "tensorrt":
        from .cuda import gpu_description, tensorrt_version

        libs["tensorrt"] = tensorrt_version()
        dev.update(gpu_description())
        libs["cuda"] = dev.pop("cuda_runtime", None)
    return {"device": dev, "libraries": libs}
