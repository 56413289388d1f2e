"""Slides pulled from a DICOMweb server (a PACS, Orthanc with its DICOMweb plugin) by study and series UID: the
series' instances are retrieved with WADO-RS (dicomweb-client) into a folder of the service's data directory,
written atomically, and opened from there with wsidicom (wsi/dicom.py), so re-reading, hashing and restarts need
no network. UIDs are checked against DICOM's UID syntax before they name a folder or a URL. Results go back with
STOW-RS (store_instances; serve/results_store.py schedules and retries it). Messages never carry the URL's user
name or password."""

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


def why(exc: BaseException) -> str:
    """An exception's first line without the credentials of any URL it quotes, bounded."""
    first = (str(exc).splitlines() or [""])[0] or type(exc).__name__
    return re.sub(r"//[^/\s@]*@", "//", first)[:200]


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
        raise DicomWebError(f"{shown(url)}: cannot retrieve series {series} of study {study} ({why(exc)})") from None
    if not instances:
        raise DicomWebError(f"{shown(url)}: series {series} of study {study} holds no instances")
    with atomic_dir(folder) as tmp:
        for i, ds in enumerate(instances):
            sop = str(getattr(ds, "SOPInstanceUID", "")) or f"instance-{i}"
            name = sop if UID_RE.fullmatch(sop) else f"instance-{i}"
            ds.save_as(tmp / f"{name}.dcm", enforce_file_format=True)
    return folder


def _timed_session(seconds: float):
    """A requests session whose every request has a time bound (dicomweb-client sets none: a silent server would
    hold the storing thread for ever)."""
    import requests
    from requests.adapters import HTTPAdapter

    class Timed(HTTPAdapter):
        def send(self, request, **kw):
            kw["timeout"] = kw.get("timeout") or seconds
            return super().send(request, **kw)

    session = requests.Session()
    session.mount("http://", Timed())
    session.mount("https://", Timed())
    return session


def store_instances(url: str, datasets: list, timeout_s: float = 60.0) -> list[str]:
    """STOW-RS of the datasets to the server; the SOP instance UIDs it stored. Raises DicomWebError (no
    credentials in it) when the server cannot be reached, refuses the request or reports a failed instance."""
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError as exc:
        raise DicomWebError("DICOMweb needs dicomweb-client (pip install dicomweb-client)") from exc
    session = _timed_session(timeout_s)
    try:
        client = DICOMwebClient(url=url, session=session)
        client.set_http_retry_params(retry=False)  # one request per attempt: the caller's retries are the only ones
        reply = client.store_instances(datasets)
    except Exception as exc:
        raise DicomWebError(f"{shown(url)}: STOW-RS failed ({why(exc)})") from None
    finally:
        session.close()
    failed = list(getattr(reply, "FailedSOPSequence", None) or [])
    if failed:
        reasons = sorted({str(getattr(f, "FailureReason", "?")) for f in failed})
        raise DicomWebError(f"{shown(url)}: STOW-RS stored {len(datasets) - len(failed)} of {len(datasets)} "
                            f"instances (failure reason {', '.join(reasons)})")
    stored = [str(r.ReferencedSOPInstanceUID) for r in getattr(reply, "ReferencedSOPSequence", None) or []
              if "ReferencedSOPInstanceUID" in r]
    return stored or [str(ds.SOPInstanceUID) for ds in datasets]
