"""Slides per hour, overlapped against sequential (`bench --throughput`): `locpath batch`'s in-process runner over
K synthetic slides of about N tissue tiles each (distinct seeds, written once into the work folder and reused), a
few questions per slide, run both ways back to back in this process in the order sequential, overlapped,
overlapped, sequential (so a drift of the machine weighs on both alike). Every pass gets a fresh output folder and
slide cache: no slide is found done or cached. slides/hour is the batch's own figure (slides done over the time
from the first slide to the last, the bundle's load excluded); CPU seconds (all threads) show how busy the cores
were, which bounds what overlapping can gain."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LocpathError
from ..synth.qa import REPORT_PROMPT, TEMPLATES

QUESTIONS = (REPORT_PROMPT,) + tuple(t[0] for t in TEMPLATES.values())  # a report and one of each question type
PREPARE_KEYS = ("hash", "open", "tissue_grid", "tiles_encode", "stm", "resampler")


@dataclass
class ThroughputConfig:
    slides: int = 4
    tiles: int = 1000
    rounds: int = 1  # each round: sequential, overlapped, overlapped, sequential
    lanes: int = 2
    seed: int = 9100


def throughput_slides(workdir: Path, cfg: ThroughputConfig, log) -> list[Path]:
    """K synthetic slides of about `cfg.tiles` tissue tiles, seeds cfg.seed + i (so no two share content)."""
    from ..synth import make_spec, write_slide

    folder = workdir / f"slides-{cfg.tiles}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(cfg.slides):
        path = folder / f"slide-{cfg.seed + i}.tiff"
        if not path.exists():
            side = max(8, int(np.ceil(np.sqrt(cfg.tiles / 0.5))))
            spec = None
            for _ in range(4):  # tissue covers about half a synthetic slide; adjust the side to land near N
                spec = make_spec(cfg.seed + i, tiles=(side, side))
                got = spec.meta["tissue_tiles"]
                if abs(got - cfg.tiles) <= 0.1 * cfg.tiles:
                    break
                side = max(8, int(round(side * np.sqrt(cfg.tiles / max(got, 1)))))
            log(f"writing {path.name} ({spec.meta['tissue_tiles']} tissue tiles)")
            write_slide(spec, path, fmt="tiff")
        out.append(path)
    return out


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _pass(run_pass, bundle: Path, slide_dir: Path, questions: Path, scratch: Path, overlap: bool, lanes: int) -> dict:
    shutil.rmtree(scratch, ignore_errors=True)
    w0, c0 = time.perf_counter(), _cpu_seconds()
    summary, records = run_pass(bundle, slide_dir, questions, scratch / "out", scratch / "cache", overlap, lanes)
    wall, cpu = time.perf_counter() - w0, _cpu_seconds() - c0
    shutil.rmtree(scratch, ignore_errors=True)
    if summary["failed"] or summary["done"] != summary["slides"]:
        raise LocpathError(f"bench --throughput: a pass did not finish every slide: {summary['failures']}")
    prepare = [sum(r["slide_timings_ms"].get(k, 0.0) for k in PREPARE_KEYS) / 1000 for r in records]
    return {"mode": "overlapped" if overlap else "sequential", "slides_per_hour": summary["slides_per_hour"],
            "seconds": summary["seconds"], "threads": summary["threads"], "lanes": summary["lanes"],
            "cpu_seconds": round(cpu, 2), "cores_busy": round(cpu / wall, 2),
            "prepare_s_per_slide": round(float(np.median(prepare)), 3),
            "slide_s_per_slide": round(float(np.median([r["seconds"] for r in records])), 3)}


def bench_throughput(run_pass, bundle: Path, workdir: Path, log, cfg: ThroughputConfig | None = None) -> dict:
    """`run_pass(bundle, slides, questions, out, cache_dir, overlap, lanes) -> (summary, records)`: batch.runner.run_pass
    (handed in by the CLI: bench and batch are siblings)."""
    cfg = cfg or ThroughputConfig()
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    slides = throughput_slides(workdir, cfg, log)
    slide_dir = workdir / f"run-{cfg.tiles}"  # exactly these K slides, whatever else the slide folder holds
    shutil.rmtree(slide_dir, ignore_errors=True)
    slide_dir.mkdir()
    for p in slides:
        os.symlink(p.resolve(), slide_dir / p.name)
    questions = workdir / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    passes = []
    for _ in range(cfg.rounds):
        for overlap in (False, True, True, False):
            passes.append(_pass(run_pass, bundle, slide_dir, questions, workdir / "pass", overlap, cfg.lanes))
            p = passes[-1]
            log(f"{p['mode']}: {p['slides_per_hour']:.0f} slides/hour ({p['seconds']:.1f} s for {cfg.slides} slides, "
                f"{p['cores_busy']:.2f} cores busy)")

    def summary(mode: str) -> dict:
        mine = [p for p in passes if p["mode"] == mode]
        return {"slides_per_hour": float(np.median([p["slides_per_hour"] for p in mine])),
                "cores_busy": float(np.median([p["cores_busy"] for p in mine])),
                "cpu_seconds_per_slide": float(np.median([p["cpu_seconds"] for p in mine])) / cfg.slides,
                "threads": mine[0]["threads"], "lanes": mine[0]["lanes"]}

    seq, ovl = summary("sequential"), summary("overlapped")
    seq_passes = [p for p in passes if p["mode"] == "sequential"]
    prepare = float(np.median([p["prepare_s_per_slide"] for p in seq_passes]))
    whole = float(np.median([p["slide_s_per_slide"] for p in seq_passes]))
    return {"slides": cfg.slides, "tiles_target": cfg.tiles, "questions": list(QUESTIONS),
            "sequential": seq, "overlapped": ovl,
            "ratio": ovl["slides_per_hour"] / seq["slides_per_hour"],
            # sequentially, a slide's time split into its preparation and the rest (answers, features, record):
            # overlapping hides the smaller part at best, when the two do not compete for the same cores
            "sequential_split": {"prepare_s": prepare, "answer_and_write_s": max(0.0, whole - prepare),
                                 "overlap_bound": whole / max(prepare, whole - prepare, 1e-9)},
            "passes": passes, "seconds": round(time.perf_counter() - t0, 1)}
