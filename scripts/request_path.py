#!/usr/bin/env python3
"""Which locpath files and functions one request walks through, in the order first entered: for reviewing the
architecture (docs/architecture.md shows the output for one CLI `ask` and one HTTP question).

    python scripts/request_path.py cli -- ask BUNDLE SLIDE "What is the diagnosis?"
    python scripts/request_path.py http --bundle BUNDLE --slide SLIDE [--question TEXT]

`cli` runs `locpath.cli.main(ARGS)` in this process under a profile hook. `http` starts `locpath serve` in a child
process with the hook installed but off, registers the slide and waits for its ingestion, then turns the hook on
(SIGUSR1), asks one question over HTTP, and has the child write what it recorded (SIGUSR2). Only frames in the
locpath package count (functions only: no module or class bodies, comprehensions or lambdas); each (module,
function) is listed once, at its first call.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class Recorder:
    """A profile hook that keeps the first call of each locpath function, in order, across threads."""

    def __init__(self, active: bool = True):
        self.active = active
        self.seen: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        self.root = None

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if not self.active or event != "call" or not code.co_flags & 1 or code.co_name.startswith("<"):
            return  # only functions: not module or class bodies (no CO_OPTIMIZED), comprehensions or lambdas
        f = code.co_filename
        i = f.find(os.sep + "locpath" + os.sep)
        if i < 0 or os.sep + "site-packages" + os.sep in f[:i] and "locpath" not in f[:i]:
            return
        key = (f[i + 1:], code.co_qualname)
        with self.lock:
            if key not in self.seen:
                self.seen[key] = len(self.seen)

    def install(self) -> None:
        threading.setprofile(self)
        sys.setprofile(self)

    def lines(self) -> list[str]:
        """Files in order of first entry, each with its functions in order."""
        files: dict[str, list[str]] = {}
        for (f, fn), _ in sorted(self.seen.items(), key=lambda kv: kv[1]):
            files.setdefault(f, []).append(fn)
        return [f"{f}: {', '.join(fns)}" for f, fns in files.items()]


def trace_cli(argv: list[str]) -> list[str]:
    from locpath.cli import main

    rec = Recorder()
    rec.install()
    try:
        main(argv)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return rec.lines()


def serve_traced(out: str, argv: list[str]) -> None:
    """The child: `locpath serve ARGV` with a recorder that SIGUSR1 turns on and SIGUSR2 writes to `out`."""
    rec = Recorder(active=False)

    def on(*_):
        rec.seen.clear()
        rec.active = True

    def dump(*_):
        rec.active = False
        Path(out).write_text("\n".join(rec.lines()) + "\n")

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, dump)
    rec.install()
    from locpath.cli import main

    main(argv)


def trace_http(bundle: str, slide: str, question: str) -> list[str]:
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        out = Path(tmp) / "path.txt"
        data = Path(tmp) / "data"
        cmd = [sys.executable, __file__, "_serve", str(out), "--", "serve", bundle, "--data-dir", str(data),
               "--port", str(port), "--slide-root", str(Path(slide).parent), "--cache-dir", str(Path(tmp) / "cache")]
        log = open(Path(tmp) / "serve.log", "wb")
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=300) as c:
                _wait(lambda: c.get("/readyz").status_code == 200, child, log.name)
                sid = c.post("/v1/slides", json={"path": str(Path(slide).resolve())}).json()["slide"]["id"]
                _wait(lambda: c.get(f"/v1/slides/{sid}").json().get("status") in ("ready", "failed"), child, log.name)
                child.send_signal(signal.SIGUSR1)
                time.sleep(0.5)
                r = c.post(f"/v1/slides/{sid}/questions", json={"question": question, "stream": False})
                r.raise_for_status()
                child.send_signal(signal.SIGUSR2)
                _wait(out.exists, child, log.name)
                return out.read_text().splitlines()
        finally:
            child.terminate()
            child.wait(30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, child, log: str, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if child.poll() is not None:
            raise SystemExit(f"request_path: the server exited ({child.returncode}):\n{Path(log).read_text()[-2000:]}")
        try:
            if ready():
                return
        except Exception:  # the server is not up yet
            pass
        time.sleep(0.3)
    raise SystemExit("request_path: timed out waiting for the server")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_serve":
        serve_traced(sys.argv[2], sys.argv[4:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cli", help="trace one locpath command in this process")
    c.add_argument("argv", nargs=argparse.REMAINDER, help="the command's arguments, after --")
    h = sub.add_parser("http", help="trace one HTTP question to a local `locpath serve`")
    h.add_argument("--bundle", required=True, help="the bundle the server runs")
    h.add_argument("--slide", required=True, help="the slide file registered and asked about")
    h.add_argument("--question", default="What is the diagnosis?", help="the question asked")
    args = ap.parse_args()
    if args.mode == "cli":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        lines = trace_cli(argv)
    else:
        lines = trace_http(args.bundle, args.slide, args.question)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
