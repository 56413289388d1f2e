"""Writing the objects: checked before any work (a .dcm name in an existing, writable folder), written atomically
(fsutil: a temporary beside the target, renamed into place), so no half-written file is ever seen under the name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..fsutil import atomic_file
from .errors import DicomOutError


def check_target(path: str | os.PathLike, option: str) -> Path:
    """Refuse, before any work, an output the objects could not be written to."""
    p = Path(path)
    if p.suffix.lower() != ".dcm":
        raise DicomOutError(f"{p}: {option} must name a .dcm file")
    if p.is_dir():
        raise DicomOutError(f"{p}: {option} names a folder, not a file")
    parent = p.parent
    if not parent.is_dir():
        raise DicomOutError(f"{p}: {option}: the folder {parent} does not exist")
    try:  # a real write: permissions, read-only mounts and /proc all refuse here, also for root
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DicomOutError(f"{p}: {option}: cannot write in {parent} ({exc.strerror or exc})") from None
    return p


def write_dataset(ds, path: str | os.PathLike) -> Path:
    """The dataset as a DICOM file (with its file meta information), written atomically."""
    p = Path(path)
    try:
        with atomic_file(p) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    except OSError as exc:
        raise DicomOutError(f"{p}: cannot write the DICOM file ({exc.strerror or exc})") from None
    return p
