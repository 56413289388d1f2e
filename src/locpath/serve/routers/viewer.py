"""The page's deep-zoom viewer: a ready slide's Deep Zoom descriptor and tiles, a finished question's evidence as a
transparent heatmap, the tissue grid, and the vendored OpenSeadragon files (static/vendor/openseadragon/).

Behind the same keys as the other slide routes (a reader key; a question's heatmap only for the key that asked, as
thumbnail.png?evidence=). The work blocks (file checks, reads, encoding): it runs in threads. Cached bytes are looked
up first (the file still checked), never behind renders; a miss is rendered at most ServeConfig.tile_renders at a
time (serve/viewer.py), with at most WAITING_PER_RENDER per render waiting (more: 429), and a request whose client
left while it waited is not rendered (499). Addresses are checked before any read: a name that is not
`<col>_<row>.jpeg` with non-negative integers is a 400, a level or tile outside the slide a 404."""

import mimetypes
import re
from pathlib import Path

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.requests import ClientDisconnect

from ...errors import LocpathError
from .. import viewer, viewer_overlays
from ..auth import Caller
from ..deps import Reader, Svc, job_or_404, slide_or_404
from ..errors import ApiError
from ..service import Service
from ..views import hide_paths

VENDOR = Path(__file__).resolve().parents[1] / "static" / "vendor" / "openseadragon"
NO_STORE = {"Cache-Control": "private, no-store"}  # patients' pixels: not kept in shared or disk caches
DIGITS = re.compile(r"[0-9]+")
TILE_NAME = re.compile(r"([0-9]+)_([0-9]+)\.([A-Za-z0-9]+)")
BIG = 10 ** 9  # any integer written with more digits is outside every slide
# renders waiting for a slot, per slot (4 slots: 64); a browser has at most 6 requests in flight per server
WAITING_PER_RENDER = 16
router = APIRouter()


def _vendored() -> frozenset[str]:
    """The files recorded in SHA256SUMS (scripts/vendor_openseadragon.py): the only ones served."""
    try:
        lines = (VENDOR / "SHA256SUMS").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(line.split("  ", 1)[1] for line in lines if "  " in line)


VENDORED = _vendored()


def _int(digits: str) -> int:
    return int(digits) if len(digits) <= 9 else BIG


def _shown(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_tile(level: str, name: str) -> tuple[int, int, int]:
    if not DIGITS.fullmatch(level):
        raise ApiError(400, "invalid_request_error", f"the Deep Zoom level must be a non-negative integer, got "
                                                     f"{_shown(level)}")
    m = TILE_NAME.fullmatch(name)
    if m is None:
        raise ApiError(400, "invalid_request_error", f"a tile is named <col>_<row>.jpeg with non-negative integers, "
                                                     f"got {_shown(name)}")
    if m.group(3) != "jpeg":
        raise ApiError(400, "invalid_request_error", f"tiles are served as .jpeg (the descriptor's Format), not "
                                                     f"{_shown('.' + m.group(3))}")
    return _int(level), _int(m.group(1)), _int(m.group(2))


async def _render(request: Request, svc: Service, caller: Caller, slide_id: str, work) -> bytes:
    """`work(slide, render)` for a ready slide, in threads: first from the cache only (render False: None on a miss),
    then, on a miss, rendered under the viewer's bounds (_bounded). Server paths left out of a non-admin caller's
    errors."""
    def blocking(render: bool):
        s = slide_or_404(svc, slide_id)
        if s.status != "ready":
            raise ApiError(409, "not_ready", f"slide {s.id} is {s.status}")
        try:
            return work(s, render)
        except ApiError as exc:
            if not caller.admin:
                exc.message = hide_paths(exc.message, svc.server_paths)
            raise
        except LocpathError as exc:
            if not caller.admin:
                exc.args = (hide_paths(str(exc), svc.server_paths),)
            raise
    body = await anyio.to_thread.run_sync(blocking, False)
    if body is None:
        body = await _bounded(request, viewer.state(svc), lambda: blocking(True))
    return body


async def _bounded(request: Request, st: viewer.ViewerState, fn):
    """`fn()` in a thread once one of the st.renders slots is free: a full queue is a 429 at once, and a client
    that left while waiting gets nothing rendered (499), so abandoned requests cannot queue work without bound."""
    if st.waiting >= st.renders * WAITING_PER_RENDER:
        raise ApiError(429, "rate_limit_error", f"{st.waiting} viewer tiles are already waiting to be rendered; "
                                                "try again shortly", {"Retry-After": "1"})
    st.waiting += 1
    try:
        await st.limiter.acquire()
    finally:
        st.waiting -= 1
    try:
        if await request.is_disconnected():
            raise ClientDisconnect()
        return await anyio.to_thread.run_sync(fn)
    finally:
        st.limiter.release()


@router.get("/v1/slides/{slide_id}/viewer.dzi")
async def viewer_dzi(request: Request, slide_id: str, svc: Svc, caller: Reader):
    body = await _render(request, svc, caller, slide_id, lambda s, render: viewer.dzi(svc, s, render))
    return Response(body, media_type="application/xml", headers=NO_STORE)


@router.get("/v1/slides/{slide_id}/viewer_files/{level}/{name}")
async def viewer_tile(request: Request, slide_id: str, level: str, name: str, svc: Svc, caller: Reader):
    lv, col, row = parse_tile(level, name)
    body = await _render(request, svc, caller, slide_id, lambda s, render: viewer.tile(svc, s, lv, col, row, render))
    return Response(body, media_type="image/jpeg", headers=NO_STORE)


@router.get("/v1/slides/{slide_id}/viewer/heatmap.png")
async def viewer_heatmap(request: Request, slide_id: str, evidence: str, svc: Svc, caller: Reader):
    def work(s, render):
        missing = f"no finished question {evidence!r} about slide {s.id}"
        job = job_or_404(svc, evidence, caller, missing)  # another key's question reads as a missing one
        if job.slide_id != s.id or job.kind != "question" or job.status != "done":
            raise ApiError(404, "not_found", missing)
        return viewer_overlays.heatmap_png(svc, s, job, render)
    body = await _render(request, svc, caller, slide_id, work)
    return Response(body, media_type="image/png", headers=NO_STORE)


@router.get("/v1/slides/{slide_id}/viewer/grid.json")
async def viewer_grid(request: Request, slide_id: str, svc: Svc, caller: Reader):
    body = await _render(request, svc, caller, slide_id, lambda s, render: viewer_overlays.grid_json(svc, s, render))
    return Response(body, media_type="application/json", headers=NO_STORE)


@router.get("/static/vendor/openseadragon/{name:path}", include_in_schema=False)
async def vendored(name: str):
    if name not in VENDORED:
        raise ApiError(404, "not_found", "no such file")
    return FileResponse(VENDOR / name, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")
