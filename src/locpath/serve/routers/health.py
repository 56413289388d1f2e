"""Liveness, readiness (the worker lanes alive), Prometheus metrics and the web page."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

from ..deps import READ, Svc
from ..errors import ApiError

STATIC = Path(__file__).resolve().parents[1] / "static"
router = APIRouter()


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(svc: Svc):
    alive = all(t.is_alive() for t in svc.worker._threads)
    body = {"status": "ready" if alive else "not ready", "instance": svc.owner,
            "question_queue": svc.worker.questions.qsize(), "ingest_queue": svc.worker.ingests.qsize(),
            "ingesting": svc.worker.busy_ingest}
    return JSONResponse(body, 200 if alive else 503)


@router.get("/metrics", dependencies=[READ])
def metrics(svc: Svc):  # the job gauges read the store
    svc.worker.publish_queue_depth()
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str):
    if name not in {"app.js", "style.css", "viewer.js", "viewer.css"}:
        raise ApiError(404, "not_found", "no such file")
    return FileResponse(STATIC / name)
