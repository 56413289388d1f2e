"""Joining a Ray cluster, shared by `locpath batch --ray` and `locpath serve --ray`: one place that turns Ray's
connection failures (wrong address, token auth, Ray not installed) into one clear line."""

from __future__ import annotations

from .errors import LocpathError


def _auth_hint(exc: BaseException) -> str:
    """Ray clusters started with token auth refuse clients that were not told to use it; say how."""
    chain, e = [], exc
    while e is not None and len(chain) < 5:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    if any("AuthToken" in text or "Authentication" in text for text in chain):
        return "; the cluster uses token auth: set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN_PATH)"
    return ""


def connect(address: str | None, what: str) -> bool:
    """Join the cluster at `address`, or start a local one for this process when it is None. Returns whether this
    call started Ray (so the caller shuts it down); an already initialised Ray is reused."""
    try:
        import ray
    except ImportError:
        raise LocpathError(f"{what} needs Ray (pip install 'locpath[cluster]')") from None
    if ray.is_initialized():
        return False
    kw = {"address": address} if address else {"include_dashboard": False}
    try:
        ray.init(logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}}, **kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LocpathError(f"cannot reach the Ray cluster at {address or 'a new local cluster'} "
                           f"({str(exc).splitlines()[0][:200]}){_auth_hint(exc)}") from None
    return True
