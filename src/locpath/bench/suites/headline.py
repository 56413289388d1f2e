"""The headline, like for like: LoC-Path against the prefix baseline on the same runtime and precision, each side
in its own process (bench/headline.py; JSON `headline`), from the scaling section's cached features."""

from __future__ import annotations

from ..headline import SHAPE_05B
from ..slides import scaling_slide
from ..suite import Context, Skip, Suite

SHAPES = (("reference", ""), (SHAPE_05B, "_0.5b"))  # (headline shape, its ratio-name infix)


def run(ctx: Context) -> dict:
    from ..headline import HeadlineConfig, bench_headline

    cfg = ctx.cfg
    if not (ctx.baselines and cfg.tiles):  # the prefix baseline is exported with torch
        raise Skip("needs --tiles, the baselines and torch (to export the prefix baseline)")
    return bench_headline(ctx.pipe, HeadlineConfig(
        tiles=list(cfg.tiles), question=cfg.question, workdir=cfg.workdir, warmup=cfg.warmup,
        repeats=cfg.repeats, tiles_05b=cfg.headline_tiles_05b,
        slide_for=lambda n: scaling_slide(cfg.workdir, n, ctx.log)), ctx.log, with_05b=cfg.headline_05b)


def ratios(report: dict) -> dict:
    """ttft/memory/kv/peak_rss prefix over LoC-Path per N (>1: LoC-Path ahead), same runtime."""
    r = {}
    for shape, key in SHAPES:
        for row in report.get("headline", {}).get(shape, {}).get("rows", []):
            n, lp, px = row["n_target"], row["locpath"], row["prefix"]
            r[f"ttft_prefix_over_locpath{key}_at_{n}"] = px["ttft_ms"]["median"] / lp["ttft_ms"]["median"]
            r[f"memory_prefix_over_locpath{key}_at_{n}"] = (px["kv_plus_activation_bytes"]
                                                            / max(1, lp["kv_plus_activation_bytes"]))
            r[f"kv_prefix_over_locpath{key}_at_{n}"] = px["kv_bytes"] / lp["kv_bytes"]
            r[f"peak_rss_prefix_over_locpath{key}_at_{n}"] = px["peak_rss_mb"] / lp["peak_rss_mb"]
    return r


def targets(report: dict) -> dict:
    """The 20x time-to-first-token and 50x memory targets, at 10k tiles on the reference shape."""
    r, t = report["ratios"], {}
    for n in (10000,):
        if f"ttft_prefix_over_locpath_at_{n}" in r:
            t[f"ttft_20x_at_{n}"] = {"target": 20, "value": r[f"ttft_prefix_over_locpath_at_{n}"],
                                     "met": r[f"ttft_prefix_over_locpath_at_{n}"] >= 20}
            v = r[f"memory_prefix_over_locpath_at_{n}"]
            t[f"memory_50x_at_{n}"] = {"target": 50, "value": v, "met": v >= 50,
                                       "memory": "KV + activations (peak RSS growth during the TTFT)"}
    return t


SUITE = Suite("headline", "headline", run, ratios=ratios, targets=targets)
