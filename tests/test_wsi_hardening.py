"""Slide and feature files that are not what they claim (locpath.wsi): one line naming the file, through the CLI."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_checks import Q, assert_answered, assert_refused, cache_copy, err_lines, run


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
