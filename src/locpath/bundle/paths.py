"""The path policy: every path locpath builds from something it read (a manifest, a checksum list, a cache memo)
goes through here, so no file can steer a read, a write or a delete outside the folder it belongs to.

- A bundle member is a relative POSIX path of plain names: not absolute, no `..`, no empty or `.` parts, no
  backslash, no NUL or control characters. Resolved (symlinks followed) it must stay inside the bundle folder
  and be a regular file whose size is the one recorded (so `/dev/zero`, a FIFO or a swapped-in huge file is
  refused before a byte is read).
- A digest is 64 lower-case hex characters; cache paths are built from validated digests only.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path, PurePosixPath

from ..errors import LocpathError

SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_MEMBER_BYTES = 1 << 40  # 1 TiB: larger than any bundle file a real model needs
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class PathPolicyError(LocpathError):
    """A path read from a file points outside its folder or at something that is not a regular file."""


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and SHA256_RE.fullmatch(value) is not None


def check_sha256(value: object, where: str) -> str:
    if not is_sha256(value):
        raise PathPolicyError(f"{where}: not a sha256 digest (64 lower-case hex characters): {str(value)[:80]!r}")
    return value  # type: ignore[return-value]


def check_member_name(name: object, where: str) -> str:
    """A safe relative name inside a folder, or PathPolicyError naming `where`."""
    if not isinstance(name, str) or not name:
        raise PathPolicyError(f"{where}: file name must be a non-empty string, got {name!r}")
    if _BAD_CHARS.search(name):
        raise PathPolicyError(f"{where}: file name {name!r} holds a backslash or control character")
    p = PurePosixPath(name)
    if p.is_absolute():
        raise PathPolicyError(f"{where}: {name!r} is an absolute path; bundle files must be named relative to the bundle")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise PathPolicyError(f"{where}: {name!r} leaves or names the bundle folder itself ('..', '.' or an empty part)")
    return name


def member_path(folder: str | os.PathLike, name: str, where: str, expect_bytes: int | None = None) -> Path:
    """The path of `name` inside `folder`, checked: inside after resolving symlinks, a regular file, and (when
    given) exactly `expect_bytes` long. Raises PathPolicyError or LocpathError naming the file."""
    check_member_name(name, where)
    root = Path(folder).resolve()
    path = Path(folder) / name
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise LocpathError(f"{path}: listed in {where} but missing") from None
    except RuntimeError as exc:  # symlink loop (Python < 3.13)
        raise PathPolicyError(f"{path}: symlink loop ({exc})") from None
    except OSError as exc:
        raise LocpathError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if real != root and root not in real.parents:
        raise PathPolicyError(f"{path}: resolves to {real}, outside the folder {root}")
    try:
        st = real.stat()
    except OSError as exc:
        raise LocpathError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise PathPolicyError(f"{path}: not a regular file")
    if expect_bytes is not None and st.st_size != expect_bytes:
        raise LocpathError(f"{path}: {st.st_size} bytes, but {where} records {expect_bytes}: the file was modified "
                           "or truncated")
    return real


def sha256_file(path: str | os.PathLike, limit: int | None = None, chunk: int = 1 << 20) -> str:
    """sha256 of a file, reading at most `limit` bytes (a file growing past it is refused, never hashed for ever)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            n += len(b)
            if limit is not None and n > limit:
                raise LocpathError(f"{path}: larger than the {limit} bytes recorded for it")
            h.update(b)
    return h.hexdigest()


def read_bounded(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The whole of a small file (a manifest, a checksum list), refusing one over `limit` bytes or not regular."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise LocpathError(f"{p}: {what} not found") from None
    except OSError as exc:
        raise LocpathError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise PathPolicyError(f"{p}: {what} is not a regular file")
    if st.st_size > limit:
        raise LocpathError(f"{p}: {what} is {st.st_size} bytes, over the {limit}-byte limit")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise LocpathError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise LocpathError(f"{p}: {what} grew past the {limit}-byte limit while being read")
    return data


def confined(root: str | os.PathLike, *parts: str) -> Path:
    """root/parts... for names built by locpath (validated digests, keys): refused if a symlink on the way leads
    outside `root`. Used before anything under a shared folder is written or deleted."""
    base = Path(root).resolve()
    path = base.joinpath(*parts)
    real = path.resolve()
    if real != base and base not in real.parents:
        raise PathPolicyError(f"{path}: resolves to {real}, outside {base}")
    return path
