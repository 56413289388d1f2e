"""Every input a user or an attacker can hand locpath, run through the CLI in a subprocess as a user would: bad input
gets exit status 2 and one stderr line naming the file or option, never a traceback; recoverable problems give at
most one warning line and still an answer; nothing outside the working folders is touched and nothing is left
half-written.

As root (CI), permission cases run under `setpriv` with CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH dropped, so file
modes apply to root too; without setpriv they are skipped.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import reseal

Q = "What is the diagnosis?"


# -- helpers ------------------------------------------------------------------------------------------------
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


@pytest.fixture()
def bundle(ref_bundle, tmp_path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(ref_bundle, b)
    return b


@pytest.fixture(scope="module")
def slide(eval_slide, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    shutil.copy(eval_slide, d / "case.svs")
    return d / "case.svs"


@pytest.fixture(scope="module")
def cached(ref_bundle, slide, tmp_path_factory):
    """A slide cache holding the slide's entry, and the answer the bundle gives (a reference for every case)."""
    cache = tmp_path_factory.mktemp("cache")
    res = run("ask", ref_bundle, slide, Q, "--json", "--cache-dir", cache)
    return cache, assert_answered(res, warnings=0)["answers"][0]


def cache_copy(cached, tmp_path) -> Path:
    c = tmp_path / "cache"
    shutil.copytree(cached[0], c)
    return c


def entry_dir(cache: Path) -> Path:
    (key,) = [p for p in cache.iterdir() if p.is_dir()]
    (entry,) = list(key.iterdir())
    return entry


def features_h5(path: Path, feats, coords=None, **attrs) -> Path:
    feats = np.asarray(feats)
    n = feats.shape[0] if feats.ndim >= 1 else 0
    coords = np.stack([np.arange(n) * 224, np.zeros(n, int)], 1) if coords is None else np.asarray(coords)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", data=feats)
        d.attrs["encoder"] = "locpath-tiny-vit"
        c = f.create_dataset("coords", data=coords)
        base = {"patch_size": 224, "patch_size_level0": 224, "level0_mpp": 0.5, "target_mpp": 0.5}
        for k, v in dict(base, **attrs).items():
            c.attrs[k] = v
    return path


# -- security ------------------------------------------------------------------------------------------------
def test_poisoned_memo_cannot_steer_a_delete_or_swap_latents(ref_bundle, slide, cached, tmp_path):
    cache = cache_copy(cached, tmp_path)
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    (victim / "keep" / "data.txt").write_text("precious")
    before = tree(victim)
    memo = cache / "hashes.json"
    m = json.loads(memo.read_text())
    (key,) = m["entries"]
    m["entries"][key] = "../../victim"
    memo.write_text(json.dumps(m))
    res = run("ask", ref_bundle, slide, Q, "--json", "--cache-dir", cache)
    ans = assert_answered(res, warnings=0)["answers"][0]
    assert ans["answer"] == cached[1]["answer"] and tree(victim) == before  # nothing outside the cache deleted

    # slide B mapped to slide A's digest: B must be answered from B's own pixels
    other = tmp_path / "other.svs"
    from locpath.synth import make_spec, write_slide

    write_slide(make_spec(777, diagnosis="benign", organ="kidney", necrosis=False), other)
    fresh = assert_answered(run("ask", ref_bundle, other, Q, "--json", "--no-cache"))["answers"][0]
    digest_a = entry_dir(cache).name
    st = other.stat()
    m = json.loads(memo.read_text())
    m["entries"][f"{other.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"] = digest_a
    memo.write_text(json.dumps(m))
    got = assert_answered(run("ask", ref_bundle, other, Q, "--json", "--cache-dir", cache))["answers"][0]
    assert got["slide"]["tiles"] == fresh["slide"]["tiles"] != cached[1]["slide"]["tiles"]
    assert got["answer"] == fresh["answer"] and not got["slide"]["cache_hit"]


@pytest.mark.parametrize("member", ["/etc/passwd", "../outside.onnx", "/dev/zero", "sub/../../x.onnx"])
def test_manifest_paths_outside_the_bundle_are_refused(bundle, tmp_path, member):
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle / "tis.onnx", outside)
    size = 0 if member == "/dev/zero" else (outside.stat().st_size if "outside" in member else 10)

    def point_outside(mf):
        entry = mf["files"].pop("tis.onnx")
        entry["bytes"] = size
        mf["files"][member] = entry
        mf["components"]["tis"]["file"] = member

    reseal(bundle, point_outside)
    start = time.time()
    assert_refused(run("ask", bundle, "x.svs", Q, "--no-cache"), "manifest.json")
    assert time.time() - start < 60  # /dev/zero is never read


def test_data_files_and_checksum_list_are_confined(bundle):
    reseal(bundle, lambda mf: mf["components"]["tis"]["data_files"].append("../../../etc/hostname"))
    assert_refused(run("verify", bundle), "etc/hostname", "leaves or names the bundle folder")
    sums = bundle / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{'0' * 64}  /etc/passwd\n")
    assert_refused(run("verify", bundle), "SHA256SUMS", "absolute path")


def test_a_hand_edited_manifest_is_refused(bundle):
    mf = json.loads((bundle / "manifest.json").read_text())
    mf["generation"]["max_new_tokens"] = 200
    (bundle / "manifest.json").write_text(json.dumps(mf, indent=2))
    assert_refused(run("ask", bundle, "x.svs", Q), "manifest.json: checksum mismatch with SHA256SUMS")


def test_chat_template_is_checksummed_and_used(bundle, slide, cached):
    tmpl = bundle / "chat_template.jinja"
    tmpl.write_text(tmpl.read_text().replace("message['content']", "'Pathologist asks: ' + message['content']"))
    assert_refused(run("ask", bundle, slide, Q, "--no-cache"), "chat_template.jinja", "was modified")

    def rehash(mf):
        mf["files"]["chat_template.jinja"] = {"sha256": hashlib.sha256(tmpl.read_bytes()).hexdigest(),
                                              "bytes": tmpl.stat().st_size}

    reseal(bundle, rehash)
    (bundle / "SHA256SUMS").write_text("\n".join(
        ln if not ln.endswith("  chat_template.jinja") else f"{hashlib.sha256(tmpl.read_bytes()).hexdigest()}  "
        "chat_template.jinja" for ln in (bundle / "SHA256SUMS").read_text().splitlines()) + "\n")
    got = assert_answered(run("ask", bundle, slide, Q, "--json", "--no-cache"))["answers"][0]
    assert got["generation"]["prompt_tokens"] > cached[1]["generation"]["prompt_tokens"]  # the template built it


def test_signatures_under_a_trusted_keys_setting(bundle, slide, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    assert run("keygen", keys / "site").returncode == 0
    assert run("keygen", keys / "intruder").returncode == 0
    assert oct((keys / "site.key").stat().st_mode & 0o777) == "0o600"
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(keys / "site.pub", trusted / "site.pem")
    assert_refused(run("ask", bundle, slide, Q, "--no-cache", "--trusted-keys", trusted), "is not signed")
    assert_refused(run("verify", bundle, env={"LOCPATH_TRUSTED_KEYS": str(trusted)}), "is not signed")
    assert run("sign", bundle, "--key", keys / "intruder.key").returncode == 0
    assert_refused(run("verify", bundle, "--trusted-keys", trusted), "SHA256SUMS.sig", "not among the trusted keys")
    assert run("sign", bundle, "--key", keys / "site.key").returncode == 0
    assert_answered(run("ask", bundle, slide, Q, "--json", "--no-cache", "--trusted-keys", trusted), warnings=0)
    reseal(bundle, lambda mf: mf["generation"].update(max_new_tokens=3))  # consistent edit after signing
    assert_refused(run("ask", bundle, slide, Q, "--no-cache", "--trusted-keys", trusted),
                   "signature does not match SHA256SUMS")
    assert_refused(run("sign", bundle, "--key", keys / "site.pub"), "site.pub", "private key")


# -- clean one-line errors ------------------------------------------------------------------------------------
def test_slide_paths_that_are_not_readable_files(ref_bundle, tmp_path):
    d = tmp_path / "folder.svs"
    d.mkdir()
    assert_refused(run("ask", ref_bundle, d, Q, "--no-cache"), str(d), "is a directory")
    loop = tmp_path / "loop.svs"
    loop.symlink_to(tmp_path / "loop2.svs")
    (tmp_path / "loop2.svs").symlink_to(loop)
    assert_refused(run("ask", ref_bundle, loop, Q, "--no-cache"), str(loop), "symbolic link loop")
    assert_refused(run("ask", ref_bundle, "/dev/zero", Q, "--no-cache"), "/dev/zero", "not a regular file")
    assert_refused(run("tiles", tmp_path / "none.svs"), "none.svs", "file not found")


def test_unreadable_slide_and_bundle_folder(ref_bundle, slide, cached, tmp_path):
    locked = tmp_path / "locked.svs"
    shutil.copy(slide, locked)
    cache = cache_copy(cached, tmp_path)
    # cached under its content: a readable copy would be answered from the cache without reading a tile
    locked.chmod(0)
    assert_refused(run("ask", ref_bundle, locked, Q, "--cache-dir", cache, drop_root=True), str(locked),
                   "permission denied")
    b = tmp_path / "b"
    shutil.copytree(ref_bundle, b)
    b.chmod(0)
    try:
        assert_refused(run("ask", b, slide, Q, "--no-cache", drop_root=True), str(b), "cannot be read")
    finally:
        b.chmod(0o755)


def test_broken_manifests(bundle):
    cases = [
        (lambda mf: mf.update(components=[]), "components must be a JSON object"),
        (lambda mf: mf["components"].pop("tile_encoder"), "components lack tile_encoder"),
        (lambda mf: mf["generation"].update(max_length=-4), "generation.max_length"),
        (lambda mf: mf["generation"].update(stop_tokens=["<|not-a-token|>"]), "'<|not-a-token|>' is not a token"),
        (lambda mf: mf["preprocessing"].update(target_mpp="fast"), "preprocessing.target_mpp"),
        (lambda mf: mf["components"]["decoder"]["templates"].update(num_layers=0), "manifest.json: components.decoder.templates"),
    ]
    pristine = (bundle / "manifest.json").read_text()
    for mutate, fragment in cases:
        (bundle / "manifest.json").write_text(pristine)
        reseal(bundle, mutate)
        assert_refused(run("ask", bundle, "x.svs", Q, "--no-cache"), fragment, str(bundle / "manifest.json"))


def test_bad_questions_and_options_fail_before_any_output(ref_bundle, slide):
    bad_utf8 = b"What is the \xff\xfe diagnosis?"
    res = subprocess.run([sys.executable, "-m", "locpath.cli", "ask", str(ref_bundle), str(slide), bad_utf8,
                          "--no-cache"], capture_output=True, timeout=120)
    assert_refused(res, "question 1", "not valid UTF-8")
    assert res.stdout == b""
    for opts, fragment in ((["--seed", "-1"], "--seed"), (["--temperature", "inf"], "--temperature"),
                           (["--repetition-penalty", "inf"], "--repetition-penalty"), (["--top-k", "-3"], "--top-k"),
                           (["--max-new-tokens", "100000"], "max_new_tokens 100000 does not fit")):
        res = run("ask", ref_bundle, slide, Q, "--no-cache", *opts)
        assert_refused(res, fragment)
        assert res.stdout == b""
    res = run("ask", ref_bundle, slide, Q, "--no-cache", "--json", "--max-new-tokens", "100000")
    assert_refused(res, "does not fit")
    out = json.loads(res.stdout)
    assert out["schema"] == "locpath-answers/1" and out["answers"] == [] and "does not fit" in out["error"]
    assert_refused(run("ask", ref_bundle, slide, "word " * 1000, "--no-cache"), "question 1", "prompt is")


def test_chat_survives_a_bad_line(ref_bundle, slide, cached, tmp_path):
    lines = b"What is the diagnosis?\n\xff\xfe broken\nIs necrosis present?\n"
    res = run("chat", ref_bundle, slide, "--cache-dir", cache_copy(cached, tmp_path), stdin=lines)
    assert res.returncode == 0 and b"Traceback" not in res.stderr
    assert res.stdout.decode().count("A: ") == 2
    assert sum("not valid UTF-8" in ln for ln in err_lines(res)) == 1


def test_broken_pipe_is_quiet(ref_bundle, slide, cached, tmp_path):
    cmd = [sys.executable, "-m", "locpath.cli", "ask", str(ref_bundle), str(slide), *([Q] * 20), "--cache-dir",
           str(cache_copy(cached, tmp_path))]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read()
    assert p.wait(timeout=120) == 2 and b"Traceback" not in err
    assert len(err.decode().strip().splitlines()) == 1 and b"pipe" in err


# -- the slide cache degrades, never fails an answer ---------------------------------------------------------------
def test_unwritable_cache_warns_once_and_answers(ref_bundle, slide, tmp_path):
    if os.geteuid() == 0:
        blocked = tmp_path / "not-a-folder"
        blocked.write_text("a file where the cache folder should be")
        cache, kw = blocked / "cache", {}
    else:
        cache, kw = tmp_path / "ro", {}
        cache.mkdir()
        cache.chmod(0o555)
    res = run("ask", ref_bundle, slide, Q, "Is necrosis present?", "--json", "--cache-dir", cache, **kw)
    out = assert_answered(res, warnings=1)
    assert "slide cache cannot be written" in err_lines(res)[0] and len(out["answers"]) == 2


def test_full_disk_while_caching_warns_once_and_answers(ref_bundle, slide, tmp_path):
    def small_files():  # writes past 16 KiB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    cache = tmp_path / "cache"
    res = run("ask", ref_bundle, slide, Q, "--json", "--cache-dir", cache, preexec=small_files)
    assert_answered(res, warnings=1)
    assert "cannot be written" in err_lines(res)[0]
    assert no_temporaries(cache) and not list(cache.rglob("features.h5"))  # nothing half-written


@pytest.mark.parametrize("damage", ["meta_empty", "memo_list", "nan_latents", "wrong_shape", "junk_h5"])
def test_damaged_cache_entries_are_dropped_and_recomputed(ref_bundle, slide, cached, tmp_path, damage):
    cache = cache_copy(cached, tmp_path)
    e = entry_dir(cache)
    if damage == "meta_empty":
        (e / "meta.json").write_text("{}")
    elif damage == "memo_list":
        (cache / "hashes.json").write_text("[1, 2, 3]")
    elif damage == "nan_latents":
        lat = np.load(e / "latents.npy")
        lat[0, 3, 5] = np.nan
        np.save(e / "latents.npy", lat)
    elif damage == "wrong_shape":
        np.save(e / "latents.npy", np.zeros((1, 3, 3), np.float32))
    else:
        (e / "features.h5").write_bytes(b"not hdf5 at all")
    res = run("ask", ref_bundle, slide, Q, "--json", "--cache-dir", cache)
    got = assert_answered(res, warnings=0 if damage == "memo_list" else 1)["answers"][0]
    assert got["answer"] == cached[1]["answer"] and got["slide"]["tiles"] == cached[1]["slide"]["tiles"]
    again = assert_answered(run("ask", ref_bundle, slide, Q, "--json", "--cache-dir", cache), warnings=0)
    assert again["answers"][0]["slide"]["cache_hit"]  # the recomputed entry is good


def test_a_deleted_slide_is_not_answered_from_the_cache(ref_bundle, slide, cached, tmp_path):
    gone = tmp_path / "gone.svs"
    shutil.copy(slide, gone)
    cache = cache_copy(cached, tmp_path)
    assert_answered(run("ask", ref_bundle, gone, Q, "--json", "--cache-dir", cache))
    gone.unlink()
    assert_refused(run("ask", ref_bundle, gone, Q, "--cache-dir", cache), str(gone), "file not found")


# -- feature files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,fragment", [
    ("nan", "NaN or inf"), ("int8", "float16 or float32"), ("bool", "float16 or float32"),
    ("complex", "float16 or float32"), ("bytes", "float16 or float32"), ("width", "63 wide; this bundle's tile encoder gives 64"),
    ("empty", "no tiles"), ("patch0", "'patch_size_level0' must be an integer >= 1, got 0"), ("negative", "negative positions"),
    ("external", "link to another file"),
])
def test_bad_feature_files(ref_bundle, tmp_path, case, fragment):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(12, 64)).astype(np.float32)
    p = tmp_path / f"{case}.h5"
    if case == "nan":
        f[3, 2] = np.nan
        features_h5(p, f)
    elif case in ("int8", "bool", "complex"):
        features_h5(p, f.astype({"int8": np.int8, "bool": bool, "complex": np.complex64}[case]))
    elif case == "bytes":
        features_h5(p, np.array([[b"abc"] * 64] * 12))
    elif case == "width":
        features_h5(p, f[:, :63])
    elif case == "empty":
        features_h5(p, np.zeros((0, 64), np.float32), coords=np.zeros((0, 2), int))
    elif case == "patch0":
        features_h5(p, f, patch_size_level0=0)
    elif case == "negative":
        coords = np.stack([np.arange(12) * 224 - 448, np.zeros(12, int)], 1)
        features_h5(p, f, coords=coords)
    else:
        other = features_h5(tmp_path / "elsewhere.h5", f)
        with h5py.File(p, "w") as h:
            h["features"] = h5py.ExternalLink(str(other), "features")
            h.create_dataset("coords", data=np.zeros((12, 2), int)).attrs["patch_size"] = 224
    res = run("ask", ref_bundle, p, Q)
    line = assert_refused(res, str(p), fragment)
    assert "onnxruntime" not in line.lower() and b"[E:" not in res.stderr  # no runtime log leaks through


# -- slide files ------------------------------------------------------------------------------------------------------
def test_truncated_slides_one_line_each(ref_bundle, real_svs, tmp_path):
    data = real_svs.read_bytes()
    head = tmp_path / "head.svs"
    head.write_bytes(data[:100_000])
    assert_refused(run("ask", ref_bundle, head, Q, "--no-cache"), str(head), "the TIFF holds no image")  # the header budget (wsi/budget.py) reads it first
    tail = tmp_path / "tail.svs"  # pixels intact, the trailing label/macro pages cut off
    tail.write_bytes(data[:1_850_000])
    res = run("ask", ref_bundle, tail, Q, "--json", "--no-cache")
    assert_answered(res, warnings=1)
    assert "tail.svs" in err_lines(res)[0] and "slide library reported" in err_lines(res)[0]


# -- interrupted writers --------------------------------------------------------------------------------------------
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
