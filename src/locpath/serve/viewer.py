"""What the page's deep-zoom viewer reads: a registered slide's Deep Zoom descriptor and tiles (wsi/deepzoom.py),
bounded and cached per service.

Every request re-checks the registered file (serve/slide_files.py), also when the bytes are cached: a swapped or
deleted slide stops showing at once. Encoded bytes are kept in one LRU bounded in bytes (ServeConfig.tile_cache_bytes)
and keyed by the slide's id and recorded identity; renders are bounded by ServeConfig.tile_renders threads (the
routes run them off the event loop through the state's limiter). All functions here block.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable

from .errors import ApiError
from .service import Service
from .tilecache import ByteLRU


class ViewerState:
    """One service's tile cache and render bound."""

    def __init__(self, cache_bytes: int, renders: int):
        self.cache = ByteLRU(cache_bytes)
        self.renders = renders
        self.waiting = 0  # requests waiting for a render slot (changed on the event loop only)
        self._limiter = None

    @property
    def limiter(self):
        """An anyio CapacityLimiter, made on first use inside the event loop (anyio needs one running)."""
        if self._limiter is None:
            import anyio

            self._limiter = anyio.CapacityLimiter(self.renders)
        return self._limiter


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def state(svc: Service) -> ViewerState:
    with _LOCK:
        st = _STATES.get(svc)
        if st is None:
            st = _STATES[svc] = ViewerState(svc.cfg.tile_cache_bytes, svc.cfg.tile_renders)
        return st


def cached(svc: Service, slide, what: tuple, make: Callable, render: bool = True) -> bytes | None:
    """The bytes of `what` about `slide`: from the cache, else `make(f)` with the opened file `f` (None instead when
    not `render`: the routes look up first, and render under their bounds only on a miss). The file is checked first
    either way (a refusal is raised here, as for every other slide route)."""
    st = state(svc)
    key = (slide.id, getattr(slide, "identity", None) or slide.path, *what)
    with svc.open_slide(slide.id) as f:
        body = st.cache.get(key)
        if body is None and render:
            body = make(f)
            st.cache.put(key, body)
    return body


@contextlib.contextmanager
def generator(f):
    """The opened slide and its DeepZoomGenerator."""
    from ..wsi import open_slide
    from ..wsi.deepzoom import deep_zoom

    with open_slide(f, require_mpp=False) as s:
        yield s, deep_zoom(s)


def dzi(svc: Service, slide, render: bool = True) -> bytes | None:
    def make(f):
        from ..wsi.deepzoom import dzi

        with generator(f) as (_, dz):
            return dzi(dz)
    return cached(svc, slide, ("dzi",), make, render)


def tile(svc: Service, slide, level: int, col: int, row: int, render: bool = True) -> bytes | None:
    """One JPEG tile; an address outside the slide's Deep Zoom pyramid is a 404 naming what exists."""
    def make(f):
        from ..wsi.deepzoom import TileTooCostly, tile_jpeg

        with generator(f) as (s, dz):
            check_address(slide.id, dz, level, col, row)
            try:
                return tile_jpeg(dz, s, level, col, row)
            except TileTooCostly as exc:
                raise ApiError(422, "invalid_request_error", str(exc)) from None
    return cached(svc, slide, ("tile", level, col, row), make, render)


def check_address(slide_id: str, dz, level: int, col: int, row: int) -> None:
    if level >= dz.level_count:
        raise ApiError(404, "not_found", f"slide {slide_id} has Deep Zoom levels 0-{dz.level_count - 1}; "
                                         f"there is no level {level}")
    cols, rows = dz.level_tiles[level]
    if col >= cols or row >= rows:
        raise ApiError(404, "not_found", f"slide {slide_id} has {cols}x{rows} tiles at Deep Zoom level {level}; "
                                         f"tile {col}_{row} is outside it")
