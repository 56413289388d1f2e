"""One slide of a batch, through the pipeline's public stages, in two halves so a runner can overlap them:

    staged = stage_slide(pipe, out, path, questions, sampling)   # hash; skip when a record has this content, these
                                                                 # questions and options and this bundle; check
                                                                 # the questions (pipe.question, once); prepare
                                                                 # (tiles, encoder, STM, resampler; latents into
                                                                 # the slide cache)
    row = finish_slide(pipe, out, staged, questions, sampling)   # answer every question as one batch, write its
                                                                 # features and record
`run_slide` is the two back to back (the Ray workers and the sequential runner). A slide's failure is its row's
error (LocpathError, OSError); anything else (a bug, Ctrl-C) propagates."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LocpathError
from ..runtime.slide_cache import content_digest
from ..wsi.factory import check_slide_file
from .records import Output


@dataclass
class Staged:
    """A slide after its first half: `ctx` set when it is prepared and waits for its questions; otherwise `row` is
    final (skipped or failed)."""

    row: dict
    ctx: object = None
    questions: list | None = None  # the checked Questions (runtime/question.py), answered by finish_slide
    seconds: float = 0.0  # the first half's own time (a slide waiting in a queue is not charged for the wait)


def _error(exc: BaseException, path: Path) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, LocpathError):
        return f"{getattr(exc, 'filename', None) or path}: {exc.strerror or exc}"
    return " ".join(str(exc).split())


def stage_slide(pipe, out: Output, path: Path, questions: list[str], sampling: dict, progress=None) -> Staged:
    """Hash, skip or check, and prepare. `progress(done, total)` is called after each tile batch (it may raise to
    stop the slide: a runner's cancel)."""
    t0 = time.perf_counter()
    row = {"slide": str(path), "digest": "", "status": "failed", "seconds": 0.0, "tiles": 0, "error": ""}
    staged = Staged(row)
    try:
        check_slide_file(path)
        digest = pipe.cache.content_hash(path) if pipe.cache else content_digest(path)
        row["digest"] = digest
        if out.done(digest, questions, sampling):
            row.update(status="skipped")
        else:
            # a question that cannot fit fails before the slide is tiled
            staged.questions = [pipe.question(q, **sampling) for q in questions]
            staged.ctx = pipe.prepare(path, keep_features=True, digest=digest, progress=progress)
    except (LocpathError, OSError) as exc:
        row["error"] = _error(exc, path)
    staged.seconds = time.perf_counter() - t0
    row["seconds"] = round(staged.seconds, 3)
    return staged


def finish_slide(pipe, out: Output, staged: Staged, questions: list[str], sampling: dict) -> dict:
    """Answer a prepared slide's questions (decoded as one batch) and write its features and record."""
    row = staged.row
    if staged.ctx is None:
        return row
    t0 = time.perf_counter()
    try:
        answers = pipe.answer(staged.ctx.again({}), staged.questions)
        seconds = staged.seconds + time.perf_counter() - t0
        out.write(row["digest"], row["slide"], staged.ctx, answers, seconds, questions, sampling)
        row.update(status="done", tiles=staged.ctx.tiles)
    except (LocpathError, OSError) as exc:
        row["error"] = _error(exc, Path(row["slide"]))
    finally:
        staged.ctx = None  # the features are not held past this slide
    row["seconds"] = round(staged.seconds + time.perf_counter() - t0, 3)
    return row


def run_slide(pipe, out: Output, path: Path, questions: list[str], sampling: dict) -> dict:
    """{"slide", "digest", "status": done | skipped | failed, "seconds", "tiles", "error"}."""
    return finish_slide(pipe, out, stage_slide(pipe, out, path, questions, sampling), questions, sampling)
