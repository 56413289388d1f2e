"""Atomic writes: build under a temporary name in the target's folder, rename into place on success, remove on
failure. Nothing half-written is ever visible under the final name.

Beside each temporary file or folder, a `<temporary>.lock` file is locked (flock) by the process writing it (not
the temporary itself: libraries such as HDF5 take their own lock on the files they write). A process killed with -9 cannot
remove its temporary, but its lock dies with it: the next command writing to the same place removes every
unlocked temporary of that target (a live writer's are locked, so they are left alone).
Replacing an existing folder renames the old one aside, renames the new one in, then deletes the old one, so the
target name always holds a complete folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

LOCK_SUFFIX = ".lock"  # `<temporary>.lock`, held by the writer until the temporary is renamed into place


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _lock(path: Path) -> int:
    """An exclusive flock on `path` (a file), held until the fd is closed or the process dies."""
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _is_abandoned(lock_file: Path) -> bool:
    """True when nobody holds the lock (its writer finished badly or was killed)."""
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except FileNotFoundError:
        return True  # a folder whose lock file was never made: its writer died at once
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _reserve(target: Path, suffix: str) -> tuple[Path, int, Path]:
    """A locked `<temp>.lock` beside `target` and the temporary name it guards (not created yet)."""
    try:
        fd, lock_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + LOCK_SUFFIX, dir=target.parent)
    except OSError as exc:  # name what the user asked to write, not our temporary
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    os.close(fd)
    lock_path = Path(lock_name)
    return lock_path, _lock(lock_path), lock_path.with_name(lock_path.name[: -len(LOCK_SUFFIX)])


def remove_stale_temporaries(target: str | os.PathLike) -> int:
    """Delete temporaries of `target` whose writer is gone (their lock is free or missing); returns how many."""
    target = Path(target)
    removed = 0
    try:
        siblings = list(target.parent.glob(f".{target.name}.*"))
    except OSError:
        return 0
    for p in siblings:
        try:
            if p.is_symlink():
                continue
            if p.name.endswith(LOCK_SUFFIX):
                if not p.with_name(p.name[: -len(LOCK_SUFFIX)]).exists() and _is_abandoned(p):
                    p.unlink(missing_ok=True)
                continue
            if not _is_abandoned(p.with_name(p.name + LOCK_SUFFIX)):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            p.with_name(p.name + LOCK_SUFFIX).unlink(missing_ok=True)
            removed += 1
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it becomes `target` (mode 0666 & ~umask)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    lock_path, lock, tmp = _reserve(target, suffix)
    try:
        tmp.touch(exist_ok=False)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(lock)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` (files 0644, folders 0755)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    lock_path, lock, tmp = _reserve(target, "")
    try:
        tmp.mkdir()
        yield tmp
        mask = _umask()
        for p in tmp.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            _swap_in(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(lock)


def _swap_in(new: Path, target: Path) -> None:
    """Old folder aside, new folder in, old folder deleted: `target` never names a partial folder. The aside name
    is a temporary of `target`, so a crash between the renames leaves it to the next writer's clean-up."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.rmdir(aside)
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)  # put the old one back
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
