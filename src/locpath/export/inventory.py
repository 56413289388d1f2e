"""`locpath inspect`: what a checkpoint holds (key groups, counts, shapes, dtypes, parameters, bytes), read lazily.

Sources (`open_source`), each a name -> (shape, dtype, bytes) table plus `get(name)` for one tensor:

- `.safetensors`: the header only (8-byte length + JSON); a tensor is read when asked for (`safe_open`).
- a Hugging Face model folder: `model.safetensors.index.json` (sharded; every shard's header is read and checked
  against the index), `model.safetensors`, or `pytorch_model.bin[.index.json]`.
- a PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors` (or `.bin`).
- `.pth`/`.bin`/`.pt`: `torch.load(weights_only=True, mmap=True)`: shapes and dtypes without reading the data, so a
  15 GB fp16 state dict costs address space, not memory. A file that needs pickle for anything but tensors and
  plain containers is refused in one line: locpath never unpickles. Wrappers ('state_dict', 'model', 'module')
  are unwrapped and nested dicts flattened with '.'; other non-tensor entries are listed, not loaded.

Grouping: the first all-digit component of a key (the layer index) becomes '*' (`model.layers.*.self_attn.q_proj.weight`
x28); `depth` keeps only the first N components of that pattern.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..engines.hf_weights import SafetensorsFiles, confined_name
from ..engines.safetensors_header import ST_DTYPES, load_json, read_index
from ..errors import CheckpointError

INVENTORY_SCHEMA = "locpath-inventory/1"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPERS = ("state_dict", "model", "module")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class TensorSource:
    """A checkpoint's tensors by name, metadata read eagerly, data only on `get`."""

    path: Path
    kind: str  # safetensors | hf-folder | peft-adapter | torch
    infos: dict[str, TensorInfo]
    files: list[str] = field(default_factory=list)
    non_tensor: dict[str, str] = field(default_factory=dict)  # key -> type name (torch files only)
    meta: dict = field(default_factory=dict)  # config.json / adapter_config.json facts
    _where: dict[str, SafetensorsFiles] = field(default_factory=dict)  # tensor -> its checked, open file
    _torch: dict | None = None  # flattened torch state dict (mmap'd tensors)

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, key: str):
        """One tensor (torch), read now: from its safetensors file or the mmap'd torch state dict."""
        if key not in self.infos:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        if self._torch is not None:
            return self._torch[key]
        import torch

        reader = self._where[key]
        e = reader.entries[key]
        dtype = getattr(torch, ST_DTYPES[e.dtype][0])
        if e.end == e.start:
            return torch.empty(e.shape, dtype=dtype)
        raw = reader.read_bytes(e, e.start, e.end, key)  # through the descriptor checked when the header was read
        return torch.from_numpy(raw).view(dtype).reshape(e.shape)

    def close(self) -> None:
        for reader in set(self._where.values()):
            reader.close()
        self._where = {}
        self._torch = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# -- readers ----------------------------------------------------------------------------------------------------
def _infos(reader: SafetensorsFiles) -> dict[str, TensorInfo]:
    return {k: TensorInfo(e.shape, ST_DTYPES[e.dtype][0], e.end - e.start) for k, e in reader.entries.items()}


def read_safetensors_header(path: Path, folder: Path | None = None) -> dict[str, TensorInfo]:
    """name -> TensorInfo from the header alone, validated (`engines/safetensors_header.parse_header`)."""
    reader = SafetensorsFiles([path], folder, dtypes=tuple(ST_DTYPES))
    reader.close()
    return _infos(reader)


def _safetensors_file(path: Path, folder: Path | None = None) -> TensorSource:
    reader = SafetensorsFiles([path], folder, dtypes=tuple(ST_DTYPES))
    return TensorSource(path, "safetensors", _infos(reader), files=[path.name], _where=dict.fromkeys(reader.entries,
                                                                                                     reader))


def _sharded(folder: Path, index: Path, kind: str, meta: dict) -> TensorSource:
    """Every shard the index names, each opened inside the folder and its header checked; each listed tensor must
    be in the shard the index names."""
    weight_map = read_index(index, folder)
    shards = sorted(set(weight_map.values()))
    infos, where = {}, {}
    try:
        for name in shards:
            f = confined_name(folder, name, index)
            reader = SafetensorsFiles([f], folder, dtypes=tuple(ST_DTYPES))
            listed = {k for k, v in weight_map.items() if v == name}
            absent = sorted(listed - set(reader.entries))
            if absent:
                reader.close()
                raise CheckpointError(f"{f}: lacks {len(absent)} tensors its index lists there, e.g. {absent[:3]}")
            mine = _infos(reader)
            for k in sorted(listed):
                infos[k], where[k] = mine[k], reader
    except BaseException:
        for reader in set(where.values()):
            reader.close()
        raise
    src = TensorSource(folder, kind, infos, files=[index.name] + shards, meta=meta, _where=where)
    data = load_json(index, "shard index", folder)
    total = (data.get("metadata") or {}).get("total_size") if isinstance(data.get("metadata"), dict) else None
    if isinstance(total, int):
        src.meta["index_total_size"] = total
    return src


def _torch_file(path: Path) -> TensorSource:
    import pickle

    import torch

    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # a legacy (non-zip) torch file cannot be memory-mapped; read it plainly
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: needs pickle to load (not a tensor-only state dict: "
                              f"{_first_line(exc).removeprefix('Weights only load failed. ')[:160]}); refused, "
                              "locpath never unpickles: save it as a plain state dict or safetensors") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {_first_line(exc)})") from None
    flat: dict = {}
    odd: dict[str, str] = {}

    def walk(prefix: str, d) -> None:
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, torch.Tensor):
                flat[name] = v
            elif isinstance(v, dict):
                walk(name + ".", v)
            else:
                odd[name] = type(v).__name__

    if isinstance(obj, torch.Tensor) or not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict (a {type(obj).__name__})")
    while True:  # {'module': {...}} / {'state_dict': {...}, 'epoch': 3}: the tensors are one level down
        inner = [k for k in WRAPPERS if isinstance(obj.get(k), dict)]
        if len(inner) == 1 and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for k, v in obj.items():
                if k != inner[0]:
                    odd[str(k)] = type(v).__name__
            obj = obj[inner[0]]
            continue
        break
    try:
        walk("", obj)
    except RecursionError:
        raise CheckpointError(f"{path}: its dicts are nested too deeply to be a state dict") from None
    infos = {k: TensorInfo(tuple(v.shape), str(v.dtype).removeprefix("torch."), v.numel() * v.element_size())
             for k, v in flat.items()}
    return TensorSource(path, "torch", infos, files=[path.name], non_tensor=odd, _torch=flat)


def _config_facts(p: Path) -> dict:
    c = load_json(p, "config", p.parent)
    if not isinstance(c, dict):
        raise CheckpointError(f"{p}: not a JSON object")
    keep = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "torch_dtype", "dtype",
            "peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path", "use_dora", "modules_to_save")
    return {k: c[k] for k in keep if k in c}


def _named(p: Path) -> bool:
    """A folder entry exists under this name (a broken or escaping symlink too: it is then refused, not skipped)."""
    return p.exists() or p.is_symlink()


def _inside(p: Path, folder: Path) -> Path:
    """p's resolved path, refused when it is outside `folder` or not a regular file (what torch.load opens)."""
    from ..engines.safetensors_header import open_confined

    os.close(open_confined(p, folder))
    return p.resolve()


def open_source(path: str | os.PathLike) -> TensorSource:
    """A TensorSource for a file or folder, or a CheckpointError naming it and saying what is wrong."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: not found")
    if p.is_dir():
        if _named(p / "adapter_config.json"):
            meta = _config_facts(p / "adapter_config.json")
            for name in ("adapter_model.safetensors", "adapter_model.bin"):
                if (p / name).exists() or (p / name).is_symlink():
                    src = _safetensors_file(p / name, p) if name.endswith(".safetensors") else \
                        _torch_file(_inside(p / name, p))
                    src.path, src.kind, src.meta = p, "peft-adapter", meta
                    src.files = ["adapter_config.json", name]
                    return src
            raise CheckpointError(f"{p}: a PEFT adapter folder without adapter_model.safetensors or adapter_model.bin")
        meta = _config_facts(p / "config.json") if _named(p / "config.json") else {}
        if _named(p / "model.safetensors.index.json"):
            return _sharded(p, p / "model.safetensors.index.json", "hf-folder", meta)
        if _named(p / "model.safetensors"):
            src = _safetensors_file(p / "model.safetensors", p)
            src.path, src.kind, src.meta = p, "hf-folder", meta
            return src
        if _named(p / "pytorch_model.bin"):
            src = _torch_file(_inside(p / "pytorch_model.bin", p))
            src.path, src.kind, src.meta = p, "hf-folder", meta
            return src
        if (p / "pytorch_model.bin.index.json").is_file():
            raise CheckpointError(f"{p}: sharded pytorch_model-*.bin folders are not supported; convert to safetensors")
        raise CheckpointError(f"{p}: a folder without model.safetensors[.index.json], pytorch_model.bin or "
                              "adapter_config.json")
    if not p.is_file():
        raise CheckpointError(f"{p}: not a regular file")
    if p.suffix == ".safetensors":
        return _safetensors_file(p)
    if p.suffix in TORCH_SUFFIXES:
        return _torch_file(p)
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"PK":  # a torch zip file under another name
        return _torch_file(p)
    raise CheckpointError(f"{p}: unknown checkpoint kind (expected .safetensors, .pth/.pt/.bin, a Hugging Face model "
                          "folder or a PEFT adapter folder)")


# -- inventory --------------------------------------------------------------------------------------------------
def group_name(key: str, depth: int | None = None) -> str:
    """The key with its first all-digit component (the layer index) as '*'; later indices (nn.Sequential
    positions inside a layer) stay, so differently shaped tensors keep their own rows."""
    parts = key.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if first is not None:
        parts[first] = "*"
    if depth is not None and len(parts) > depth:
        return ".".join(parts[:depth]) + ".…"
    return ".".join(parts)


def inventory(src: TensorSource, depth: int | None = None) -> dict:
    """The key inventory as a JSON-able dict (schema locpath-inventory/1)."""
    groups: dict[str, dict] = {}
    for key, info in src.infos.items():
        g = groups.setdefault(group_name(key, depth), {"shapes": Counter(), "dtypes": Counter(), "count": 0,
                                                       "parameters": 0, "bytes": 0, "first": key})
        g["count"] += 1
        g["shapes"][info.shape] += 1
        g["dtypes"][info.dtype] += 1
        g["parameters"] += info.numel
        g["bytes"] += info.nbytes
    rows = []
    for name, g in groups.items():
        shapes = [{"shape": list(s), "count": c} for s, c in g["shapes"].most_common()]
        rows.append({"prefix": name, "count": g["count"], "shape": shapes[0]["shape"] if len(shapes) == 1 else None,
                     "shapes": shapes, "dtypes": sorted(g["dtypes"]), "parameters": g["parameters"],
                     "bytes": g["bytes"], "example": g["first"]})
    dtypes = Counter(i.dtype for i in src.infos.values())
    return {"schema": INVENTORY_SCHEMA, "path": str(src.path), "kind": src.kind, "files": list(src.files),
            "tensors": len(src.infos), "parameters": sum(i.numel for i in src.infos.values()),
            "bytes": sum(i.nbytes for i in src.infos.values()), "dtypes": dict(sorted(dtypes.items())),
            "groups": rows, "non_tensor": dict(src.non_tensor), "meta": dict(src.meta)}


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _shape_text(row: dict) -> str:
    if row["shape"] is not None:
        return "x".join(map(str, row["shape"])) or "scalar"
    cells = [f"{'x'.join(map(str, s['shape'])) or 'scalar'} ({s['count']})" for s in row["shapes"][:3]]
    return ", ".join(cells) + (f", +{len(row['shapes']) - 3} more" if len(row["shapes"]) > 3 else "")


def format_inventory(inv: dict) -> str:
    """The human table: one row per group, totals first."""
    lines = [f"{inv['path']}: {inv['kind']} ({', '.join(inv['files'][:4])}{', ...' if len(inv['files']) > 4 else ''}), "
             f"{inv['tensors']} tensors, {_human(inv['parameters'])} parameters, {_human(inv['bytes'], 'B')}; "
             + ", ".join(f"{d} x{n}" for d, n in inv["dtypes"].items())]
    if inv["meta"]:
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in inv["meta"].items()))
    if inv["non_tensor"]:
        items = list(inv["non_tensor"].items())
        lines.append("  not tensors (ignored): " + ", ".join(f"{k} ({t})" for k, t in items[:8])
                     + (f", +{len(items) - 8} more" if len(items) > 8 else ""))
    width = min(max([len(r["prefix"]) for r in inv["groups"]] + [6]), 90)
    lines.append(f"{'prefix':<{width}}  {'count':>5}  {'shape':<24} {'dtype':<10} {'params':>10}")
    for r in inv["groups"]:
        lines.append(f"{r['prefix']:<{width}}  {r['count']:>5}  {_shape_text(r):<24} {','.join(r['dtypes']):<10} "
                     f"{_human(r['parameters']):>10}")
    return _printable("\n".join(lines))


def _printable(text: str) -> str:
    """Names and config values come from the file: control characters (terminal escapes) and lone surrogates are
    shown escaped, never sent to the terminal as they are."""
    if text.isprintable() or all(c.isprintable() or c == "\n" for c in text):
        return text
    return "".join(c if c.isprintable() or c == "\n" else c.encode("unicode_escape").decode("ascii") for c in text)
