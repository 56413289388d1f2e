"""DICOM whole-slide images (the format scanners and PACS deliver) behind the Slide interface, read with wsidicom.

A DICOM WSI is a series: one file per pyramid level (plus label and overview images). locpath opens a *folder*
holding one series with wsidicom (`WsiDicom.open`); microns per pixel come from the DICOM pixel spacing of the base
level. (OpenSlide 4 also reads a single `.dcm` file of such a series, through `open_slide` on that file; the folder
path is what a DICOMweb retrieval produces, so it is the one the service uses.) wsidicom is optional: without it a
DICOM folder is one clear error.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .slide import Slide, _one_line, _rgba_to_rgb

DICOM_SUFFIXES = (".dcm", ".dicom")


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files of a series folder (by suffix, or by the DICM preamble for files without one)."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file() or p.is_symlink():
            continue
        if p.suffix.lower() in DICOM_SUFFIXES:
            out.append(p)
            continue
        try:
            with open(p, "rb") as f:
                f.seek(128)
                if f.read(4) == b"DICM":
                    out.append(p)
        except OSError:
            continue
    return out


def is_dicom_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and bool(dicom_files(p))


def folder_identity(folder: Path) -> str:
    """One string for the exact state of a series folder (names, sizes, mtimes and ctimes of its DICOM files)."""
    parts = [str(folder.resolve())]
    for f in dicom_files(folder):
        st = f.stat()
        parts.append(f"{f.name}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class DicomSlide(Slide):
    backend_name = "wsidicom"

    def __init__(self, path, mpp_override=None):
        super().__init__(path, mpp_override)
        try:
            from wsidicom import WsiDicom
        except ImportError as exc:
            raise SlideError(f"{path}: reading DICOM WSI needs wsidicom (pip install wsidicom)") from exc
        # the folder's own regular files, each opened once without following a link: given the folder, wsidicom
        # would also read files that are symbolic links to anywhere (outside the slide roots)
        from .identity import pin

        self._pins = []
        try:
            folder = Path(path).is_dir()
            self._pins = [pin(f, name=f.name) for f in dicom_files(path)] if folder else []
            self._wsi = WsiDicom.open([os.fspath(f) for f in self._pins] if folder else str(path))
        except Exception as exc:  # wsidicom raises its own error kinds for missing levels, bad files, ...
            self._close_pins()
            if isinstance(exc, SlideError):
                raise SlideError(f"{path}: {str(exc).split(': ', 1)[-1]}") from None
            raise SlideError(f"{path}: not a readable DICOM WSI series ({_one_line(exc)})") from None
        self._levels = list(self._wsi.levels)
        base = self._levels[0].size
        self._dims = tuple((int(lv.size.width), int(lv.size.height)) for lv in self._levels)
        self._down = tuple(base.width / lv.size.width for lv in self._levels)

    @property
    def level_dimensions(self):
        return self._dims

    @property
    def level_downsamples(self):
        return self._down

    @property
    def metadata_mpp(self):
        mpp = self._levels[0].mpp  # wsidicom reports the pixel spacing in micrometres per pixel
        try:
            v = float(mpp.width)
        except (AttributeError, TypeError, ValueError):
            return None
        return v if np.isfinite(v) and v > 0 else None

    @property
    def vendor(self):
        return "dicom"

    def _read(self, level, x, y, w, h):
        ds = self._down[level]
        lx, ly = int(round(x / ds)), int(round(y / ds))
        lw, lh = self._dims[level]
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image reads as background, as OpenSlide does
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x1 > x0 and y1 > y0:
            img = self._wsi.read_region((x0, y0), self._levels[level].level, (x1 - x0, y1 - y0))
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = _rgba_to_rgb(np.asarray(img.convert("RGB")))
        return out

    def reopen(self):
        return self  # wsidicom serialises its file access internally

    def _close_pins(self):
        for f in self._pins:
            f.close()
        self._pins = []

    def close(self):
        self._wsi.close()
        self._close_pins()
        super().close()
