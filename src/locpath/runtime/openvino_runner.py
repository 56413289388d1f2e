"""OpenVINO behind the same Runner interface: reads the bundle's ONNX files (or an OpenVINO IR .xml, as NNCF's INT8
models are saved) and compiles them for the CPU with an inference-precision hint (bf16 runs on AMX/AVX-512 BF16
units; f32 elsewhere). INT8 models run their quantized ops in INT8 and the rest at the hint `locpath build` measured
fastest for that model (recorded in the manifest): on this machine's AMX f32 won for the 96-wide reference ViT
(956 vs 820 tiles/s) and bf16 for a ViT-B (41.5 vs 37.7)."""

from __future__ import annotations

import numpy as np

from .runner import Runner, RunnerError, first_line


class OpenVinoRunner(Runner):
    def __init__(self, path, name: str, device: str = "cpu", threads: int | None = None, precision: str = "bf16",
                 hint: str | None = None):
        super().__init__(path, name)
        if device != "cpu":
            raise RunnerError(f"{path}: the OpenVINO runner drives the CPU only (asked for {device!r})")
        self.threads = threads
        default = {"bf16": "bf16", "fp32": "f32", "f32": "f32", "int8": "f32"}.get(precision)
        if default is None:
            raise RunnerError(f"{path}: OpenVINO precision {precision!r} is not supported (bf16, fp32 or int8)")
        if hint not in (None, "bf16", "f32"):
            raise RunnerError(f"{path}: OpenVINO inference-precision hint {hint!r} is not supported (bf16 or f32)")
        self.hint = hint or default
        self._compiled = None
        self._req = None

    def load(self) -> "OpenVinoRunner":
        if self._compiled is not None:
            return self
        try:
            import openvino as ov
        except ImportError as exc:
            raise RunnerError(f"{self.path}: this bundle uses OpenVINO; install it (pip install 'locpath[openvino]')") from exc
        core = ov.Core()
        cfg = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        try:
            self._compiled = core.compile_model(core.read_model(str(self.path)), "CPU", cfg)
        except Exception as exc:
            raise RunnerError(f"{self.path}: OpenVINO cannot compile the graph ({first_line(exc)})") from exc
        self._req = self._compiled.create_infer_request()
        self._outputs = {o.get_any_name(): o for o in self._compiled.outputs}
        return self

    @property
    def input_names(self) -> list[str]:
        return [i.get_any_name() for i in self.load()._compiled.inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self.load()._outputs)

    def run(self, feeds, outputs=None):
        self.load()
        try:
            res = self._req.infer(feeds)
        except Exception as exc:
            raise RunnerError(f"{self.name}: OpenVINO inference failed ({first_line(exc)})") from exc
        names = outputs or list(self._outputs)
        # the request reuses its buffers: copy what leaves
        return {n: np.array(res[self._outputs[n]]) for n in names}

    def release(self) -> None:
        self._req = None
        self._compiled = None
