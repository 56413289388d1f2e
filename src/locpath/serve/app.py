"""The FastAPI application of `locpath serve`, assembled: routers (one per resource, routers/), middleware (body
limit, Host/Origin/JSON guard, request log) and exception handlers (errors.py's table).

    GET  /healthz /readyz /metrics              liveness, readiness (worker lanes alive), Prometheus   (health)
    GET  /                                      the web page (static/)                                  (health)
    GET  /v1/models                             the one model this service runs                          (openai)
    POST /v1/slides                             register by path (under a slide root) or by DICOMweb UID (slides)
    POST /v1/slides/upload                      register by upload (streamed to disk, size-limited)      (slides)
    GET  /v1/slides, /v1/slides/{id}            slides with ingestion status and progress                (slides)
    GET  /v1/slides/{id}/thumbnail.png          thumbnail (?evidence=<job id> for a heatmap)             (slides)
    DELETE /v1/slides/{id}                      (admin)                                                   (slides)
    GET  /v1/slides/{id}/viewer.dzi, viewer_files/{level}/{col}_{row}.jpeg   Deep Zoom descriptor and tiles (viewer)
    GET  /v1/slides/{id}/viewer/heatmap.png?evidence=<job id>, viewer/grid.json   the viewer's overlays     (viewer)
    POST /v1/slides/{id}/questions              an answer as JSON or server-sent events                  (questions)
    POST /v1/chat/completions                   the same through OpenAI's chat-completions shape         (openai)
    GET  /v1/jobs, /v1/jobs/{id}                ingestion and question jobs                               (jobs)
Errors are JSON `{"error": {"type", "message"}}`: 4xx for what the client can fix, 5xx for what the service could
not do (errors.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .deps import ServiceRef
from .errors import HTTP_KINDS, STATUS, ApiError, error_json, response
from .guard import Guard, Refused
from .limits import BodyLimit
from .logs import RequestLog
from .routers import health, jobs, openai, questions, slides, viewer
from .service import Service


def create_app(service: Service | None = None, *, cfg: ServeConfig | None = None,
               build: Callable[[], Service] | None = None) -> FastAPI:
    """The app over `service`, or over the one `build()` makes where the app runs (a Ray Serve replica builds its
    own: ray_app.py; `cfg` then gives the middleware its limits). The lifespan starts the service and stops it."""
    ref = ServiceRef(service, build)
    cfg = service.cfg if service is not None else cfg
    if cfg is None:
        raise TypeError("create_app needs a service, or cfg and build")

    @asynccontextmanager
    async def lifespan(app):
        svc = ref.ensure()
        svc.start()
        try:
            yield
        finally:
            svc.stop()

    app = FastAPI(title="locpath", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = ref
    _middleware(app, ref, cfg)
    _handlers(app)
    for module in (health, openai, slides, viewer, jobs, questions):
        app.include_router(module.router)
    return app


def _middleware(app: FastAPI, ref: ServiceRef, cfg: ServeConfig) -> None:
    """Innermost first: the guard (Host, Origin, Content-Type, JSON shape) inside the body limit, and outermost
    the request log (one line per request, the answering instance in a header)."""
    def limit_for(path: str) -> int:
        return cfg.max_upload_bytes if path == "/v1/slides/upload" else cfg.max_request_bytes

    app.add_middleware(Guard, names=cfg.host_names)
    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_middleware(RequestLog, service=ref)


def _handlers(app: FastAPI) -> None:
    async def mapped(request, exc):  # errors.py's table: typed exceptions to their status
        return response(exc)

    for cls in (ApiError, Refused, *(row[0] for row in STATUS)):
        app.add_exception_handler(cls, mapped)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request")
        return error_json(400, "invalid_request_error", msg)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):  # unknown route, wrong method, FastAPI's own 4xx
        kind = HTTP_KINDS.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        return error_json(exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # a bug: its traceback goes to the log, the client gets JSON
        return response(exc)
