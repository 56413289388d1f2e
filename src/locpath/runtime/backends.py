"""The runner factory: one manifest entry's backend -> its Runner. Sits above every backend module, so the
backends never import it (or each other)."""

from __future__ import annotations

from .runner import Runner, RunnerError


def make_runner(backend: str, path, name: str, precision: str = "fp32", entry=None, engine_cache=None,
                **kw) -> Runner:
    """`entry` (the manifest entry) and `engine_cache` matter to ONNX Runtime's TensorRT provider only."""
    if backend in ("onnxruntime", "ort"):
        from .ort_runner import OrtRunner

        return OrtRunner(path, name, entry=entry, engine_cache=engine_cache, **kw)
    if backend == "openvino":
        from .openvino_runner import OpenVinoRunner

        return OpenVinoRunner(path, name, precision=precision, **kw)
    if backend == "tensorrt":
        from .tensorrt_runner import TrtRunner

        return TrtRunner(path, name, **kw)
    raise RunnerError(f"{path}: backend {backend!r} is not available in this runtime")
