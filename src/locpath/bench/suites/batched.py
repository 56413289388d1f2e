"""Batched decoding on `bench --decoder-0.5b`'s fused INT4 graphs: aggregate tokens/s at batch 1, 2, 4, 8
(bench/batched.py; JSON `baselines.decoder_0.5b.batched`)."""

from __future__ import annotations

import os

from ..suite import Context, Suite


def run(ctx: Context) -> dict:
    from ..batched import bench_batched, contract_05b

    built = ctx.cfg.workdir / "decoder-0.5b" / "locpath-0.5b"  # the graphs the decoder_0.5b suite built
    return bench_batched({"int4_block32": built / "decoder_fused.int4.onnx",
                          "int4_block128": built / "decoder_fused.int4-b128.onnx"},
                         contract_05b(), os.cpu_count() or 1, log=ctx.log)


def _batched(report: dict) -> dict | None:
    return report.get("baselines", {}).get("decoder_0.5b", {}).get("batched")


def ratios(report: dict) -> dict:
    """Aggregate decode tokens/s, batch 4 over batch 1 of the same graph."""
    batched = _batched(report)
    if not (batched and "batch_4" in batched):
        return {}
    return {f"decode_0.5b_batch4_over_batch1_{name}": g["batch_4"]["over_batch_1"]
            for name, g in batched["graphs"].items() if "batch_4" in g}


def targets(report: dict) -> dict:
    batched = _batched(report)
    if not (batched and "batch_4" in batched):
        return {}
    b4 = batched["batch_4"]
    v = b4["over_batch_1"]
    return {"decode_0.5b_batch4_3x_batch1": {"target": 3.0, "value": v, "graph": batched["best"],
                                             "identical_to_batch_1": b4["identical_to_batch_1"],
                                             "runtime_batches": b4["runtime_batches"],
                                             "met": v >= 3.0 and b4["identical_to_batch_1"] and b4["runtime_batches"]}}


SUITE = Suite("batched", "baselines.decoder_0.5b.batched", run, flag="decoder_05b", needs_torch=True,
              ratios=ratios, targets=targets)
