"""OpenAI's shape over locpath: GET /v1/models and POST /v1/chat/completions (JSON or chunked server-sent events)."""

import json
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..answering import ready_slide, start_question
from ..deps import READ, Submitter, Svc
from ..guard import parse_json
from ..openai_api import chunk, completion, completion_id, finish_reason, parse_chat
from ..streaming import event_stream, whole_answer

MODEL = "locpath"
router = APIRouter()


@router.get("/v1/models", dependencies=[READ])
async def models(svc: Svc):
    return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "locpath",
                                        "bundle": svc.cfg.bundle.name}]}


@router.post("/v1/chat/completions")
async def chat(request: Request, svc: Svc, caller: Submitter):
    body = parse_json(await request.body())  # bounded depth, strict JSON (also checked by Guard)
    slide_id, question, sampling, stream = parse_chat(body)
    slide = await run_in_threadpool(ready_slide, svc, slide_id)
    task, job = await start_question(svc, caller, slide, question, sampling, None,
                                     {"question": question, "openai": True, **sampling})
    cid, model = completion_id(), body.get("model") or MODEL
    if not stream:
        return completion(cid, model, await whole_answer(task, request, svc))
    created = int(time.time())

    def data(delta: dict, finish: str | None = None) -> dict:
        return {"data": json.dumps(chunk(cid, model, created, delta, finish))}

    return event_stream(
        task, request, svc, first=[data({"role": "assistant", "content": ""})],
        piece=lambda text: data({"content": text}),
        done=lambda answer: [{"data": json.dumps(dict(chunk(cid, model, created, {},
                                                            finish_reason(answer.generation["stop_reason"])),
                                                      locpath={"trust": answer.trust}))}, {"data": "[DONE]"}],
        error=lambda exc: {"data": json.dumps({"error": {"type": exc.kind, "message": exc.message}})})
