"""Interrupted and failing writers (locpath.fsutil's atomic folders, used by export and build) leave nothing
half-written under a final name."""

import signal
import subprocess
import sys
import time

import pytest
from cli_checks import assert_refused, err_lines, run, tree


@pytest.mark.torch  # `locpath export`
def test_a_killed_export_leaves_nothing_the_next_writer_keeps(ref_bundle, tmp_path):
    out = tmp_path / "exported"
    p = subprocess.Popen([sys.executable, "-m", "locpath.cli", "export", str(out), "--no-validate"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(q.name.endswith(".lock") for q in tmp_path.iterdir()):
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = [q.name for q in tmp_path.iterdir() if q.name.startswith(".exported.")]
    assert left and not out.exists()  # the killed writer could not clean up; nothing under the final name
    res = run("build", ref_bundle, out, "--precision", "fp32")
    assert res.returncode == 0, err_lines(res)
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".exported.")] == []
    assert run("verify", out).returncode == 0

@pytest.mark.torch
def test_overwrite_replaces_atomically_and_keeps_the_old_bundle_on_failure(ref_bundle, tmp_path):
    out = tmp_path / "built"
    assert run("build", ref_bundle, out, "--precision", "fp32").returncode == 0
    before = tree(out)
    assert_refused(run("build", ref_bundle, out, "--precision", "int8-static", "--overwrite"), "calibration")
    assert_refused(run("build", ref_bundle, out, "--precision", "nonsense", "--overwrite"), "nonsense")
    assert tree(out) == before
    assert run("build", ref_bundle, out, "--precision", "int4", "--overwrite").returncode == 0
    assert tree(out) != before and run("verify", out).returncode == 0
    assert [q.name for q in tmp_path.iterdir()] == ["built"]  # no aside copy, no temporary left
