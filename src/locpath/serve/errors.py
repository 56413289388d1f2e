"""From exception to HTTP answer, in one table: what the client can fix is 4xx, what the service could not do
(inference, the job store) is 5xx, and every error is the one JSON shape `{"error": {"type", "message"}}`.

Routes, helpers and the worker raise typed exceptions (the worker hands the exception itself to the route, never a
string); `describe` turns one into an ApiError by the first matching row of STATUS.
"""

from __future__ import annotations

import logging

import sqlalchemy.exc as sa_exc
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from ..errors import LocpathError
from ..runtime.pipeline import NotPrepared
from ..wsi.identity import SlideChanged
from .guard import Refused
from .limits import BodyTooLarge
from .slide_files import SlideEscaped, SlideGone
from .store import StoreError
from .worker import InferenceError, QueueFull, Reprepared

log = logging.getLogger("locpath.serve")


class ApiError(Exception):
    """An HTTP error a route decided itself (status, OpenAI-style type, message, extra headers)."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def _retry_after(exc) -> dict:
    return {"Retry-After": str(max(1, round(getattr(exc, "retry_after", 1))))}


STORE_DOWN = "the job store is unavailable (see the service log); try again shortly"
# (exception type, status, error type, message or None for the exception's own, headers(exc) or None); first match
STATUS: list[tuple[type, int, str, str | None, object]] = [
    (QueueFull, 429, "rate_limit_error", None, _retry_after),  # a lane's queue is full
    (Reprepared, 503, "not_prepared", None, _retry_after),  # the slide's latents are gone: ingested again
    (NotPrepared, 503, "not_prepared", None, lambda exc: {"Retry-After": "10"}),
    (SlideEscaped, 403, "permission_error", None, None),  # the registered path now leads outside the roots
    (SlideGone, 410, "gone", None, None),  # the registered file is gone
    (SlideChanged, 409, "conflict", None, None),  # the registered file was replaced
    (BodyTooLarge, 413, "request_too_large", None, None),
    (ClientDisconnect, 499, "cancelled", "the client went away", None),
    (InferenceError, 500, "inference_error", None, None),  # the decoder failed (non-finite logits, a crash)
    (StoreError, 503, "store_unavailable", STORE_DOWN, None),
    (sa_exc.OperationalError, 503, "store_unavailable", STORE_DOWN, None),  # locked, unreachable, disk I/O
    (sa_exc.InterfaceError, 503, "store_unavailable", STORE_DOWN, None),
    (sa_exc.SQLAlchemyError, 500, "store_error", "the job store failed (see the service log)", None),
    (LocpathError, 400, "invalid_request_error", None, None),  # bad input the client can fix
]
BUG = (500, "server_error", "internal error (see the service log)")

HTTP_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found",
              405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
              422: "invalid_request_error"}


def describe(exc: BaseException) -> ApiError:
    """The HTTP error of any exception (a bug: 500 without its text, which may hold server internals)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Refused):
        return ApiError(exc.status, exc.kind, exc.message)
    for cls, status, kind, message, headers in STATUS:
        if isinstance(exc, cls):
            if status >= 500 and message is not None:
                log.error("request failed: %s", type(exc).__name__, exc_info=exc)
            return ApiError(status, kind, message or " ".join(str(exc).split()), headers(exc) if headers else None)
    return ApiError(*BUG)


def error_json(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error shape; a message quoting the client's text cannot fail to encode (a lone surrogate)."""
    text = message.encode("utf-8", "replace").decode("utf-8")
    return JSONResponse({"error": {"type": kind, "message": text}}, status, headers=headers or None)


def response(exc: BaseException) -> JSONResponse:
    e = describe(exc)
    return error_json(e.status, e.kind, e.message, e.headers)
