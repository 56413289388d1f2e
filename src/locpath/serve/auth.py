"""API keys: random tokens shown once at creation, stored only as their sha256 (a high-entropy token needs no slow
hash), each with scopes: `read` (slides, jobs, answers' records, metrics), `submit` (register slides, ask) and
`admin` (delete slides, everything). Clients send `Authorization: Bearer <token>` (what the OpenAI client sends)
or `X-API-Key`. Without any key the service runs open only when bound to a loopback address."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets

from ..errors import ConfigError

SCOPES = ("read", "submit", "admin")
TOKEN_PREFIX = "lp_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_scopes(text: str) -> str:
    scopes = sorted({s.strip() for s in text.split(",") if s.strip()})
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ConfigError(f"scopes must be a comma-separated subset of {', '.join(SCOPES)}, got {text!r}")
    return ",".join(scopes)


def allows(granted: str, needed: str) -> bool:
    have = set(granted.split(","))
    return "admin" in have or needed in have or (needed == "read" and "submit" in have)


def bearer(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        m = re.fullmatch(r"\s*Bearer\s+(\S+)\s*", authorization, re.IGNORECASE)  # schemes are case-blind (RFC 7235)
        return m.group(1) if m else None
    return None


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who sent a request: an API key's id (None in open loopback mode) and whether it may see everything."""

    key_id: str | None
    admin: bool

    def owns(self, row) -> bool:
        return self.admin or (row.key_id is not None and row.key_id == self.key_id)


OPEN = Caller(None, True)  # no key exists and the service is on loopback: as before keys, everyone sees all
