"""Which slide paths a client may register: those that, symlinks and `..` resolved, lie under a configured slide root
(a path outside the roots gets the same 404 whether or not it exists: no probing the server's files)."""

from __future__ import annotations

from pathlib import Path

from .errors import ApiError


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
