"""Starting a question, shared by the native route and the OpenAI one: the slide must be ready and still its
registered file, the question is checked before it is queued (400 now, not after a wait), a client_key already used
returns its stored answer. Store and file work runs in the threadpool; queueing happens on the event loop, which
receives the answer's events."""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .auth import Caller
from .deps import slide_or_404
from .errors import ApiError
from .service import Service
from .views import hide_paths, public_answer
from .worker import QueueFull, QuestionTask


def ready_slide(svc: Service, slide_id: str):
    """The slide if ready and still its registered file (swapped or escaped: refused here, before queueing)."""
    s = slide_or_404(svc, slide_id)
    if s.status != "ready":
        error = hide_paths(s.error, svc.server_paths) if s.error else ""
        detail = f" ({s.progress:.0%})" if s.status == "ingesting" else (f": {error}" if error else "")
        raise ApiError(409, "not_ready", f"slide {s.id} is {s.status}{detail}; ask when it is ready")
    with svc.open_slide(s.id):
        pass
    return s


def _new_job(svc: Service, caller: Caller, slide, question: str, sampling: dict, client_key: str | None,
             request_body: dict):
    if len(question) > svc.cfg.max_question_chars:
        raise ApiError(400, "invalid_request_error",
                       f"the question is {len(question)} characters; at most {svc.cfg.max_question_chars}")
    checked = svc.pipe.question(question, **sampling)  # too long for the KV cache, bad options: 400 before queueing
    job, created = svc.store.add_job("question", slide.id, request_body, client_key, owner=svc.owner,
                                     key_id=caller.key_id)
    return job, created, checked


async def start_question(svc: Service, caller: Caller, slide, question: str, sampling: dict,
                         client_key: str | None, request_body: dict):
    """A new question job of the caller's key and its queued task, or (None, the job) a client_key already names."""
    job, created, checked = await run_in_threadpool(_new_job, svc, caller, slide, question, sampling, client_key,
                                                    request_body)
    if not created:
        return None, job
    task = QuestionTask(job.id, slide.path, checked, asyncio.get_running_loop(), asyncio.Queue(),
                        slide_id=slide.id)
    try:
        svc.worker.submit_question(task)
    except QueueFull:
        await run_in_threadpool(svc.store.update_job, job.id, status="cancelled", error="queue full",
                                finished=time.time())
        raise
    return task, job


def stored_answer(svc: Service, caller: Caller, job, slide_id: str, question: str) -> JSONResponse:
    """The answer of an earlier question with this client_key (the caller's own: keys are scoped)."""
    asked = job.to_dict()["request"]
    if job.slide_id != slide_id or asked.get("question") != question:
        raise ApiError(409, "conflict", f"this client_key was used for another question (job {job.id})")
    if job.status == "done":
        result = job.to_dict()["result"]
        return JSONResponse(dict(result if caller.admin else public_answer(result, svc.server_paths), job=job.id))
    raise ApiError(409, "conflict", f"a question with this client_key is {job.status} (job {job.id})",
                   {"Retry-After": str(max(1, round(svc.worker.answer_seconds)))})
