"""Shared helpers for tests that run `locpath serve` as its users meet it: a real uvicorn process on a loopback
port, driven with real HTTP clients. `shipped()` is the reference bundle shipped in the package (no torch export)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def shipped() -> Path:
    from locpath.checkpoints import shipped_bundle

    return shipped_bundle("reference")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`locpath ARGS` in its own process (text output captured)."""
    return subprocess.run([sys.executable, "-m", "locpath.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


class Server:
    def __init__(self, bundle: Path, work: Path, *extra, env: dict | None = None):
        self.bundle, self.work, self.extra, self.env = bundle, work, list(map(str, extra)), env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def cmd(self) -> list[str]:
        return [sys.executable, "-m", "locpath.cli", "serve", str(self.bundle), "--port", str(self.port),
                "--data-dir", str(self.work / "data"), "--cache-dir", str(self.work / "cache"), *self.extra]

    @property
    def log_path(self) -> Path:
        return self.work / f"serve-{self.port}.log"

    def start(self, wait: bool = True) -> "Server":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd(), stdout=self.log, stderr=self.log, env=dict(os.environ, **self.env))
        if wait:
            deadline = time.time() + 120
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited: {self.log_path.read_text()[-2000:]}")
                try:
                    if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            raise AssertionError("server did not become ready")
        return self

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, sig=signal.SIGTERM, wait: float = 20) -> float:
        """Stops the server; returns how long it took to exit after the signal."""
        t0 = time.monotonic()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
        return time.monotonic() - t0

    def client(self, key: str | None = None, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {key}"} if key else {}, **kw)


def wait_ready(c, slide_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    s = None
    while time.time() < deadline:
        s = c.get(f"/v1/slides/{slide_id}").json()
        if s["status"] in ("ready", "failed"):
            return s
        time.sleep(0.2)
    raise AssertionError(f"slide {slide_id} not ready: {s}")


def register(c, path) -> dict:
    r = c.post("/v1/slides", json={"path": str(path)})
    assert r.status_code == 202, r.text
    return wait_ready(c, r.json()["slide"]["id"])


def sse(text: str) -> list[tuple[str, str]]:
    """(event, data) of each server-sent event in a response body."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        ev, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            out.append((ev, "\n".join(data)))
    return out


def one_line(res, *fragments) -> str:
    """A CLI refusal as users must see it: exit 2, one `locpath: error:` line holding each fragment, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout[-1000:], res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("locpath: error: "), lines
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    return lines[0]


# -- a real DICOMweb server: Orthanc with its DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb) -----------
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """Orthanc on a loopback port, its storage under `work`; `url` is its REST root, `dicomweb` its DICOMweb root.
    Skips the test when Orthanc or the plugin is not installed."""

    def __init__(self, work: Path):
        import shutil

        import pytest

        self.exe = shutil.which("Orthanc")
        if self.exe is None or not ORTHANC_DICOMWEB.exists():
            pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
        self.work, self.port, self.proc = Path(work), free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = self.url + "/dicom-web"

    def start(self) -> "Orthanc":
        import json

        import pytest

        d = self.work
        cfg = {"Name": "locpath-test", "HttpPort": self.port, "DicomServerEnabled": False, "DicomPort": free_port(),
               "StorageDirectory": str(d / "storage"), "IndexDirectory": str(d / "index"),
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [str(ORTHANC_DICOMWEB)],
               "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (d / "orthanc.json").write_text(json.dumps(cfg))
        self.log = open(d / "orthanc.log", "ab")
        self.proc = subprocess.Popen([self.exe, str(d / "orthanc.json")], stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"Orthanc did not start: {(d / 'orthanc.log').read_text()[-1000:]}")

    def upload(self, files) -> None:
        for f in files:
            assert httpx.post(self.url + "/instances", content=Path(f).read_bytes(), timeout=60).status_code == 200

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        if getattr(self, "log", None) is not None:
            self.log.close()


def dicomize(svs: Path, out: Path) -> tuple[str, str, list[Path]]:
    """An SVS as a DICOM WSI series (wsidicomizer): (study UID, series UID, files)."""
    import shutil

    import pytest

    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("wsidicomizer")
    exe = shutil.which("wsidicomizer", path=os.path.dirname(sys.executable)) or shutil.which("wsidicomizer")
    res = subprocess.run([exe or "wsidicomizer", "-i", str(svs), "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.skip(f"wsidicomizer cannot convert here ({res.stderr.strip().splitlines()[-1:]})")
    files = sorted(out.glob("*.dcm"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), files


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def browser_api():
    """(Playwright's sync API, the system Chromium's path), or the test skips where either is missing."""
    import shutil

    import pytest

    sync_api = pytest.importorskip("playwright.sync_api")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return sync_api, exe


def launch_chromium(p, exe: str, extra: list[str] | None = None):
    """A headless Chromium for the page tests (the system one: Playwright downloads nothing)."""
    return p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS + list(extra or []))
