"""The CLI run in a subprocess as a user would, for the hardening tests (tests/test_*_hardening.py): every input a
user or an attacker can hand locpath. Bad input gets exit status 2 and one stderr line naming the file or option,
never a traceback; recoverable problems give at most one warning line and still an answer; nothing outside the
working folders is touched and nothing is left half-written.

As root (CI), permission cases run under `setpriv` with CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH dropped, so file
modes apply to root too; without setpriv they are skipped.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

Q = "What is the diagnosis?"


def _drop_root_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]

def run(*args, stdin: bytes | None = None, drop_root: bool = False, preexec=None, timeout: int = 180,
        env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = (_drop_root_prefix() if drop_root else []) + [sys.executable, "-m", "locpath.cli", *map(str, args)]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, preexec_fn=preexec,
                          env=dict(os.environ, **(env or {})))

def err_lines(res) -> list[str]:
    return res.stderr.decode("utf-8", "replace").strip().splitlines()

def assert_refused(res, *fragments: str) -> str:
    """Exit 2, exactly one stderr line `locpath: error: ...` holding every fragment, no traceback."""
    lines = err_lines(res)
    assert res.returncode == 2, (res.returncode, lines[-5:])
    assert len(lines) == 1, lines
    assert lines[0].startswith("locpath: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert b"Traceback" not in res.stderr
    return lines[0]

def assert_answered(res, warnings: int | None = None) -> dict:
    """Exit 0 with a JSON answer; `warnings` = how many `locpath: warning:` lines stderr must hold (all it holds)."""
    lines = err_lines(res)
    assert res.returncode == 0, lines[-5:]
    assert b"Traceback" not in res.stderr
    if warnings is not None:
        assert len(lines) == warnings and all(ln.startswith("locpath: warning: ") for ln in lines), lines
    out = json.loads(res.stdout)
    assert out["answers"] and out["answers"][0]["answer"]
    return out

def tree(folder: Path) -> dict:
    """path -> sha256 of every file under a folder (what 'untouched' is checked against)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}

def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if p.name not in (".", "..")]

def cache_copy(cached, tmp_path) -> Path:
    c = tmp_path / "cache"
    shutil.copytree(cached[0], c)
    return c

def entry_dir(cache: Path) -> Path:
    (key,) = [p for p in cache.iterdir() if p.is_dir()]
    (entry,) = list(key.iterdir())
    return entry
