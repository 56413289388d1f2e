"""POST /v1/slides/{id}/questions: an answer with timings and evidence, as JSON or server-sent events."""

import json

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..answering import ready_slide, start_question, stored_answer
from ..bodies import Ask
from ..deps import Submitter, Svc
from ..streaming import event_stream, sse_error, whole_answer

router = APIRouter()


@router.post("/v1/slides/{slide_id}/questions")
async def ask(slide_id: str, body: Ask, request: Request, svc: Svc, caller: Submitter):
    slide = await run_in_threadpool(ready_slide, svc, slide_id)
    task, job = await start_question(svc, caller, slide, body.question, body.sampling(), body.client_key,
                                     body.model_dump(exclude={"client_key"}))
    if task is None:
        return stored_answer(svc, caller, job, slide.id, body.question)
    if not body.stream:
        answer = await whole_answer(task, request, svc)
        return dict(answer.to_dict(body.evidence_tiles), job=job.id)
    return event_stream(
        task, request, svc,
        piece=lambda text: {"event": "piece", "data": json.dumps({"text": text})},
        done=lambda answer: [{"event": "done", "data": json.dumps(dict(answer.to_dict(body.evidence_tiles),
                                                                       job=job.id))}],
        error=sse_error)
