"""The tissue overview of a JPEG-tiled TIFF level decoded at libjpeg scale (wsi/jpeg_scaled.py): the same picture as
the full-size read, the full read wherever the shortcut does not apply or does not agree, and nothing trusted from
the file's tile tables."""

from __future__ import annotations

import numpy as np
import pytest

from locpath.wsi import TissueConfig, open_slide
from locpath.wsi.jpeg_scaled import JpegTiles, find_jpeg_tiles, pick_scale
from locpath.wsi.slide import Slide
from locpath.wsi.tissue import detect_tissue, detect_tissue_rgb


def _reads(monkeypatch) -> list:
    calls = []
    orig = Slide.read_region

    def counting(self, level, x, y, w, h):
        calls.append((level, w, h))
        return orig(self, level, x, y, w, h)

    monkeypatch.setattr(Slide, "read_region", counting)
    return calls


def _tissue_disc(h: int, w: int, centre: tuple[int, int], radius: int, seed: int) -> np.ndarray:
    """Glass (240) with one disc of noisy H&E-coloured tissue: texture, so a misplaced tile shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 240, np.uint8)
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2
    img[disc] = (np.array([180, 90, 160]) + rng.integers(-20, 20, (int(disc.sum()), 3))).clip(0, 255)
    return img


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_scaled_overview_is_the_full_read_of_the_real_slide(real_svs, backend, monkeypatch):
    """The single-level real SVS (Aperio RGB JPEG tiles): at the tissue mask's 16x, one tile is read by the library
    (the agreement check) instead of the whole level, and the picture and the mask are the full read's."""
    calls = _reads(monkeypatch)
    with open_slide(real_svs, backend=backend) as s:
        assert s.level_count == 1
        calls.clear()
        fast, ds_fast = s.read_downsampled(16.0)
        fast_calls = list(calls)
        full, ds_full = s.read_downsampled(16.0, scaled=False)
    assert len(fast_calls) == 1 and fast_calls[0][1] <= 240 and fast_calls[0][2] <= 240  # one tile, not the level
    assert fast.shape == full.shape and ds_fast == ds_full and fast.flags.c_contiguous
    diff = np.abs(fast.astype(int) - full.astype(int))
    assert diff.mean() < 3.0, diff.mean()
    m_fast, thr_fast = detect_tissue_rgb(fast)
    m_full, thr_full = detect_tissue_rgb(full)
    assert abs(thr_fast - thr_full) <= 2
    iou = (m_fast & m_full).sum() / (m_fast | m_full).sum()
    assert iou > 0.97, iou
    # an RGB tile decoded as YCbCr (the colour transform the Adobe marker turns off) would be far off
    assert np.abs(fast.mean((0, 1)) - full.mean((0, 1))).max() < 2.0


def test_damaged_tile_falls_back_to_the_full_read(tmp_path, real_svs):
    """A tile libjpeg refuses: the shortcut gives up, and the full read finds and records it as before (the tile
    reader then counts it)."""
    from test_slide_files_hostile import corrupt_svs

    one, _ = corrupt_svs(real_svs, tmp_path / "one.svs", "one")
    with open_slide(one) as s:
        fast = s.read_downsampled(16.0)
        boxes_fast = list(s.unreadable_boxes)
    with open_slide(one) as s:
        full = s.read_downsampled(16.0, scaled=False)
        boxes_full = list(s.unreadable_boxes)
    assert boxes_fast and boxes_fast == boxes_full
    assert np.array_equal(fast[0], full[0])


def test_wrong_colours_are_caught_by_the_agreement_check(real_svs, monkeypatch):
    """Were the tiles decoded with the wrong colour transform (no Adobe marker on Aperio's RGB JPEG), the one-tile
    check against the library's read refuses the mosaic and the full read is used."""
    import locpath.wsi.jpeg_scaled as js

    monkeypatch.setattr(js, "_ADOBE_RGB", b"")
    with open_slide(real_svs) as s:
        got = s._read_level_scaled(0, 16.0, 138 * 185, None)
        assert got is None
        out, _ = s.read_downsampled(16.0)
        full, _ = s.read_downsampled(16.0, scaled=False)
    assert np.array_equal(out, full)


def test_tile_tables_are_not_trusted(tmp_path, real_svs):
    """Offsets past the end of the file (a truncated copy), a level size that is not the page's, a file that is not
    a TIFF: no shortcut, and nothing read outside the file."""
    with open(real_svs, "rb") as fh:
        t = find_jpeg_tiles(fh, (2220, 2967))
        assert isinstance(t, JpegTiles) and t.rgb and (t.cols, t.rows) == (10, 13) and len(t.offsets) == 130
        assert find_jpeg_tiles(fh, (2220, 2966)) is None
    cut = tmp_path / "cut.svs"
    with open(real_svs, "rb") as src, open(cut, "wb") as dst:
        data = src.read()
        dst.write(data[:max(t.offsets[i] + t.counts[i] for i in range(len(t.offsets))) - 1])
    with open(cut, "rb") as fh:
        assert find_jpeg_tiles(fh, (2220, 2967)) is None
    txt = tmp_path / "x.svs"
    txt.write_bytes(b"not a tiff at all" * 100)
    with open(txt, "rb") as fh:
        assert find_jpeg_tiles(fh, (2220, 2967)) is None


def test_scales_divide_the_tile_and_never_exceed_the_downsample():
    assert pick_scale(16.0, 240, 240) == 8
    assert pick_scale(7.9, 240, 240) == 4
    assert pick_scale(3.0, 256, 256) == 2
    assert pick_scale(1.9, 256, 256) == 1
    assert pick_scale(16.0, 244, 244) == 4  # 244 = 4 x 61: 1/8 would not join edge to edge
    assert pick_scale(16.0, 250, 250) == 2
    assert pick_scale(16.0, 255, 255) == 1


@pytest.mark.parametrize("photometric", ["rgb", "ycbcr"])
def test_generic_tiff_jpeg_tiles_in_both_colour_models(tmp_path, photometric, monkeypatch):
    """A single-level generic tiled TIFF written by tifffile, JPEG in RGB and in YCbCr: the shortcut is taken and
    matches the full read; the tissue mask of the slide is the full read's."""
    import tifffile

    img = _tissue_disc(1536, 1280, (700, 600), 450, seed=3)
    path = tmp_path / f"g-{photometric}.tif"
    res = 1e4 / 0.5
    tifffile.imwrite(path, img, tile=(256, 256), photometric=photometric, compression="jpeg",
                     compressionargs={"level": 90}, resolution=(res, res), resolutionunit="CENTIMETER",
                     metadata=None)
    calls = _reads(monkeypatch)
    with open_slide(path) as s:
        assert s.level_count == 1
        calls.clear()
        fast, _ = s.read_downsampled(16.0)
        assert len(calls) == 1  # the agreement check's tile
        full, _ = s.read_downsampled(16.0, scaled=False)
        mask = detect_tissue(s, TissueConfig(mask_mpp=8.0)).mask
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3.0
    m_full, _ = detect_tissue_rgb(full)
    assert (mask & m_full).sum() / (mask | m_full).sum() > 0.97


def test_small_downsamples_and_in_memory_slides_keep_the_full_read(real_svs):
    """Below 2x there is no libjpeg scale to use; an in-memory slide has no file: the full read as before."""
    from locpath.wsi.slide import ArraySlide

    with open_slide(real_svs) as s:
        assert s._read_level_scaled(0, 1.5, 10**6, None) is None
    arr = ArraySlide([np.full((512, 512, 3), 200, np.uint8)], mpp=0.5)
    assert arr._read_level_scaled(0, 16.0, 32 * 32, None) is None
    assert arr.read_downsampled(16.0)[0].shape == (32, 32, 3)


def test_tiny_tiles_keep_the_full_read(tmp_path):
    """16-px JPEG tiles: per-tile overhead would cost more than the scaled IDCT saves, so no shortcut."""
    import tifffile

    img = np.full((512, 512, 3), 200, np.uint8)
    for side, taken in ((16, False), (64, True)):
        path = tmp_path / f"tiles-{side}.tif"
        tifffile.imwrite(path, img, tile=(side, side), photometric="rgb", compression="jpeg", metadata=None)
        with open(path, "rb") as fh:
            assert (find_jpeg_tiles(fh, (512, 512)) is not None) == taken, side


def test_tiles_whose_own_markers_change_their_colour_model_are_not_mixed(tmp_path, real_svs):
    """Every tile but the richest (the one checked against the library) carries its own JFIF marker, which makes
    libjpeg read it as YCbCr: the level has two colour models, so the shortcut is refused and the overview is the
    full read's (it was 44/255 off, with every pixel taken for tissue)."""
    import struct

    import tifffile

    jfif = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    with tifffile.TiffFile(real_svs) as t:
        p = t.pages[0]
        offs, cnts = list(p.dataoffsets), list(p.databytecounts)
        at_offs, at_cnts = p.tags["TileOffsets"].valueoffset, p.tags["TileByteCounts"].valueoffset
    data = bytearray(open(real_svs, "rb").read())
    keep = int(np.argmax(cnts))
    for i, (o, c) in enumerate(zip(offs, cnts)):
        if i != keep:
            tile = bytes(data[o:o + c])
            struct.pack_into("<I", data, at_offs + 4 * i, len(data))
            struct.pack_into("<I", data, at_cnts + 4 * i, c + len(jfif))
            data += tile[:2] + jfif + tile[2:]
    mixed = tmp_path / "mixed.svs"
    mixed.write_bytes(bytes(data))
    with open_slide(mixed) as s:
        assert s._read_level_scaled(0, 16.0, 138 * 185, None) is None
        fast, _ = s.read_downsampled(16.0)
        full, _ = s.read_downsampled(16.0, scaled=False)
    assert np.array_equal(fast, full)


def test_a_reduced_level_with_a_fractional_downsample_is_read_at_scale(tmp_path, monkeypatch):
    """A generic TIFF pyramid whose reduced level is a page of its own (tifffile lists it as a second series;
    OpenSlide as level 1) at a downsample of 4.006, as scanners' rounded level sizes give: the level is found by
    its size, the agreement check reads its tile from a rounded origin, and the overview is the full read's."""
    import tifffile
    from PIL import Image

    img = _tissue_disc(2003, 2003, (950, 1050), 650, seed=5)
    small = np.asarray(Image.fromarray(img).resize((500, 500), Image.Resampling.BOX))
    path = tmp_path / "pyramid.tif"
    res = 1e4 / 0.5
    kw = dict(photometric="rgb", compression="jpeg", compressionargs={"level": 90}, metadata=None, tile=(256, 256),
              resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, resolution=(res, res), **kw)
        tif.write(small, subfiletype=1, resolution=(res / 4.006, res / 4.006), **kw)
    calls = _reads(monkeypatch)
    with open_slide(path) as s:
        assert s.level_count == 2 and not float(s.level_downsamples[1]).is_integer()
        assert s.best_level_for_downsample(16.0) == 1
        calls.clear()
        fast, ds_fast = s.read_downsampled(16.0)
        # the agreement check's one tile at level 1, not the 500-px level
        assert len(calls) == 1 and calls[0][0] == 1 and max(calls[0][1:]) <= 256
        assert s._read_level_scaled(1, 16.0 / s.level_downsamples[1], 125 * 125, None) is not None
        full, ds_full = s.read_downsampled(16.0, scaled=False)
    assert fast.shape == full.shape and ds_fast == ds_full
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 2.0
    m_fast, m_full = detect_tissue_rgb(fast)[0], detect_tissue_rgb(full)[0]
    assert (m_fast & m_full).sum() / (m_fast | m_full).sum() > 0.97
