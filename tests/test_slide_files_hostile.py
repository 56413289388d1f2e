"""Hostile slide files through the CLI (a subprocess, as users run it): decompression bombs and other forged TIFF
headers are refused before any pixel is decoded, corrupt JPEG tiles are retried, counted and skipped (or refused when
too many), and no error ever quotes the bytes of the file it names."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib

import numpy as np
import pytest

from servers import cli, shipped

SECRET = "TOPSECRET-root:x:0:0"


# -- forged TIFFs, written byte by byte --------------------------------------------------------------------------
def write_tiff(path, width, height, tile, n_unique=1, loop=False, tile_side=None, extra_page=None):
    """A classic little-endian tiled deflate TIFF declaring width x height pixels. Its tiles point at `n_unique`
    stored copies of one small white tile (1: every offset shares one tile, the decompression bomb). `tile_side`
    declares another tile size than the stored one; `loop` points the IFD chain back at itself; `extra_page`
    (w, h) adds a stripped page (an associated image) declaring that size."""
    data = zlib.compress(np.full((tile, tile, 3), 240, np.uint8).tobytes(), 9)
    n = ((width + tile - 1) // tile) * ((height + tile - 1) // tile)
    out = bytearray(b"II*\x00\0\0\0\0")
    stored = []
    n_unique = n_unique or n
    for _ in range(n_unique):
        stored.append(len(out))
        out += data
    bps = len(out)
    out += struct.pack("<3H", 8, 8, 8)
    res = len(out)
    out += struct.pack("<2I", 40000, 1)  # 40000 px/cm = 0.25 um/px
    offs = len(out)
    out += struct.pack(f"<{n}I", *[stored[i % n_unique] for i in range(n)])
    cnts = len(out)
    out += struct.pack(f"<{n}I", *([len(data)] * n))

    def ifd(entries, nxt):
        at = len(out)
        out.extend(struct.pack("<H", len(entries)))
        for tag, typ, cnt, val in entries:
            out.extend(struct.pack("<HHIHH", tag, typ, cnt, val, 0) if typ == 3 and cnt == 1
                       else struct.pack("<HHII", tag, typ, cnt, val))
        out.extend(struct.pack("<I", nxt))
        return at

    side = tile_side or tile
    first = len(out)
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bps), (259, 3, 1, 8), (262, 3, 1, 2),
               (277, 3, 1, 3), (282, 5, 1, res), (283, 5, 1, res), (284, 3, 1, 1), (296, 3, 1, 3),
               (322, 4, 1, side), (323, 4, 1, side), (324, 4, n, offs), (325, 4, n, cnts)]
    nxt = first if loop else 0
    if extra_page:
        nxt = first + 2 + 12 * len(entries) + 4
    ifd(entries, nxt)
    if extra_page:
        w, h = extra_page
        ifd([(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, bps), (259, 3, 1, 8), (262, 3, 1, 2), (277, 3, 1, 3),
             (273, 4, 1, stored[0]), (278, 4, 1, h), (279, 4, 1, len(data))], 0)
    struct.pack_into("<I", out, 4, first)
    path.write_bytes(bytes(out))
    return path


def run_tiles(path, *extra, limit=20.0):
    t0 = time.monotonic()
    r = cli("tiles", path, *extra, timeout=120)
    return r, time.monotonic() - t0


def assert_one_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("locpath: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_tile_bomb_refused_fast(tmp_path):
    """The issue's 1.2 MB file: 100k x 100k declared, ~150,000 tile offsets at one deflate tile. It ran `locpath
    tiles` for minutes at 4.9 GB; now one line, exit 2, well under a few seconds."""
    bomb = write_tiff(tmp_path / "bomb.tif", 100_000, 100_000, 256)
    assert bomb.stat().st_size < 2_000_000
    r, dt = run_tiles(bomb)
    line = assert_one_line(r, "bomb.tif", "point at another tile's data")
    assert dt < 10, dt
    r, dt = run_tiles(bomb, "--mpp-override", "0.25", "--backend", "tiffslide")
    assert_one_line(r, "bomb.tif")
    assert dt < 10 and line


@pytest.mark.parametrize("kind,needle", [
    ("unique", "decompression bomb"),  # every tile its own copy: nothing shared, but ~1000x more pixels than bytes
    ("huge", "declares"),  # 2M x 2M pixels
    ("tile", "-pixel tiles"),  # 65536 x 65536-pixel tiles (one would decode to 12 GB)
    ("zero", "zero size"),
    ("loop", "loop"),
    ("label", "image 1 has 60000x60000-pixel strips"),  # a small slide, a 60k x 60k associated image in one strip
])
def test_forged_headers_refused(tmp_path, kind, needle):
    p = tmp_path / f"{kind}.tif"
    if kind == "unique":
        write_tiff(p, 40_000, 40_000, 1024, n_unique=None)
    elif kind == "huge":
        write_tiff(p, 2_000_000, 2_000_000, 4096)
    elif kind == "tile":
        write_tiff(p, 2048, 2048, 256, tile_side=65536)
    elif kind == "zero":
        write_tiff(p, 0, 2048, 256)
    elif kind == "loop":
        write_tiff(p, 512, 512, 256, loop=True)
    else:
        write_tiff(p, 2048, 2048, 256, n_unique=64, extra_page=(60_000, 60_000))
    r, dt = run_tiles(p)
    assert_one_line(r, f"{kind}.tif", needle)
    assert dt < 10, dt


def test_truncated_and_text_files_quote_no_bytes(tmp_path, real_svs):
    """A truncated slide and a text file renamed .svs: one line each, naming the file, quoting none of its bytes
    (tifffile's own error puts a file's first bytes in its message)."""
    text = tmp_path / "secret.svs"
    text.write_text(SECRET + "\n" * 100)
    r, _ = run_tiles(text)
    line = assert_one_line(r, "secret.svs")
    assert "TOPSECRET" not in r.stderr + r.stdout and "root:x" not in line
    tiff_text = tmp_path / "header.tif"
    tiff_text.write_bytes(b"II*\x00" + SECRET.encode() * 4)
    r, _ = run_tiles(tiff_text)
    assert_one_line(r, "header.tif")
    assert "TOPSECRET" not in r.stderr + r.stdout
    cut = tmp_path / "cut.svs"
    cut.write_bytes(real_svs.read_bytes()[: real_svs.stat().st_size // 3])
    r, _ = run_tiles(cut)
    assert "Traceback" not in r.stderr
    assert r.returncode in (0, 2), r.stderr[-2000:]
    if r.returncode == 2:
        assert_one_line(r, "cut.svs")


# -- corrupt JPEG tiles in a real SVS --------------------------------------------------------------------------------
def corrupt_svs(src, dst, which: str):
    """A copy of the real SVS with garbage (an invalid JPEG marker, repeated) written in the middle of level-0 tiles
    under tissue: one tile, or every tissue tile ('most')."""
    import tifffile

    from locpath.wsi import GridConfig, TissueConfig, open_slide
    from locpath.wsi.extract import plan_tiles

    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as t:
        page = t.pages[0]
        offs, cnts, tw = list(page.dataoffsets), list(page.databytecounts), page.tilewidth
        cols = (page.imagewidth + tw - 1) // tw
    with open_slide(src) as s:
        coords = plan_tiles(s, GridConfig(target_mpp=0.5, tile_size=224), TissueConfig(mask_mpp=8.0)).grid.coords
    under = sorted({int(y // tw) * cols + int(x // tw) for x, y in coords})
    hit = [under[len(under) // 2]] if which == "one" else under
    with open(dst, "r+b") as f:
        for i in hit:
            f.seek(offs[i] + cnts[i] // 2)
            f.write(b"\xff\x3f" * 64)  # libjpeg: corrupt data; imagecodecs: unsupported marker
    return dst, len(hit)


def test_corrupt_tile_skipped_with_warning(tmp_path, real_svs):
    """One damaged JPEG tile: OpenSlide's handle went into its sticky error state and `ask` ended in a traceback.
    Now: a fresh handle, tiffslide tried, then the tile is counted and skipped with one warning; the answer comes."""
    slide, _ = corrupt_svs(real_svs, tmp_path / "one.svs", "one")
    r = cli("ask", shipped(), slide, "What is the diagnosis?", "--json", "--cache-dir", tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "unreadable" in ln]
    assert len(warnings) == 1 and "one.svs" in warnings[0] and " of " in warnings[0], r.stderr
    out = json.loads(r.stdout)
    assert out["answers"][0]["answer"].strip()


def test_mostly_corrupt_slide_refused(tmp_path, real_svs):
    slide, n = corrupt_svs(real_svs, tmp_path / "most.svs", "most")
    assert n > 10
    r = cli("ask", shipped(), slide, "What is the diagnosis?", "--json", "--cache-dir", tmp_path / "cache")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "most.svs" in lines[0] and "unreadable" in lines[0], r.stderr


# -- the pinned opening ---------------------------------------------------------------------------------------------
def test_pinned_file_survives_a_swap(tmp_path, small_svs):
    """What was opened (and checked) is what is read: swapping the path for a link afterwards changes nothing, and
    a link in place of a pinned path is refused."""
    import dataclasses

    from locpath.errors import SlideError
    from locpath.wsi import open_slide
    from locpath.wsi.identity import pin

    p = tmp_path / "s.svs"
    shutil.copy(small_svs, p)
    with pin(p) as f:
        ident = f.identity()
        outside = tmp_path / "outside.txt"
        outside.write_text(SECRET)
        p.unlink()
        os.symlink(outside, p)
        with open_slide(f) as s:
            assert s.dimensions[0] > 1000 and s.path == str(p)
        now = f.identity()  # the same file and bytes; unlinking its name set its status change time
        assert dataclasses.replace(now, ctime_ns=ident.ctime_ns) == ident and now.ctime_ns != ident.ctime_ns
    with pytest.raises(SlideError, match="symbolic link"):
        pin(p)


def test_banded_overview_read_is_the_single_read(tmp_path, real_svs):
    """The tissue overview of a single-level slide, where it is not read at JPEG scale (test_jpeg_scaled.py), is
    decoded in row bands by two threads: the same pixels as one read (bands were really used), and on a slide with a damaged tile the same result and the same unreadable
    boxes as the one-thread read, which goes piece by piece."""
    from locpath.wsi import open_slide
    from locpath.wsi.slide import Slide

    calls = []
    orig = Slide.read_region

    def counting(self, level, x, y, w, h):
        calls.append(h)
        return orig(self, level, x, y, w, h)

    one, _ = corrupt_svs(real_svs, tmp_path / "one.svs", "one")
    for path in (real_svs, one):
        got = {}
        for workers in (1, 2):
            with open_slide(path) as s:
                Slide.read_region = counting
                try:
                    calls.clear()
                    got[workers] = (*s.read_downsampled(16.0, workers=workers, scaled=False), list(s.unreadable_boxes),
                                    len(calls))
                finally:
                    Slide.read_region = orig
        assert np.array_equal(got[1][0], got[2][0]) and got[1][1] == got[2][1] and got[1][2] == got[2][2]
        if path == real_svs:
            assert got[1][3] == 1 and got[2][3] == 2 and not got[2][2]  # one read against two bands
        else:
            assert got[2][2] and got[2][3] > 2  # a band failed: the strip was read piece by piece


def test_identity_recorded_before_ctimes_still_checks_the_rest(tmp_path, small_svs):
    """A registration stored before ctimes were kept reads back with ctime None and is checked on everything
    else; one with a ctime refuses a chmod (the only way to tell an in-place edit with the mtime put back)."""
    import dataclasses

    from locpath.wsi.identity import FileIdentity, SlideChanged, pin

    p = tmp_path / "s.svs"
    shutil.copy(small_svs, p)
    with pin(p) as f:
        ident = f.identity()
    assert ident.ctime_ns == p.stat().st_ctime_ns
    assert FileIdentity.from_json(ident.to_json()) == ident
    old = json.loads(ident.to_json())
    del old["ctime_ns"]
    legacy = FileIdentity.from_json(json.dumps(old))
    assert legacy == dataclasses.replace(ident, ctime_ns=None)
    time.sleep(0.01)
    os.chmod(p, 0o600)
    pin(p, legacy).close()  # no ctime recorded: size, mtime and fingerprint still match
    with pytest.raises(SlideChanged, match="status change time differs"):
        pin(p, ident)
    with pytest.raises(SlideChanged, match="size or modification time"):
        pin(p, dataclasses.replace(legacy, mtime_ns=legacy.mtime_ns + 1))
