"""`bench --encoder-vit-l`: the INT8 tile-encoder recipes at UNI's ViT-L/16 shape against PyTorch bf16
(bench/encoder_vitb.py; JSON `baselines.encoder_vit_l`)."""

from __future__ import annotations

from ..suite import Context, Suite


def run(ctx: Context) -> dict:
    from ..encoder_vitb import bench_encoder_vitb

    return bench_encoder_vitb(ctx.cfg.workdir / "encoder-vit-l", ctx.log, shape="vit_l", slide=ctx.cfg.slide)


def _section(report: dict) -> dict | None:
    return report.get("baselines", {}).get("encoder_vit_l")


def ratios(report: dict) -> dict:
    from ..encoder_vitb import int8_ratios

    return int8_ratios(_section(report), "l")[0] if _section(report) else {}


def targets(report: dict) -> dict:
    from ..encoder_vitb import int8_ratios

    return int8_ratios(_section(report), "l")[1] if _section(report) else {}


SUITE = Suite("encoder_vit_l", "baselines.encoder_vit_l", run, flag="encoder_vitl", needs_torch=True,
              off="pass --encoder-vit-l (with torch installed) for the INT8 encoder recipes at UNI's ViT-L/16 shape",
              ratios=ratios, targets=targets)
