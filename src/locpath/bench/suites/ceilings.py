"""The machine's ceilings (matmul rates, memory bandwidth) and how much of them the encoder and the decoder
reach (JSON `ceilings`, `fraction_of_ceiling`); after the stages, whose throughput it reads."""

from __future__ import annotations

from pathlib import Path

from ..suite import Context, Suite


def vit_flops_per_tile(tc) -> float:
    t = (tc.img_size // tc.patch_size) ** 2 + int(tc.class_token)
    d = tc.embed_dim
    per_layer = t * (2 * 4 * d * d + 2 * 2 * d * int(d * tc.mlp_ratio)) + 2 * 2 * t * t * d
    patch = 2 * (tc.img_size // tc.patch_size) ** 2 * 3 * tc.patch_size**2 * d
    return float(tc.depth * per_layer + patch)


def run(ctx: Context) -> dict:
    from .. import ceilings as ceil

    ctx.log("measuring machine ceilings")
    ceilings = ceil.measure()
    pipe, thr = ctx.pipe, ctx.report["throughput"]
    enc_prec = pipe.manifest.components["tile_encoder"].precision
    ceiling = {"bf16": "bf16_matmul_gflops", "int8-dynamic": "int8_matmul_gops",
               "int8-static": "int8_matmul_gops", "int8": "int8_matmul_gops"}.get(enc_prec, "fp32_matmul_gflops")
    dec_bytes = (Path(ctx.cfg.bundle) / pipe.manifest.components[pipe.decoder_component].file).stat().st_size
    return {"ceilings": ceilings, "fraction_of_ceiling": {
        "encoder_compute": (vit_flops_per_tile(pipe.cfg.tile_encoder) * thr["encode_tiles_per_s"] / 1e9)
        / (ceilings[ceiling] or float("nan")),
        "encoder_ceiling": ceiling,
        "decoder_bandwidth": dec_bytes * thr["decode_tokens_per_s"] / 1e9 / ceilings["memory_bandwidth_gbs"],
    }}


SUITE = Suite("ceilings", "", run)
