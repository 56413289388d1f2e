"""OpenVINO behind the same Runner interface: reads the bundle's ONNX files (or an OpenVINO IR .xml, as NNCF's INT8
models are saved) and compiles them for the CPU with an inference-precision hint (bf16 runs on AMX/AVX-512 BF16
units; f32 elsewhere). INT8 models run their quantized ops in INT8 and the rest at the hint `locpath build` measured
fastest for that model (recorded in the manifest): on this machine's AMX f32 won for the 96-wide reference ViT
(956 vs 820 tiles/s) and bf16 for a ViT-B (41.5 vs 37.7)."""

from __future__ import annotations

import numpy as np

from .runner import Runner, RunnerError, checked_rows, first_line


def ov_error_line(exc: BaseException, limit: int = 300) -> str:
    """OpenVINO's exception text opens with lines of source locations ("Exception from src/.../core.cpp:132:",
    "Check 'false' failed at ...") and says what went wrong last: its last line that is not one of those."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    return (said[-1] if said else first_line(exc))[:limit]


class OpenVinoRunner(Runner):
    # OpenVINO 2026.4's GroupQueryAttention fails on two rows at once (a Reshape inside its translation) and leaves
    # the compiled model failing batch-1 runs after: the generator gives each answer a cache of its own instead
    runs_rows_together = False

    def __init__(self, path, name: str, device: str = "cpu", threads: int | None = None, precision: str = "bf16",
                 hint: str | None = None):
        super().__init__(path, name)
        if device != "cpu":
            raise RunnerError(f"{path}: the OpenVINO runner drives the CPU only (asked for {device!r})")
        self.threads = threads
        # INT4 decoders: the weights stay compressed whatever the hint; f32 activations prefilled 2.1x faster than
        # bf16 on an AMX Xeon (one 7B MLP matmul, 13 tokens: 74 against 154 ms), and keep ORT's logits
        default = {"bf16": "bf16", "fp32": "f32", "f32": "f32", "int8": "f32", "int4-fused": "f32"}.get(precision)
        if default is None:
            raise RunnerError(f"{path}: OpenVINO precision {precision!r} is not supported "
                             "(bf16, fp32, int8 or int4-fused)")
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
            raise RunnerError(f"{self.path}: OpenVINO cannot compile the graph ({ov_error_line(exc)})") from exc
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
            raise RunnerError(f"{self.name}: OpenVINO inference failed ({ov_error_line(exc)})") from exc
        names = outputs or list(self._outputs)
        # the request reuses its buffers: copy what leaves
        return {n: np.array(res[self._outputs[n]]) for n in names}

    def release(self) -> None:
        self._req = None
        self._compiled = None

    def new_buffer(self, shape, dtype=np.float32):
        """Host memory: OpenVINO reads its inputs from numpy in place (share_inputs)."""
        return np.zeros(shape, dtype)

    def binder(self, state: dict, out_buffers: dict[str, np.ndarray], rows: tuple[int, int] | None = None):
        return OpenVinoBinder(self, state, out_buffers, rows)


class OpenVinoBinder:
    """The shared K/V cache of a fused decoder (runtime/kv_cache.SharedKVCache) on OpenVINO. Its
    GroupQueryAttention reads the max-length past buffer up to each row's length (the mask's ones), as ONNX
    Runtime's does, but returns the present K/V at the total length instead of writing the buffer in place: each
    run copies positions [0, total) back into the rows it ran (a 7B step at 30 positions: ~3 MB, against ~4 GB of
    weights read)."""

    def __init__(self, runner: OpenVinoRunner, state: dict, out_buffers: dict[str, np.ndarray],
                 rows: tuple[int, int] | None = None):
        self.runner = runner.load()
        self.out_buffers = out_buffers
        self.state = {}
        for name, (buf, out_name) in state.items():
            if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
                raise RunnerError(f"{runner.name}: state buffer {name} must be a C-contiguous numpy array")
            if rows is not None:
                start, count = checked_rows(runner.name, rows, buf.shape[0])
                buf = buf[start:start + count]  # a view: rows along the first axis stay contiguous
            self.state[name] = (buf, out_name)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = self.runner
        inputs = dict(feeds)
        inputs.update({name: buf for name, (buf, _) in self.state.items()})
        try:
            res = r._req.infer(inputs, share_inputs=True)
        except Exception as exc:
            raise RunnerError(f"{r.name}: OpenVINO inference failed ({ov_error_line(exc)})") from exc
        for buf, out_name in self.state.values():
            present = res[r._outputs[out_name]]
            total = present.shape[2]
            if present.shape[:2] != buf.shape[:2] or present.shape[3:] != buf.shape[3:] or total > buf.shape[2]:
                raise RunnerError(f"{r.name}: {out_name} came back {tuple(present.shape)}, the cache holds "
                                  f"{tuple(buf.shape)}")
            buf[:, :, :total] = present
        for name, arr in self.out_buffers.items():
            arr[...] = res[r._outputs[name]]
        return self.out_buffers
