"""The one way the service opens a registered slide (ingestion, questions, thumbnails, evidence images).

A slide path is checked when it is registered, but the file is read later, again and again: anyone who can write in a
slide root could swap the file, or a folder above it, for a symbolic link to a file outside the roots. So every use
re-resolves the stored path, checks it still lies under the roots of its kind (slide roots; uploads under
data_dir/uploads; DICOMweb retrievals under data_dir/dicomweb) and is still the file recorded at registration
(device, inode, size, mtime, a sampled content fingerprint), opens it once without following a final link, and hands
the libraries that open file (wsi/identity.py). A changed or escaped file is refused with one line and the slide is
marked failed. Slides registered before identities were recorded get theirs at their first use.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..errors import SlideError
from ..wsi.identity import FileIdentity, PinnedFile, SlideChanged, pin


class SlideEscaped(SlideError):
    """The stored path now leads outside the slide roots (a link was put in place of the file or a folder)."""


class SlideGone(SlideError):
    """The registered file is no longer there."""


def http_status(exc: SlideError) -> tuple[int, str]:
    """The HTTP status and error type a route answers for a slide file refused here."""
    if isinstance(exc, SlideEscaped):
        return 403, "permission_error"
    if isinstance(exc, SlideGone):
        return 410, "gone"
    if isinstance(exc, SlideChanged):
        return 409, "conflict"
    return 400, "invalid_request_error"


def roots_of(cfg, slide) -> list[Path]:
    if slide.source_kind == "upload":
        return [cfg.data_dir / "uploads"]
    if slide.source_kind == "dicomweb":
        return [cfg.data_dir / "dicomweb"]
    return list(cfg.slide_roots)


def _under(real: Path, roots: list[Path]) -> bool:
    return any(real == r or r in real.parents for r in (Path(os.path.realpath(r)) for r in roots))


def record(path: str | os.PathLike) -> str | None:
    """What registration stores for a slide file: its real path and identity (JSON); None for a folder (a DICOM
    series, checked by path only)."""
    real = Path(os.path.realpath(path))
    if real.is_dir():
        return None
    with pin(real, name=Path(path).name) as f:
        ident = f.identity()
    return json.dumps({"real": str(real), **json.loads(ident.to_json())}, sort_keys=True)


def _real_path(cfg, slide) -> Path:
    """The stored path, resolved now: it must still be itself (no link put in place of it or of a folder above it)
    and lie under the roots of its kind."""
    label = f"slide {slide.id} ({slide.name})"
    try:
        recorded = json.loads(getattr(slide, "identity", None) or "{}").get("real")
    except (ValueError, AttributeError):
        recorded = None
    stored = Path(recorded or slide.path)
    # where the path leads is checked before whether it exists, so the answer says nothing about files outside the
    # roots (a link to a missing file and one to an existing file are refused alike)
    if not _under(Path(os.path.realpath(stored)), roots_of(cfg, slide)):
        raise SlideEscaped(f"{label}: its path now leads outside the slide roots (a link was put in place of the file "
                           "or a folder above it); refused")
    try:
        real = Path(os.path.realpath(stored, strict=True))
    except (FileNotFoundError, NotADirectoryError):
        raise SlideGone(f"{label}: its file is gone (moved or deleted since it was registered)") from None
    except OSError:
        raise SlideEscaped(f"{label}: its path no longer resolves (a link loop was put in its place)") from None
    if not _under(real, roots_of(cfg, slide)):
        raise SlideEscaped(f"{label}: its path now leads outside the slide roots (a link was put in place of the file "
                           "or a folder above it); refused")
    if recorded and real != stored:
        raise SlideEscaped(f"{label}: its path now goes through a link that was not there at registration; refused")
    return real


@contextlib.contextmanager
def open_registered(cfg, store, slide):
    """The registered slide, checked and opened: a PinnedFile for a file, the folder's Path for a DICOM series.
    A refusal (SlideEscaped / SlideGone / SlideChanged) marks the slide failed and is raised as one SlideError."""
    try:
        real = _real_path(cfg, slide)
        if real.is_dir():
            opened = contextlib.nullcontext(real)
        else:
            opened = _pin_checked(store, slide, real)
    except SlideError as exc:
        msg = " ".join(str(exc).split())
        store.update_slide(slide.id, status="failed", error=msg)
        raise
    with opened as f:
        yield f


def _pin_checked(store, slide, real: Path) -> PinnedFile:
    expected = FileIdentity.from_json(getattr(slide, "identity", None))
    label = f"slide {slide.id} ({slide.name})"
    try:
        f = pin(real, expected, name=str(real))
    except SlideChanged as exc:
        raise SlideChanged(f"{label}: {str(exc).split(': ', 1)[-1]}") from None
    except SlideError as exc:
        if "symbolic link" in str(exc):
            raise SlideEscaped(f"{label}: a link was put in place of its file; refused") from None
        raise SlideGone(f"{label}: its file cannot be opened any more ({str(exc).split(': ', 1)[-1]})") from None
    if expected is None or expected.ctime_ns is None:  # registered before identities (or ctimes) were kept
        ident = json.loads(f.identity().to_json())
        store.update_slide(slide.id, identity=json.dumps({"real": str(real), **ident}, sort_keys=True))
    return f
