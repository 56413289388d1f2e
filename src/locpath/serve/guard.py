"""Checks at the HTTP boundary, before any route runs, so that a web page open in a browser on the same machine
cannot drive the API (the service is open on loopback when it has no keys):

- `Host` must name this service (loopback names, the bound address, `--allowed-host`): DNS rebinding gives an
  attacker's page a same-origin view of 127.0.0.1 under the attacker's name. Missing, repeated or malformed: 400;
  a well-formed name not on the list: 421.
- A state-changing request (any method but GET/HEAD/OPTIONS) from another origin is refused (403): an `Origin`
  other than the service's own (`null` included) or `Sec-Fetch-Site: cross-site/same-site`. No Origin (curl,
  SDKs) passes.
- Bodies: every POST/PUT/PATCH takes `application/json` (charset utf-8 at most), except the upload, which takes
  raw bytes but not the types a form or a preflight-free cross-site fetch sends (text/*, multipart/*,
  form-encoded): 415. JSON bodies are checked before FastAPI parses them: nesting at most MAX_DEPTH, UTF-8
  without a byte-order mark, finite numbers, no NaN/Infinity, no repeated keys, an object at the top (400).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re

import numpy as np

MAX_DEPTH = 32  # a chat request nests ~6 deep; the recursive parser gives up near 1,000
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
BODY_METHODS = {"POST", "PUT", "PATCH"}
RAW_BODY_PATHS = {"/v1/slides/upload"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_PORTS = {"http": 80, "https": 443}
_NAME = re.compile(r"([a-z0-9](?:[a-z0-9_.-]{0,251}[a-z0-9])?)\.?(?::([0-9]{1,5}))?")
_IPV6 = re.compile(r"\[([0-9a-f:.]{2,45})\](?::([0-9]{1,5}))?")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]], _STEP[[ord("]"), ord("}")]] = 1, -1


class Refused(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def parse_host(value: str) -> tuple[str, int | None] | None:
    """(normalized name, port or None) of a `Host` value or an allow-list entry; None when malformed. Names are
    lower-cased without a trailing dot; IPv6 literals lose their brackets and take their canonical form."""
    v = value.lower()
    m = _IPV6.fullmatch(v)
    if m:
        try:
            name = str(ipaddress.IPv6Address(m.group(1)))
        except ValueError:
            return None
    else:
        m = _NAME.fullmatch(v)
        if not m or ".." in m.group(1):
            return None
        name = m.group(1)
    port = int(m.group(2)) if m.group(2) else None
    if port is not None and not 0 < port < 65536:
        return None
    return name, port


def allowed_names(bound: str, extra: list[str]) -> frozenset[str]:
    """The host names this service answers to: loopback, the bound address unless a wildcard, `extra`."""
    names = set(LOOPBACK_NAMES)
    for entry in [bound, *extra]:
        parsed = parse_host(f"[{entry}]" if ":" in entry and not entry.startswith("[") else entry)
        if parsed and parsed[0] not in ("0.0.0.0", "::"):
            names.add(parsed[0])
    return frozenset(names)


def _headers(scope) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for k, v in scope.get("headers") or []:
        out.setdefault(k.lower(), []).append(v)
    return out


def _one(headers: dict, name: bytes) -> str | None:
    """The single value of a header (None when absent); repeated: 400."""
    values = headers.get(name, [])
    if len(values) > 1:
        raise Refused(400, "invalid_request_error", f"the {name.decode()} header is repeated")
    return values[0].decode("latin-1") if values else None


def check_host(headers: dict, names: frozenset[str]) -> tuple[str, int | None]:
    value = _one(headers, b"host")
    if value is None:
        raise Refused(400, "invalid_request_error", "the request has no Host header")
    parsed = parse_host(value)
    if parsed is None:
        raise Refused(400, "invalid_request_error", "the Host header is malformed")
    if parsed[0] not in names:
        raise Refused(421, "misdirected_request", f"this service does not answer for host {parsed[0][:100]!r} "
                                                  "(start it with --allowed-host NAME to add one)")
    return parsed


def check_origin(headers: dict, host: tuple[str, int | None], scheme: str) -> None:
    """A state-changing request must come from this service's own origin, or from no browser page at all."""
    site = _one(headers, b"sec-fetch-site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        raise Refused(403, "permission_error", f"cross-site request refused (Sec-Fetch-Site: {site[:40]})")
    origin = _one(headers, b"origin")
    if origin is None:
        return
    m = re.fullmatch(r"(https?)://([^/?#@\s]+)", origin.strip().lower())
    parsed = parse_host(m.group(2)) if m else None
    own = (host[0], host[1] or DEFAULT_PORTS.get(scheme, 80))
    if parsed is None or (parsed[0], parsed[1] or DEFAULT_PORTS[m.group(1)]) != own:
        raise Refused(403, "permission_error", f"cross-origin request refused (Origin: {origin[:100]})")


def media_type(value: str | None) -> tuple[str, dict[str, str]]:
    """('type/subtype', {param: value}) lower-cased; ('', {}) when absent."""
    if value is None:
        return "", {}
    essence, *params = value.split(";")
    out = {}
    for p in params:
        k, _, v = p.partition("=")
        out[k.strip().lower()] = v.strip().strip('"').lower()
    return essence.strip().lower(), out


def check_content_type(headers: dict, path: str) -> bool:
    """True when the body is JSON to check; refuses the types this route does not take."""
    essence, params = media_type(_one(headers, b"content-type"))
    if path in RAW_BODY_PATHS:
        if essence.startswith(("text/", "multipart/")) or essence == "application/x-www-form-urlencoded":
            raise Refused(415, "unsupported_media_type", f"an upload is the slide file's bytes "
                                                         f"(Content-Type: application/octet-stream), not {essence}")
        return False
    if essence != "application/json" or any(k != "charset" or v != "utf-8" for k, v in params.items()):
        shown = essence or "none"
        raise Refused(415, "unsupported_media_type", f"the body must be JSON (Content-Type: application/json), "
                                                     f"not {shown[:100]}")
    return True


def json_depth(body: bytes) -> int:
    """The nesting depth of a JSON text (strings skipped), without parsing it: a running sum of its brackets."""
    brackets = np.frombuffer(_STRING.sub(b"", body), dtype=np.uint8)
    steps = _STEP[brackets]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0)) if steps.any() else 0


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:40]} is out of range")
    return v


def _unique(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k[:40]!r} is repeated")
        out[k] = v
    return out


def parse_json(body: bytes) -> dict:
    """The JSON object of a request body; refuses (400) what a recursive parser would choke on (deep nesting) or
    what two parsers could read differently (a byte-order mark, NaN, 1e999, a repeated key)."""
    if json_depth(body) > MAX_DEPTH:
        raise Refused(400, "invalid_request_error", f"the JSON body nests deeper than {MAX_DEPTH} levels")
    if body.startswith(b"\xef\xbb\xbf"):
        raise Refused(400, "invalid_request_error", "the body is not JSON: it starts with a byte-order mark")
    try:
        doc = json.loads(body.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite,
                         object_pairs_hook=_unique)
    except UnicodeDecodeError:
        raise Refused(400, "invalid_request_error", "the body is not JSON: not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise Refused(400, "invalid_request_error", f"the body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise Refused(400, "invalid_request_error", "the body must be a JSON object")
    if not _utf8(doc):
        raise Refused(400, "invalid_request_error", "the body is not JSON text: an unpaired surrogate (\\ud800)")
    return doc


def _utf8(value) -> bool:
    """No lone surrogate in any string (JSON's \\uXXXX escapes can make one; nothing downstream can encode it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_utf8(k) and _utf8(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_utf8(v) for v in value)
    return True


class Guard:
    """ASGI middleware (inside BodyLimit, which bounds what it buffers) applying the checks above."""

    def __init__(self, app, names: frozenset[str]):
        self.app, self.names = app, names

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method = scope["method"].upper()
        try:
            headers = _headers(scope)
            host = check_host(headers, self.names)
            if method not in SAFE_METHODS:
                check_origin(headers, host, scope.get("scheme", "http"))
            if method in BODY_METHODS and check_content_type(headers, scope["path"]):
                body, gone = await _read(receive)
                if gone:
                    return await _refuse(send, 499, "cancelled", "the client went away")
                parse_json(body)
                receive = _replay(body, receive)
        except Refused as exc:
            return await _refuse(send, exc.status, exc.kind, exc.message)
        await self.app(scope, receive, send)


async def _read(receive) -> tuple[bytes, bool]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when the client leaves
    return replay


async def _refuse(send, status: int, kind: str, message: str) -> None:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
