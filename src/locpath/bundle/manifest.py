"""The bundle manifest: what an appliance needs to run a bundle, parsed into typed dataclasses and validated field
by field (a bad value is refused with its field named, before anything reaches a graph).

Schema (version 2), `manifest.json` beside the files it names:
  schema_version, locpath_version, created, fusion, model (ModelConfig as a dict),
  components: {name: {file, sha256, precision, backend, inputs/outputs [{name, dtype, shape}], templates,
               description, profiles, quantization, parent_sha256, engine_config, data_files}},
  preprocessing: {tile_size, target_mpp, mean, std, min_tissue, tissue_mask_mpp, normalisation_in_graph, stm},
  tokenizer: {file, chat_template (a file), pad, im_start, im_end},
  generation: {max_new_tokens, max_length, stop_tokens, do_sample, temperature, top_k, top_p, repetition_penalty},
  files: {name: {sha256, bytes}}  every file of the bundle but manifest.json and its checksum/signature files,
  source, export (free-form records of how the bundle was made).
`SHA256SUMS` beside it covers manifest.json and every listed file: `integrity.write_manifest` writes both and
`integrity.verify_bundle` loads them. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig
from ..errors import ConfigError, LocpathError
from . import names
from .decoder_io import DecoderContract
from .paths import check_member_name, check_sha256

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
DTYPES = ("uint8", "int8", "int32", "int64", "float16", "bfloat16", "float32", "bool")


class BundleError(LocpathError):
    """A bundle is missing, tampered with, malformed, or of an unknown schema."""


class _Fields:
    """Typed access to one JSON object of the manifest; every refusal names the manifest and the field."""

    def __init__(self, d: object, where: str, section: str, known: tuple[str, ...] | None = None):
        if not isinstance(d, dict):
            raise BundleError(f"{where}: {section} must be a JSON object, got {type(d).__name__}")
        if known is not None:
            unknown = sorted(set(d) - set(known))
            if unknown:
                raise BundleError(f"{where}: {section} has unknown fields {unknown}")
        self.d, self.where, self.section = d, where, section

    def fail(self, key: str, what: str) -> BundleError:
        return BundleError(f"{self.where}: {self.section}.{key} {what}, got {self.d.get(key)!r}"[:400])

    def get(self, key: str, default=dataclasses.MISSING):
        if key not in self.d:
            if default is dataclasses.MISSING:
                raise BundleError(f"{self.where}: {self.section}.{key} is missing")
            return default
        return self.d[key]

    def text(self, key: str, default=dataclasses.MISSING, choices: tuple | None = None, optional: bool = False) -> str:
        v = self.get(key, default)
        if optional and v is None:
            return None  # type: ignore[return-value]
        if not isinstance(v, str):
            raise self.fail(key, "must be a string")
        if choices is not None and v not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}")
        return v

    def integer(self, key: str, default=dataclasses.MISSING, lo: int | None = None, hi: int | None = None) -> int:
        v = self.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(key, "must be an integer")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.fail(key, f"must be in [{lo}, {hi}]")
        return v

    def number(self, key: str, default=dataclasses.MISSING, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False) -> float:
        v = self.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise self.fail(key, "must be a finite number")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise self.fail(key, f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise self.fail(key, f"must be <= {hi}")
        return float(v)

    def flag(self, key: str, default=dataclasses.MISSING) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(key, "must be true or false")
        return v

    def mapping(self, key: str, default=dataclasses.MISSING) -> dict:
        v = self.get(key, default)
        if not isinstance(v, dict):
            raise self.fail(key, "must be a JSON object")
        return v

    def sequence(self, key: str, default=dataclasses.MISSING) -> list:
        v = self.get(key, default)
        if not isinstance(v, list):
            raise self.fail(key, "must be a list")
        return v

    def _checked(self, key: str, optional: bool, check) -> str | None:
        v = self.get(key, None if optional else dataclasses.MISSING)
        if optional and v is None:
            return None
        try:
            return check(v, f"{self.where}: {self.section}.{key}")
        except LocpathError as exc:
            raise BundleError(str(exc)) from None

    def sha(self, key: str, optional: bool = False) -> str | None:
        return self._checked(key, optional, check_sha256)

    def name(self, key: str, optional: bool = False) -> str | None:
        """A file name, through the path policy."""
        return self._checked(key, optional, check_member_name)


@dataclass
class IOSpec:
    name: str
    dtype: str
    shape: list

    @classmethod
    def parse(cls, d: object, where: str, section: str) -> "IOSpec":
        f = _Fields(d, where, section, ("name", "dtype", "shape"))
        shape = f.sequence("shape")
        if not all((isinstance(x, int) and not isinstance(x, bool) and x >= 0) or (isinstance(x, str) and x)
                   for x in shape):
            raise f.fail("shape", "must list non-negative sizes or axis names")
        return cls(name=f.text("name"), dtype=f.text("dtype", choices=DTYPES), shape=shape)

    @classmethod
    def from_decl(cls, decl) -> "IOSpec":
        return cls(decl.name, decl.dtype, list(decl.shape))


@dataclass
class FileEntry:
    sha256: str
    bytes: int


COMPONENT_FIELDS = ("file", "sha256", "precision", "backend", "inputs", "outputs", "templates", "description",
                    "profiles", "quantization", "parent_sha256", "engine_config", "data_files")


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
    data_files: list[str] = field(default_factory=list)  # weights beside `file` (OpenVINO .bin, ONNX external data)

    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def referenced_files(self) -> list[str]:
        return [self.file, *self.data_files] + ([self.engine_config] if self.engine_config else [])

    @classmethod
    def parse(cls, d: object, where: str, name: str) -> "ComponentEntry":
        sec = f"components.{name}"
        f = _Fields(d, where, sec, COMPONENT_FIELDS)
        profiles = f.mapping("profiles", {})
        for axis, rng in profiles.items():
            if not (isinstance(rng, list) and len(rng) == 3 and all(isinstance(x, int) and x >= 0 for x in rng)
                    and rng[0] <= rng[1] <= rng[2]):
                raise BundleError(f"{where}: {sec}.profiles.{axis} must be [min, opt, max] integers in order, got {rng!r}")
        data = f.sequence("data_files", [])
        return cls(
            file=f.name("file"), sha256=f.sha("sha256"), precision=f.text("precision", "fp32"),
            backend=f.text("backend", "onnxruntime", choices=BACKENDS),
            inputs=[IOSpec.parse(x, where, f"{sec}.inputs[{i}]") for i, x in enumerate(f.sequence("inputs", []))],
            outputs=[IOSpec.parse(x, where, f"{sec}.outputs[{i}]") for i, x in enumerate(f.sequence("outputs", []))],
            templates=f.mapping("templates", {}), description=f.text("description", ""), profiles=profiles,
            quantization=f.mapping("quantization", {}), parent_sha256=f.sha("parent_sha256", optional=True),
            engine_config=f.name("engine_config", optional=True),
            data_files=[_Fields({"data_files": x}, where, sec).name("data_files") for x in data],
        )


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

    @classmethod
    def parse(cls, d: object, where: str) -> "Preprocessing":
        f = _Fields(d, where, "preprocessing", tuple(cls.__dataclass_fields__))
        mean, std = f.sequence("mean"), f.sequence("std")
        for key, vals, lo in (("mean", mean, 0.0), ("std", std, 1e-6)):
            if len(vals) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                         and lo <= v <= 1e3 for v in vals):
                raise f.fail(key, "must be three finite numbers" + (" > 0" if key == "std" else ""))
        s = _Fields(f.mapping("stm", {}), where, "preprocessing.stm", ("window", "threshold", "enabled"))
        stm = {"window": s.integer("window", 2, lo=1, hi=64), "threshold": s.number("threshold", 0.95, lo=-1.0, hi=1.0),
               "enabled": s.flag("enabled", True)}
        return cls(tile_size=f.integer("tile_size", lo=8, hi=4096), target_mpp=f.number("target_mpp", lo=0.0, hi=100.0, lo_open=True),
                   mean=[float(v) for v in mean], std=[float(v) for v in std],
                   min_tissue=f.number("min_tissue", 0.25, lo=0.0, hi=1.0),
                   tissue_mask_mpp=f.number("tissue_mask_mpp", 8.0, lo=0.0, hi=1000.0, lo_open=True),
                   normalisation_in_graph=f.flag("normalisation_in_graph", True), stm=stm)


@dataclass
class TokenizerEntry:
    file: str
    chat_template: str  # a Jinja file beside the tokenizer; the runtime builds prompts with it
    pad: str
    im_start: str
    im_end: str

    @classmethod
    def parse(cls, d: object, where: str) -> "TokenizerEntry":
        f = _Fields(d, where, "tokenizer", tuple(cls.__dataclass_fields__))
        return cls(file=f.name("file"), chat_template=f.name("chat_template"), pad=f.text("pad"),
                   im_start=f.text("im_start"), im_end=f.text("im_end"))


@dataclass
class GenerationDefaults:
    max_new_tokens: int = 16
    max_length: int = 256  # cap of the self-attention KV cache (prompt + answer)
    stop_tokens: list = field(default_factory=list)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @classmethod
    def parse(cls, d: object, where: str) -> "GenerationDefaults":
        f = _Fields(d, where, "generation", tuple(cls.__dataclass_fields__))
        max_length = f.integer("max_length", lo=2, hi=1 << 20)
        stops = f.sequence("stop_tokens", [])
        if not all(isinstance(s, str) and s for s in stops):
            raise f.fail("stop_tokens", "must be a list of token strings")
        return cls(max_new_tokens=f.integer("max_new_tokens", lo=1, hi=max_length - 1), max_length=max_length,
                   stop_tokens=list(stops), do_sample=f.flag("do_sample", False),
                   temperature=f.number("temperature", 1.0, lo=0.0, hi=100.0, lo_open=True),
                   top_k=f.integer("top_k", 0, lo=0), top_p=f.number("top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
                   repetition_penalty=f.number("repetition_penalty", 1.0, lo=0.0, hi=100.0, lo_open=True))


TOP_FIELDS = ("schema_version", "locpath_version", "created", "fusion", "model", "components", "preprocessing",
              "tokenizer", "generation", "files", "source", "export")


@dataclass
class Manifest:
    fusion: str
    model: dict
    components: dict[str, ComponentEntry]
    preprocessing: Preprocessing
    tokenizer: TokenizerEntry
    generation: GenerationDefaults
    files: dict[str, FileEntry] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    locpath_version: str = ""
    created: str = ""
    source: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def decoder_contract(self, component: str, where: str = MANIFEST) -> DecoderContract:
        return DecoderContract.from_templates(self.components[component].templates,
                                              f"{where}: components.{component}.templates")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def referenced_files(self) -> list[str]:
        """Every file the manifest's entries point at (each must be listed in `files`)."""
        out = [n for c in self.components.values() for n in c.referenced_files()]
        return out + [self.tokenizer.file, self.tokenizer.chat_template]

    def record_file(self, bundle_dir: str | os.PathLike, name: str) -> FileEntry:
        """Hash a file written into the bundle being assembled and list it."""
        from .paths import sha256_file

        p = Path(bundle_dir) / check_member_name(name, "bundle file")
        self.files[name] = FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
        return self.files[name]

    def drop_file(self, name: str) -> None:
        self.files.pop(name, None)

    @classmethod
    def from_dict(cls, d: object, where: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: not a JSON object")
        v = d.get("schema_version")
        if v != SCHEMA_VERSION:
            raise BundleError(f"{where}: unknown schema version {v!r} (this locpath reads version {SCHEMA_VERSION}); "
                              "re-export the bundle with this version")
        f = _Fields(d, where, "manifest", TOP_FIELDS)
        fusion = f.text("fusion", choices=("cara", "prefix"))
        model = f.mapping("model")
        try:
            ModelConfig.from_dict(model)
        except ConfigError as exc:
            raise BundleError(f"{where}: model: {exc}") from None
        comps = f.mapping("components")
        components = {}
        for name, c in comps.items():
            if name not in names.ALL:
                raise BundleError(f"{where}: unknown component {name!r} (known: {', '.join(names.ALL)})")
            components[name] = ComponentEntry.parse(c, where, name)
        missing = [n for n in names.REQUIRED if n not in components]
        if missing:
            raise BundleError(f"{where}: components lack {', '.join(missing)}")
        if not any(n in components for n in names.DECODERS):
            raise BundleError(f"{where}: components hold no decoder ({' or '.join(names.DECODERS)})")
        if names.DECODER_FUSED_PREFILL in components and names.DECODER_FUSED not in components:
            raise BundleError(f"{where}: components hold {names.DECODER_FUSED_PREFILL} without {names.DECODER_FUSED} "
                              "(the prefill graph fills the fused decoder's K/V cache)")
        chunked = [n for n in names.RESAMPLER_CHUNKS if n in components]
        if chunked and len(chunked) != len(names.RESAMPLER_CHUNKS):
            raise BundleError(f"{where}: components hold {chunked[0]} without "
                              f"{', '.join(n for n in names.RESAMPLER_CHUNKS if n not in chunked)} (the chunked "
                              "resampler needs all three graphs)")
        files = {}
        for name, e in f.mapping("files").items():
            fe = _Fields(e, where, f"files.{name}", ("sha256", "bytes"))
            try:
                check_member_name(name, f"{where}: files")
            except LocpathError as exc:
                raise BundleError(str(exc)) from None
            files[name] = FileEntry(sha256=fe.sha("sha256"), bytes=fe.integer("bytes", lo=0))
        m = cls(fusion=fusion, model=model, components=components,
                preprocessing=Preprocessing.parse(f.get("preprocessing"), where),
                tokenizer=TokenizerEntry.parse(f.get("tokenizer"), where),
                generation=GenerationDefaults.parse(f.get("generation"), where), files=files, schema_version=v,
                locpath_version=f.text("locpath_version", ""), created=f.text("created", ""),
                source=f.mapping("source", {}), export=f.mapping("export", {}))
        m.check_references(where)
        return m

    def check_references(self, where: str = MANIFEST) -> None:
        """Every referenced file is listed in `files` and every component's sha256 is its file's."""
        for name in self.referenced_files():
            if name not in self.files:
                raise BundleError(f"{where}: {name} is referenced but not listed under files")
        for cname, c in self.components.items():
            if self.files[c.file].sha256 != c.sha256:
                raise BundleError(f"{where}: components.{cname}.sha256 differs from files.{c.file}.sha256")
            if cname in names.DECODERS or cname == names.DECODER_FUSED_PREFILL:
                self.decoder_contract(cname, where)  # malformed decoder templates fail at load, not mid-answer
        if names.DECODER_FUSED_PREFILL in self.components:
            if self.decoder_contract(names.DECODER_FUSED_PREFILL, where) != self.decoder_contract(names.DECODER_FUSED, where):
                raise BundleError(f"{where}: components.{names.DECODER_FUSED_PREFILL}.templates differ from "
                                  f"{names.DECODER_FUSED}'s: both graphs must share one K/V cache layout")


def parse_manifest_bytes(data: bytes, where: str) -> Manifest:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: invalid JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"{where}: invalid JSON (nested too deeply)") from None
    return Manifest.from_dict(obj, where=where)
