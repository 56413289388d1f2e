"""The page's deep-zoom viewer: a ready slide's Deep Zoom descriptor and tiles, a finished question's evidence as a
transparent heatmap, the tissue grid, and the vendored OpenSeadragon files (static/vendor/openseadragon/).

Behind the same keys as the other slide routes (a reader key; a question's heatmap only for the key that asked, as
thumbnail.png?evidence=). The work blocks (file checks, reads, encoding): it runs in threads, at most
ServeConfig.tile_renders at a time (serve/viewer.py). Addresses are checked before any read: a name that is not
`<col>_<row>.jpeg` with non-negative integers is a 400, a level or tile outside the slide a 404."""

import mimetypes
import re
from pathlib import Path

import anyio
from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

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


async def _render(svc: Service, caller: Caller, slide_id: str, work) -> bytes:
    """`work(slide)` for a ready slide, in a thread under the viewer's render bound; server paths left out of a
    non-admin caller's errors."""
    def blocking():
        s = slide_or_404(svc, slide_id)
        if s.status != "ready":
            raise ApiError(409, "not_ready", f"slide {s.id} is {s.status}")
        try:
            return work(s)
        except ApiError as exc:
            if not caller.admin:
                exc.message = hide_paths(exc.message, svc.server_paths)
            raise
        except LocpathError as exc:
            if not caller.admin:
                exc.args = (hide_paths(str(exc), svc.server_paths),)
            raise
    return await anyio.to_thread.run_sync(blocking, limiter=viewer.state(svc).limiter)


@router.get("/v1/slides/{slide_id}/viewer.dzi")
async def viewer_dzi(slide_id: str, svc: Svc, caller: Reader):
    body = await _render(svc, caller, slide_id, lambda s: viewer.dzi(svc, s))
    return Response(body, media_type="application/xml", headers=NO_STORE)


@router.get("/v1/slides/{slide_id}/viewer_files/{level}/{name}")
async def viewer_tile(slide_id: str, level: str, name: str, svc: Svc, caller: Reader):
    lv, col, row = parse_tile(level, name)
    body = await _render(svc, caller, slide_id, lambda s: viewer.tile(svc, s, lv, col, row))
    return Response(body, media_type="image/jpeg", headers=NO_STORE)


@router.get("/v1/slides/{slide_id}/viewer/heatmap.png")
async def viewer_heatmap(slide_id: str, evidence: str, svc: Svc, caller: Reader):
    def work(s):
        missing = f"no finished question {evidence!r} about slide {s.id}"
        job = job_or_404(svc, evidence, caller, missing)  # another key's question reads as a missing one
        if job.slide_id != s.id or job.kind != "question" or job.status != "done":
            raise ApiError(404, "not_found", missing)
        return viewer_overlays.heatmap_png(svc, s, job)
    body = await _render(svc, caller, slide_id, work)
    return Response(body, media_type="image/png", headers=NO_STORE)


@router.get("/v1/slides/{slide_id}/viewer/grid.json")
async def viewer_grid(slide_id: str, svc: Svc, caller: Reader):
    body = await _render(svc, caller, slide_id, lambda s: viewer_overlays.grid_json(svc, s))
    return Response(body, media_type="application/json", headers=NO_STORE)


@router.get("/static/vendor/openseadragon/{name:path}", include_in_schema=False)
async def vendored(name: str):
    if name not in VENDORED:
        raise ApiError(404, "not_found", "no such file")
    return FileResponse(VENDOR / name, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")
