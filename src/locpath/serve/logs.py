"""Structured logs: one JSON object per line on stderr (what a hospital's log collector ingests), for the service's
own events and one per HTTP request (method, route, status, milliseconds, key name; never the key itself)."""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, default=str)


def setup(json_lines: bool = True, level: int = logging.INFO) -> None:
    for name in ("locpath", "locpath.serve"):
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if not getattr(h, "_locpath_serve", False)]
    handler = logging.StreamHandler(sys.stderr)
    handler._locpath_serve = True
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("locpath")
    root.handlers = [handler]
    root.setLevel(level)
    root.propagate = False


class RequestLog:
    """ASGI middleware (outermost of the service's own): one log line and one metrics count per request, and the
    answering instance in an `X-Locpath-Instance` header, written when the response starts. A plain ASGI
    middleware, not Starlette's BaseHTTPMiddleware: that one hides a client's disconnect from the routes, so a
    JSON client that hung up mid-answer kept its decoder row until the answer ended."""

    def __init__(self, app, service):
        self.app, self.service = app, service  # service: serve.deps.ServiceRef (ready once the Service is built)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()

        async def logged_send(message):
            if message["type"] == "http.response.start":
                self._record(scope, message, t0)
            await send(message)
        await self.app(scope, receive, logged_send)

    def _record(self, scope, message, t0: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        status = message["status"]
        if self.service.ready:
            svc = self.service.get()
            message.setdefault("headers", [])
            message["headers"] = [*message["headers"], (b"x-locpath-instance", svc.owner.encode("latin-1", "replace"))]
            svc.metrics.requests.labels(route, str(status)).inc()
        state = scope.get("state") or {}
        logging.getLogger("locpath.serve").info(
            "request", extra={"method": scope["method"], "route": route, "status": status,
                              "ms": round((time.perf_counter() - t0) * 1000, 1), "key": state.get("key_name")})
