"""One walk over a running question's events for every way an answer leaves the service (a JSON body, native
server-sent events, OpenAI chat-completion chunks): it waits for the next event within the question's deadline,
watches for a client that went away, turns a failure into its HTTP error (errors.py; server paths hidden from
non-admin keys) and, however the walk ends (answer, error, timeout, a client that left, a cancelled request),
cancels the question in `finally`, so its decoder row is freed between two tokens."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from .errors import ApiError, describe
from .service import Service
from .views import hide_paths, public_done
from .worker import QuestionTask

POLL_S = 0.5  # how often a waiting walk looks whether its client is still there


async def events(task: QuestionTask, request: Request, svc: Service) -> AsyncIterator[tuple[str, object]]:
    """("piece", text) ... then ("done", Answer); a failure is raised as an ApiError."""
    admin = request.state.caller.admin
    deadline = time.monotonic() + svc.cfg.question_timeout_s
    checked = [time.monotonic()]
    try:
        while True:
            kind, value = await _next(task, request, deadline, svc.cfg.question_timeout_s, checked)
            if kind == "error":
                raise _public(describe(value), admin, svc)
            if kind == "done":
                yield kind, value if admin else public_done(value, svc.server_paths)
                return
            yield kind, value
    finally:
        task.cancelled.set()  # a no-op when finished; stops the decoder when the walk ended early


async def _next(task: QuestionTask, request: Request, deadline: float, timeout_s: float,
                checked: list[float]) -> tuple[str, object]:
    """The next event; every POLL_S, also while pieces keep coming, whether the client is still there (a JSON
    client that hangs up mid-answer is noticed by nobody else)."""
    while True:
        now = time.monotonic()
        if deadline - now <= 0:
            raise ApiError(504, "timeout", f"no answer within {timeout_s:g} s")
        if now - checked[0] >= POLL_S:
            checked[0] = now
            if await request.is_disconnected():
                raise ApiError(499, "cancelled", "the client went away")
        try:
            return await asyncio.wait_for(task.events.get(), timeout=min(deadline - now, POLL_S))
        except asyncio.TimeoutError:
            pass


def _public(exc: ApiError, admin: bool, svc: Service) -> ApiError:
    if admin:
        return exc
    return ApiError(exc.status, exc.kind, hide_paths(exc.message, svc.server_paths), exc.headers)


async def whole_answer(task: QuestionTask, request: Request, svc: Service):
    """The finished Answer (a JSON response's), or the question's ApiError."""
    async with aclosing(events(task, request, svc)) as walk:
        async for kind, value in walk:
            if kind == "done":
                return value
    raise ApiError(500, "server_error", "the answer ended without a result")  # never: the walk ends at done


def event_stream(task: QuestionTask, request: Request, svc: Service, piece: Callable[[str], dict],
                 done: Callable[[object], list[dict]], error: Callable[[ApiError], dict],
                 first: list[dict] = ()) -> EventSourceResponse:
    """Server-sent events: `first`, then piece(text) per piece, then done(answer) or error(exc) once."""
    async def stream():
        for message in first:
            yield message
        async with aclosing(events(task, request, svc)) as walk:
            try:
                async for kind, value in walk:
                    for message in (done(value) if kind == "done" else [piece(value)]):
                        yield message
            except ApiError as exc:
                yield error(exc)

    return EventSourceResponse(stream(), ping=15)


def sse_error(exc: ApiError) -> dict:
    return {"event": "error", "data": json.dumps({"type": exc.kind, "message": exc.message})}
