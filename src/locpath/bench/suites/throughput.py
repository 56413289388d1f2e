"""`bench --throughput`: `locpath batch` slides/hour, overlapped against sequential (bench/throughput.py); runs
before torch is loaded, as the batch runner runs in production."""

from __future__ import annotations

from pathlib import Path

from ..suite import Context, Suite


def run(ctx: Context) -> dict:
    from ..throughput import ThroughputConfig, bench_throughput

    cfg = ctx.cfg
    ctx.log(f"slides/hour: {cfg.throughput_slides} slides, sequential against overlapped")
    return bench_throughput(cfg.throughput_pass, Path(cfg.bundle), cfg.workdir / "throughput", ctx.log,
                            ThroughputConfig(slides=cfg.throughput_slides))


def ratios(report: dict) -> dict:
    sph = report.get("slides_per_hour")
    return {"slides_per_hour_overlapped_over_sequential": sph["ratio"]} if sph else {}


def targets(report: dict) -> dict:
    sph = report.get("slides_per_hour")
    if not sph:
        return {}
    v = sph["ratio"]
    return {"slides_per_hour_overlap_1.3x": {"target": 1.3, "value": v, "met": v >= 1.3,
                                             "overlap_bound": sph["sequential_split"]["overlap_bound"],
                                             "cores_busy_sequential": sph["sequential"]["cores_busy"]}}


SUITE = Suite("slides_per_hour", "slides_per_hour", run, flag="throughput_pass",
              off="pass --throughput for `locpath batch` slides/hour, overlapped against sequential (4 synthetic "
                  "~1k-tile slides: about a minute)", ratios=ratios, targets=targets)
