"""A small versioned config saved beside every built engine (in the manner of TensorRT-LLM's engine config):
what it was built from (the fp32 ONNX sha256), how (precision, recipe), and for what (device, library versions).
`check_engine_config` refuses an engine on any mismatch with a "rebuild" message naming the file.

Rules: TensorRT plans are tied to the exact GPU model, compute capability and TensorRT version, and to the CUDA
major version. ONNX Runtime models are portable across CPUs, but are refused on another device kind (a CUDA
fp16 build on a CPU runtime) and on an older onnxruntime than the one that built them (contrib ops such as
MatMulNBits appear over versions); OpenVINO-compiled components likewise on an older or missing OpenVINO.
All are refused when their source ONNX is not the bundle's.

The machine is described by the caller (`runtime.machine.describe_machine`), so this format module probes
nothing and imports no runtime library.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LocpathError
from ..fsutil import atomic_file

ENGINE_CONFIG_VERSION = 1


class EngineMismatchError(LocpathError):
    """An engine was built for another machine, library or ONNX graph."""


@dataclass
class EngineConfig:
    component: str
    backend: str  # "onnxruntime" or "tensorrt"
    precision: str
    artifact: str  # the engine file this config describes
    artifact_sha256: str
    onnx_sha256: str  # the fp32 graph it was built from
    device: dict = field(default_factory=dict)  # kind, name, compute_capability
    libraries: dict = field(default_factory=dict)  # onnxruntime / tensorrt / cuda versions
    build: dict = field(default_factory=dict)  # recipe details
    version: int = ENGINE_CONFIG_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EngineConfig":
        from .paths import read_bounded

        p = Path(path)
        if not p.exists():
            raise EngineMismatchError(f"{p}: engine config missing; rebuild the engine")
        try:
            d = json.loads(read_bounded(p, 1 << 20, "engine config").decode("utf-8"))
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise EngineMismatchError(f"{p}: unreadable engine config ({exc}); rebuild the engine") from exc
        if d.get("version") != ENGINE_CONFIG_VERSION:
            raise EngineMismatchError(f"{p}: engine config version {d.get('version')!r} is not {ENGINE_CONFIG_VERSION}; rebuild")
        try:
            return cls(**d)
        except TypeError as exc:
            raise EngineMismatchError(f"{p}: malformed engine config ({exc}); rebuild the engine") from exc


def _version_tuple(v: str) -> tuple:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_engine_config(cfg: EngineConfig, machine: dict, onnx_sha256: str | None, artifact_sha256: str | None,
                        where: str) -> None:
    """Raise EngineMismatchError naming `where` and the mismatch; return quietly when the engine may run here."""
    def refuse(what: str):
        raise EngineMismatchError(f"{where}: {what}; rebuild it here with `locpath build`")

    if artifact_sha256 is not None and cfg.artifact_sha256 != artifact_sha256:
        refuse("the engine file does not match its engine config")
    if onnx_sha256 is not None and cfg.onnx_sha256 != onnx_sha256:
        refuse(f"built from ONNX {cfg.onnx_sha256[:12]}..., but the bundle's graph is {onnx_sha256[:12]}...")
    dev, libs = machine.get("device", {}), machine.get("libraries", {})
    want_dev = cfg.device
    if want_dev.get("kind") != dev.get("kind"):
        refuse(f"built for device {want_dev.get('kind')!r}, running on {dev.get('kind')!r}")
    if cfg.backend == "tensorrt":
        for key in ("name", "compute_capability"):
            if want_dev.get(key) != dev.get(key):
                refuse(f"built for GPU {key} {want_dev.get(key)!r}, this GPU has {dev.get(key)!r}")
        if cfg.libraries.get("tensorrt") != libs.get("tensorrt"):
            refuse(f"built with TensorRT {cfg.libraries.get('tensorrt')}, this machine has {libs.get('tensorrt')}")
        want_cuda, have_cuda = cfg.libraries.get("cuda"), libs.get("cuda")
        if want_cuda and have_cuda and str(want_cuda).split(".")[0] != str(have_cuda).split(".")[0]:
            refuse(f"built with CUDA {want_cuda}, this machine has CUDA {have_cuda}")
    elif cfg.backend in ("onnxruntime", "openvino"):
        lib = cfg.backend
        built, have = cfg.libraries.get(lib), libs.get(lib)
        if built and not have:
            refuse(f"built for {lib} {built}, which is not installed here")
        if built and have and _version_tuple(have)[:2] < _version_tuple(built)[:2]:
            refuse(f"built with {lib} {built}, this runtime has the older {have}")
    else:
        refuse(f"unknown engine backend {cfg.backend!r}")
