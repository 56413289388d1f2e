"""`locpath batch`: every slide asked every question, in this process and on a local Ray cluster started by the test
(loopback only, two worker processes); resumable by content hash, one record per slide."""

import json
import os
import shutil
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locpath.runtime.pipeline import Pipeline

QUESTIONS = ["What is the diagnosis?", "Is necrosis present?", "Which organ is this?"]


def run(*args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "locpath.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, real_svs):
    from locpath.synth import make_spec, write_slide

    d = tmp_path_factory.mktemp("archive")
    for i in range(5):
        write_slide(make_spec(4400 + i, tiles=(22, 22)), d / f"slide{i}.{'svs' if i % 2 == 0 else 'tiff'}",
                    fmt="svs" if i % 2 == 0 else "tiff")
    shutil.copy(real_svs, d / "cmu.svs")
    (d / "notes.txt").write_text("not a slide: ignored by the folder scan")
    q = tmp_path_factory.mktemp("questions") / "questions.txt"
    q.write_text("\n".join(QUESTIONS) + "\n")
    return d, q


@pytest.fixture(scope="module")
def expected(ref_bundle, archive):
    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False)
    return {str(p.resolve()): [pipe.ask(p, q).answer for q in QUESTIONS]
            for p in sorted(archive[0].iterdir()) if p.suffix in (".svs", ".tiff")}


def answers(out: Path) -> dict:
    lines = (out / "answers.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert len({r["digest"] for r in records}) == len(records)  # one record per slide content
    return {r["slide"]: [a["answer"] for a in r["answers"]] for r in records}


def test_embedded_batch_equals_ask_and_a_rerun_does_no_work(ref_bundle, archive, expected, tmp_path):
    slides, questions = archive
    out = tmp_path / "out"
    res = run("batch", ref_bundle, "--slides", slides, "--questions", questions, "--out", out, "--cache-dir",
              tmp_path / "cache", "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["done"] == 6 and summary["failed"] == 0 and summary["slides_per_hour"] > 0
    assert summary["overlap"] is True and summary["lanes"] == 2  # overlapped by default, answers as `ask` gives
    assert answers(out) == expected
    (rec,) = [json.loads(p.read_text()) for p in (out / "records").glob("*.json") if "cmu" in p.read_text()]
    from locpath.wsi.features import read_features

    ff = read_features(out / rec["features"])  # TRIDENT layout
    assert len(ff.features) == rec["tiles"] and ff.patch_size == 224
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    again = run("batch", ref_bundle, "--slides", slides, "--questions", questions, "--out", out, "--cache-dir",
                tmp_path / "cache", "--json", "--quiet", "--no-overlap")
    s2 = json.loads(again.stdout)
    assert again.returncode == 0 and s2["done"] == 0 and s2["skipped"] == 6 and s2["overlap"] is False
    assert {p: p.stat().st_mtime_ns for p in (out / "records").iterdir()} == mtimes
    pytest.importorskip("pyarrow")  # --format parquet: the [cluster] extra
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two slides\n{slides / 'cmu.svs'}\nslide-missing.svs\n")
    bad = run("batch", ref_bundle, "--slides", listing, "--questions", questions, "--out", tmp_path / "o2",
              "--format", "parquet", "--quiet")
    assert bad.returncode == 2 and "1 of 2 slides failed" in bad.stderr and "slide-missing.svs" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and (tmp_path / "o2" / "answers.parquet").exists()


# -- on Ray ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head` on loopback with two CPUs (two worker processes), stopped afterwards."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tmp_path_factory.mktemp("ray")
    token = tmp / "auth_token"  # Ray 2.5x+ clusters use token auth; clients must be given the same token
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    start = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                            "--temp-dir", str(tmp)], capture_output=True, text=True, timeout=180, env=env)
    if start.returncode != 0:
        pytest.skip(f"ray start failed here: {start.stderr.strip().splitlines()[-1:]}")
    yield f"127.0.0.1:{port}", env
    subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120, env=env)


def _slide_workers() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:] if "SlideWorker" in line and "ray::" in line]


def test_batch_on_ray_survives_a_killed_worker_and_equals_embedded(ref_bundle, archive, expected, ray_cluster,
                                                                    tmp_path):
    slides, questions = archive
    address, env = ray_cluster
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "locpath.cli", "batch", str(ref_bundle), "--slides", str(slides), "--questions",
           str(questions), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--ray-address", address,
           "--workers", "2", "--json", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and killed is None:
        workers = _slide_workers()
        if len(workers) == 2 and (out / "records").is_dir() and list((out / "records").glob("*.json")):
            os.kill(workers[0], signal.SIGKILL)  # a worker dies mid-run: Ray restarts it and retries its slide
            killed = workers[0]
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert killed is not None, "no worker was killed (the batch finished first)"
    assert summary["runner"] == "ray" and summary["failed"] == 0 and summary["records"] == 6
    assert answers(out) == expected  # every slide exactly once, the answers `locpath ask` gives
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["done"] == 0  # a rerun does no work


def test_batch_inputs_one_slide_file_and_hostile_text_files(tmp_path):
    """--slides takes a folder, a list or one slide file; list and questions files that are devices, huge or not
    UTF-8 are refused with the file named (never read for ever)."""
    from locpath.batch.inputs import TEXT_LIMIT, list_slides, read_questions
    from locpath.errors import LocpathError

    slide = tmp_path / "one.svs"
    slide.write_bytes(b"II*\0")
    assert list_slides(slide) == [slide.resolve()]
    listed = tmp_path / "list.txt"
    listed.write_text("# cohort\none.svs\n\none.svs\n")
    assert list_slides(listed) == [slide.resolve()]
    (tmp_path / "q.txt").write_text("What is the diagnosis?\n\n  Is necrosis present?  \n")
    assert read_questions(tmp_path / "q.txt") == ["What is the diagnosis?", "Is necrosis present?"]

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"What\xff?\n")
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(TEXT_LIMIT + 1)
    for read, path, fragment in [(read_questions, bad, "not UTF-8"), (list_slides, bad, "not UTF-8"),
                                 (read_questions, Path("/dev/zero"), "not a regular file"),
                                 (list_slides, Path("/dev/zero"), "not a regular file"),
                                 (read_questions, huge, "over the"), (list_slides, huge, "over the")]:
        with pytest.raises(LocpathError) as err:
            read(path)
        assert str(err.value).startswith(str(path)) and fragment in str(err.value)
