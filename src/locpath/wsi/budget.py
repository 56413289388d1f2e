"""Budgets a TIFF-family slide (SVS, generic TIFF, NDPI, SCN, BIF, ...) must fit before any pixel is decoded.

A TIFF declares its size and where its tiles are; nothing makes those honest. A 1.2 MB file can declare
100,000 x 100,000 pixels with all ~150,000 tile offsets pointing at one small deflate tile, and the slide libraries
then decode that tile over and over (minutes, gigabytes). So the header (tifffile, which reads tags only) is checked
first against the limits below; a file over one is refused with one line naming the file and the limit.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import SlideError

# Real 40x slides are ~100k x 100k (1e10 px) with real data; the largest scans reach ~250k x 150k. The size limit
# only stops absurd declarations: a forged file stays within it easily, which is why the checks after it matter.
MAX_LEVEL_PIXELS = 1 << 36  # ~6.9e10 px per page (262k x 262k)
# One tile (or strip) is decoded whole: 2**26 px is 192 MiB of RGB. Real tiles are 240-1024 px on a side (4096 at
# most), associated images a few megapixels.
MAX_CHUNK_PIXELS = 1 << 26
MAX_CHUNKS = 1 << 22  # tiles per page: ~4.2M (a 100k x 100k level holds ~174k tiles of 240 px)
MAX_PAGES = 512  # IFDs in the file (real slides hold a handful: levels, label, macro, thumbnail)
# A real slide never shares tile data between tiles; some writers point blank tiles at one shared blank tile, but
# never a large part of a level.
MAX_SHARED_FRACTION = 0.05
# Decoded bytes of every page over the file's size: JPEG slides run 10-30x, lossless background-heavy slides a few
# hundred (a slide 99 % blank in deflate: ~170x); beyond this the file does not hold the pixels it declares.
MAX_EXPANSION = 500
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGIC
    except OSError:
        return False


def check_tiff_budget(source: str | os.PathLike, name: str | None = None) -> None:
    """Refuse a TIFF whose header declares more than the budgets allow (SlideError); other formats pass through.
    `source`: what is opened (a pinned /proc/self/fd path); `name`: what messages call the file."""
    name = name or str(source)
    if not is_tiff(source):
        return
    import tifffile

    from .liblog import collecting

    try:  # what tifffile logs about the header (a loop it cut short, a missing tag) is dropped: refused here or by
        # the slide library, in one line
        # a file object: given a name, tifffile resolves links itself (and would read what the name now leads to)
        with collecting([]), open(source, "rb") as fh, tifffile.TiffFile(fh, _multifile=False) as tif:
            size = os.fstat(tif.filehandle.fileno()).st_size if hasattr(tif.filehandle, "fileno") else None
            pages = _pages(tif, name)
            decoded = sum(_check_page(p, i, name) for i, p in enumerate(pages))
    except SlideError:
        raise
    except Exception as exc:  # tifffile's own error kinds; never quote the file's bytes
        raise SlideError(f"{name}: not a readable TIFF ({_describe(exc)})") from None
    size = size or os.path.getsize(source)
    if decoded > MAX_EXPANSION * max(size, 1):
        raise SlideError(f"{name}: declares {decoded / 1e9:.1f} GB of pixels in a {size / 1e6:.1f} MB file (more than "
                         f"{MAX_EXPANSION}x its size): not a real slide (a decompression bomb?)")


def _pages(tif, name: str) -> list:
    """Every page: the main IFD chain and the SubIFD pyramids (OME-TIFF style), at most MAX_PAGES."""
    pages, seen = [], set()
    n = 0
    for page in tif.pages:
        n += 1
        if n > MAX_PAGES:
            raise SlideError(f"{name}: more than {MAX_PAGES} images (IFDs) in the file: not a real slide")
        if page is None:
            continue
        if page.offset in seen:
            raise SlideError(f"{name}: its image directories form a loop")
        seen.add(page.offset)
        pages.append(page)
        for off in (page.subifds or ())[:MAX_PAGES]:
            if off in seen:
                continue
            seen.add(off)
            pages.append(tifffile_page(tif, off))
            if len(pages) > MAX_PAGES:
                raise SlideError(f"{name}: more than {MAX_PAGES} images (IFDs) in the file: not a real slide")
    if not pages:
        raise SlideError(f"{name}: the TIFF holds no image")
    return pages


def tifffile_page(tif, offset: int):
    import tifffile

    tif.filehandle.seek(offset)
    return tifffile.TiffPage(tif, index=0)


def _check_page(page, i: int, name: str) -> int:
    """The page's decoded size in bytes, after its own budgets."""
    w, h, d = int(page.imagewidth), int(page.imagelength), int(page.imagedepth or 1)
    if w <= 0 or h <= 0 or d <= 0:
        raise SlideError(f"{name}: image {i} declares a zero size ({w}x{h})")
    if w * h * d > MAX_LEVEL_PIXELS:
        raise SlideError(f"{name}: image {i} declares {w}x{h} pixels (more than {MAX_LEVEL_PIXELS:.2e}): not a real "
                         "slide")
    if page.is_tiled:
        cw, ch = int(page.tilewidth), int(page.tilelength)
    else:
        cw, ch = w, min(h, int(page.rowsperstrip or h))
    if cw <= 0 or ch <= 0 or cw * ch * int(page.tiledepth if page.is_tiled else 1) > MAX_CHUNK_PIXELS:
        raise SlideError(f"{name}: image {i} has {cw}x{ch}-pixel {'tiles' if page.is_tiled else 'strips'} (more than "
                         f"{MAX_CHUNK_PIXELS:.2e} pixels each): not a real slide")
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    if len(offsets) > MAX_CHUNKS:
        raise SlideError(f"{name}: image {i} declares {len(offsets)} tiles (more than {MAX_CHUNKS})")
    used = offsets[counts > 0]
    shared = len(used) - len(np.unique(used))
    if len(used) > 16 and shared > MAX_SHARED_FRACTION * len(used):
        raise SlideError(f"{name}: {shared} of the {len(used)} tiles of image {i} point at another tile's data (a real "
                         "slide never shares tile data): not a real slide")
    spp, bps = int(page.samplesperpixel or 1), int(np.max(page.bitspersample) if page.bitspersample else 8)
    return w * h * d * spp * max(bps, 1) // 8


def _describe(exc: Exception) -> str:
    """A library error as one line that quotes none of the file's bytes (tifffile puts the header in some)."""
    from .slide import _one_line

    return _one_line(exc)
