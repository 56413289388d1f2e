"""Checkpoint files from other people, opened and checked before a byte of tensor data is trusted, torch-free.

One place for what `locpath inspect`, `locpath import` (in memory and streamed) and the streamed export read:

- `open_confined`: a file opened by its resolved path, refused when it resolves outside the folder it was named in
  (a shard that is a symlink to /etc/...) or is not a regular file; opened without following a last-moment symlink
  and without blocking on a FIFO, so the descriptor read later is the file checked now.
- `parse_header`: a safetensors header (8-byte length + JSON) checked as the format's own reader checks it: the
  length inside the file and under 100 MB, JSON without duplicate names and not nested past the parser's depth,
  known dtypes, non-negative integer dims and offsets, each tensor's byte span equal to what its shape and dtype
  need, and the spans tiling the data section exactly (no overlap, no hole, nothing past the end).
- `read_index`: a `model.safetensors.index.json` whose weight_map maps tensor names to plain shard file names.
- `load_json`: a small JSON file (config, adapter config, index, key map), bounded in size and depth.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

MAX_HEADER = 100_000_000  # the safetensors format's own bound on its JSON header
MAX_JSON = 64 << 20  # a config, adapter config, index or key map larger than this is not one
# safetensors dtype codes -> (torch name, bytes per element)
ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
             "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
             "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8), "BOOL": ("bool", 1),
             "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}


@dataclass
class Entry:
    """One tensor of a safetensors file: absolute byte offsets in `file`."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def plain_name(name: object, where: object) -> str:
    """A file name an index or config may give: one component, no '..', no hidden or absolute path."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise CheckpointError(f"{where}: shard name {str(name)[:120]!r} is not a plain file name inside the folder")
    return name


def open_confined(path: Path, folder: Path | None = None) -> int:
    """A read-only descriptor of `path`'s resolved file; CheckpointError when it is missing, a symlink loop,
    outside `folder` once resolved, or not a regular file."""
    try:
        real = Path(path).resolve(strict=True)
        if folder is not None:
            root = Path(folder).resolve(strict=True)
            if root not in real.parents:
                raise CheckpointError(f"{path}: resolves to {real}, outside its folder {root}; refused")
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found" + (" (a broken symbolic link)" if os.path.islink(path) else "")) \
            from None
    except RuntimeError:  # Path.resolve on a symlink loop
        raise CheckpointError(f"{path}: symbolic link loop") from None
    except OSError as exc:
        what = "symbolic link loop (or a symlink swapped in)" if exc.errno == errno.ELOOP else (exc.strerror or exc)
        raise CheckpointError(f"{path}: cannot be opened ({what})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file")
    return fd


def pread_all(fd: int, n: int, offset: int, where: object) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), offset + len(out))
        if not chunk:
            raise CheckpointError(f"{where}: ends early (truncated while read?)")
        out += chunk
    return bytes(out)


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        k = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the name {k[:120]!r} appears twice")
    return d


def parse_json(raw: bytes | str, where: object, what: str):
    """JSON text -> object; one CheckpointError line for anything that is not (bad UTF-8, syntax, duplicate names,
    nesting past the parser's depth)."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise CheckpointError(f"{where}: {what} is nested too deeply to be one") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers of thousands of digits, duplicates
        raise CheckpointError(f"{where}: {what} is not valid JSON ({str(exc)[:200]})") from None


def load_json(path: Path, what: str, folder: Path | None = None, limit: int = MAX_JSON):
    """A small JSON file (opened as `open_confined`), at most `limit` bytes."""
    fd = open_confined(path, folder)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(f"{path}: {what} of {size} bytes, over the {limit}-byte limit")
        raw = pread_all(fd, size, 0, path)
    finally:
        os.close(fd)
    return parse_json(raw, path, what)


def parse_header(fd: int, path: Path) -> tuple[dict[str, Entry], dict]:
    """(name -> Entry, the __metadata__ strings) of an open safetensors file, or one CheckpointError line naming the
    file and the first problem found."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
    n = int.from_bytes(pread_all(fd, 8, 0, path), "little")
    if n > MAX_HEADER:
        raise CheckpointError(f"{path}: not a safetensors file (a header of {n} bytes, over the format's "
                              f"{MAX_HEADER}-byte limit)")
    if n < 2 or n > size - 8:
        raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
    header = parse_json(pread_all(fd, n, 8, path), path, "its safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")
    base, data_len = 8 + n, size - 8 - n
    spans = []
    for name, e in header.items():
        spans.append((_entry(path, name, e, data_len), name))
    spans.sort(key=lambda s: (s[0][0], s[0][1]))
    pos, prev = 0, None
    for (start, end, _, _), name in spans:
        if start < pos:
            raise CheckpointError(f"{path}: tensor {name[:120]!r} (bytes {start}-{end}) overlaps {prev[:120]!r} "
                                  f"(ending at {pos})")
        if start > pos:
            raise CheckpointError(f"{path}: data bytes {pos}-{start} belong to no tensor (before {name[:120]!r})")
        pos, prev = end, name
    if pos != data_len:
        raise CheckpointError(f"{path}: the tensors end at data byte {pos}, the file's data section has {data_len} "
                              "bytes (trailing data)")
    out = {name: Entry(path, dtype, shape, base + start, base + end) for (start, end, dtype, shape), name in spans}
    return out, meta


def _entry(path: Path, name: str, e: object, data_len: int) -> tuple[int, int, str, tuple[int, ...]]:
    what = f"{path}: tensor {name[:120]!r}"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{path}: a tensor name is not valid Unicode text ({name[:60]!a})") from None
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{what}: a header entry is {{dtype, shape, data_offsets}}, got {str(e)[:160]}")
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in ST_DTYPES:
        raise CheckpointError(f"{what}: unknown dtype {str(dtype)[:40]!r} (known: {', '.join(ST_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > 64 or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{what}: shape {str(shape)[:120]} is not a list of non-negative integers")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)
            and offs[0] <= offs[1]):
        raise CheckpointError(f"{what}: data_offsets {str(offs)[:120]} are not [start, end] with 0 <= start <= end")
    start, end = offs
    if end > data_len:
        raise CheckpointError(f"{what}: bytes {start}-{end} lie outside the file, past the end of its {data_len} "
                              "data bytes (truncated file?)")
    need = math.prod(shape) * ST_DTYPES[dtype][1]
    if end - start != need:
        raise CheckpointError(f"{what}: shape {shape} of {dtype} needs {need} bytes, its offsets span {end - start}")
    return start, end, dtype, tuple(shape)


def read_index(index: Path, folder: Path) -> dict[str, str]:
    """tensor name -> shard file name of a `model.safetensors.index.json`, every value a plain .safetensors name."""
    data = load_json(index, "shard index", folder)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: not a shard index (a JSON object with a non-empty 'weight_map' object)")
    for k, v in wm.items():
        if not isinstance(v, str):
            raise CheckpointError(f"{index}: weight_map[{k[:120]!r}] is a {type(v).__name__}, not a shard file name")
        plain_name(v, index)
        if not v.endswith(".safetensors"):
            raise CheckpointError(f"{index}: shard {v[:120]!r} is not safetensors (torch shards: not supported)")
    return wm


MAX_FOLDER_ENTRIES = 100_000


def check_folder(folder: Path) -> None:
    """Every entry of a checkpoint folder (what Hugging Face loaders may open by name) resolves inside it and is a
    regular file or a folder: a symlink out of it, a loop, a FIFO or a device is refused in one line naming it.
    (Hugging Face cache snapshots, whose files are symlinks into ../../blobs, are refused: download with
    `--local-dir` for a folder of real files.)"""
    folder = Path(folder)
    try:
        root = folder.resolve(strict=True)
        entries = []
        with os.scandir(root) as it:
            for e in it:
                entries.append(e.name)
                if len(entries) > MAX_FOLDER_ENTRIES:
                    raise CheckpointError(f"{folder}: over {MAX_FOLDER_ENTRIES} entries; not a checkpoint folder")
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: cannot be listed ({getattr(exc, 'strerror', None) or exc})") from None
    for name in sorted(entries):
        p = folder / name
        try:
            real = p.resolve(strict=True)
            st = os.stat(real)
        except FileNotFoundError:
            raise CheckpointError(f"{p}: a broken symbolic link") from None
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{p}: cannot be read ({getattr(exc, 'strerror', None) or 'symbolic link loop'})") \
                from None
        if real != root and root not in real.parents:
            raise CheckpointError(f"{p}: resolves to {real}, outside its folder {root}; refused")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise CheckpointError(f"{p}: not a regular file (a FIFO, socket or device)")
