"""Running a batch: in this process, or on Ray (ray_runner.py)."""

from __future__ import annotations

from pathlib import Path

from .inputs import list_slides, read_questions
from .job import run_slide
from .progress import Progress
from .records import Output
from .settings import BatchConfig


def run_batch(cfg: BatchConfig) -> dict:
    cfg.validate()
    slides = list_slides(cfg.slides)
    questions = read_questions(cfg.questions)
    out = Output(cfg.out).prepare()
    if cfg.ray or cfg.ray_address:
        from .ray_runner import run_on_ray

        summary = run_on_ray(cfg, slides, questions, out)
    else:
        summary = run_embedded(cfg, slides, questions, out)
    records = out.all_records()
    summary["output"] = str(out.consolidate(records, cfg.fmt))
    summary["records"] = len(records)
    return summary


def run_embedded(cfg: BatchConfig, slides: list[Path], questions: list[str], out: Output) -> dict:
    """In this process: one Pipeline; each slide's tiles are read by threads ahead of the encoder (TileReader)."""
    from ..runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(cfg.bundle, trusted_keys=cfg.trusted_keys, device=cfg.device, threads=cfg.threads,
                                cache_dir=cfg.cache_dir, memory_slides=1)
    prog = Progress(len(slides), cfg.progress)
    for path in slides:
        prog.update(run_slide(pipe, out, path, questions, cfg.sampling))
        pipe.forget_slides()
    pipe.release()
    return dict(prog.close(), runner="embedded")
