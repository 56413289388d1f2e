"""The source series a report refers to, read from the slide's own DICOM files (headers only, no pixel data): its
study, series and instances, and the base (largest VOLUME) image the evidence coordinates are in. UIDs read from a
file are checked against DICOM's UID syntax before they go into an object or a URL."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..wsi.dicom import DICOM_SUFFIXES, dicom_files
from .errors import DicomOutError

WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
MAX_FILES = 512  # DICOM files looked at in one series folder
UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass
class SourceSeries:
    """The slide's series: `base` is the header of its largest VOLUME image (what level-0 coordinates are in)."""

    study_uid: str
    series_uid: str
    base: object  # pydicom Dataset (no pixel data)
    instances: list  # every WSI instance of the series (headers)

    @property
    def size(self) -> tuple[int, int]:
        """The base image's total pixel matrix (columns, rows)."""
        return int(self.base.TotalPixelMatrixColumns), int(self.base.TotalPixelMatrixRows)


def is_dicom_path(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() or p.suffix.lower() in DICOM_SUFFIXES


def read_source(path: str | os.PathLike) -> SourceSeries:
    """The series of a DICOM slide: a folder holding one series, or one .dcm file of it (its folder's files of the
    same series join it). Raises DicomOutError naming the path and the problem."""
    p = Path(path)
    if not is_dicom_path(p):
        raise DicomOutError(f"{p}: DICOM output needs a DICOM slide (a folder of .dcm files or a .dcm file), "
                            f"not a {p.suffix or 'file without suffix'}")
    try:
        files = dicom_files(p) if p.is_dir() else [p] + [f for f in dicom_files(p.parent) if f != p]
    except OSError as exc:
        raise DicomOutError(f"{p}: cannot list the DICOM files ({exc.strerror or exc})") from None
    headers = [h for h in (_header(f) for f in files[:MAX_FILES]) if h is not None]
    if not headers or (p.is_file() and str(getattr(headers[0], "SOPClassUID", "")) != WSI_STORAGE):
        raise DicomOutError(f"{p}: no DICOM whole-slide image (VL Whole Slide Microscopy) found")
    first = headers[0]
    study = _uid(first, "StudyInstanceUID", p)
    series = _uid(first, "SeriesInstanceUID", p)
    same = [h for h in headers if str(h.get("StudyInstanceUID", "")) == study
            and str(h.get("SeriesInstanceUID", "")) == series]
    if p.is_dir() and len(same) != len(headers):
        raise DicomOutError(f"{p}: the folder holds more than one DICOM series")
    volumes = [h for h in same if _is_volume(h)]
    if not volumes:
        raise DicomOutError(f"{p}: the series has no VOLUME image (no pyramid level)")
    base = max(volumes, key=lambda h: int(h.TotalPixelMatrixColumns) * int(h.TotalPixelMatrixRows))
    for h in same:
        _uid(h, "SOPInstanceUID", p)
    _uid(base, "FrameOfReferenceUID", p)
    return SourceSeries(study, series, base, same)


def _header(f: Path):
    """A WSI instance's header, or None for other DICOM objects (reports, annotations) and unreadable files."""
    import pydicom

    try:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
    except Exception:  # pydicom raises many kinds for a damaged or foreign file
        return None
    return ds if str(ds.get("SOPClassUID", "")) == WSI_STORAGE else None


def _is_volume(ds) -> bool:
    kinds = [str(v).upper() for v in (ds.get("ImageType") or [])]
    try:
        cols, rows = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
    except (AttributeError, TypeError, ValueError):
        return False
    return len(kinds) > 2 and kinds[2] == "VOLUME" and cols > 0 and rows > 0


def _uid(ds, keyword: str, p: Path) -> str:
    v = str(ds.get(keyword, "") or "")
    if len(v) > 64 or not UID_RE.fullmatch(v):
        raise DicomOutError(f"{p}: {keyword} is missing or not a DICOM UID ({v[:70]!r})")
    return v
