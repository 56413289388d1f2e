"""Running a batch: in this process, or on Ray (ray_runner.py).

In this process, slides go through one Pipeline, overlapped (the default) or strictly one after another
(`--no-overlap`). Overlapped: `lanes` staging threads each take the next slide (hash, tiles, encoder, STM,
resampler) while this thread answers the earliest staged slide's questions and writes its record: at most `lanes`
slides staged ahead of the one answered, rows and records in slide order, as the sequential runner gives them. A
slide that fails still gives its failed row; a bug or Ctrl-C stops the staging threads (at their next tile batch)
and leaves no half-written record (records are written by this thread only, atomically).
On Ray each worker stays sequential (one slide at a time per actor; Ray runs the workers side by side).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..runtime.options import RuntimeOptions
from .inputs import list_slides, read_questions
from .job import finish_slide, run_slide, stage_slide
from .progress import Progress
from .records import Output, bundle_digest
from .settings import BatchConfig


def run_batch(cfg: BatchConfig) -> dict:
    cfg.validate()
    slides = list_slides(cfg.slides)
    questions = read_questions(cfg.questions)
    out = Output(cfg.out, bundle=bundle_digest(cfg.bundle)).prepare()
    if cfg.ray or cfg.ray_address:
        from .ray_runner import run_on_ray

        summary = run_on_ray(cfg, slides, questions, out)
    else:
        summary = run_embedded(cfg, slides, questions, out)
    records = out.all_records(questions, cfg.sampling)  # this run's: its questions, options and bundle
    summary["output"] = str(out.consolidate(records, cfg.fmt))
    summary["records"] = len(records)
    summary["run"] = out.run_digest(questions, cfg.sampling)
    return summary


def run_embedded(cfg: BatchConfig, slides: list[Path], questions: list[str], out: Output) -> dict:
    """In this process: one Pipeline; each slide's tiles are read by threads ahead of the encoder (TileReader)."""
    from ..runtime.pipeline import Pipeline
    from ..runtime.runner import default_threads

    pipe_threads = cfg.pipeline_threads()
    pipe = Pipeline.from_bundle(cfg.bundle, cfg.runtime, threads=pipe_threads)
    prog = Progress(len(slides), cfg.progress)
    try:
        if cfg.overlap:
            run_overlapped(pipe, out, slides, questions, cfg.sampling, prog.update, cfg.lanes)
        else:
            for path in slides:
                prog.update(run_slide(pipe, out, path, questions, cfg.sampling))
                pipe.forget_slides()
    finally:
        pipe.release()
    return dict(prog.close(), runner="embedded", overlap=cfg.overlap, lanes=cfg.lanes if cfg.overlap else 0,
                threads=pipe_threads or default_threads())


class _Cancelled(Exception):
    """Raised inside a staging thread's prepare (from its tile-batch callback) once the run stops."""


def run_overlapped(pipe, out: Output, slides: list[Path], questions: list[str], sampling: dict, report,
                   lanes: int = 1) -> None:
    """Stage slides in `lanes` threads ahead of this one, which answers, writes and calls `report(row)` in slide
    order. At most `lanes` slides are staged while one is answered. An exception that is not a slide's own failure
    (a bug, KeyboardInterrupt) stops the staging threads and propagates here."""
    stop = threading.Event()

    def cancel(done: int, total: int) -> None:
        if stop.is_set():
            raise _Cancelled

    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="locpath-batch-stage")
    pending: deque[Future] = deque()
    try:
        for path in slides:
            pending.append(pool.submit(stage_slide, pipe, out, path, questions, sampling, cancel))
            if len(pending) > lanes:
                report(finish_slide(pipe, out, pending.popleft().result(), questions, sampling))
                pipe.forget_slides()
        while pending:
            report(finish_slide(pipe, out, pending.popleft().result(), questions, sampling))
            pipe.forget_slides()
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def run_pass(bundle: Path, slides: Path, questions: Path, out: Path, cache_dir: Path, overlap: bool,
             lanes: int) -> tuple[dict, list[dict]]:
    """One quiet in-process run and its records: a pass of `bench --throughput` (bench/throughput.py; the CLI hands
    it to the bench, which sits beside this package, not above it)."""
    cfg = BatchConfig(bundle=bundle, slides=slides, questions=questions, out=out, progress=False,
                      overlap=overlap, lanes=lanes, runtime=RuntimeOptions(memory_slides=1, cache_dir=str(cache_dir)))
    summary = run_batch(cfg)
    return summary, Output(out, bundle=bundle_digest(bundle)).all_records(read_questions(questions), cfg.sampling)
