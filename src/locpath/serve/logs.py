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
