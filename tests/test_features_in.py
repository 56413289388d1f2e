"""Features in: TRIDENT h5 as TRIDENT writes it (any registered encoder, by any alias; overlap honoured) and SlideChat
CSVs (CONCH v1, no coordinates), read and answered from with the shipped reference bundle.

TRIDENT's layout (mahmoodlab/TRIDENT trident/IO.py save_h5 + coords_to_h5, trident/wsi_objects/WSI.py
extract_patch_features): `features` (N, D) with attributes name (the slide), savetodir, encoder (enc_name, or the
string 'None'); `coords` (N, 2) int64 level-0 positions with patch_size, patch_size_level0, level0_magnification,
target_magnification, overlap, name, savetodir, level0_width, level0_height; datasets chunked (1, ...) with an
unlimited first axis; files in <job>/<mag>x_<patch>px_<overlap>px_overlap/features_<enc_name>/<slide>.h5. Its patcher
puts column k >= 1 at k * patch - (k - 1) * overlap (trident/wsi_objects/WSIPatcher.py _colrow_to_xy).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from locpath.checkpoints import shipped_bundle
from locpath.encoders import same_encoder
from locpath.errors import FeatureFileError
from locpath.runtime.pipeline import Pipeline
from locpath.stm import merge_tokens
from locpath.wsi.features import FeatureFile, read_features, write_features

BUNDLE = shipped_bundle("reference")  # encoder 'locpath-tiny-vit', 64-d features
Q = "What is the diagnosis?"


# -- helpers ------------------------------------------------------------------------------------------------
def trident_xy(k: int, patch0: int, overlap0: int) -> int:
    """TRIDENT's patcher: level-0 position of column (or row) k."""
    return k * patch0 - overlap0 * max(k - 1, 0)


def trident_coords(cols: int, rows: int, patch0: int, overlap0: int) -> tuple[np.ndarray, np.ndarray]:
    """(coords, col/row) in TRIDENT's order (column-major: for col, for row)."""
    cr = np.array([(c, r) for c in range(cols) for r in range(rows)], np.int64)
    xy = np.array([(trident_xy(c, patch0, overlap0), trident_xy(r, patch0, overlap0)) for c, r in cr], np.int64)
    return xy, cr


def trident_h5(path: Path, feats, coords, encoder: str | None = "conch_v1", patch: int = 256, overlap: int = 0,
               mag0: int = 40, mag: int = 20) -> Path:
    """A file as TRIDENT's extract_patch_features writes it (encoder None: older TRIDENT, no 'encoder' attribute)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    feats, coords = np.asarray(feats), np.asarray(coords, np.int64)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", shape=feats.shape, maxshape=(None, *feats.shape[1:]),
                             chunks=(1, *feats.shape[1:]), dtype=feats.dtype)
        d[:] = feats
        d.attrs["name"] = path.stem  # the slide's name, not the encoder's
        d.attrs["savetodir"] = str(path.parent)
        if encoder is not None:
            d.attrs["encoder"] = encoder
        c = f.create_dataset("coords", shape=coords.shape, maxshape=(None, 2), chunks=(1, 2), dtype=np.int64)
        c[:] = coords
        for k, v in {"patch_size": patch, "patch_size_level0": patch * mag0 // mag, "level0_magnification": mag0,
                     "target_magnification": mag, "overlap": overlap, "name": path.stem,
                     "savetodir": str(path.parent.parent), "level0_width": 100_000, "level0_height": 80_000}.items():
            c.attrs[k] = v
    return path


def slidechat_csv(path: Path, feats, header: bool = True, index: bool = False, extra: int = 0) -> Path:
    """SlideChat's layout: pandas column names as the header, one row per patch (index: pandas' index column)."""
    feats = np.asarray(feats)
    cols = [str(i) for i in range(feats.shape[1] + extra)]
    lines = [("," if index else "") + ",".join(cols)] if header else []
    for i, row in enumerate(feats):
        cells = [repr(float(x)) for x in row] + ["7"] * extra
        lines.append((f"{i}," if index else "") + ",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "locpath.cli", *map(str, args)], capture_output=True, timeout=120)


def err_lines(res) -> list[str]:
    return res.stderr.decode("utf-8", "replace").strip().splitlines()


def refused(res, *fragments: str) -> str:
    lines = err_lines(res)
    assert res.returncode == 2, (res.returncode, lines[-5:])
    assert len(lines) == 1 and lines[0].startswith("locpath: error: "), lines
    for fr in fragments:
        assert fr in lines[0], (fr, lines[0])
    assert b"Traceback" not in res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def feats64():
    return np.random.default_rng(0).normal(size=(30, 64)).astype(np.float32)


# -- encoder names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["features", "file", "coords", "folder", "folder_none", "locpath"])
def test_encoder_name_is_found_where_writers_put_it(tmp_path, where):
    f = np.ones((3, 8), np.float32)
    xy, _ = trident_coords(3, 1, 512, 0)
    if where == "locpath":
        p = write_features(tmp_path / "a.h5", FeatureFile(f, xy, 224, 448, 0.25, 0.5, "UNI"))
    elif where in ("folder", "folder_none"):  # older TRIDENT: no attribute; 'None' when enc_name was missing
        p = trident_h5(tmp_path / "20x_256px_0px_overlap" / "features_uni_v1" / "a.h5", f, xy,
                       encoder=None if where == "folder" else "None")
    else:
        p = trident_h5(tmp_path / "a.h5", f, xy, encoder=None)
        with h5py.File(p, "a") as h:
            {"features": h["features"], "file": h, "coords": h["coords"]}[where].attrs["encoder"] = b"uni"
    ff = read_features(p)
    assert same_encoder(ff.encoder, "uni_v1") and ff.encoder != "a", (ff.encoder, ff.encoder_from)
    assert read_features(p, expect_dim=8, expect_encoder="UNI-v1").encoder == ff.encoder


def test_bundle_check_accepts_aliases_and_refuses_other_encoders_in_one_line(tmp_path):
    """Pipeline.read_feature_file (the pipeline's check) against a bundle whose encoder is TRIDENT's 'uni_v1'."""
    pipe = SimpleNamespace(cfg=SimpleNamespace(feature_dim=8, tile_encoder=SimpleNamespace(name="uni_v1")),
                           _warned=set())
    xy, _ = trident_coords(2, 2, 512, 0)
    f = np.ones((4, 8), np.float16)
    for alias in ("uni_v1", "UNI", "uni-v1"):
        ff = Pipeline.read_feature_file(pipe, trident_h5(tmp_path / f"{alias}.h5", f, xy, encoder=alias))
        assert ff.features.dtype == np.float32 and ff.features.shape == (4, 8)
    other = trident_h5(tmp_path / "conch.h5", f, xy, encoder="conch_v1")
    with pytest.raises(FeatureFileError) as e:
        Pipeline.read_feature_file(pipe, other)
    msg = str(e.value)
    assert "\n" not in msg and str(other) in msg and "'conch_v1'" in msg and "'uni_v1'" in msg
    unnamed = trident_h5(tmp_path / "old.h5", f, xy, encoder=None)  # kept: a file naming no encoder is refused
    with pytest.raises(FeatureFileError, match="names no tile encoder.*'uni_v1'"):
        Pipeline.read_feature_file(pipe, unnamed)
    wide = trident_h5(tmp_path / "wide.h5", np.ones((4, 16), np.float32), xy, encoder=None)
    with pytest.raises(FeatureFileError, match="16 wide; this bundle's tile encoder gives 8"):  # width first
        Pipeline.read_feature_file(pipe, wide)


# -- overlap ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [0, 32, 128])
def test_trident_grid_positions_with_and_without_overlap(tmp_path, overlap):
    """40x slide, 256 px patches at 20x: level-0 patch 512, stride 2 * (256 - overlap) (224 px at 20x: 448)."""
    xy, cr = trident_coords(5, 4, 512, 2 * overlap)
    feats = np.eye(6, 8, dtype=np.float32)[(cr[:, 0] // 2) * 2 + cr[:, 1] // 2]  # equal within each 2x2 block
    ff = read_features(trident_h5(tmp_path / "t.h5", feats, xy, encoder="conch_v1", overlap=overlap))
    assert ff.overlap == overlap and ff.patch_size_level0 == 512
    assert ff.stride_level0 == 2 * (256 - overlap)
    assert (ff.grid_index == cr).all()
    # STM merges exactly the 2x2 blocks of equal tiles: 3 x 2 blocks over 5 x 4 tiles
    merged = merge_tokens(ff.features, ff.grid_index, window=2, threshold=0.97)
    assert len(merged) == 6 and np.bincount(merged.assignment).tolist() == [4, 4, 2, 4, 4, 2]  # row-major blocks


def test_other_grids_with_overlap_and_locpath_files(tmp_path):
    """A grid of k * stride (locpath's own layout) keeps coords // stride, overlap or not."""
    cr = np.array([(c, r) for r in range(3) for c in range(4)], np.int64)
    for overlap in (0, 32, 128):
        stride0 = 2 * (256 - overlap)
        ff = FeatureFile(np.ones((12, 4), np.float32), cr * stride0, 256, 512, 0.25, 0.5, "x", overlap=overlap)
        ff = read_features(write_features(tmp_path / f"l{overlap}.h5", ff))
        assert (ff.grid_index == cr).all(), overlap


def test_evidence_draws_overlapping_tiles_at_their_real_size():
    from locpath.runtime.evidence import Evidence
    from locpath.wsi.overlay import evidence_image
    from locpath.wsi.slide import ArraySlide

    slide = ArraySlide([np.full((2048, 2048, 3), 255, np.uint8)], mpp=0.25)
    xy, _ = trident_coords(4, 4, 512, 64)  # stride 448 < patch 512
    w = np.zeros(len(xy))
    w[5] = 1.0  # column 1, row 1: level-0 (512, 512)
    ev = Evidence(xy, 512, w)
    assert ev.top(1) == [{"x": 512, "y": 512, "weight": 1.0}]
    img = np.asarray(evidence_image(slide, ev.coords, ev.weights, ev.tile_size_level0, max_size=1024))  # ds 2
    red = (img[..., 0] > 200) & (img[..., 1] < 150)
    ys, xs = np.nonzero(red)
    assert (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (256, 256, 256, 256)


# -- end to end with the shipped bundle -----------------------------------------------------------------------------
def test_trident_h5_with_overlap_answered_through_the_cli(tmp_path, feats64):
    xy, cr = trident_coords(6, 5, 512, 64)
    p = trident_h5(tmp_path / "20x_256px_32px_overlap" / "features_locpath-tiny-vit" / "case.h5", feats64, xy,
                   encoder="None", overlap=32)  # the name only in TRIDENT's folder
    res = run("ask", BUNDLE, p, Q, "--json")
    assert res.returncode == 0 and not err_lines(res), err_lines(res)
    (a,) = json.loads(res.stdout)["answers"]
    assert a["answer"] and a["slide"]["tiles"] == 30
    ev = a["evidence"]
    assert ev["tile_size_level0"] == 512 and ev["top"]
    assert {(t["x"], t["y"]) for t in ev["top"]} <= set(map(tuple, xy.tolist()))


def test_slidechat_csv_answered_through_the_cli(tmp_path, feats64):
    same = np.repeat(feats64[:1], 30, axis=0) + np.random.default_rng(1).normal(scale=1e-4, size=(30, 64))
    p = slidechat_csv(tmp_path / "TCGA-XX-0001.csv", same.astype(np.float32))
    res = run("ask", BUNDLE, p, Q, "Is necrosis present?", "--json")
    lines = err_lines(res)
    assert res.returncode == 0, lines
    assert len(lines) == 1 and lines[0].startswith("locpath: warning: ") and str(p) in lines[0], lines
    assert "no tile coordinates" in lines[0] and "no heatmap" in lines[0]
    answers = json.loads(res.stdout)["answers"]
    assert len(answers) == 2 and all(a["answer"] for a in answers)
    for a in answers:
        assert a["slide"]["tiles"] == 30 and a["slide"]["tokens_after_stm"] == 30  # near-equal tiles: no merges
        ev = a["evidence"]
        assert ev["positions"].startswith("unavailable") and ev["tile_size_level0"] is None
        assert ev["top"] and all(set(t) == {"tile", "weight"} and 0 <= t["tile"] < 30 for t in ev["top"])
    refused(run("ask", BUNDLE, p, Q, "--evidence", tmp_path / "ev.png"), "a feature file has none")


def test_slidechat_512_columns_are_conch_v1(tmp_path):
    f = np.random.default_rng(2).normal(size=(7, 512)).astype(np.float32)
    for kw in ({}, {"index": True}, {"extra": 3}, {"header": False}):
        ff = read_features(slidechat_csv(tmp_path / f"s{len(kw)}{''.join(kw)}.csv", f, **kw))
        assert ff.encoder == "conch_v1" and not ff.spatial, kw
        assert ff.features.dtype == np.float32 and np.array_equal(ff.features, f), kw
        assert (ff.grid_index == 0).all()
    p = slidechat_csv(tmp_path / "s.csv", f)
    assert read_features(p, expect_dim=512, expect_encoder="CONCH").features.shape == (7, 512)
    refused(run("ask", BUNDLE, p, Q), str(p), "'conch_v1'", "'locpath-tiny-vit'")
    # written out (as a batch does) and read back, a CSV's features stay without positions
    back = read_features(write_features(tmp_path / "s.h5", read_features(p)))
    assert not back.spatial and back.encoder == "conch_v1"


@pytest.mark.parametrize("case,fragment", [
    ("ragged", "line 4 has 63 columns; the header has 64"), ("text", "line 3, column 5: 'abc' is not a number"),
    ("nan", "line 6 holds NaN or inf"), ("empty", "the CSV is empty"), ("header_only", "holds no tiles"),
    ("huge", "feature CSVs above"), ("long_line", "is longer than"), ("narrow", "features are 63 wide"),
])
def test_bad_csvs_exit_2_with_one_line(tmp_path, feats64, case, fragment):
    p = tmp_path / f"{case}.csv"
    if case in ("ragged", "text", "nan"):
        lines = slidechat_csv(p, feats64).read_text().splitlines()
        if case == "ragged":
            lines[3] = lines[3].rsplit(",", 1)[0]
        elif case == "text":
            cells = lines[2].split(",")
            cells[4] = "abc"
            lines[2] = ",".join(cells)
        else:
            lines[5] = lines[5].replace(lines[5].split(",")[2], "nan", 1)
        p.write_text("\n".join(lines) + "\n")
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "header_only":
        p.write_text(",".join(map(str, range(64))) + "\n")
    elif case == "huge":
        with open(p, "wb") as f:  # sparse: nothing is written or read
            f.truncate((4 << 30) + 1)
    elif case == "long_line":
        p.write_bytes(b"1," * (3 << 20))
    else:
        slidechat_csv(p, feats64[:, :63])
    refused(run("ask", BUNDLE, p, Q), str(p), fragment)


def test_batch_takes_feature_csvs_but_not_slide_lists(tmp_path, feats64):
    from locpath.batch.inputs import list_slides

    d = tmp_path / "in"
    d.mkdir()
    feat = slidechat_csv(d / "case.csv", feats64)
    (d / "labels.csv").write_text("slide,label\ncase,tumour\n")
    lst = tmp_path / "slides.csv"
    lst.write_text(f"{feat}\n")
    assert list_slides(d) == [feat.resolve()]
    assert list_slides(feat) == [feat.resolve()]
    assert list_slides(lst) == [feat.resolve()]  # a list of paths named .csv stays a list
    assert os.path.getsize(feat) > 0


@pytest.mark.torch
# slow, all seven (8 dynamo exports each, ~40 s): the default run answers a TRIDENT h5 with overlap through the
# shipped bundle (test_trident_h5_with_overlap_answered_through_the_cli) and checks bundle-against-PyTorch parity in
# test_runtime; what this adds is each registered encoder's feature width end to end
@pytest.mark.slow
@pytest.mark.parametrize("name,alias", [
    ("conch_v1", "CONCH"), ("uni_v1", "UNI"), ("uni_v2", "UNI2-h"), ("virchow2", "Virchow2"),
    ("hoptimus0", "H-optimus-0"), ("hoptimus1", "hoptimus1"), ("gigapath", "prov-gigapath")])
def test_each_registered_encoders_trident_h5_is_answered_from(tmp_path, tokenizer, name, alias):
    """For every registered encoder: a bundle built on it (real width, depth 1) answers a TRIDENT-layout h5 that
    names the encoder by an alias, with overlap, token for token as PyTorch does from the same features."""
    import torch

    from locpath.config import preset
    from locpath.export.bundle import export_bundle
    from locpath.models.checkpoint import save_checkpoint
    from locpath.models.encoders import encoder_config
    from locpath.models.slide_llm import LocPathModel
    from locpath.runtime.pipeline import Pipeline

    cfg = preset("tiny")
    cfg.tile_encoder = encoder_config(name, depth=1)
    torch.manual_seed(0)
    model = LocPathModel(cfg).eval()
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    bundle, _ = export_bundle(ckpt, tmp_path / "bundle", validate=False, log=lambda m: None)
    xy, _ = trident_coords(6, 5, 512, 64)
    feats = np.random.default_rng(1).normal(size=(len(xy), cfg.feature_dim)).astype(np.float32)
    h5 = trident_h5(tmp_path / "features_x" / "slide.h5", feats, xy, encoder=alias, patch=256, overlap=32)
    pipe = Pipeline.from_bundle(bundle, use_cache=False)
    ans = pipe.ask(h5, "What is the diagnosis?", max_new_tokens=4)
    assert ans.slide["tiles"] == len(xy) and ans.generation["new_tokens"] >= 1
    lat = pipe.compress(pipe.read_feature_file(h5)).latents
    with torch.no_grad():
        want = model.answer_tokens(tokenizer, torch.from_numpy(lat), ["What is the diagnosis?"], max_new=4)[0]
    assert ans.token_ids == want
