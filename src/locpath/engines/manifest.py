"""The bundle manifest: what an appliance needs to run a bundle, parsed into typed dataclasses.

Schema (version 1), `manifest.json` beside the files it names:
  schema_version, locpath_version, created, fusion, model (ModelConfig as a dict),
  components: {name: {file, sha256, precision, backend, inputs/outputs [{name, dtype, shape}], templates,
               description, profiles}},
  preprocessing: {tile_size, target_mpp, mean, std, min_tissue, tissue_mask_mpp, stm: {...}},
  tokenizer: {file, sha256, chat_template, pad, im_start, im_end},
  generation: {max_new_tokens, max_length, stop_tokens, do_sample, temperature, top_k, top_p, repetition_penalty},
  source: {...}, export: {...}
Loading verifies the schema version and every file's sha256; a mismatch is refused naming the file.
Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig
from ..errors import LocpathError
from ..fsutil import atomic_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(LocpathError):
    """A bundle is missing, tampered with, or of an unknown schema."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass
class IOSpec:
    name: str
    dtype: str
    shape: list

    @classmethod
    def from_dict(cls, d):
        return cls(name=d["name"], dtype=d["dtype"], shape=list(d["shape"]))


@dataclass
class ComponentEntry:
    file: str
    sha256: str
    precision: str = "fp32"
    backend: str = "onnxruntime"
    inputs: list[IOSpec] = field(default_factory=list)
    outputs: list[IOSpec] = field(default_factory=list)
    templates: dict = field(default_factory=dict)
    description: str = ""
    profiles: dict = field(default_factory=dict)  # axis -> [min, opt, max], for engines that need them
    quantization: dict = field(default_factory=dict)  # the recipe, when not plain fp32
    parent_sha256: str | None = None  # the fp32 graph a built component came from
    engine_config: str | None = None  # EngineConfig file beside a built component
    data_files: dict = field(default_factory=dict)  # weights beside `file` (OpenVINO .bin, ONNX external data) -> sha256

    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["inputs"] = [IOSpec.from_dict(x) for x in d.get("inputs", [])]
        d["outputs"] = [IOSpec.from_dict(x) for x in d.get("outputs", [])]
        return cls(**d)


@dataclass
class Preprocessing:
    tile_size: int = 224
    target_mpp: float = 0.5
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    min_tissue: float = 0.25
    tissue_mask_mpp: float = 8.0
    normalisation_in_graph: bool = True
    stm: dict = field(default_factory=dict)


@dataclass
class TokenizerEntry:
    file: str
    sha256: str
    chat_template: str
    pad: str
    im_start: str
    im_end: str


@dataclass
class GenerationDefaults:
    max_new_tokens: int = 16
    max_length: int = 256  # cap of the preallocated self-attention KV cache (prompt + answer)
    stop_tokens: list = field(default_factory=list)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


@dataclass
class Manifest:
    fusion: str
    model: dict
    components: dict[str, ComponentEntry]
    preprocessing: Preprocessing
    tokenizer: TokenizerEntry
    generation: GenerationDefaults
    schema_version: int = SCHEMA_VERSION
    locpath_version: str = ""
    created: str = ""
    source: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: not a JSON object")
        v = d.get("schema_version")
        if v != SCHEMA_VERSION:
            raise BundleError(f"{where}: unknown schema version {v!r} (this locpath reads version {SCHEMA_VERSION}); "
                              "re-export the bundle with this version")
        try:
            return cls(
                fusion=d["fusion"],
                model=d["model"],
                components={k: ComponentEntry.from_dict(c) for k, c in d["components"].items()},
                preprocessing=Preprocessing(**d["preprocessing"]),
                tokenizer=TokenizerEntry(**d["tokenizer"]),
                generation=GenerationDefaults(**d["generation"]),
                schema_version=v,
                locpath_version=d.get("locpath_version", ""),
                created=d.get("created", ""),
                source=d.get("source", {}),
                export=d.get("export", {}),
            )
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from exc

    def save(self, bundle_dir: str | os.PathLike) -> Path:
        out = Path(bundle_dir) / MANIFEST
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return out

    def files(self) -> dict[str, str]:
        """Every file the bundle needs -> its recorded sha256."""
        out = {c.file: c.sha256 for c in self.components.values()}
        for c in self.components.values():
            out.update(c.data_files)
        # engine configs are checked against the machine at load time, and covered by checksums here
        recorded = self.export.get("engine_config_sha256", {})
        out.update({c.engine_config: recorded.get(c.engine_config, "") for c in self.components.values() if c.engine_config})
        out[self.tokenizer.file] = self.tokenizer.sha256
        return out


def load_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> Manifest:
    b = Path(bundle_dir)
    if not b.is_dir():
        raise BundleError(f"{b}: bundle folder not found")
    mf = b / MANIFEST
    if not mf.exists():
        raise BundleError(f"{b}: not a locpath bundle (no {MANIFEST})")
    try:
        data = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mf}: invalid JSON ({exc})") from exc
    m = Manifest.from_dict(data, where=str(mf))
    if verify:
        verify_files(b, m)
    return m


def verify_files(bundle_dir: Path, m: Manifest) -> None:
    for name, digest in m.files().items():
        p = bundle_dir / name
        if not p.exists():
            raise BundleError(f"{p}: listed in the manifest but missing")
        got = sha256_file(p)
        if got != digest:
            raise BundleError(f"{p}: checksum mismatch (manifest {digest[:12]}..., file {got[:12]}...): "
                              "the file was modified or corrupted; re-export the bundle")
