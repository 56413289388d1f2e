import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import iou
from locpath.cli import main
from locpath.errors import FeatureFileError, SlideError
from locpath.wsi import (FeatureFile, GridConfig, TileReader, build_grid, detect_tissue, open_slide, read_features,
                         write_features)
from locpath.wsi.extract import plan_tiles


def test_real_svs_metadata(real_svs):
    with open_slide(real_svs) as s:
        assert s.backend_name == "openslide"
        assert s.dimensions == (2220, 2967)
        assert s.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_source == "metadata"
        assert set(s.associated_images) == {"label", "macro", "thumbnail"}
        assert s.read_associated("label").shape[2] == 3


def test_real_svs_tiles_stream_in_order(real_svs):
    with open_slide(real_svs) as s:
        plan = plan_tiles(s)
        assert 0.15 < plan.tissue.tissue_fraction < 0.7
        g = plan.grid
        assert len(g) > 20 and g.read_level == 0 and g.read_size == 224
        seen = []
        for batch in TileReader(s, g, batch_size=7, workers=2, prefetch=2):
            assert batch.tiles.dtype == np.uint8 and batch.tiles.shape[1:] == (224, 224, 3)
            seen.append(batch.coords)
            x, y = batch.coords[0]
            np.testing.assert_array_equal(batch.tiles[0], s.read_region(0, x, y, 224, 224))
        np.testing.assert_array_equal(np.concatenate(seen), g.coords)


@pytest.mark.parametrize("fixture,vendor", [("small_svs", "aperio"), ("small_tiff", "generic-tiff")])
def test_synthetic_slides_open_and_tissue_matches_truth(request, fixture, vendor, small_spec):
    path = request.getfixturevalue(fixture)
    with open_slide(path) as s:
        assert s.vendor == vendor
        assert s.mpp == pytest.approx(0.5)
        assert s.dimensions == small_spec.dimensions
        t = detect_tissue(s)
        truth = np.asarray(Image.fromarray(small_spec.tissue_mask().astype(np.uint8) * 255).resize(
            t.mask.shape[::-1], Image.Resampling.NEAREST)) > 0
        assert iou(t.mask, truth) >= 0.9


def test_synthetic_pyramid_has_levels_and_tiles_come_from_a_coarser_level(tmp_path):
    from locpath.synth import make_spec, write_slide

    spec = make_spec(5, tiles=(12, 10), mpp=0.25)  # a 40x scan: 0.5 um/px tiles need a 2x downsample
    path = write_slide(spec, tmp_path / "forty.svs")
    with open_slide(path) as s:
        assert s.level_count >= 2 and s.level_downsamples[1] == pytest.approx(4.0)
        g = build_grid(s, detect_tissue(s), GridConfig())
        assert g.size_level0 == 448 and g.read_level == 0 and g.read_size == 448
        batch = next(iter(TileReader(s, g, batch_size=4)))
        assert batch.tiles.shape == (4, 224, 224, 3)
        # 1 um/px tiles are read from the 4x level, not level 0; 2 um/px from the 4x level, then halved
        g2 = build_grid(s, detect_tissue(s), GridConfig(target_mpp=1.0))
        assert g2.read_level == 1 and g2.read_size == 224
        g3 = build_grid(s, detect_tissue(s), GridConfig(target_mpp=2.0))
        assert g3.read_level == 1 and g3.read_size == 448
        assert next(iter(TileReader(s, g3, batch_size=2))).tiles.shape == (2, 224, 224, 3)


def test_tiffslide_fallback_for_tiffs_openslide_rejects(tmp_path):
    # a stripped (untiled) TIFF: OpenSlide's generic-tiff driver refuses it, tiffslide reads it
    img = np.full((600, 700, 3), 240, np.uint8)
    img[100:400, 100:500] = (180, 90, 160)
    p = tmp_path / "stripped.tif"
    tifffile.imwrite(p, img, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        assert s.backend_name == "tiffslide"
        assert s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.read_region(0, 100, 100, 10, 10)[0, 0], (180, 90, 160))


def _run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(result, path, fragment):
    code, _out, err = result
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in err


def test_bad_inputs_fail_with_one_line(tmp_path, capsys, small_svs):
    not_slide = tmp_path / "notes.svs"
    not_slide.write_text("this is not a slide\n")
    _assert_one_line_error(_run_cli(capsys, "tiles", str(not_slide)), not_slide, "not a readable slide")

    missing = tmp_path / "missing.svs"
    _assert_one_line_error(_run_cli(capsys, "tiles", str(missing)), missing, "file not found")

    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    _assert_one_line_error(_run_cli(capsys, "tiles", str(empty)), empty, "empty")

    truncated = tmp_path / "truncated.svs"
    data = small_svs.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    overlay = tmp_path / "out.png"
    _assert_one_line_error(_run_cli(capsys, "tiles", str(truncated), "--overlay", str(overlay)), truncated,
                           "cannot read region at level 0")
    assert not overlay.exists() and not any(p.name.startswith(".out.png") for p in tmp_path.iterdir())


def test_missing_mpp_needs_override(tmp_path, capsys):
    img = np.full((1024, 1024, 3), 245, np.uint8)
    img[200:800, 200:800] = (200, 100, 170)
    p = tmp_path / "nompp.tif"
    tifffile.imwrite(p, img, photometric="rgb", tile=(256, 256))
    _assert_one_line_error(_run_cli(capsys, "tiles", str(p)), p, "--mpp-override")
    code, out, err = _run_cli(capsys, "tiles", str(p), "--mpp-override", "0.5", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["slide"]["mpp_source"] == "override" and rep["tiles"] > 0


def test_no_tissue_and_too_small(tmp_path, capsys):
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((1024, 1024, 3), 245, np.uint8), photometric="rgb", tile=(256, 256),
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    _assert_one_line_error(_run_cli(capsys, "tiles", str(blank)), blank, "no tissue")
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.full((128, 160, 3), 120, np.uint8), photometric="rgb", tile=(16, 16),
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    _assert_one_line_error(_run_cli(capsys, "tiles", str(small)), small, "smaller than one")


def test_tiles_cli_json_and_overlay(tmp_path, capsys, small_svs, small_spec):
    overlay = tmp_path / "ov.png"
    code, out, err = _run_cli(capsys, "tiles", str(small_svs), "--json", "--overlay", str(overlay))
    assert code == 0, err
    rep = json.loads(out)
    assert rep["tiles"] > 0 and rep["slide"]["vendor"] == "aperio"
    assert abs(rep["tissue_fraction"] - small_spec.ground_truth()["tissue_fraction"]) < 0.05
    im = Image.open(overlay)
    assert max(im.size) <= 1024


def test_feature_file_roundtrip_and_errors(tmp_path):
    ff = FeatureFile(features=np.random.rand(5, 8).astype(np.float32), coords=np.arange(10).reshape(5, 2),
                     patch_size=224, patch_size_level0=448, level0_mpp=0.25, target_mpp=0.5, encoder="vit-test",
                     name="slide-1")
    p = write_features(tmp_path / "a.h5", ff)
    back = read_features(p)
    np.testing.assert_array_equal(back.features, ff.features)
    np.testing.assert_array_equal(back.coords, ff.coords)
    assert (back.patch_size, back.patch_size_level0, back.encoder) == (224, 448, "vit-test")
    assert back.level0_magnification == 40.0 and back.target_magnification == 20.0
    import h5py

    with h5py.File(p) as f:  # TRIDENT's attribute names are there
        assert {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification"} <= set(f["coords"].attrs)
    with pytest.raises(FeatureFileError, match="do not match|must be"):
        write_features(tmp_path / "bad.h5", FeatureFile(np.zeros((3, 4)), np.zeros((2, 2)), 224, 224, 0.5, 0.5, "x"))
    assert sorted(os.listdir(tmp_path)) == ["a.h5"]  # nothing half-written
    junk = tmp_path / "junk.h5"
    junk.write_text("nope")
    with pytest.raises(FeatureFileError, match="junk.h5"):
        read_features(junk)


def test_reader_surfaces_read_errors(real_svs):
    with open_slide(real_svs) as s:
        g = build_grid(s, detect_tissue(s))

        class Broken(type(s)):
            pass

        def bad_read(level, x, y, w, h):
            raise OSError("disk gone")

        s._read = bad_read
        with pytest.raises(SlideError, match="disk gone"):
            for _ in TileReader(s, g, batch_size=4):
                pass


def test_tiles_read_reports_throughput(capsys, real_svs):
    code, out, err = _run_cli(capsys, "tiles", str(real_svs), "--read", "--json", "--workers", "2", "--batch-size", "16")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["read"]["tiles"] == rep["tiles"] and rep["read"]["tiles_per_s"] > 0


def test_median_filter_is_pillows_pixel_for_pixel(real_svs):
    """The tissue mask's median filter (bit by bit, no sort) gives Pillow's MedianFilter pixels exactly: random
    images of odd shapes (1 px, thinner than the window) and the real slide's saturation, window sizes 3 to 15;
    an even size is refused as Pillow refuses it."""
    from PIL import ImageFilter

    from locpath.wsi.tissue import median_filter_u8

    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(1, 1), (2, 9), (4, 4), (37, 91), (211, 150)]]
    with open_slide(real_svs) as s:
        rgb, _ = s.read_downsampled(8.0)
    images.append(np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1].copy())
    images.append(np.full((50, 60), 255, np.uint8))
    for img in images:
        for k in (3, 5, 7, 15):
            want = np.asarray(Image.fromarray(img).filter(ImageFilter.MedianFilter(k)))
            assert np.array_equal(median_filter_u8(img, k), want), (img.shape, k)
    assert median_filter_u8(images[0], 1) is images[0]
    assert median_filter_u8(np.zeros((0, 5), np.uint8), 5).shape == (0, 5)
    with pytest.raises(ValueError, match="filter size"):
        median_filter_u8(images[3], 4)
