"""Slides: registered by path (under a slide root), by DICOMweb study/series UID or by upload; listed with their
ingestion status; a thumbnail (or a finished question's evidence heatmap); deleted by an admin key."""

import logging
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ...errors import LocpathError
from .. import uploads
from ..auth import Caller
from ..bodies import RegisterSlide
from ..deps import ADMIN, Reader, Submitter, Svc, job_or_404, slide_or_404
from ..dicomweb import check_uid, series_folder
from ..errors import ApiError
from ..images import evidence_png, thumbnail_png
from ..paths import resolve_under_roots
from ..service import Service
from ..store import ANY_KEY, new_id
from ..views import hide_paths, public_job, slide_view
from ..worker import QueueFull

log = logging.getLogger("locpath.serve")
router = APIRouter()


def register(svc: Service, name: str, kind: str, source: str, path: str, client_key: str | None, caller: Caller,
             size: int | None = None) -> JSONResponse:
    """The slide row, its identity and its ingestion job (blocking: hashes the file, writes the store)."""
    from ..slide_files import record

    identity = record(path) if kind != "dicomweb" else None  # the file as registered: swaps are refused later
    slide, created = svc.store.add_slide(name, kind, source, path, client_key, caller.key_id, size)
    if not created:
        job = svc.store.jobs(slide.id, limit=1, key_id=caller.key_id if not caller.admin else ANY_KEY, kind="ingest")
        return JSONResponse({"slide": slide_view(slide, caller, svc.server_paths),
                             "job": public_job(job[0], caller, svc.server_paths) if job else None,
                             "existing": True}, 200)
    if identity is not None:
        svc.store.update_slide(slide.id, identity=identity)
    job, _ = svc.store.add_job("ingest", slide.id, {"source_kind": kind, "source": source},
                               owner=svc.owner, key_id=caller.key_id)
    try:
        svc.worker.submit_ingest(svc.ingest_task(job.id, svc.store.slide(slide.id)))
    except QueueFull:
        svc.store.delete_slide(slide.id)  # nothing stored for a refused request
        raise
    return JSONResponse({"slide": slide_view(svc.store.slide(slide.id), caller, svc.server_paths),
                         "job": public_job(job, caller, svc.server_paths), "existing": False}, 202)


@router.post("/v1/slides")
def register_slide(body: RegisterSlide, svc: Svc, caller: Submitter):
    if (body.path is None) == (body.dicomweb is None):
        raise ApiError(400, "invalid_request_error", "give exactly one of 'path' or 'dicomweb'")
    if body.path is not None:
        path = resolve_under_roots(body.path, svc.cfg.slide_roots)
        return register(svc, body.name or path.name, "path", body.path, str(path), body.client_key, caller)
    if not svc.cfg.dicomweb_url:
        raise ApiError(400, "invalid_request_error", "this service has no DICOMweb server (--dicomweb URL)")
    study = check_uid(body.dicomweb.study, "dicomweb.study")
    series = check_uid(body.dicomweb.series, "dicomweb.series")
    folder = series_folder(svc.cfg.data_dir, study, series)
    return register(svc, body.name or f"DICOM {series}", "dicomweb", f"{study}/{series}", str(folder),
                    body.client_key, caller)


@router.post("/v1/slides/upload")
async def upload_slide(request: Request, filename: str, svc: Svc, caller: Submitter,
                       name: str | None = Query(default=None, max_length=256),  # the JSON route's bounds
                       client_key: str | None = Query(default=None, min_length=1, max_length=128)):
    """Streamed into a private folder, counted against the key's quota as it arrives; whatever is refused
    (quota, a bad file, 429, a client that leaves) leaves nothing on disk."""
    safe = uploads.safe_filename(filename)
    if client_key:
        old = await run_in_threadpool(svc.store.slide_by_key, client_key, caller.key_id)
        if old is not None and old.status != "failed":
            return JSONResponse({"slide": slide_view(old, caller, svc.server_paths), "existing": True}, 200)
    quota = await run_in_threadpool(uploads.UploadQuota, svc, caller.key_id, new_id())
    folder = svc.cfg.data_dir / "uploads" / quota.folder
    target = folder / safe
    try:
        await uploads.receive(request, quota, target)
        response = await run_in_threadpool(register, svc, name or safe, "upload", safe, str(target), client_key,
                                           caller, quota.size)
        if response.status_code != 202:  # the same client_key registered meanwhile: keep that one
            await run_in_threadpool(uploads.remove, folder)
        return response
    except ClientDisconnect:
        await run_in_threadpool(uploads.remove, folder)
        log.warning("upload abandoned: the client went away mid-body; partial file removed", extra={"upload": safe})
        raise ApiError(499, "cancelled", "the client went away during the upload") from None
    except BaseException:
        await run_in_threadpool(uploads.remove, folder)
        raise
    finally:
        svc.uploading.pop(quota.folder, None)


@router.get("/v1/slides")
def list_slides(svc: Svc, caller: Reader):
    return {"slides": [slide_view(s, caller, svc.server_paths) for s in svc.store.slides()]}


@router.get("/v1/slides/{slide_id}")
def get_slide(slide_id: str, svc: Svc, caller: Reader):
    return slide_view(slide_or_404(svc, slide_id), caller, svc.server_paths)


@router.delete("/v1/slides/{slide_id}", dependencies=[ADMIN])
def delete_slide(slide_id: str, svc: Svc):
    s = slide_or_404(svc, slide_id)
    svc.store.delete_slide(s.id)
    if s.source_kind == "upload":
        uploads.remove(Path(s.path).parent)
    (svc.cfg.data_dir / "thumbnails" / f"{s.id}.png").unlink(missing_ok=True)
    return {"deleted": s.id}


@router.get("/v1/slides/{slide_id}/thumbnail.png")
def thumbnail(slide_id: str, svc: Svc, caller: Reader, evidence: str | None = None):
    s = slide_or_404(svc, slide_id)
    if s.status != "ready":
        raise ApiError(409, "not_ready", f"slide {s.id} is {s.status}")
    try:
        if evidence is None:
            return Response(thumbnail_png(svc, s), media_type="image/png")
        missing = f"no finished question {evidence!r} about slide {s.id}"
        job = job_or_404(svc, evidence, caller, missing)  # another key's question reads as a missing one
        if job.slide_id != s.id or job.kind != "question" or job.status != "done":
            raise ApiError(404, "not_found", missing)
        return Response(evidence_png(svc, s, job.to_dict()), media_type="image/png")
    except LocpathError as exc:
        if not caller.admin:  # same error and status, without the server's paths
            exc.args = (hide_paths(str(exc), svc.server_paths),)
        raise
