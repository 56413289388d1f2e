"""Every runtime stage on one slide: cold slide-side stages (slide cache off), question-side stages on the
prepared slide, the tile reader alone; median/min/max over repeats after warm-up (JSON `stages`, `throughput`)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..stats import spread
from ..suite import Context, Suite


def bench_stages(pipe, slide: Path, cfg) -> tuple[dict, dict]:
    from ...wsi import TileReader, open_slide

    slide_runs, q_runs, read_s = [], [], []
    for i in range(cfg.warmup + cfg.repeats):
        pipe.forget_slides()
        ctx = pipe.prepare(slide)
        if i >= cfg.warmup:
            slide_runs.append(ctx.timings_ms)
    for i in range(cfg.warmup + cfg.repeats):
        a = pipe.ask(slide, cfg.question)
        if i >= cfg.warmup:
            q_runs.append(a.timings_ms)
    with open_slide(slide) as s:
        plan = pipe.plan_tiles(s)
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            n = sum(len(b.tiles) for b in TileReader(s, plan.grid))
            read_s.append(time.perf_counter() - t0)
    stages = {}
    for key in ("open", "tissue_grid", "tiles_encode", "tile_read_wait", "encode", "stm", "resampler"):
        stages[key] = spread([r[key] for r in slide_runs])
    stages["tile_read"] = spread([s * 1000 for s in read_s])
    for key in ("tis", "cross_kv", "prefill", "decode_per_token", "time_to_first_token"):
        stages[key] = spread([r[key] for r in q_runs])
    cold = [sum(r[k] for k in ("open", "tissue_grid", "tiles_encode", "stm", "resampler")) for r in slide_runs]
    thr = {
        "tiles": ctx.tiles,
        "tokens_after_stm": ctx.tokens,
        "read_tiles_per_s": n / float(np.median(read_s)),
        "encode_tiles_per_s": ctx.tiles / (stages["encode"]["median"] / 1000),
        "decode_tokens_per_s": 1000.0 / max(stages["decode_per_token"]["median"], 1e-9),
        "cold_time_to_first_token_ms": float(np.median(cold)) + stages["time_to_first_token"]["median"],
    }
    return stages, thr


def run(ctx: Context) -> dict:
    from ...runtime.pipeline import peak_rss_mb

    ctx.log(f"stages on {ctx.slide} ({ctx.cfg.warmup} warm-up, {ctx.cfg.repeats} repeats)")
    stages, thr = bench_stages(ctx.pipe, ctx.slide, ctx.cfg)
    thr["peak_rss_mb"] = peak_rss_mb()  # the runtime alone: no baseline or ceiling buffer loaded yet
    return {"stages": stages, "throughput": thr}


SUITE = Suite("stages", "", run)
