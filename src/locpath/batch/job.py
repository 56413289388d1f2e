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
        digest = content_digest(path)
        row["digest"] = digest
        if out.done(digest):
            row.update(status="skipped")
            return row
        ctx = pipe.prepare(path, keep_features=True)
        answers = [pipe.ask(path, q, **sampling) for q in questions]  # the slide is in memory: questions only
        seconds = time.perf_counter() - t0
        out.write(digest, str(path), ctx, answers, seconds)
        row.update(status="done", tiles=ctx.tiles)
    except LocpathError as exc:
        row["error"] = " ".join(str(exc).split())
    except OSError as exc:
        row["error"] = f"{getattr(exc, 'filename', None) or path}: {exc.strerror or exc}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row
