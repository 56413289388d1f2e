"""Slides pulled from a DICOMweb server (a PACS, Orthanc with its DICOMweb plugin) by study and series UID: the
series' instances are retrieved with WADO-RS (dicomweb-client) into a folder of the service's data directory,
written atomically, and opened from there with wsidicom (wsi/dicom.py), so re-reading, hashing and restarts need
no network. UIDs are checked against DICOM's UID syntax before they name a folder or a URL."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ..errors import LocpathError
from ..fsutil import atomic_dir

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


class DicomWebError(LocpathError):
    """The DICOMweb server cannot be reached, or has no such series."""


def check_uid(uid: object, what: str) -> str:
    if not isinstance(uid, str) or len(uid) > 64 or not UID_RE.fullmatch(uid):
        raise DicomWebError(f"{what} must be a DICOM UID (digits and dots, at most 64 characters), got {uid!r}"[:200])
    return uid


def shown(url: str) -> str:
    """The server's URL as messages name it: without a user name and password (errors reach every key)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the DICOMweb server"
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def series_folder(data_dir: Path, study: str, series: str) -> Path:
    return data_dir / "dicomweb" / check_uid(study, "study UID") / check_uid(series, "series UID")


def retrieve_series(url: str, study: str, series: str, data_dir: Path) -> Path:
    """The local folder of the series, retrieved once (a second call finds it)."""
    folder = series_folder(data_dir, study, series)
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError as exc:
        raise DicomWebError("DICOMweb needs dicomweb-client (pip install dicomweb-client)") from exc
    try:
        instances = DICOMwebClient(url=url).retrieve_series(study_instance_uid=study, series_instance_uid=series)
    except Exception as exc:
        why = re.sub(r"//[^/\s@]*@", "//", (str(exc).splitlines() or [type(exc).__name__])[0])  # URLs it quotes
        raise DicomWebError(f"{shown(url)}: cannot retrieve series {series} of study {study} ({why[:200]})") from None
    if not instances:
        raise DicomWebError(f"{shown(url)}: series {series} of study {study} holds no instances")
    with atomic_dir(folder) as tmp:
        for i, ds in enumerate(instances):
            sop = str(getattr(ds, "SOPInstanceUID", "")) or f"instance-{i}"
            name = sop if UID_RE.fullmatch(sop) else f"instance-{i}"
            ds.save_as(tmp / f"{name}.dcm", enforce_file_format=True)
    return folder
