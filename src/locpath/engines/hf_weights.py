"""Tensors of a Hugging Face model folder read one at a time from its safetensors shards, torch-free.

Why: a 7B model in fp32 does not fit a 24 GB machine, so the published-scale decoder is written layer by layer
from the shards (`engines/fused_stream.py`). A tensor is read (pread, not a memory map) and converted to
float32 only when asked for; nothing keeps it afterwards. Nothing read from the folder is trusted: the index may only
name shard files inside the folder, every header entry must lie inside its file with the size its dtype and
shape imply, and only float dtypes are taken.

LoRA adapters (a PEFT folder: adapter_config.json + adapter_model.safetensors) are read the same way and
merged per weight as W + scale * B @ A, the formula PEFT's own merge applies (scale = alpha / r, or
alpha / sqrt(r) with rsLoRA); `tests/test_published.py` checks the result against peft's merge.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .safetensors_header import Entry, load_json, open_confined, parse_header, plain_name, read_index

_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
FLOAT_DTYPES = tuple(_DTYPES)


def confined_name(folder: Path, name: object, where: Path) -> Path:
    """folder/name for a name an index or config gives; the file is checked again (resolved inside the folder,
    regular) when it is opened."""
    p = folder / plain_name(name, where)
    if not (p.exists() or p.is_symlink()):
        raise CheckpointError(f"{where}: names shard {name!r}, which is not in {folder}")
    return p


class SafetensorsFiles:
    """Named tensors over one or more safetensors files; read on demand, converted to float32. Each file is opened
    once, checked (`open_confined`: inside `folder` when one is given) and its header validated
    (`parse_header`); tensors are read later through that same descriptor. `dtypes`: the dtype codes taken (the
    float ones by default: what the decoder is built from)."""

    def __init__(self, files: list[Path], folder: Path | None = None, dtypes: tuple[str, ...] = FLOAT_DTYPES):
        self.entries: dict[str, Entry] = {}
        self.metadata: dict[Path, dict] = {}
        self._fds: dict[Path, int] = {}
        try:
            for f in files:
                self._read_header(Path(f), folder, dtypes)
        except BaseException:
            self.close()
            raise

    def _read_header(self, f: Path, folder: Path | None, dtypes: tuple[str, ...]) -> None:
        fd = self._fds[f] = open_confined(f, folder)
        entries, self.metadata[f] = parse_header(fd, f)
        for name, e in entries.items():
            if e.dtype not in dtypes:
                raise CheckpointError(f"{f}: tensor {name!r} is {e.dtype}; only {', '.join(dtypes)} weights are read")
            if name in self.entries:
                raise CheckpointError(f"{f}: tensor {name!r} is stored twice (also in {self.entries[name].file.name})")
            self.entries[name] = e

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in the model's weight files") from None

    def raw(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The stored tensor (or a range of its rows) as read from disk, bf16 as uint16. Read with pread, not
        memory-mapped: mapped pages would stay in the process's resident set after use, so a 15 GB model read
        through a map looks like a 15 GB process."""
        e = self._entry(name)
        np_dtype, size = _DTYPES[e.dtype]
        shape = e.shape
        start, end = e.start, e.end
        if rows is not None:
            lo, hi, step = rows.indices(shape[0] if shape else 1)
            if step != 1:
                raise ValueError("row slices must be contiguous")
            row = math.prod(shape[1:]) * size
            start, end, shape = e.start + lo * row, e.start + max(lo, hi) * row, (max(0, hi - lo), *shape[1:])
        buf = self.read_bytes(e, start, end, name)
        return buf.view(np_dtype).reshape(shape)

    def read_bytes(self, e: Entry, start: int, end: int, name: str) -> np.ndarray:
        """Bytes start..end of e's file (pread through the descriptor checked at open)."""
        buf = np.empty(end - start, np.uint8)
        fd = self._fds[e.file]
        got, view = 0, memoryview(buf)
        while got < len(buf):
            n = os.preadv(fd, [view[got:]], start + got)
            if n <= 0:
                raise CheckpointError(f"{e.file}: ends inside tensor {name!r} (the file was truncated)")
            got += n
        return buf

    def array(self, name: str, rows: slice | None = None) -> np.ndarray:
        """float32 copy of a tensor (or of a range of its rows)."""
        e, raw = self._entry(name), self.raw(name, rows)
        if e.dtype == "BF16":  # shifted in place: one float32-sized buffer, not two
            wide = raw.astype(np.uint32)
            del raw
            wide <<= np.uint32(16)
            return wide.view(np.float32)
        return raw.astype(np.float32, copy=e.dtype != "F32")

    def prefixed(self, prefix: str) -> "SafetensorsFiles":
        """The tensors whose names start with `prefix`, named without it (the `llm.` part of a locpath
        checkpoint's model.safetensors is a Hugging Face LLM's state dict)."""
        view = SafetensorsFiles([])
        view.entries = {k[len(prefix):]: e for k, e in self.entries.items() if k.startswith(prefix)}
        view._fds = self._fds
        view._owner = self  # keeps the shared descriptors open
        return view

    def close(self) -> None:
        if getattr(self, "_owner", None) is not None:
            return
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()


class HFFolder:
    """A local Hugging Face causal-LM folder: config.json plus model.safetensors or shards with their index. Every
    file is checked as it is opened: inside the folder once resolved, a regular file, its header valid."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.folder}: not a Hugging Face model folder (no config.json)")
        self.config = load_json(cfg, "model config", self.folder)
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg}: not a JSON object")
        index = self.folder / "model.safetensors.index.json"
        if index.exists() or index.is_symlink():
            wm = read_index(index, self.folder)
            files = sorted({confined_name(self.folder, v, index) for v in wm.values()})
            self.weights = SafetensorsFiles(files, self.folder)
            unlisted = sorted(set(wm) - set(self.weights.names()))
            if unlisted:
                raise CheckpointError(f"{index}: names tensors its shards do not hold: {', '.join(unlisted[:4])}")
        elif (self.folder / "model.safetensors").exists() or (self.folder / "model.safetensors").is_symlink():
            self.weights = SafetensorsFiles([self.folder / "model.safetensors"], self.folder)
        else:
            raise CheckpointError(f"{self.folder}: no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors weights are read)")
        self.model_type = self.config.get("model_type")
        if self.model_type not in ("qwen2", "llama"):
            raise CheckpointError(f"{cfg}: model_type {self.model_type!r} is not supported (qwen2 or llama)")

    def get(self, key: str, default=None):
        return self.config.get(key, default)

    def hf_config(self):
        """transformers' config object of the folder (what the rotary embedding is built from)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.folder), local_files_only=True)

    @property
    def bytes(self) -> int:
        return sum(e.end - e.start for e in self.weights.entries.values())


# -- LoRA ----------------------------------------------------------------------------------------------------
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def saved_module_keys(cfg: dict, names: list[str], where: object) -> dict[str, str]:
    """adapter key -> base weight name, for the keys of a PEFT adapter that are whole modules (`modules_to_save`:
    PEFT saves `base_model.model.lm_head.weight` and replaces the base's lm_head with it), not LoRA factors."""
    mts = cfg.get("modules_to_save") or []
    if isinstance(mts, str):
        mts = [mts]
    if not isinstance(mts, list) or not all(isinstance(m, str) and m for m in mts):
        raise CheckpointError(f"{where}: modules_to_save must be a list of module names")
    out = {}
    for k in names:
        if _LORA_KEY.match(k):
            continue
        w = k.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
        module = w.rsplit(".", 1)[0]
        if any(module == m or module.endswith("." + m) for m in mts):
            out[k] = w
    return out


def check_replaced(replaced: dict[str, dict[str, tuple[int, ...]]], base: dict[str, tuple[int, ...]], tied: bool,
                   source: object) -> list[str]:
    """Modules an adapter replaces wholesale, checked against the base LLM's weight shapes; returns one warning
    line per module (a replacement is never silent), or raises one CheckpointError line."""
    lines = []
    for module, weights in sorted(replaced.items()):
        for w, shape in sorted(weights.items()):
            if tied and w.split(".")[-2] in ("lm_head", "embed_tokens"):
                raise CheckpointError(f"{source}: replaces {module} wholesale (modules_to_save), but the LLM ties "
                                      "lm_head to embed_tokens: not supported")
            if w not in base:
                raise CheckpointError(f"{source}: replaces {w} (modules_to_save), which the base LLM does not have")
            if tuple(base[w]) != tuple(shape):
                raise CheckpointError(f"{source}: replaces {module} wholesale (modules_to_save) with {w} "
                                      f"{list(shape)}, the base's is {list(base[w])}")
        lines.append(f"{source}: replaces {module} wholesale (PEFT modules_to_save: "
                     + ", ".join(f"{w} {list(s)}" for w, s in sorted(weights.items())) + "), not a LoRA delta")
    return lines


@dataclass
class LoraAdapter:
    """LoRA A/B pairs by the base weight they modify ("model.layers.0.self_attn.q_proj.weight"), and the weights of
    modules it replaces wholesale (PEFT's modules_to_save)."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # weight name -> (A [r, in], B [out, r]) float32
    alpha: float | None  # None: alpha equals each pair's own rank (scale 1), as `locpath import` merges state dicts
    rslora: bool = False
    source: str = "adapter"
    replaced: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> the whole new tensor (float32)

    def scale(self, rank: int) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    def delta(self, weight: str) -> np.ndarray | None:
        ab = self.pairs.get(weight)
        if ab is None:
            return None
        a, b = ab
        return (b @ a) * np.float32(self.scale(a.shape[0]))

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], alpha: float | None, rslora: bool = False,
                     source: str = "adapter") -> "LoraAdapter":
        """From PEFT-style keys (`base_model.model.<module>.lora_A.weight`); alpha None: each pair's rank."""
        halves: dict[str, dict[str, np.ndarray]] = {}
        for k, v in tensors.items():
            m = _LORA_KEY.match(k)
            if m is None:
                raise CheckpointError(f"{source}: {k!r} is not a LoRA A/B weight")
            halves.setdefault(m["module"] + ".weight", {})[m["ab"]] = np.asarray(v, np.float32)
        pairs = {}
        for w, h in halves.items():
            if set(h) != {"A", "B"}:
                raise CheckpointError(f"{source}: {w} has lora_{'A' if 'A' not in h else 'B'} missing")
            a, b = h["A"], h["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"{source}: {w}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not pair")
            pairs[w] = (a, b)
        if not pairs:
            raise CheckpointError(f"{source}: holds no LoRA weights")
        return cls(pairs, float(alpha) if alpha is not None else None, rslora, source)

    @classmethod
    def from_peft_folder(cls, folder: str | os.PathLike) -> "LoraAdapter":
        folder = Path(folder)
        cfg_file = folder / "adapter_config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
        cfg = load_json(cfg_file, "adapter config", folder)
        try:
            alpha, r = float(cfg["lora_alpha"]), int(cfg["r"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CheckpointError(f"{cfg_file}: not a LoRA adapter config ({type(exc).__name__}: {exc})") from None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
        if cfg.get("fan_in_fan_out"):
            raise CheckpointError(f"{cfg_file}: fan_in_fan_out adapters (Conv1D models) are not supported")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise CheckpointError(f"{cfg_file}: per-module rank/alpha patterns are not supported")
        files = SafetensorsFiles([folder / "adapter_model.safetensors"], folder)
        try:
            saved = saved_module_keys(cfg, files.names(), cfg_file)
            ad = cls.from_tensors({k: files.array(k) for k in files.names() if k not in saved}, alpha,
                                  bool(cfg.get("use_rslora")), str(folder))
            ad.replaced = {w: files.array(k) for k, w in saved.items()}
        finally:
            files.close()
        bad = [w for w, (a, _) in ad.pairs.items() if a.shape[0] != r]
        if bad:
            raise CheckpointError(f"{folder}: {bad[0]} has rank {ad.pairs[bad[0]][0].shape[0]}, the config says {r}")
        return ad

    def replaced_modules(self) -> dict[str, dict[str, tuple[int, ...]]]:
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for w, x in self.replaced.items():
            out.setdefault(w.rsplit(".", 1)[0], {})[w] = tuple(x.shape)
        return out

    def check_against(self, hf: HFFolder) -> list[str]:
        """Every adapted weight exists in the base model with the shape B @ A gives, every replaced one with its
        shape; returns the warning lines naming the modules replaced wholesale."""
        base = {w: hf.weights.shape(w) for w in hf.weights.names()}
        lines = check_replaced(self.replaced_modules(), base, bool(hf.get("tie_word_embeddings")), self.source)
        for w, (a, b) in self.pairs.items():
            if w not in hf.weights:
                raise CheckpointError(f"{self.source}: adapts {w}, which {hf.folder} does not have")
            if hf.weights.shape(w) != (b.shape[0], a.shape[1]):
                raise CheckpointError(f"{self.source}: {w}: B @ A is {[b.shape[0], a.shape[1]]}, "
                                      f"the base weight is {list(hf.weights.shape(w))}")
        return lines


# -- writing ----------------------------------------------------------------------------------------------------
def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (as torch's `.to(torch.bfloat16)`)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def write_safetensors(path: Path, tensors: list[tuple[str, str, tuple[int, ...], object]],
                      metadata: dict | None = None) -> int:
    """Write a safetensors file tensor by tensor: `tensors` is (name, "F32" | "BF16" | "F16", shape, make) with
    `make()` returning the float32 values, called only when the tensor is written (so a model larger than memory
    is written holding one tensor). Returns the bytes written."""
    header, off = {}, 0
    for name, dtype, shape, _ in tensors:
        n = math.prod(shape) * _DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb)
        for name, dtype, shape, make in tensors:
            x = np.asarray(make(), np.float32)
            if x.shape != tuple(shape):
                raise CheckpointError(f"{path}: {name} came out {list(x.shape)}, declared {list(shape)}")
            flat = x.reshape(-1)
            for i in range(0, flat.size, 1 << 24):  # converted in slices: no full-size temporaries
                c = flat[i:i + (1 << 24)]
                data = bf16_bits(c) if dtype == "BF16" else c.astype(np.float16 if dtype == "F16" else np.float32)
                f.write(np.ascontiguousarray(data).tobytes())
            del x, flat
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(hb) + off
