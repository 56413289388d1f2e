"""Ingestion and question jobs: a key sees its own (an admin key everyone's)."""

from fastapi import APIRouter

from ..deps import Reader, Svc, job_or_404
from ..store import ANY_KEY
from ..views import public_job

router = APIRouter()


@router.get("/v1/jobs")
def list_jobs(svc: Svc, caller: Reader, slide_id: str | None = None, limit: int = 100):
    jobs = svc.store.jobs(slide_id, min(max(limit, 1), 1000), key_id=ANY_KEY if caller.admin else caller.key_id)
    return {"jobs": [public_job(j, caller, svc.server_paths) for j in jobs]}


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, svc: Svc, caller: Reader):
    return public_job(job_or_404(svc, job_id, caller), caller, svc.server_paths)
