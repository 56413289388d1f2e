"""The test tiers: `pytest -m "not torch"` must run where the [train] extra is not installed (a runtime or service
install), so the shared helpers import no torch, and a test file that needs torch at import is marked and guarded
rather than failing to collect. Checked here with torch, transformers, timm and onnx blocked in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HEAVY = ("torch", "torchvision", "transformers", "timm", "onnx", "peft")
BLOCKER = f"""
import sys


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError("blocked: " + name, name=name)  # as if not installed


sys.meta_path.insert(0, Block())
"""


def _python(args, tmp_path, block: bool) -> subprocess.CompletedProcess:
    (tmp_path / "blockheavy.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    pre = ["-c", "import blockheavy, runpy, sys; sys.argv[0] = 'pytest'; runpy.run_module('pytest', run_name='__main__')"
           ] if block else ["-m", "pytest"]
    return subprocess.run([sys.executable, *pre, *args], capture_output=True, text=True, cwd=TESTS.parent, env=env,
                          timeout=300)


def test_shared_helpers_import_no_torch(tmp_path):
    code = ("import sys, conftest, servers, cli_checks\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TESTS, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])))
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_torch_free_tier_collects_without_torch_and_loses_no_test(tmp_path):
    """With torch & co. blocked, `-m "not torch"` collects without an error and selects the same tests as with them:
    a file skipped at import (importorskip) holds no test left unmarked."""
    args = ["--collect-only", "-q", "-m", "not torch", "-p", "no:cacheprovider", "tests"]
    blocked, full = _python(args, tmp_path, block=True), _python(args, tmp_path, block=False)
    assert blocked.returncode == 0, blocked.stdout[-3000:]
    assert full.returncode == 0, full.stdout[-3000:]
    ids = lambda res: sorted(ln for ln in res.stdout.splitlines() if "::" in ln)  # noqa: E731
    assert ids(blocked) and ids(blocked) == ids(full)
