"""One slide of a batch, through the pipeline's public stages: skip it when its content already has a record,
else prepare it (tiles, encoder, STM, resampler; latents into the slide cache), answer every question from memory,
and write its features and record. Shared by the in-process and the Ray runners."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import LocpathError
from ..runtime.slide_cache import content_digest
from ..wsi.factory import check_slide_file
from .records import Output


def run_slide(pipe, out: Output, path: Path, questions: list[str], sampling: dict) -> dict:
    """{"slide", "digest", "status": done | skipped | failed, "seconds", "tiles", "error"}."""
    t0 = time.perf_counter()
    row = {"slide": str(path), "digest": "", "status": "failed", "seconds": 0.0, "tiles": 0, "error": ""}
    try:
        check_slide_file(path)
        digest = pipe.cache.content_hash(path) if pipe.cache else content_digest(path)
        row["digest"] = digest
        if out.done(digest):
            row.update(status="skipped")
            return row
        params = pipe.sampling(**sampling)
        for q in questions:  # a question that cannot fit fails before the slide is tiled
            pipe.check_question(q, params)
        ctx = pipe.prepare(path, keep_features=True, digest=digest)
        answers = [pipe.answer(ctx.again({}), q, **sampling) for q in questions]
        seconds = time.perf_counter() - t0
        out.write(digest, str(path), ctx, answers, seconds)
        row.update(status="done", tiles=ctx.tiles)
    except LocpathError as exc:
        row["error"] = " ".join(str(exc).split())
    except OSError as exc:
        row["error"] = f"{getattr(exc, 'filename', None) or path}: {exc.strerror or exc}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row
