"""A tiled-JPEG TIFF level decoded at 1/2, 1/4 or 1/8 scale, for the tissue overview.

A single-level slide (a scanner's region export, a cropped SVS) has no coarse level, so its tissue mask was a decode
of every pixel at full size and a resize: the largest fixed cost of a cold question on it, and fresh buffers of the
level's full size. libjpeg decodes a JPEG at 1/8 scale without the full inverse DCT (Pillow's `Image.draft`), so a
tile of a JPEG-tiled TIFF page comes out already 8x smaller. Used only where the page's tiles are the image as the
slide libraries show it (Aperio SVS, generic tiled TIFF: no overlaps, no per-tile offsets); anything else, or any
tile that does not decode to the expected size, returns None and the caller reads the level as before.

Nothing read from the file is trusted: tile offsets and byte counts are checked against the file's size and the
level's tile count before a byte is read, and the tile stream is the TIFF's own (JPEGTables joined as libtiff does).
"""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass

import numpy as np

SCALES = (8, 4, 2)  # what libjpeg's scaled IDCT gives for free
MAX_TILE_BYTES = 1 << 24  # a JPEG tile of a few hundred pixels is tens of kB; more is not a tile we decode here
MIN_TILE_SIDE = 64  # smaller tiles cost more in per-tile overhead than the scaled IDCT saves
MAX_TILES = 1 << 18  # a level of more tiles is left to the library's own (C) decoding
MAX_PAGES = 64  # top-level pages looked at for the level's size (slides have a handful)
# Adobe APP14 with transform 0: the three components are R, G, B (no YCbCr). Aperio writes photometric RGB JPEG
# tiles without JFIF/Adobe markers and with component ids 0, 1, 2, which libjpeg would otherwise take for YCbCr.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6


@dataclass(frozen=True)
class JpegTiles:
    """Where a level's JPEG tiles lie in the file, as checked."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tables: bytes
    rgb: bool  # photometric RGB (no colour transform) rather than YCbCr

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_h)


def pick_scale(relative_downsample: float, tile_w: int, tile_h: int) -> int:
    """The largest libjpeg scale not coarser than the wanted downsample that divides the tile size (so tiles join
    edge to edge); 1 where none does."""
    for s in SCALES:
        if s <= relative_downsample * (1 + 1e-6) and tile_w % s == 0 and tile_h % s == 0:
            return s
    return 1


def find_jpeg_tiles(fh, size: tuple[int, int]) -> JpegTiles | None:
    """The tiled, 8-bit, 3-sample, chunky JPEG page whose size is `size` (the level as the library sees it), or None.
    `fh` is an open binary file (the pinned one)."""
    import tifffile

    try:
        tif = tifffile.TiffFile(fh, _multifile=False)  # never opens a file the slide did not name
    except Exception:  # not a TIFF, or one tifffile cannot parse: the slide library reads it as before
        return None
    try:
        # the first series' levels (SubIFD pyramids, Aperio), then the top-level pages: a generic TIFF's reduced
        # levels are pages OpenSlide counts as levels and tifffile may list as series of their own
        series = tif.series[0] if tif.series else None
        levels = [lv.pages[0] for lv in series.levels] if series is not None else []
        top = (tif.pages[k] for k in range(min(len(tif.pages), MAX_PAGES)))  # parsed only if no level matched
        for page in itertools.chain(levels, top):
            if page is None or (int(page.imagewidth), int(page.imagelength)) != tuple(size):
                continue
            if not (page.is_tiled and int(page.compression) == 7 and page.bitspersample == 8
                    and page.samplesperpixel == 3 and int(page.planarconfig) == 1 and page.imagedepth == 1
                    and int(page.photometric) in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)):
                return None
            tw, th = int(page.tilewidth), int(page.tilelength)
            offs, cnts = tuple(int(v) for v in page.dataoffsets), tuple(int(v) for v in page.databytecounts)
            want = -(-page.imagewidth // tw) * -(-page.imagelength // th)
            fsize = os.fstat(fh.fileno()).st_size
            if (min(tw, th) < MIN_TILE_SIDE or want > MAX_TILES or len(offs) != want or len(cnts) != want
                    or any(c <= 0 or c > MAX_TILE_BYTES or o < 0 or o + c > fsize for o, c in zip(offs, cnts))):
                return None  # sparse tiles, or offsets outside the file: the library's reader says what is wrong
            tables = bytes(page.jpegtables or b"")
            return JpegTiles(int(page.imagewidth), int(page.imagelength), tw, th, offs, cnts, tables,
                             int(page.photometric) == _PHOTOMETRIC_RGB)
        return None
    except Exception:
        return None
    finally:
        tif.close()  # the handle is the caller's: tifffile closes only what it opened


def _tile_stream(t: JpegTiles, data: bytes) -> bytes | None:
    """One tile's complete JPEG: libtiff's abbreviated stream with the shared tables (SOI ... EOI) put in front."""
    if data[:2] != b"\xff\xd8":
        return None
    body = data[2:]
    if t.tables:
        if t.tables[:2] != b"\xff\xd8" or t.tables[-2:] != b"\xff\xd9":
            return None
        body = t.tables[2:-2] + body
    return b"\xff\xd8" + (_ADOBE_RGB if t.rgb else b"") + body


def decode_scaled(fh, t: JpegTiles, scale: int, pool=None) -> np.ndarray | None:
    """The whole level at 1/scale (ceil of its size), RGB uint8; None if any tile does not decode to its expected
    size or the tiles do not share one colour signature (the caller then reads the level at full size, which finds
    and records damaged tiles)."""
    from PIL import Image

    sw, sh = t.tile_w // scale, t.tile_h // scale
    out = np.empty((t.rows * sh, t.cols * sw, 3), np.uint8)
    fd = fh.fileno()

    def one(i: int):
        """The tile's colour signature once placed, or None. Never raises, so every tile has finished (and no
        `pread` is left running on the descriptor) when the caller closes the file."""
        try:
            data = os.pread(fd, t.counts[i], t.offsets[i])
            stream = _tile_stream(t, data) if len(data) == t.counts[i] else None
            if stream is None:
                return None
            with Image.open(io.BytesIO(stream), formats=["JPEG"]) as im:
                if im.size != (t.tile_w, t.tile_h):
                    return None
                sig = _colour_signature(im)
                im.draft("RGB", (sw, sh))
                if im.size != (sw, sh) or im.mode != "RGB":
                    return None
                a = np.asarray(im)
        except Exception:  # a tile libjpeg refuses (corrupt data): the full-size read deals with it
            return None
        r, c = divmod(i, t.cols)
        out[r * sh:(r + 1) * sh, c * sw:(c + 1) * sw] = a
        return sig

    n = len(t.offsets)
    sigs = list(pool.map(one, range(n))) if pool is not None else [one(i) for i in range(n)]
    # one colour model for the whole level: the caller checks one tile against the library, which says nothing of
    # a tile whose own JFIF or Adobe marker makes libjpeg read it otherwise
    if any(sig is None for sig in sigs) or len(set(sigs)) != 1:
        return None
    return out[:-(-t.height // scale), :-(-t.width // scale)]


def _colour_signature(im) -> tuple:
    """What decides how libjpeg turns a tile's components into RGB: its JFIF and Adobe markers and its components'
    ids and sampling factors (Pillow's `layer`: id, h, v, table)."""
    layers = tuple(tuple(layer[:3]) for layer in getattr(im, "layer", ()) or ())
    return ("jfif" in im.info, im.info.get("adobe_transform"), layers)
