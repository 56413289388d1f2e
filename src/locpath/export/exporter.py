"""Export each component with torch.onnx (dynamo exporter) and validate it against PyTorch under ONNX Runtime.

Validation re-runs every graph on fresh shapes (the config's `check_dims`, none equal to the traced sample)
and raises ValidationError listing the max abs difference of every output that is out of tolerance.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import LocpathError
from .configs import ExportConfig


class ExportError(LocpathError):
    """A component could not be exported."""


class ValidationError(LocpathError):
    """An exported graph disagrees with PyTorch."""

    def __init__(self, component: str, dims: dict, diffs: dict, atol: float):
        self.component, self.dims, self.diffs, self.atol = component, dims, diffs, atol
        bad = ", ".join(f"{k}: {v:.3g}" for k, v in diffs.items() if not v <= atol)
        super().__init__(f"{component}: ONNX output differs from PyTorch beyond atol {atol:g} at shapes {dims} ({bad})")


@dataclass
class ComponentReport:
    component: str
    file: str
    seconds: float
    max_abs_diff: dict = field(default_factory=dict)  # output -> worst diff over check shapes
    nodes: int = 0
    data_files: list = field(default_factory=list)  # weights beside the graph (ONNX external data), if any


EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit on one file, with room for the graph itself


def _dynamic_shapes(cfg: ExportConfig):
    from torch.export import Dim

    dims: dict[str, object] = {}
    for name in sorted(cfg.axes()):
        lo = 0 if name in ("past",) else 1
        dims[name] = Dim(name.replace(".", "_"), min=lo, max=1 << 20) if lo == 0 else Dim(name.replace(".", "_"), max=1 << 20)
    shapes = {}
    for spec in cfg.inputs:
        shapes[spec.name] = {i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)}
    return shapes


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs optional-op registrations and deprecation notes meant for its developers."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _nest(cfg: ExportConfig, per_input: list):
    """Shape specs in the structure of forward's signature: a `*flat` tail is one nested entry."""
    k = cfg.fixed_args
    return tuple(per_input) if k is None else (*per_input[:k], tuple(per_input[k:]))


def export_component(cfg: ExportConfig, model, out_dir: Path) -> ComponentReport:
    """Trace `cfg` on its sample shapes into out_dir/<component>.onnx: weights inside the file, or, past
    protobuf's 2 GB limit (a ViT-g tile encoder in fp32), in `<component>.onnx.data` beside it."""
    import shutil

    import onnx

    t0 = time.time()
    module = cfg.module(model).eval()
    example = cfg.dummy_inputs(model, cfg.sample_dims)
    names_in = [s.name for s in cfg.inputs]
    names_out = [s.name for s in cfg.outputs]
    target = out_dir / f"{cfg.component}.onnx"
    external = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > EXTERNAL_DATA_BYTES
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=out_dir))
    tmp = str(tmp_dir / target.name)
    data_files = [target.name + ".data"] if external else []
    try:
        with torch.no_grad(), _quiet_exporter():
            prog = torch.onnx.export(
                module,
                tuple(example[n] for n in names_in),
                input_names=names_in,
                output_names=names_out,
                dynamic_shapes=_nest(cfg, [_dynamic_shapes(cfg)[n] for n in names_in]),
                dynamo=True,
                external_data=external,
                optimize=True,
                verbose=False,
            )
        prog.save(tmp, external_data=external)
        proto = onnx.load(tmp, load_external_data=False)
        got_in = [i.name for i in proto.graph.input]
        got_out = [o.name for o in proto.graph.output]
        if got_in != names_in or got_out != names_out:
            raise ExportError(f"{cfg.component}: graph I/O {got_in} -> {got_out} differs from the config")
        written = sorted(p.name for p in tmp_dir.iterdir())
        if written != sorted([target.name, *data_files]):
            raise ExportError(f"{cfg.component}: the exporter wrote {written}, expected {[target.name, *data_files]}")
        for name in data_files:
            os.replace(tmp_dir / name, out_dir / name)
        os.replace(tmp, target)
        nodes = len(proto.graph.node)
    except LocpathError:
        raise
    except Exception as exc:
        raise ExportError(f"{cfg.component}: export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ComponentReport(cfg.component, target.name, time.time() - t0, nodes=nodes, data_files=data_files)


def validate_component(cfg: ExportConfig, model, onnx_path: Path, report: ComponentReport | None = None) -> dict:
    """Run the graph on every check shape beside PyTorch; return the worst max abs diff per output."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    module = cfg.module(model).eval()
    worst: dict[str, float] = {}
    for k, dims in enumerate(cfg.check_dims):
        inputs = cfg.dummy_inputs(model, dims, seed=100 + k)
        with torch.no_grad():
            ref = module(*[inputs[s.name] for s in cfg.inputs])
        ref = ref if isinstance(ref, tuple) else (ref,)
        feed = {s.name: inputs[s.name].numpy() for s in cfg.inputs}
        got = sess.run([s.name for s in cfg.outputs], feed)
        diffs = {}
        for spec, r, g in zip(cfg.outputs, ref, got):
            r = r.numpy()
            if r.shape != g.shape:
                raise ValidationError(cfg.component, dims, {spec.name: float("inf")}, cfg.atol)
            d = float(np.max(np.abs(r - g))) if r.size else 0.0
            diffs[spec.name] = d
            worst[spec.name] = max(worst.get(spec.name, 0.0), d)
        if any(not v <= cfg.atol for v in diffs.values()):
            raise ValidationError(cfg.component, dims, diffs, cfg.atol)
    if report is not None:
        report.max_abs_diff = worst
    return worst
