"""`bench --encoder-vit-b`: the tile-encoder recipes at a ViT-B/16 shape (bench/encoder_vitb.py; JSON
`baselines.encoder_vit_b`)."""

from __future__ import annotations

from ..suite import Context, Suite


def run(ctx: Context) -> dict:
    from ..encoder_vitb import bench_encoder_vitb

    return bench_encoder_vitb(ctx.cfg.workdir / "encoder-vit-b", ctx.log, slide=ctx.cfg.slide)


def ratios(report: dict) -> dict:
    from ..encoder_vitb import best_accurate, int8_ratios

    vb = report.get("baselines", {}).get("encoder_vit_b")
    if not vb:
        return {}
    best, v = best_accurate(vb)
    return {"encoder_vit_b_best_vs_pytorch_bf16": v["vs_pytorch_bf16"], "encoder_vit_b_best_vs_ort_fp32": v["vs_ort_fp32"],
            **int8_ratios(vb, "b")[0]}


def targets(report: dict) -> dict:
    from ..encoder_vitb import best_accurate, int8_ratios

    vb = report.get("baselines", {}).get("encoder_vit_b")
    if not vb:
        return {}
    best, v = best_accurate(vb)
    return {"encoder_vit_b_1.2x_pytorch_bf16_at_cosine_0.999": {"target": 1.2, "value": v["vs_pytorch_bf16"],
                                                                "variant": best, "met": v["vs_pytorch_bf16"] >= 1.2},
            **int8_ratios(vb, "b")[1]}


SUITE = Suite("encoder_vit_b", "baselines.encoder_vit_b", run, flag="encoder_vitb", needs_torch=True,
              off="pass --encoder-vit-b (with torch installed) for the tile-encoder recipes at a ViT-B/16 shape",
              ratios=ratios, targets=targets)
