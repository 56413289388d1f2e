"""What routes share through FastAPI's dependencies: the Service (through a ServiceRef, so it can be built where
the app runs), the caller's API key checked for a scope, and ids checked before they reach the store. All are
plain `def`s: FastAPI runs them in its threadpool, so their database reads never block the event loop. (No
`from __future__ import annotations` here or in routers/: a Ray Serve replica re-reads the routes' signatures from
functions shipped by value, where string annotations no longer resolve.)"""

import re
import threading
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Request

from . import auth
from .auth import OPEN, Caller
from .errors import ApiError
from .service import Service

ID = re.compile(r"[0-9a-f]{16}")


class ServiceRef:
    """The routes reach the Service through this, so it can be built where the app runs: `locpath serve` builds it
    before listening (a bad setting fails at once); a Ray Serve replica builds its own with `build` after the app
    was shipped to it (ray_app.py)."""

    def __init__(self, service: Service | None = None, build: Callable[[], Service] | None = None):
        self._service, self._build, self._lock = service, build, None

    def __getstate__(self):  # shipped to Ray replicas: no service, no lock
        return {"_service": None, "_build": self._build, "_lock": None}

    def ensure(self) -> Service:
        """The Service, built once on first use (the lifespan and a replica's constructor may both ask)."""
        if self._service is None:
            if self._lock is None:
                self._lock = threading.Lock()
            with self._lock:
                if self._service is None:
                    if self._build is None:
                        raise RuntimeError("no Service and nothing to build it with")
                    self._service = self._build()
        return self._service

    @property
    def ready(self) -> bool:
        return self._service is not None

    def get(self) -> Service:
        if self._service is None:
            raise ApiError(503, "unavailable", "the service is starting")
        return self._service


def get_service(request: Request) -> Service:
    return request.app.state.service.get()


Svc = Annotated[Service, Depends(get_service)]


def require(scope: str):
    """The key state is read from the store at every request: a key added with `locpath keys add` while the
    service runs is required at once, and a non-loopback service whose keys are all revoked refuses."""
    def check(request: Request, svc: Svc, authorization: str | None = Header(default=None),
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


READ, SUBMIT, ADMIN = require("read"), require("submit"), require("admin")
Reader = Annotated[Caller, READ]
Submitter = Annotated[Caller, SUBMIT]


def slide_or_404(svc: Service, slide_id: str):
    s = svc.store.slide(slide_id) if ID.fullmatch(slide_id or "") else None
    if s is None:
        raise ApiError(404, "not_found", f"no slide {slide_id!r}")
    return s


def job_or_404(svc: Service, job_id: str, caller: Caller, message: str | None = None):
    """A job the caller may read; another key's job reads as a missing one."""
    job = svc.store.job(job_id) if ID.fullmatch(job_id or "") else None
    if job is None or not caller.owns(job):
        raise ApiError(404, "not_found", message or f"no job {job_id!r}")
    return job
