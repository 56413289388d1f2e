"""Streams tiles as uint8 NHWC batches from background threads through a bounded queue.

Memory stays flat: at most `prefetch` batches are in flight, whatever the slide's size. A tile the slide libraries
cannot decode (corrupt data, after the backend's own retries) is skipped: its batch marks it, the reader counts it,
and more than MAX_UNREADABLE_FRACTION of the grid unreadable stops the read with one SlideError.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import SlideError
from .grid import TileGrid
from .slide import MAX_UNREADABLE_FRACTION, Slide, UnreadableRegion


@dataclass
class TileBatch:
    tiles: np.ndarray  # uint8 (B, tile_size, tile_size, 3)
    coords: np.ndarray  # int64 (B, 2), level-0 top-left
    start: int  # index of the first tile in the grid
    ok: np.ndarray | None = None  # bool (B,): False for a tile that could not be decoded (its pixels are white)


class TileReader:
    """Iterate a grid's tiles in order, read by `workers` threads, `prefetch` batches ahead."""

    def __init__(
        self,
        slide: Slide,
        grid: TileGrid,
        batch_size: int = 64,
        workers: int = 2,
        prefetch: int = 4,
        progress: bool | None = None,
        desc: str = "tiles",
    ):
        if batch_size < 1 or workers < 1 or prefetch < 1:
            raise ValueError("batch_size, workers and prefetch must be >= 1")
        self.slide = slide
        self.grid = grid
        self.batch_size = batch_size
        self.workers = workers
        self.prefetch = max(prefetch, workers)
        self.progress = progress
        self.desc = desc
        self.tiles_read = 0
        self.unreadable = 0  # tiles skipped because the libraries could not decode them
        self._unreadable_lock = threading.Lock()
        self._local = threading.local()

    def __len__(self) -> int:
        return (len(self.grid) + self.batch_size - 1) // self.batch_size

    def _handle(self) -> Slide:
        h = getattr(self._local, "slide", None)
        if h is None:
            h = self.slide.reopen()
            self._local.slide = h
        return h

    def read_tile(self, slide: Slide, x: int, y: int) -> np.ndarray:
        g = self.grid
        img = slide.read_region(g.read_level, x, y, g.read_size, g.read_size)
        if g.read_size != g.tile_size:
            img = np.asarray(
                Image.fromarray(img).resize((g.tile_size, g.tile_size), Image.Resampling.BILINEAR)
            )
        return img

    def _read_batch(self, start: int) -> TileBatch:
        slide = self._handle()
        coords = self.grid.coords[start : start + self.batch_size]
        out = np.empty((len(coords), self.grid.tile_size, self.grid.tile_size, 3), dtype=np.uint8)
        ok = np.ones(len(coords), bool)
        for i, (x, y) in enumerate(coords):
            try:
                out[i] = self.read_tile(slide, int(x), int(y))
            except UnreadableRegion:
                out[i] = 255
                ok[i] = False
                self._count_unreadable()
        return TileBatch(tiles=out, coords=coords.copy(), start=start, ok=ok)

    def _count_unreadable(self) -> None:
        """Stop as soon as the slide holds too many unreadable tiles to answer from (not after reading it all)."""
        with self._unreadable_lock:
            self.unreadable += 1
            n = len(self.grid)
            if self.unreadable > MAX_UNREADABLE_FRACTION * n:
                raise SlideError(f"{self.slide.path}: more than {MAX_UNREADABLE_FRACTION:.0%} of its {n} tiles are "
                                 f"unreadable (corrupt data; {self.unreadable} so far): the file is damaged")

    def __iter__(self) -> Iterator[TileBatch]:
        starts = list(range(0, len(self.grid), self.batch_size))
        show = self.progress if self.progress is not None else (len(self.grid) >= 2000 and sys.stderr.isatty())
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=len(self.grid), desc=self.desc, unit="tile", file=sys.stderr)
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="locpath-tiles")
        pending: list[Future] = []
        try:
            it = iter(starts)
            for s in it:
                pending.append(pool.submit(self._read_batch, s))
                if len(pending) >= self.prefetch:
                    break
            while pending:
                batch = pending.pop(0).result()  # re-raises a worker's SlideError here
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(self._read_batch, nxt))
                self.tiles_read += len(batch.coords)
                if bar is not None:
                    bar.update(len(batch.coords))
                yield batch
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()
