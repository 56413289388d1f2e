"""One slide interface with interchangeable backends behind a factory (TRIDENT-style).

Coordinates are always level-0 pixels; `read_region` returns uint8 RGB (H, W, 3) arrays with the
alpha channel composited onto white, so transparent (unscanned) areas read as background.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
import numpy as np

from ..errors import SlideError, warn
from .liblog import collecting

WHITE = 255


# Scanners and interrupted copies leave a few damaged tiles in real slides: those are skipped (one warning). A slide
# with more than this fraction of its tissue tiles (or of an overview strip) unreadable is refused: its answer would
# rest on too little (one damaged 240-px storage tile spoils up to four 224-px grid tiles).
MAX_UNREADABLE_FRACTION = 0.10


class UnreadableRegion(SlideError):
    """Pixels the slide libraries could not decode (corrupt tile data), after every retry."""


@dataclass(frozen=True)
class SlideInfo:
    """What a user asks first about a slide."""

    path: str
    backend: str
    vendor: str | None
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str  # "metadata", "override" or "none"
    magnification: float | None
    associated_images: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "magnification": self.magnification,
            "associated_images": list(self.associated_images),
        }


class Slide(ABC):
    """A whole-slide image. Subclasses wrap one reading library each."""

    backend_name = "abstract"

    def __init__(self, path: str | os.PathLike, mpp_override: float | None = None, source: str | None = None):
        self.path = str(path)  # the file's name, in every message
        self.source = str(source or path)  # what the library opens (a pinned file's /proc/self/fd entry)
        self._mpp_override = mpp_override
        self.library_messages: list[str] = []  # what tifffile/tiffslide logged while reading this slide
        self._pin = None  # the PinnedFile this slide owns (closed with it)
        self.unreadable_boxes: list[tuple[int, int, int, int]] = []  # level-0 x, y, w, h the overview could not decode

    # -- what each backend provides -------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]: ...

    @property
    @abstractmethod
    def metadata_mpp(self) -> float | None:
        """Level-0 microns per pixel as recorded in the file, or None."""

    @property
    def vendor(self) -> str | None:
        return None

    @property
    def associated_images(self) -> tuple[str, ...]:
        return ()

    def read_associated(self, name: str) -> np.ndarray:
        raise SlideError(f"{self.path}: no associated image named {name!r}")

    @abstractmethod
    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read RGB uint8 (h, w, 3) at `level`, top-left (x, y) in level-0 pixels."""

    def reopen(self) -> "Slide":
        """A fresh handle on the same file, for use from another thread."""
        return self

    def close(self) -> None:
        self.report_library_messages()
        if self._pin is not None:
            self._pin.close()
            self._pin = None

    def decode_errors(self) -> tuple[type[Exception], ...]:
        """The library's errors for pixel data it cannot decode (a corrupt tile: retried, then skipped); any other
        error (a disk gone) stops the read."""
        return ()

    def _recover(self, level: int, x: int, y: int, w: int, h: int, exc: Exception) -> np.ndarray:
        """A read the library failed: backends that can retry (another handle, another library) override this."""
        raise exc

    def report_library_messages(self) -> None:
        """One warning line for whatever the slide library complained about while this slide was read."""
        if self.library_messages:
            n = len(self.library_messages)
            warn(f"{self.path}: the slide library reported {n} problem{'s' if n > 1 else ''} reading this file "
                 f"({self.library_messages[0]}{'; ...' if n > 1 else ''}); the pixels it could read were used")
            self.library_messages = []

    # -- shared behaviour -----------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float | None:
        return self._mpp_override if self._mpp_override is not None else self.metadata_mpp

    @property
    def mpp_source(self) -> str:
        if self._mpp_override is not None:
            return "override"
        return "metadata" if self.metadata_mpp is not None else "none"

    def require_mpp(self) -> float:
        mpp = self.mpp
        if mpp is None:
            raise SlideError(
                f"{self.path}: the slide records no microns-per-pixel; pass --mpp-override "
                "(e.g. 0.25 for 40x, 0.5 for 20x)"
            )
        return mpp

    @property
    def magnification(self) -> float | None:
        mpp = self.mpp
        return None if mpp is None else round(10.0 / mpp, 2)

    def best_level_for_downsample(self, downsample: float) -> int:
        """Deepest level whose downsample does not exceed `downsample` (never upsample from a coarser level)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} out of range (slide has {self.level_count})")
        if w <= 0 or h <= 0:
            raise SlideError(f"{self.path}: empty region {w}x{h}")
        try:
            with collecting(self.library_messages):
                try:
                    out = self._read(level, int(x), int(y), int(w), int(h))
                except SlideError:
                    raise
                except self.decode_errors() as exc:
                    out = self._recover(level, int(x), int(y), int(w), int(h), exc)
        except SlideError:
            raise
        except Exception as exc:  # the libraries raise many types; name the file and the problem
            kind = UnreadableRegion if isinstance(exc, self.decode_errors()) else SlideError
            raise kind(f"{self.path}: cannot read region at level {level} ({x},{y}) {w}x{h}: "
                       f"{_one_line(exc).replace(self.source, self.path)}") from None
        return out

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB thumbnail no larger than max_size on its long side, and its level-0 downsample."""
        w0, h0 = self.dimensions
        ds = max(w0, h0) / max_size
        return self.read_downsampled(max(ds, 1.0))

    def read_downsampled(self, downsample: float, strip_rows: int = 256, workers: int | None = None,
                         scaled: bool = True) -> tuple[np.ndarray, float]:
        """The whole slide at about `downsample`, read from the best level in horizontal strips and resized, so
        memory is bounded by the output plus one strip, not by the source level. A large strip is decoded by
        `workers` threads in row bands (the libraries decode outside the GIL): a single-level slide's tissue mask
        is a decode of the whole image, the largest fixed cost of a cold question on it. Where that level is JPEG
        tiles in a TIFF (and `scaled`), its tiles are decoded at 1/2-1/8 scale instead (wsi/jpeg_scaled.py)."""
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        w0, h0 = self.dimensions
        tw, th = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        workers = max(1, min(2, os.cpu_count() or 1) if workers is None else workers)
        with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
            small = self._read_level_scaled(level, lw / tw, tw * th, pool) if scaled else None
            if small is not None:  # already near the size wanted: one resize, no full-size strips
                if small.shape[:2] != (th, tw):
                    small = np.asarray(Image.fromarray(small).resize((tw, th), Image.Resampling.BILINEAR))
                return np.ascontiguousarray(small), w0 / tw
            out = np.empty((th, tw, 3), np.uint8)
            scale = lh / th  # source rows per output row
            for r0 in range(0, th, strip_rows):
                r1 = min(th, r0 + strip_rows)
                s0 = int(np.floor(r0 * scale))
                s1 = min(lh, max(s0 + 1, int(np.ceil(r1 * scale))))
                strip = self._read_rows(level, s0, lw, s1 - s0, pool, workers)
                if strip.shape[:2] != (r1 - r0, tw):
                    strip = np.asarray(Image.fromarray(strip).resize((tw, r1 - r0), Image.Resampling.BILINEAR))
                out[r0:r1] = strip
        return out, w0 / tw

    def _scaled_source(self) -> str | None:
        """The TIFF whose JPEG tiles are this slide's levels as read (wsi/jpeg_scaled.py), or None."""
        return None

    def _read_level_scaled(self, level: int, relative_ds: float, out_pixels: int, pool) -> np.ndarray | None:
        """The level decoded at a libjpeg scale near `relative_ds`, or None where that does not apply: not a tiled
        JPEG TIFF level, no scale of at least 2, a mosaic larger than 4x the output (a huge single-level slide keeps
        the strip-bounded read), or a tile that does not decode (the full read finds and records damaged tiles)."""
        from . import jpeg_scaled

        src = self._scaled_source()
        if src is None or relative_ds < 2:
            return None
        with open(src, "rb") as fh:
            with collecting([]):  # what tifffile says of the file is said by the library's own read, if it matters
                tiles = jpeg_scaled.find_jpeg_tiles(fh, self.level_dimensions[level])
            if tiles is None:
                return None
            s = jpeg_scaled.pick_scale(relative_ds, tiles.tile_w, tiles.tile_h)
            mosaic = (tiles.rows * tiles.tile_h // s) * (tiles.cols * tiles.tile_w // s)
            if s < 2 or mosaic > 4 * out_pixels + (1 << 20):
                return None
            small = jpeg_scaled.decode_scaled(fh, tiles, s, pool)
        return small if small is not None and self._scaled_agrees(level, tiles, s, small) else None

    def _scaled_agrees(self, level: int, tiles, s: int, small: np.ndarray, tolerance: float = 4.0) -> bool:
        """The richest tile (most bytes) as the library reads it, averaged s x s, against its scaled decode: a
        colour transform or a tile layout the raw mosaic gets wrong shows here, and the full read is used. Where the
        level's downsample is not whole (Aperio's 4.0001), the tile's level-0 origin is rounded: the library may then
        start a pixel off, which moves s x s means far less than the tolerance on tissue, and only ever costs the
        shortcut, never the overview."""
        ds = self.level_downsamples[level]
        i = max(range(len(tiles.counts)), key=tiles.counts.__getitem__)
        r, c = divmod(i, tiles.cols)
        x, y = c * tiles.tile_w, r * tiles.tile_h
        w, h = min(tiles.tile_w, tiles.width - x) // s * s, min(tiles.tile_h, tiles.height - y) // s * s
        if w < s or h < s:
            return False
        try:
            full = self.read_region(level, int(round(x * ds)), int(round(y * ds)), w, h).astype(np.float32)
        except SlideError:
            return False
        mean = full.reshape(h // s, s, w // s, s, 3).mean(axis=(1, 3))
        got = small[y // s:y // s + h // s, x // s:x // s + w // s].astype(np.float32)
        return got.shape == mean.shape and float(np.abs(got - mean).mean()) <= tolerance

    def _read_rows(self, level: int, s0: int, lw: int, rows: int, pool, workers: int,
                   band_pixels: int = 1 << 20) -> np.ndarray:
        """Level rows [s0, s0 + rows) at full width: in `workers` row bands read at once where the strip is large
        and the level's downsample is a whole number (so each band's level-0 origin maps back to its exact row:
        the bands join into the same pixels as one read); otherwise, or where a band cannot be decoded, as one
        strip (_read_strip, which reads a damaged strip piece by piece)."""
        ds = self.level_downsamples[level]
        if pool is None or rows * lw < 2 * band_pixels or not float(ds).is_integer():
            return self._read_strip(level, int(round(s0 * ds)), lw, rows)
        step = -(-rows // workers)
        bands = [(r, min(step, rows - r)) for r in range(0, rows, step)]
        try:
            parts = list(pool.map(lambda b: self.read_region(level, 0, int((s0 + b[0]) * ds), lw, b[1]), bands))
        except UnreadableRegion:
            return self._read_strip(level, int(round(s0 * ds)), lw, rows)
        return np.concatenate(parts, axis=0)

    def _read_strip(self, level: int, y0: int, lw: int, rows: int, piece: int = 256) -> np.ndarray:
        """A full-width strip; where the library cannot decode it (a corrupt tile), read it in pieces and leave
        the undecodable ones white, recording their level-0 boxes in `unreadable_boxes` (tissue detection keeps
        them in the grid, so the tile reader meets them, counts them and skips them)."""
        try:
            return self.read_region(level, 0, y0, lw, rows)
        except UnreadableRegion as exc:
            first = exc
        ds = self.level_downsamples[level]
        bad = 0
        out = np.full((rows, lw, 3), WHITE, np.uint8)
        for r in range(0, rows, piece):
            h = min(piece, rows - r)
            for x in range(0, lw, piece):
                w = min(piece, lw - x)
                x0, y = int(round(x * ds)), y0 + int(round(r * ds))
                try:
                    out[r:r + h, x:x + w] = self.read_region(level, x0, y, w, h)
                except UnreadableRegion:
                    self.unreadable_boxes.append((x0, y, int(round(w * ds)), int(round(h * ds))))
                    bad += w * h
        if bad > MAX_UNREADABLE_FRACTION * rows * lw:  # a truncated file, not a few damaged tiles
            raise UnreadableRegion(f"{first}; more than {MAX_UNREADABLE_FRACTION:.0%} of it is unreadable: the file "
                                   "is damaged or truncated")
        return out

    def info(self) -> SlideInfo:
        return SlideInfo(
            path=self.path,
            backend=self.backend_name,
            vendor=self.vendor,
            dimensions=self.dimensions,
            level_dimensions=self.level_dimensions,
            level_downsamples=self.level_downsamples,
            mpp=self.mpp,
            mpp_source=self.mpp_source,
            magnification=self.magnification,
            associated_images=self.associated_images,
        )

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.library_messages = []  # the error being raised says what went wrong, in one line
        self.close()


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA onto white (OpenSlide returns premultiplied RGBA; transparent means unscanned)."""
    if rgba.ndim == 3 and rgba.shape[2] == 4:
        if rgba[..., 3].min() == 255:  # fully opaque (the usual case): no compositing, no uint16 copies
            return np.ascontiguousarray(rgba[..., :3])
        alpha = rgba[..., 3:4].astype(np.uint16)
        rgb = rgba[..., :3].astype(np.uint16)
        # premultiplied: out = rgb + (1 - a) * white
        out = rgb + ((255 - alpha) * WHITE + 127) // 255
        return np.clip(out, 0, 255).astype(np.uint8)
    if rgba.ndim == 3 and rgba.shape[2] == 3:
        return np.ascontiguousarray(rgba)
    if rgba.ndim == 2:
        return np.repeat(rgba[..., None], 3, axis=2)
    raise ValueError(f"unexpected image shape {rgba.shape}")


def _positive_float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _mpp_from_tiff_tags(path: str) -> float | None:
    """Level-0 mpp from TIFF XResolution/ResolutionUnit, for generic TIFFs whose reader ignores them."""
    try:
        import tifffile

        # a file object: given a name, tifffile resolves links itself and would read whatever the name now leads to
        with open(path, "rb") as fh, tifffile.TiffFile(fh) as tif:
            page = tif.pages[0]
            tags = page.tags
            if "XResolution" not in tags or "ResolutionUnit" not in tags:
                return None
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            if not num or not den:
                return None
            px_per_unit = num / den
            um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
            if um_per_unit is None:
                return None
            mpp = um_per_unit / px_per_unit
            # a 72 dpi (or similar) default written by image tools is not a scan resolution
            return mpp if 0.05 <= mpp <= 20.0 else None
    except Exception:
        return None


class OpenSlideSlide(Slide):
    """OpenSlide (openslide-bin): SVS, NDPI, MRXS, SCN, BIF, DICOM, generic pyramidal TIFF and more."""

    backend_name = "openslide"

    def __init__(self, path, mpp_override=None, source=None):
        super().__init__(path, mpp_override, source)
        import openslide

        self._osr = openslide.OpenSlide(self.source)
        # read once: a handle in OpenSlide's sticky error state refuses even these (it is replaced, see _recover)
        self._dims = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
        self._downs = tuple(float(d) for d in self._osr.level_downsamples)
        self._props = dict(self._osr.properties)
        self._assoc = tuple(sorted(self._osr.associated_images))
        self._generation = 0  # bumped at each fresh handle, so threads failing together reopen once
        self._thread = threading.local()  # the handle generation each reader thread last read with
        self._lock = threading.Lock()
        self._stale: list = []  # handles left in OpenSlide's sticky error state, closed once unused
        self._busy: dict[int, int] = {}  # id(handle) -> threads reading with it
        self._fallback = None  # a tiffslide reader for tiles OpenSlide cannot decode (opened on the first one)

    @property
    def level_dimensions(self):
        return self._dims

    @property
    def level_downsamples(self):
        return self._downs

    @property
    def metadata_mpp(self):
        props = self._props
        mpp = _positive_float(props.get("openslide.mpp-x"))
        if mpp is None:
            mpp = _mpp_from_tiff_tags(self.source) if self.vendor == "generic-tiff" else None
        return mpp

    @property
    def vendor(self):
        return self._props.get("openslide.vendor")

    @property
    def associated_images(self):
        return self._assoc

    def read_associated(self, name):
        if name not in self._assoc:
            return super().read_associated(name)
        return _rgba_to_rgb(np.asarray(self._osr.associated_images[name]))

    def _read(self, level, x, y, w, h):
        with self._lock:  # count the handle's readers, so a replaced one is closed only once none is inside it
            osr = self._osr
            self._thread.generation = self._generation
            self._busy[id(osr)] = self._busy.get(id(osr), 0) + 1
        try:
            return _rgba_to_rgb(np.asarray(osr.read_region((x, y), level, (w, h))))
        finally:
            with self._lock:
                self._busy[id(osr)] -= 1
                self._close_stale()

    def _close_stale(self) -> None:
        """Close replaced handles no thread is reading with (a slide with many bad tiles would pile them up)."""
        for old in [o for o in self._stale if not self._busy.get(id(o))]:
            self._stale.remove(old)
            self._busy.pop(id(old), None)
            old.close()

    def decode_errors(self):
        import openslide

        return (openslide.OpenSlideError,)

    def _recover(self, level, x, y, w, h, exc):
        """OpenSlide leaves a handle in a sticky error state after one undecodable tile (every later call fails):
        take a fresh handle for the reads that follow, then try this region once more through tiffslide."""
        import openslide

        seen = getattr(self._thread, "generation", self._generation)
        with self._lock:
            if self._generation == seen:  # not already replaced by another thread
                self._stale.append(self._osr)
                self._osr = openslide.OpenSlide(self.source)
                self._generation += 1
                self._close_stale()
        try:  # the failure may have come from the old handle's sticky state, not from this region
            return self._read(level, x, y, w, h)
        except self.decode_errors():
            pass
        with self._lock:
            if self._generation == self._thread.generation:  # the retry's handle is sticky now: replace it too
                self._stale.append(self._osr)
                self._osr = openslide.OpenSlide(self.source)
                self._generation += 1
                self._close_stale()
            try:
                if self._fallback is None:
                    self._fallback = TiffSlideSlide(self.path, None, self.source)
                if self._fallback.level_dimensions != self.level_dimensions:
                    raise exc
                out = self._fallback._read(level, x, y, w, h)
            except Exception:  # tiffslide cannot either: the original error says what is wrong
                raise exc from None
        # tiffslide decodes what OpenSlide refused (leniently: the pixels may be wrong): said once, at close
        note = f"openslide: {_one_line(exc)} (such regions were read through tiffslide)"
        if note not in self.library_messages:
            self.library_messages.append(note)
        return out

    def _scaled_source(self):
        # Aperio and generic tiled TIFF: the level is the page's tile grid as stored (other TIFF vendors overlap or
        # offset tiles, which OpenSlide corrects and a raw mosaic would not)
        return self.source if self.vendor in ("aperio", "generic-tiff") else None

    def reopen(self):
        # OpenSlide handles are thread-safe; one handle serves every reader thread.
        return self

    def close(self):
        self._osr.close()
        for h in self._stale:
            h.close()
        self._stale = []
        if self._fallback is not None:
            self._fallback.library_messages = []  # its complaints are the bad tiles, counted by the reader
            self._fallback.close()
        super().close()


class TiffSlideSlide(Slide):
    """tiffslide (tifffile + zarr): TIFF layouts OpenSlide rejects, such as SubIFD (OME-TIFF-style) pyramids."""

    backend_name = "tiffslide"

    def __init__(self, path, mpp_override=None, source=None):
        super().__init__(path, mpp_override, source)
        import tiffslide

        # a file object (each reader thread opens its own): given a name, tifffile resolves links itself and would
        # read whatever the name leads to by then, not the pinned file
        self._fh = open(self.source, "rb")
        try:
            with collecting(self.library_messages):
                self._ts = tiffslide.TiffSlide(self._fh)
                # tiffslide parses lazily: parse now, so what tifffile says about the file is collected here
                self._ts.properties, self._ts.level_dimensions, self._ts.level_downsamples
        except BaseException:
            self._fh.close()
            raise

    @property
    def level_dimensions(self):
        return tuple(tuple(int(v) for v in d) for d in self._ts.level_dimensions)

    @property
    def level_downsamples(self):
        return tuple(float(d) for d in self._ts.level_downsamples)

    @property
    def metadata_mpp(self):
        mpp = _positive_float(self._ts.properties.get("tiffslide.mpp-x"))
        return mpp if mpp is not None else _mpp_from_tiff_tags(self.source)

    @property
    def vendor(self):
        return self._ts.properties.get("tiffslide.vendor")

    @property
    def associated_images(self):
        return tuple(sorted(self._ts.associated_images))

    def read_associated(self, name):
        if name not in self._ts.associated_images:
            return super().read_associated(name)
        return _rgba_to_rgb(np.asarray(self._ts.associated_images[name].convert("RGB")))

    def _read(self, level, x, y, w, h):
        arr = self._ts.read_region((x, y), level, (w, h), as_array=True)
        return _rgba_to_rgb(np.asarray(arr))

    def _scaled_source(self):
        return self.source

    def decode_errors(self):
        return (RuntimeError, ValueError)  # imagecodecs' codec errors are RuntimeErrors; tifffile raises ValueError

    def reopen(self):
        # tiffslide shares a file handle between calls; each reader thread gets its own, reporting to this slide
        with collecting(self.library_messages):
            other = TiffSlideSlide(self.path, self._mpp_override, self.source)
        other.library_messages = self.library_messages
        return other

    def close(self):
        self._ts.close()
        self._fh.close()
        super().close()


class ArraySlide(Slide):
    """An in-memory pyramid (a list of RGB arrays). Used for synthetic training data and tests."""

    backend_name = "array"

    def __init__(self, levels: list[np.ndarray], mpp: float | None, name: str = "<array>", mpp_override=None):
        super().__init__(name, mpp_override)
        if not levels:
            raise SlideError(f"{name}: an array slide needs at least one level")
        self._levels = [np.ascontiguousarray(lv, dtype=np.uint8) for lv in levels]
        self._mpp = mpp

    @property
    def level_dimensions(self):
        return tuple((lv.shape[1], lv.shape[0]) for lv in self._levels)

    @property
    def level_downsamples(self):
        w0 = self._levels[0].shape[1]
        return tuple(w0 / lv.shape[1] for lv in self._levels)

    @property
    def metadata_mpp(self):
        return self._mpp

    def _read(self, level, x, y, w, h):
        ds = self.level_downsamples[level]
        lv = self._levels[level]
        lx, ly = int(x / ds), int(y / ds)
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lv.shape[1]), min(ly + h, lv.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = lv[y0:y1, x0:x1, :3]
        return out


_BYTES = re.compile(r"""(?<!\w)b(['"]).*?(?<!\\)\1|(?<!\w)b(['"]).*""")  # a bytes repr, closed or cut off


def _one_line(exc: Exception) -> str:
    """A library's exception as one line of a message (its type when it says nothing). Never quotes file content:
    the libraries put a file's first bytes in some errors (tifffile's `not a TIFF file b'...'`), which would leak
    what an unexpected file holds, so bytes reprs are cut out."""
    text = str(exc).strip().splitlines()
    line = _BYTES.sub("(file content not shown)", text[0] if text else type(exc).__name__)
    return line.strip()[:300]
