"""The FastAPI application of `locpath serve`.

    GET  /healthz /readyz /metrics              liveness, readiness (worker lanes alive), Prometheus
    GET  /                                      the web page (static/)
    GET  /v1/models                             the one model this service runs
    POST /v1/slides                             register by path (under a slide root) or by DICOMweb study/series UID
    POST /v1/slides/upload                      register by upload (streamed to disk, size-limited)
    GET  /v1/slides, /v1/slides/{id}            slides with ingestion status and progress
    GET  /v1/slides/{id}/thumbnail.png          thumbnail with tissue and tiles (?evidence=<job id> for a heatmap)
    DELETE /v1/slides/{id}                      (admin)
    POST /v1/slides/{id}/questions              an answer with timings and evidence, as JSON or server-sent events
    POST /v1/chat/completions                   the same through OpenAI's chat-completions shape
    GET  /v1/jobs, /v1/jobs/{id}                ingestion and question jobs
Errors are JSON `{"error": {"type", "message"}}` with a 4xx status for what the client can fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import ConfigError, LocpathError
from . import auth
from .config import ServeConfig
from .dicomweb import check_uid, retrieve_series
from .guard import Guard, Refused, parse_json
from .limits import BodyLimit
from .metrics import Metrics
from .openai_api import chunk, completion, completion_id, parse_chat
from .store import ANY_KEY, JobStore, new_id
from .worker import IngestTask, QueueFull, QuestionTask, Worker

log = logging.getLogger("locpath.serve")
STATIC = Path(__file__).resolve().parent / "static"
MODEL = "locpath"


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


# -- request bodies -------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DicomWebSource(_Body):
    study: str
    series: str


class RegisterSlide(_Body):
    path: str | None = None
    dicomweb: DicomWebSource | None = None
    name: str | None = Field(default=None, max_length=256)
    client_key: str | None = Field(default=None, min_length=1, max_length=128)


class Ask(_Body):
    question: str = Field(min_length=1)
    # strict types: lax ones read "no" as false, true as 1 and "0.5" as 0.5 (the chat route refuses them too)
    stream: StrictBool = False
    max_new_tokens: StrictInt | None = Field(default=None, ge=1)
    sample: StrictBool = False
    temperature: StrictFloat | None = Field(default=None, gt=0, le=100)
    top_k: StrictInt | None = Field(default=None, ge=0)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    repetition_penalty: StrictFloat | None = Field(default=None, gt=0, le=100)
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    evidence_tiles: StrictInt = Field(default=32, ge=0, le=100000)
    client_key: str | None = Field(default=None, min_length=1, max_length=128)

    def sampling(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, do_sample=self.sample or None, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed)


# -- the application --------------------------------------------------------------------------------------------------
SWEEP_S = 15.0  # how often an instance says it is alive and looks for the work of lost ones
CLEAN_S = 2.0  # how often the files of failed uploads are removed
ORPHAN_AGE_S = 3600.0  # an upload folder with no slide row, untouched this long, is removed (another replica's crash)


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who sent a request: an API key's id (None in open loopback mode) and whether it may see everything."""

    key_id: str | None
    admin: bool

    def owns(self, row) -> bool:
        return self.admin or (row.key_id is not None and row.key_id == self.key_id)


OPEN = Caller(None, True)  # no key exists and the service is on loopback: as before keys, everyone sees all


class Service:
    """What the routes share: config, store, pipeline, worker, metrics. `owner` names this instance in the job
    table (one per Ray Serve replica when several share a database)."""

    def __init__(self, cfg: ServeConfig, pipe=None, owner: str | None = None):
        from ..runtime.pipeline import Pipeline

        _private_dirs(cfg.data_dir)
        self.cfg = cfg.validate()
        # stable across restarts of the same server (its unfinished jobs resume at once), distinct between servers
        self.owner = owner or f"{socket.gethostname()}:{cfg.port}"
        self.store = JobStore(cfg.database_url, init=cfg.init_database)
        self.uploading: dict[str, tuple[str | None, int]] = {}  # upload folder -> (API key id, bytes so far)
        self.server_paths = _server_paths(cfg)
        if not cfg.loopback and not self.store.active_keys():
            raise ConfigError(f"--host {cfg.host} is not a loopback address: add an API key first "
                              f"(locpath keys add NAME --data-dir {cfg.data_dir}), or bind to 127.0.0.1")
        self.pipe = pipe or Pipeline.from_bundle(cfg.bundle, cfg.runtime)
        self.metrics = Metrics(self.store)
        self.worker = Worker(self.pipe, self.store, self.metrics, cfg.question_queue, cfg.ingest_queue, self.owner)
        self.worker.opener = self.open_slide
        self.started = False

    @property
    def auth_required(self) -> bool:
        """Read from the store each time: a key added or revoked while the service runs counts at once."""
        return self.store.active_keys() > 0 or not self.cfg.loopback

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        self.worker.start()
        self.store.beat(self.owner)
        cancelled = self.store.abandon_questions(self.owner, include_own=True)
        resumed = self._resume(self.store.adopt_ingestions(self.owner, include_own=True))
        self._clean_uploads(at_start=True)
        self._stopping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="locpath-sweep", daemon=True)
        self._sweeper.start()
        log.info("service started", extra={"bundle": str(self.cfg.bundle), "instance": self.owner,
                                           "resumed_ingestions": resumed, "abandoned_questions": cancelled,
                                           "auth": self.auth_required})

    def _resume(self, jobs) -> int:
        n = 0
        for job in jobs:
            slide = self.store.slide(job.slide_id)
            if slide is None:
                self.store.update_job(job.id, status="cancelled", error="slide deleted", finished=time.time())
                continue
            self.worker.submit_ingest(self.ingest_task(job.id, slide), force=True)
            n += 1
        return n

    def _sweep(self) -> None:
        """Every few seconds: say this instance is alive, take over the ingestions of instances that are gone
        (a lost node or replica) and close their questions; remove the files of failed uploads."""
        last = time.monotonic()
        while not self._stopping.wait(CLEAN_S):
            try:
                self._clean_failed_uploads()
                if time.monotonic() - last < SWEEP_S:
                    continue
                last = time.monotonic()
                self._clean_uploads()
                self.store.beat(self.owner)
                self.store.abandon_questions(self.owner, include_own=False)
                taken = self._resume(self.store.adopt_ingestions(self.owner))
                if taken:
                    log.warning("took over ingestions of a lost instance", extra={"jobs": taken})
            except Exception:  # the database may be briefly unreachable; try again next round
                log.exception("sweep failed")

    def _clean_failed_uploads(self) -> None:
        """Uploads whose ingestion failed for good lose their file (the slide row keeps its error, and the key's
        quota gets the bytes back)."""
        uploads = self.cfg.data_dir / "uploads"
        for slide in self.store.failed_uploads():
            folder = Path(slide.path).parent
            if folder.parent == uploads:
                shutil.rmtree(folder, ignore_errors=True)
            self.store.update_slide(slide.id, bytes=None)

    def _clean_uploads(self, at_start: bool = False) -> None:
        """Failed uploads' files, and upload folders no slide refers to (a server killed mid-upload: `.part`
        files): at start, when no other instance shares the database, all of them; otherwise those untouched for
        ORPHAN_AGE_S."""
        self._clean_failed_uploads()
        uploads = self.cfg.data_dir / "uploads"
        busy = set(self.uploading.copy())  # before the slide rows: an upload registers its row, then leaves
        keep = {Path(p).parent.name for p in self.store.upload_paths()}
        alone = at_start and not (self.store.live_owners() - {self.owner})
        try:
            entries = list(uploads.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name in keep or entry.name in busy or not (alone or _age(entry) > ORPHAN_AGE_S):
                continue
            log.warning("removing an unfinished upload", extra={"folder": entry.name})
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the lanes and the sweeper when started; always free the pipeline's sessions and the database."""
        if self.started:
            self.started = False
            self._stopping.set()
            self._sweeper.join(5)
            self.worker.stop()
        self.pipe.release()
        self.store.close()

    def open_slide(self, slide_id: str):
        """The registered slide's file, checked and pinned (serve/slide_files.py): what every reader gets."""
        from .slide_files import SlideGone, open_registered

        slide = self.store.slide(slide_id)
        if slide is None:
            raise SlideGone(f"slide {slide_id} was deleted")
        return open_registered(self.cfg, self.store, slide)

    def ingest_task(self, job_id: str, slide) -> IngestTask:
        if slide.source_kind != "dicomweb":
            return IngestTask(job_id, slide.id, slide.path, timeout_s=self.cfg.ingest_timeout_s)
        study, series = slide.source.split("/", 1)
        url = self.cfg.dicomweb_url

        def retrieve():
            if not url:
                raise LocpathError("no DICOMweb server is configured (--dicomweb URL)")
            return str(retrieve_series(url, study, series, self.cfg.data_dir))
        return IngestTask(job_id, slide.id, slide.path, retrieve, self.cfg.ingest_timeout_s)


class ServiceRef:
    """The routes reach the Service through this, so the Service can be built where the app runs: `locpath serve`
    builds it before listening (a bad setting fails at once); a Ray Serve replica builds its own after the app was
    shipped to it (ray_app.py)."""

    def __init__(self, service: Service | None = None):
        self._service = service

    def set(self, service: Service) -> None:
        self._service = service

    @property
    def ready(self) -> bool:
        return self._service is not None

    def __getattr__(self, name):
        if name.startswith("__") or "_service" not in self.__dict__:
            raise AttributeError(name)  # (un)pickling asks for dunders before __dict__ is filled
        service = self.__dict__["_service"]
        if service is None:
            raise ApiError(503, "unavailable", "the service is starting")
        return getattr(service, name)


def create_app(cfg: ServeConfig, pipe=None, eager: bool = True, owner: Callable[[], str] | None = None) -> FastAPI:
    """`owner`, called where the Service is built, names the instance (a Ray Serve replica names itself)."""
    svc = ServiceRef(Service(cfg, pipe) if eager else None)

    @asynccontextmanager
    async def lifespan(app):
        if not svc.ready:
            svc.set(Service(cfg, pipe, owner=owner() if owner else None))
        svc.start()
        try:
            yield
        finally:
            svc.stop()

    app = FastAPI(title="locpath", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = svc

    def limit_for(path: str) -> int:
        return cfg.max_upload_bytes if path == "/v1/slides/upload" else cfg.max_request_bytes

    app.add_middleware(Guard, names=cfg.host_names)  # Host, Origin, Content-Type, JSON shape: inside BodyLimit
    app.add_middleware(BodyLimit, limit_for=limit_for)

    # -- errors and request logs ---------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_json(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request")
        return error_json(400, "invalid_request_error", msg)

    @app.exception_handler(LocpathError)
    async def _user_error(request, exc: LocpathError):
        return error_json(400, "invalid_request_error", " ".join(str(exc).split()))

    @app.exception_handler(Refused)
    async def _refused(request, exc: Refused):
        return error_json(exc.status, exc.kind, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):  # unknown route, wrong method, FastAPI's own 4xx
        kind = HTTP_KINDS.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        return error_json(exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request, exc: ClientDisconnect):  # nobody reads it; the request log line says 499
        return error_json(499, "cancelled", "the client went away")

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # a bug: its traceback goes to the log, the client gets JSON
        return error_json(500, "server_error", "internal error (see the service log)")

    @app.middleware("http")
    async def _log_requests(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        if svc.ready:
            response.headers["X-Locpath-Instance"] = svc.owner  # which replica answered, for operators
        svc.metrics.requests.labels(name, str(response.status_code)).inc()
        log.info("request", extra={"method": request.method, "route": name, "status": response.status_code,
                                   "ms": round((time.perf_counter() - t0) * 1000, 1),
                                   "key": getattr(request.state, "key_name", None)})
        return response

    # -- auth ---------------------------------------------------------------------------------------------------------
    def require(scope: str):
        """The key state is read from the store at every request: a key added with `locpath keys add` while the
        service runs is required at once, and a non-loopback service whose keys are all revoked refuses."""
        async def check(request: Request, authorization: str | None = Header(default=None),
                        x_api_key: str | None = Header(default=None)) -> Caller:
            token = auth.bearer(authorization, x_api_key)
            key = svc.store.key_by_hash(auth.token_hash(token)) if token else None
            if key is not None and key.revoked is None:
                if not auth.allows(key.scopes, scope):
                    raise ApiError(403, "permission_error", f"this key lacks the {scope!r} scope")
                request.state.key_name = key.name
                request.state.caller = Caller(key.id, "admin" in key.scopes.split(","))
                return request.state.caller
            challenge = {"WWW-Authenticate": "Bearer"}
            if not svc.store.active_keys():
                if svc.cfg.loopback:
                    request.state.caller = OPEN
                    return OPEN
                raise ApiError(401, "authentication_error", "no API key is active on this service (it is not on "
                               "loopback): add one with `locpath keys add`", challenge)
            if not token:
                raise ApiError(401, "authentication_error", "an API key is required (Authorization: Bearer <key>)",
                               challenge)
            raise ApiError(401, "authentication_error", "unknown or revoked API key", challenge)
        return Depends(check)

    read, submit, admin = require("read"), require("submit"), require("admin")

    # -- health ---------------------------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        alive = all(t.is_alive() for t in svc.worker._threads)
        body = {"status": "ready" if alive else "not ready", "instance": svc.owner, "question_queue": svc.worker.questions.qsize(),
                "ingest_queue": svc.worker.ingests.qsize(), "ingesting": svc.worker.busy_ingest}
        return JSONResponse(body, 200 if alive else 503)

    @app.get("/metrics", dependencies=[read])
    async def metrics():
        svc.worker.publish_queue_depth()
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")

    # -- page -------------------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in {"app.js", "style.css"}:
            raise ApiError(404, "not_found", "no such file")
        return FileResponse(STATIC / name)

    @app.get("/v1/models", dependencies=[read])
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "locpath",
                                            "bundle": svc.cfg.bundle.name}]}

    # -- slides ------------------------------------------------------------------------------------------------------------
    def slide_or_404(slide_id: str):
        s = svc.store.slide(slide_id) if re.fullmatch(r"[0-9a-f]{16}", slide_id or "") else None
        if s is None:
            raise ApiError(404, "not_found", f"no slide {slide_id!r}")
        return s

    def slide_view(s, caller: Caller) -> dict:
        d = s.to_dict()
        d.pop("path", None)
        d["thumbnail"] = f"/v1/slides/{s.id}/thumbnail.png"
        return d if caller.admin else public_slide(d, svc.server_paths)

    def register(name: str, kind: str, source: str, path: str, client_key: str | None, caller: Caller,
                 size: int | None = None) -> JSONResponse:
        from .slide_files import record

        identity = record(path) if kind != "dicomweb" else None  # the file as registered: swaps are refused later
        slide, created = svc.store.add_slide(name, kind, source, path, client_key, caller.key_id, size)
        if not created:
            job = svc.store.jobs(slide.id, limit=1, key_id=caller.key_id if not caller.admin else ANY_KEY,
                                 kind="ingest")
            return JSONResponse({"slide": slide_view(slide, caller),
                                 "job": public_job(job[0], caller, svc.server_paths) if job else None,
                                 "existing": True}, 200)
        if identity is not None:
            svc.store.update_slide(slide.id, identity=identity)
        job, _ = svc.store.add_job("ingest", slide.id, {"source_kind": kind, "source": source},
                                   owner=svc.owner, key_id=caller.key_id)
        try:
            svc.worker.submit_ingest(svc.ingest_task(job.id, svc.store.slide(slide.id)))
        except QueueFull as exc:
            svc.store.delete_slide(slide.id)  # nothing stored for a refused request
            raise ApiError(429, "rate_limit_error", str(exc), {"Retry-After": str(exc.retry_after)}) from None
        return JSONResponse({"slide": slide_view(svc.store.slide(slide.id), caller),
                             "job": public_job(job, caller, svc.server_paths), "existing": False}, 202)

    @app.post("/v1/slides", dependencies=[submit])
    async def register_slide(body: RegisterSlide, caller: Caller = submit):
        if (body.path is None) == (body.dicomweb is None):
            raise ApiError(400, "invalid_request_error", "give exactly one of 'path' or 'dicomweb'")
        if body.path is not None:
            path = resolve_under_roots(body.path, svc.cfg.slide_roots)
            return register(body.name or path.name, "path", body.path, str(path), body.client_key, caller)
        if not svc.cfg.dicomweb_url:
            raise ApiError(400, "invalid_request_error", "this service has no DICOMweb server (--dicomweb URL)")
        study = check_uid(body.dicomweb.study, "dicomweb.study")
        series = check_uid(body.dicomweb.series, "dicomweb.series")
        from .dicomweb import series_folder

        folder = series_folder(svc.cfg.data_dir, study, series)
        return register(body.name or f"DICOM {series}", "dicomweb", f"{study}/{series}", str(folder), body.client_key,
                        caller)

    @app.post("/v1/slides/upload", dependencies=[submit])
    async def upload_slide(request: Request, filename: str, caller: Caller = submit,
                           name: str | None = Query(default=None, max_length=256),  # the JSON route's bounds
                           client_key: str | None = Query(default=None, min_length=1, max_length=128)):
        """Streamed into a private folder, counted against the key's quota as it arrives; whatever is refused
        (quota, a bad file, 429, a client that leaves) leaves nothing on disk."""
        safe = safe_filename(filename)
        if client_key:
            old = svc.store.slide_by_key(client_key, caller.key_id)
            if old is not None and old.status != "failed":
                return JSONResponse({"slide": slide_view(old, caller), "existing": True}, 200)
        from ..fsutil import atomic_file

        quota = UploadQuota(svc, caller.key_id, new_id())
        folder = svc.cfg.data_dir / "uploads" / quota.folder
        target = folder / safe
        try:
            declared = request.headers.get("content-length", "")
            quota.check(int(declared) if declared.isdigit() else 0)  # refused before a byte is stored
            folder.mkdir(mode=0o700)
            with atomic_file(target, suffix=".part") as tmp:
                os.chmod(tmp, 0o600)
                with open(tmp, "wb") as out:
                    async for chunk_ in request.stream():
                        out.write(chunk_)
                        quota.grow(len(chunk_))
                if quota.size == 0:
                    raise ApiError(400, "invalid_request_error", "the upload is empty")
                from ..wsi.factory import check_slide_file

                check_slide_file(tmp)
            os.chmod(target, 0o600)
            quota.check(quota.size, fresh=True)
            response = register(name or safe, "upload", safe, str(target), client_key, caller, quota.size)
            if response.status_code != 202:  # the same client_key registered meanwhile: keep that one
                shutil.rmtree(folder, ignore_errors=True)
            return response
        except ClientDisconnect:
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("upload abandoned: the client went away mid-body; partial file removed",
                        extra={"upload": safe})
            raise ApiError(499, "cancelled", "the client went away during the upload") from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            svc.uploading.pop(quota.folder, None)

    @app.get("/v1/slides", dependencies=[read])
    async def list_slides(caller: Caller = read):
        return {"slides": [slide_view(s, caller) for s in svc.store.slides()]}

    @app.get("/v1/slides/{slide_id}", dependencies=[read])
    async def get_slide(slide_id: str, caller: Caller = read):
        return slide_view(slide_or_404(slide_id), caller)

    @app.delete("/v1/slides/{slide_id}", dependencies=[admin])
    async def delete_slide(slide_id: str):
        s = slide_or_404(slide_id)
        svc.store.delete_slide(s.id)
        if s.source_kind == "upload":
            shutil.rmtree(Path(s.path).parent, ignore_errors=True)
        (svc.cfg.data_dir / "thumbnails" / f"{s.id}.png").unlink(missing_ok=True)
        return {"deleted": s.id}

    @app.get("/v1/slides/{slide_id}/thumbnail.png", dependencies=[read])
    async def thumbnail(slide_id: str, evidence: str | None = None, caller: Caller = read):
        s = slide_or_404(slide_id)
        if s.status != "ready":
            raise ApiError(409, "not_ready", f"slide {s.id} is {s.status}")
        try:
            if evidence is not None:
                job = svc.store.job(evidence) if re.fullmatch(r"[0-9a-f]{16}", evidence) else None
                if job is None or not caller.owns(job) or job.slide_id != s.id or job.kind != "question" \
                        or job.status != "done":  # another key's question reads as a missing one
                    raise ApiError(404, "not_found", f"no finished question {evidence!r} about slide {s.id}")
                png = await asyncio.to_thread(evidence_png, svc, s, job.to_dict())
                return Response(png, media_type="image/png")
            png = await asyncio.to_thread(thumbnail_png, svc, s)
        except LocpathError as exc:
            if not caller.admin:  # same error and status, without the server's paths
                exc.args = (hide_paths(str(exc), svc.server_paths),)
            raise
        return Response(png, media_type="image/png")

    # -- jobs ---------------------------------------------------------------------------------------------------------------
    @app.get("/v1/jobs", dependencies=[read])
    async def list_jobs(slide_id: str | None = None, limit: int = 100, caller: Caller = read):
        """A key's own jobs (an admin key: everyone's)."""
        jobs = svc.store.jobs(slide_id, min(max(limit, 1), 1000), key_id=ANY_KEY if caller.admin else caller.key_id)
        return {"jobs": [public_job(j, caller, svc.server_paths) for j in jobs]}

    @app.get("/v1/jobs/{job_id}", dependencies=[read])
    async def get_job(job_id: str, caller: Caller = read):
        job = svc.store.job(job_id) if re.fullmatch(r"[0-9a-f]{16}", job_id) else None
        if job is None or not caller.owns(job):  # another key's job reads as a missing one
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return public_job(job, caller, svc.server_paths)

    # -- questions ------------------------------------------------------------------------------------------------------------
    def ready_slide(slide_id: str):
        s = slide_or_404(slide_id)
        if s.status != "ready":
            error = hide_paths(s.error, svc.server_paths) if s.error else ""
            detail = f" ({s.progress:.0%})" if s.status == "ingesting" else (f": {error}" if error else "")
            raise ApiError(409, "not_ready", f"slide {s.id} is {s.status}{detail}; ask when it is ready")
        with checked_file(svc, s):  # swapped or escaped since registration: refused here, before queueing
            pass
        return s

    def start_question(request: Request, slide, question: str, sampling: dict, client_key: str | None,
                       request_body: dict):
        """A new question job of the caller's key (and its task), or (None, the job) a client_key already names."""
        if len(question) > svc.cfg.max_question_chars:
            raise ApiError(400, "invalid_request_error",
                           f"the question is {len(question)} characters; at most {svc.cfg.max_question_chars}")
        params = svc.pipe.sampling(**sampling)
        svc.pipe.check_question(question, params)  # too long for the KV cache, bad options: 400 before queueing
        job, created = svc.store.add_job("question", slide.id, request_body, client_key, owner=svc.owner,
                                         key_id=request.state.caller.key_id)
        if not created:
            return None, job
        task = QuestionTask(job.id, slide.path, question, sampling, asyncio.get_running_loop(), asyncio.Queue(),
                            slide_id=slide.id)
        try:
            svc.worker.submit_question(task)
        except QueueFull as exc:
            svc.store.update_job(job.id, status="cancelled", error="queue full", finished=time.time())
            raise ApiError(429, "rate_limit_error", str(exc), {"Retry-After": str(exc.retry_after)}) from None
        return task, job

    async def next_event(task: QuestionTask, request: Request, deadline: float):
        """The next event of a running question; cancels it when the client leaves or the deadline passes."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                task.cancelled.set()
                raise ApiError(504, "timeout", f"no answer within {svc.cfg.question_timeout_s:g} s")
            try:
                event = await asyncio.wait_for(task.events.get(), timeout=min(left, 0.5))
                return event if request.state.caller.admin else public_event(event, svc.server_paths)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    task.cancelled.set()
                    raise ApiError(499, "cancelled", "the client went away") from None

    async def whole_answer(task: QuestionTask, request: Request):
        deadline = time.monotonic() + svc.cfg.question_timeout_s
        while True:
            kind, value = await next_event(task, request, deadline)
            if kind == "done":
                return value
            if kind == "error":
                raise ApiError(400, "invalid_request_error", value)

    def stored_answer(job, request: Request, slide_id: str, question: str):
        """The answer of an earlier question with this client_key (the caller's own: keys are scoped)."""
        asked = job.to_dict()["request"]
        if job.slide_id != slide_id or asked.get("question") != question:
            raise ApiError(409, "conflict", f"this client_key was used for another question (job {job.id})")
        if job.status == "done":
            caller = request.state.caller
            result = job.to_dict()["result"]
            return JSONResponse(dict(result if caller.admin else public_answer(result, svc.server_paths), job=job.id))
        raise ApiError(409, "conflict", f"a question with this client_key is {job.status} (job {job.id})",
                       {"Retry-After": str(max(1, round(svc.worker.answer_seconds)))})

    @app.post("/v1/slides/{slide_id}/questions", dependencies=[submit])
    async def ask(slide_id: str, body: Ask, request: Request):
        slide = ready_slide(slide_id)
        task, job = start_question(request, slide, body.question, body.sampling(), body.client_key,
                                   body.model_dump(exclude={"client_key"}))
        if task is None:
            return stored_answer(job, request, slide.id, body.question)
        if not body.stream:
            answer = await whole_answer(task, request)
            return dict(answer.to_dict(body.evidence_tiles), job=job.id)

        async def events():
            deadline = time.monotonic() + svc.cfg.question_timeout_s
            try:
                while True:
                    try:
                        kind, value = await next_event(task, request, deadline)
                    except ApiError as exc:
                        yield {"event": "error", "data": json.dumps({"type": exc.kind, "message": exc.message})}
                        return
                    if kind == "piece":
                        yield {"event": "piece", "data": json.dumps({"text": value})}
                    elif kind == "done":
                        yield {"event": "done", "data": json.dumps(dict(value.to_dict(body.evidence_tiles), job=job.id))}
                        return
                    else:
                        yield {"event": "error", "data": json.dumps({"type": "invalid_request_error", "message": value})}
                        return
            finally:
                task.cancelled.set()  # a no-op when finished; stops the decoder when the client left mid-answer

        return EventSourceResponse(events(), ping=15)

    @app.post("/v1/chat/completions", dependencies=[submit])
    async def chat(request: Request):
        body = parse_json(await request.body())  # bounded depth, strict JSON (also checked by Guard)
        slide_id, question, sampling, stream = parse_chat(body)
        slide = ready_slide(slide_id)
        task, job = start_question(request, slide, question, sampling, None,
                                   {"question": question, "openai": True, **sampling})
        cid, model = completion_id(), body.get("model") or MODEL
        if not stream:
            return completion(cid, model, await whole_answer(task, request))
        created = int(time.time())

        async def chunks():
            deadline = time.monotonic() + svc.cfg.question_timeout_s
            yield {"data": json.dumps(chunk(cid, model, created, {"role": "assistant", "content": ""}))}
            try:
                while True:
                    try:
                        kind, value = await next_event(task, request, deadline)
                    except ApiError as exc:
                        yield {"data": json.dumps({"error": {"type": exc.kind, "message": exc.message}})}
                        return
                    if kind == "piece":
                        yield {"data": json.dumps(chunk(cid, model, created, {"content": value}))}
                    elif kind == "done":
                        from .openai_api import finish_reason

                        yield {"data": json.dumps(chunk(cid, model, created, {},
                                                        finish_reason(value.generation["stop_reason"])))}
                        yield {"data": "[DONE]"}
                        return
                    else:
                        yield {"data": json.dumps({"error": {"type": "invalid_request_error", "message": value}})}
                        return
            finally:
                task.cancelled.set()

        return EventSourceResponse(chunks(), ping=15)

    return app


# -- helpers -----------------------------------------------------------------------------------------------------------------
def resolve_under_roots(text: str, roots: list[Path]) -> Path:
    """The slide path if, symlinks and `..` resolved, it lies under one of the configured slide roots; else 400/404.
    A path outside the roots gets the same 404 whether or not it exists (no probing the server's files)."""
    if not roots:
        raise ApiError(400, "invalid_request_error", "registering slides by path is off (start with --slide-root DIR)")
    if "\x00" in text:
        raise ApiError(400, "invalid_request_error", "the path holds a NUL character")
    missing = ApiError(404, "not_found", f"{text[:1000]}: no such slide under the slide roots")
    try:
        real = Path(text).resolve(strict=True)
        inside = any(real == r.resolve() or r.resolve() in real.parents for r in roots)
    except (RuntimeError, OSError, ValueError):
        raise missing from None
    if not inside:
        raise missing
    from ..errors import SlideError
    from ..wsi.factory import check_slide_file

    try:
        check_slide_file(real)
    except SlideError as exc:  # named as the client wrote it: the resolved path shows the server's folders
        msg = str(exc)
        raise SlideError(f"{text[:1000]}: {msg[len(str(real)) + 2:] if msg.startswith(f'{real}: ') else msg}") \
            from None
    return real


HTTP_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found",
              405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
              422: "invalid_request_error"}


def error_json(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error shape; a message quoting the client's text cannot fail to encode (a lone surrogate)."""
    text = message.encode("utf-8", "replace").decode("utf-8")
    return JSONResponse({"error": {"type": kind, "message": text}}, status, headers=headers or None)


# -- what a non-admin key sees: no server paths ---------------------------------------------------------------
_ABS_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^/\s'\"]+/)+[^/\s'\"]*")


def _server_paths(cfg: ServeConfig) -> list[str]:
    """The folders whose names a non-admin key must not learn (as given and resolved), longest first."""
    found = set()
    for p in (cfg.data_dir, cfg.runtime.cache_dir, cfg.bundle, *cfg.slide_roots):
        if p is None:
            continue
        for q in (Path(p), Path(p).resolve(), Path(p).absolute()):
            if len(str(q)) > 1:
                found.add(str(q).rstrip("/"))
    return sorted(found, key=len, reverse=True)


def hide_paths(text: str, server_paths: list[str]) -> str:
    """A message with every server path shortened to its file name (known folders first, so names with spaces
    go whole; then anything that looks like an absolute path)."""
    for prefix in server_paths:
        text = re.sub(re.escape(prefix) + r"(?:/[^\s'\"]*)?", lambda m: Path(m.group(0)).name, text)
    return _ABS_PATH.sub(lambda m: Path(m.group(0)).name, text)


def public_answer(answer: dict, server_paths: list[str]) -> dict:
    slide = dict(answer.get("slide") or {})
    if isinstance(slide.get("source"), str):
        slide["source"] = Path(slide["source"]).name
    return dict(answer, slide=slide)


def public_event(event: tuple, server_paths: list[str]) -> tuple:
    kind, value = event
    if kind == "done":
        return kind, dataclasses.replace(value, slide=public_answer({"slide": value.slide}, server_paths)["slide"])
    if kind == "error":
        return kind, hide_paths(value, server_paths)
    return event


def public_slide(d: dict, server_paths: list[str]) -> dict:
    d = dict(d)
    d.pop("key_id", None)
    if d.get("source_kind") == "path":
        d["source"] = Path(d["source"]).name
    if d.get("error"):
        d["error"] = hide_paths(d["error"], server_paths)
    return d


def public_job(job, caller: Caller, server_paths: list[str]) -> dict:
    d = job.to_dict()
    if caller.admin:
        return d
    for k in ("key_id", "owner"):  # internal: which key (the caller's own) and which server host ran it
        d.pop(k, None)
    if d.get("error"):
        d["error"] = hide_paths(d["error"], server_paths)
    req = d.get("request")
    if isinstance(req, dict) and req.get("source_kind") == "path" and isinstance(req.get("source"), str):
        d["request"] = dict(req, source=Path(req["source"]).name)
    if isinstance(d.get("result"), dict) and "slide" in d["result"]:
        d["result"] = public_answer(d["result"], server_paths)
    return d


# -- uploads ---------------------------------------------------------------------------------------------------------
class UploadQuota:
    """One upload's share of its key's quota: the key's stored uploads (from the store, refreshed every 64 MiB)
    plus its other uploads in flight on this instance plus this one's bytes so far must stay within the quota."""

    REFRESH = 64 << 20

    def __init__(self, svc: Service, key_id: str | None, folder: str):
        self.svc, self.key_id, self.folder, self.size = svc, key_id, folder, 0
        self.stored = svc.store.upload_bytes(key_id)
        self.checked = 0
        svc.uploading[folder] = (key_id, 0)

    def grow(self, n: int) -> None:
        self.size += n
        self.svc.uploading[self.folder] = (self.key_id, self.size)
        self.check(self.size, fresh=self.size - self.checked >= self.REFRESH)

    def check(self, size: int, fresh: bool = False) -> None:
        if fresh:
            self.stored, self.checked = self.svc.store.upload_bytes(self.key_id), size
        others = sum(n for f, (k, n) in list(self.svc.uploading.items()) if k == self.key_id and f != self.folder)
        quota = self.svc.cfg.upload_quota_bytes
        if self.stored + others + size > quota:
            raise ApiError(413, "insufficient_quota", f"this upload would take the key's uploads past its quota of "
                           f"{quota} bytes ({self.stored + others} bytes stored or arriving); delete slides first")


def _private_dirs(data_dir: Path) -> None:
    """The data folder (when made here) and its subfolders: this user's only (uploads are patients' data)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in ("uploads", "dicomweb", "thumbnails"):
            (data_dir / sub).mkdir(exist_ok=True, mode=0o700)
            st = (data_dir / sub).stat()
            if st.st_mode & 0o077 and st.st_uid == os.getuid():
                os.chmod(data_dir / sub, 0o700)
    except OSError:
        pass  # ServeConfig.validate says what is wrong


def _age(path: Path) -> float:
    """Seconds since anything in an upload folder last changed."""
    try:
        times = [path.lstat().st_mtime] + ([p.lstat().st_mtime for p in path.iterdir()] if path.is_dir() else [])
    except OSError:
        return 0.0
    return time.time() - max(times)


def safe_filename(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:128]
    if not base:
        raise ApiError(400, "invalid_request_error", f"filename {name!r} has no usable characters")
    return base


@contextlib.contextmanager
def checked_file(svc: Service, slide):
    """The registered slide file, checked and pinned; a refusal is the route's JSON error (403 escaped, 409
    changed, 410 gone), and the slide is marked failed."""
    from ..errors import SlideError
    from .slide_files import http_status

    try:
        with svc.open_slide(slide.id) as f:
            yield f
    except SlideError as exc:
        status, kind = http_status(exc)
        if status == 400:
            raise
        raise ApiError(status, kind, " ".join(str(exc).split())) from None


def thumbnail_png(svc: Service, slide) -> bytes:
    from ..wsi import open_slide
    from ..wsi.overlay import write_overlay

    cached = svc.cfg.data_dir / "thumbnails" / f"{slide.id}.png"
    with checked_file(svc, slide) as f:  # also when cached: a swapped slide shows nothing
        if not cached.exists():
            with open_slide(f) as s:
                write_overlay(s, svc.pipe.plan_tiles(s), cached, max_size=768)
    return cached.read_bytes()


def evidence_png(svc: Service, slide, job: dict) -> bytes:
    """The heatmap of a finished question's evidence over the slide's thumbnail (recomputed from the cached
    latents: the stored answer keeps only its top tiles)."""
    from ..wsi import open_slide
    from ..wsi.overlay import evidence_image

    with checked_file(svc, slide) as f:
        ctx = svc.pipe.prepare(f)
        qkv = svc.pipe.question_kv(ctx.latents, job["request"]["question"])
        ev = svc.pipe.evidence(ctx, qkv)
        with open_slide(f) as s:
            img = evidence_image(s, ev.coords, ev.weights, ev.tile_size_level0, max_size=768)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
