"""Opening slides: the factory in front of the backends (TRIDENT-style). A path is checked first (missing, link loop,
folder, device, empty, unreadable: one SlideError each); a folder holding a DICOM series opens with wsidicom; a file
tries OpenSlide, then tiffslide for TIFFs OpenSlide rejects; every opened slide is probed with one small read, so
a file whose header parses but whose pixels do not fails here, not mid-run."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import SlideError
from .budget import check_tiff_budget
from .dicom import DicomSlide, is_dicom_folder
from .identity import PinnedFile, pin
from .liblog import collecting
from .slide import OpenSlideSlide, Slide, TiffSlideSlide, _one_line, _positive_float

BY_NAME_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide", ".dcm")  # OpenSlide finds these by name or folder
BACKENDS = ("auto", "openslide", "tiffslide")  # a DICOM series folder always opens with wsidicom (dicom.py)


def open_slide(
    path: str | os.PathLike,
    mpp_override: float | None = None,
    backend: str = "auto",
    require_mpp: bool = True,
) -> Slide:
    """Open a slide file. `auto` tries OpenSlide first, then tiffslide for TIFFs OpenSlide rejects.

    A file is opened once (wsi/identity.py) and the libraries read that open file, so it cannot be swapped between
    the checks and the reads; a TIFF's header is held to the budgets of wsi/budget.py before any pixel is decoded.
    `path` may be a PinnedFile the caller opened (and checked) itself. Raises SlideError with the file name and the
    reason on any failure.
    """
    pinned = path if isinstance(path, PinnedFile) else None
    p = Path(str(path))
    if backend not in BACKENDS:
        raise SlideError(f"{p}: unknown slide backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if mpp_override is not None and not (_positive_float(mpp_override)):
        raise SlideError(f"{p}: --mpp-override must be a positive number, got {mpp_override!r}")
    if pinned is None:
        check_slide_file(p)
        if p.is_dir():  # a DICOM WSI series folder (check_slide_file let only those through)
            return _open_dicom(p, mpp_override, require_mpp)
        pinned = owned = pin(os.path.realpath(p), name=str(p))
    else:
        owned = None
    # formats whose reader finds companion files beside the one named (or the format by its suffix) need the real
    # path; it was checked and pinned all the same
    source = os.path.realpath(p) if p.suffix.lower() in BY_NAME_SUFFIXES else os.fspath(pinned)
    try:
        check_tiff_budget(os.fspath(pinned), str(p))
        slide = _open_file(p, source, mpp_override, backend)
    except BaseException:
        if owned is not None:
            owned.close()
        raise
    slide._pin = owned
    if require_mpp:
        try:
            slide.require_mpp()
        except SlideError:
            slide.library_messages = []
            slide.close()
            raise
    return slide


def _open_dicom(p: Path, mpp_override, require_mpp: bool) -> Slide:
    slide = DicomSlide(p, mpp_override)
    try:
        _probe(slide)
        if require_mpp:
            slide.require_mpp()
    except Exception as exc:
        slide.library_messages = []
        slide.close()
        if isinstance(exc, SlideError):
            raise
        raise SlideError(f"{p}: not a readable DICOM WSI series ({_one_line(exc)})") from None
    return slide


def _open_file(p: Path, source: str, mpp_override, backend: str) -> Slide:
    order = ["openslide", "tiffslide"] if backend == "auto" else [backend]
    reasons = []
    for name in order:
        try:
            cls = OpenSlideSlide if name == "openslide" else TiffSlideSlide
            slide = cls(p, mpp_override, source)
        except Exception as exc:  # each library has its own error types
            reasons.append(f"{name}: {_one_line(exc).replace(source, str(p))}")
            continue
        try:
            _probe(slide)
            return slide
        except Exception as exc:
            reasons.append(f"{name}: {_one_line(exc).replace(source, str(p))}")
            slide.library_messages = []  # the error line says it; no warning on top
            slide.close()  # the handle opened, the pixels did not: do not leak it
    raise SlideError(f"{p}: not a readable slide ({'; '.join(reasons)})")


def check_slide_file(p: Path | PinnedFile) -> None:
    """A slide path must name a readable regular file, or a folder holding a DICOM WSI series: one clear SlideError
    otherwise (missing, a symlink loop, another folder, a device or FIFO, empty, no permission). Messages name the
    file and the problem, never its content."""
    if isinstance(p, PinnedFile):
        return  # checked when it was pinned
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise SlideError(f"{p}: broken symbolic link (its target does not exist)") from None
        raise SlideError(f"{p}: file not found") from None
    except PermissionError:
        raise SlideError(f"{p}: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SlideError(f"{p}: symbolic link loop") from None
        raise SlideError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            if is_dicom_folder(p):
                return  # a DICOM WSI series
        except OSError:
            pass
        raise SlideError(f"{p}: is a directory, not a slide file (nor a folder of DICOM files)")
    if not stat.S_ISREG(st.st_mode):
        raise SlideError(f"{p}: not a regular file")
    if st.st_size == 0:
        raise SlideError(f"{p}: file is empty")
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)  # not blocking on a FIFO swapped in since the stat
        os.close(fd)
    except PermissionError:
        raise SlideError(f"{p}: permission denied (the file cannot be read)") from None
    except OSError as exc:
        raise SlideError(f"{p}: cannot be read ({exc.strerror or exc})") from None


def warm_up_readers() -> None:
    """Import the slide libraries and run tissue detection once on a tiny image, at a pipeline's load: a cold
    question would otherwise pay for the imports and first calls in its open and tissue steps (~20-30 ms)."""
    import numpy as np

    from .tissue import TissueConfig, detect_tissue_rgb

    for lib in ("openslide", "tifffile"):
        try:
            __import__(lib)
        except ImportError:  # a missing library is reported when a slide needs it, not at load
            pass
    detect_tissue_rgb(np.full((16, 16, 3), 128, np.uint8), TissueConfig())


def _probe(slide: Slide) -> None:
    """Fail at open time, not mid-run, on files whose header parses but whose pixels do not."""
    w, h = slide.dimensions
    if w <= 0 or h <= 0:
        raise ValueError(f"invalid dimensions {w}x{h}")
    last = slide.level_count - 1
    lw, lh = slide.level_dimensions[last]
    with collecting(slide.library_messages):
        slide._read(last, 0, 0, min(lw, 64), min(lh, 64))
