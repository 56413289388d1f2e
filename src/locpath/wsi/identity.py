"""A slide file opened once and pinned, so what was checked is what the libraries read.

Checking a path and then opening it by name leaves a window: the file (or a folder above it) can be swapped for a
symbolic link in between. `pin` opens the file itself with O_NOFOLLOW, checks the open descriptor (a regular file,
and, when given, the identity recorded earlier: device, inode, size, mtime, a sampled fingerprint and the status
change time), and hands the libraries `/proc/self/fd/N`, which names that open file whatever happens to the path
afterwards. OpenSlide and tiffslide both take it for SVS and TIFF; multi-file formats (MRXS, VMS) and DICOM
series folders need their own path and are opened by name after the same checks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SlideError

PROC_FD = Path("/proc/self/fd")
FINGERPRINT_CHUNK = 64 << 10
FINGERPRINT_CHUNKS = 16  # 1 MiB sampled across the file: cheap for any size, catches a swapped file's content


class SlideChanged(SlideError):
    """The file is no longer the one that was registered (another inode, size, mtime, ctime or content)."""


@dataclass(frozen=True)
class FileIdentity:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    fingerprint: str  # sha256 of the size and 1 MiB sampled at evenly spaced offsets
    # The status change time: every write, utime, chmod or rename sets it to now and no call sets it back, so an
    # in-place edit between the sampled offsets with the mtime put back still shows. None: recorded before it was.
    ctime_ns: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "FileIdentity | None":
        try:
            d = json.loads(text) if text else None
            fields = {k: (str(d[k]) if k == "fingerprint" else int(d[k]))
                      for k in cls.__dataclass_fields__ if k != "ctime_ns"}
            ctime = d.get("ctime_ns")
            return cls(**fields, ctime_ns=None if ctime is None else int(ctime))
        except (ValueError, TypeError, KeyError):
            return None


def _fingerprint(fd: int, size: int) -> str:
    h = hashlib.sha256(size.to_bytes(8, "little"))
    span = max(size - FINGERPRINT_CHUNK, 0)
    for off in sorted({round(span * i / (FINGERPRINT_CHUNKS - 1)) for i in range(FINGERPRINT_CHUNKS)}):
        h.update(os.pread(fd, FINGERPRINT_CHUNK, off))
    return h.hexdigest()


def identity_of_fd(fd: int) -> FileIdentity:
    st = os.fstat(fd)
    return FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, _fingerprint(fd, st.st_size),
                        st.st_ctime_ns)


class PinnedFile(os.PathLike):
    """An open slide file. `os.fspath()` gives the path the libraries open (the descriptor's /proc entry, or the
    name where /proc is missing); `str()` and `.name` give the file's own name, for messages."""

    def __init__(self, name: str | os.PathLike, fd: int):
        self.name, self.fd = str(name), fd
        proc = PROC_FD / str(fd)
        self.source = str(proc) if proc.exists() else self.name

    def __fspath__(self) -> str:
        return self.source

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"PinnedFile({self.name!r})"

    def identity(self) -> FileIdentity:
        return identity_of_fd(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PinnedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pin(path: str | os.PathLike, expected: FileIdentity | None = None, name: str | None = None) -> PinnedFile:
    """Open a slide file without following a final symbolic link and check what was opened: a regular, non-empty
    file, the same as `expected` when given (else SlideChanged). One SlideError line naming the file otherwise."""
    name = name or str(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SlideError(f"{name}: file not found") from None
    except PermissionError:
        raise SlideError(f"{name}: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SlideError(f"{name}: is a symbolic link (slides are opened only as the file itself)") from None
        raise SlideError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SlideError(f"{name}: not a regular file")
        if st.st_size == 0:
            raise SlideError(f"{name}: file is empty")
        if expected is not None:
            check_identity(fd, expected, name)
    except BaseException:
        os.close(fd)
        raise
    return PinnedFile(name, fd)


def check_identity(fd: int, expected: FileIdentity, name: str) -> None:
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (expected.dev, expected.ino):
        raise SlideChanged(f"{name}: not the file that was registered (it was replaced); register it again")
    if (st.st_size, st.st_mtime_ns) != (expected.size, expected.mtime_ns):
        raise SlideChanged(f"{name}: the file changed since it was registered (size or modification time); "
                           "register it again")
    if _fingerprint(fd, st.st_size) != expected.fingerprint:
        raise SlideChanged(f"{name}: the file's content changed since it was registered; register it again")
    if expected.ctime_ns is not None and st.st_ctime_ns != expected.ctime_ns:
        raise SlideChanged(f"{name}: the file was written or its times or permissions were set since it was "
                           "registered (status change time differs); register it again")
