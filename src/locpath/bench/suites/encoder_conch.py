"""`bench --encoder-conch`: the INT8 tile-encoder recipes for CONCH v1 at full depth and 448 px, against ORT fp32
(bench/encoder_vitb.py; JSON `baselines.encoder_conch`). Its target: the int8-safe encoder at >= 2x ORT fp32
tiles/s with every calibration and held-out tile at cosine >= 0.995 (random drawn weights: a check of the recipe
at CONCH's shape, not of the released model)."""

from __future__ import annotations

from ..suite import Context, Suite


def run(ctx: Context) -> dict:
    from ..encoder_vitb import bench_encoder_vitb

    return bench_encoder_vitb(ctx.cfg.workdir / "encoder-conch", ctx.log, shape="conch_v1", slide=ctx.cfg.slide)


def _safe(report: dict) -> dict | None:
    return report.get("baselines", {}).get("encoder_conch", {}).get("variants", {}).get("openvino_int8_safe")


def ratios(report: dict) -> dict:
    safe = _safe(report)
    return {"encoder_conch_int8_safe_vs_ort_fp32": safe["vs_ort_fp32"]} if safe else {}


def targets(report: dict) -> dict:
    safe = _safe(report)
    if not safe:
        return {}
    return {"encoder_conch_int8_safe_2x_ort_fp32_at_min_cosine_0.995": {
        "target": 2.0, "value": safe["vs_ort_fp32"], "cosine_min": safe["cosine_min"],
        "met": safe["vs_ort_fp32"] >= 2.0 and safe["cosine_min"] >= 0.995}}


SUITE = Suite("encoder_conch", "baselines.encoder_conch", run, flag="encoder_conch", needs_torch=True,
              off="pass --encoder-conch (with torch installed) for the INT8 encoder recipes at CONCH v1's full depth",
              ratios=ratios, targets=targets)
