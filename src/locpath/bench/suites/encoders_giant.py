"""`bench --encoders-giant [NAMES]`: UNI2-h, Virchow2, H-optimus-0 (covering H-optimus-1) and Prov-GigaPath exported
at full depth with external data and validated against PyTorch fp32, each in its own child process with its own
peak RSS (bench/encoders_giant.py; JSON `encoders_giant`). Minutes per encoder on 2 cores; the exported files
(several GB each) are deleted after each encoder unless `--keep-exports`."""

from __future__ import annotations

from ..suite import Context, Suite


def run(ctx: Context) -> dict:
    from ..encoders_giant import bench_encoders_giant

    return bench_encoders_giant(ctx.cfg.workdir / "encoders-giant", ctx.log, encoders=ctx.cfg.encoders_giant,
                                slide=ctx.cfg.slide, keep=ctx.cfg.keep_exports)


def targets(report: dict) -> dict:
    sec = report.get("encoders_giant")
    if not sec or not sec.get("encoders"):
        return {}
    ok = [r for r in sec["encoders"].values() if r.get("ok")]
    worst = min((r["validation"]["cosine_min"] for r in ok), default=None)
    return {"encoders_giant_exported_and_min_cosine_0.9999": {
        "target": 0.9999, "value": worst, "failed": sec.get("failed", []),
        "met": not sec.get("failed") and worst is not None and worst >= 0.9999}}


SUITE = Suite("encoders_giant", "encoders_giant", run, flag="encoders_giant", needs_torch=True,
              off="pass --encoders-giant (with torch installed) to export and validate the ViT-H/ViT-g tile "
                  "encoders at full depth", targets=targets)
