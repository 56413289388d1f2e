"""`bench --decoder-0.5b`: the decoder alone on a Qwen2.5-0.5B shape against onnxruntime-genai INT4, llama.cpp
Q4_0 and transformers eager (bench/decoder_05b.py; JSON `baselines.decoder_0.5b`)."""

from __future__ import annotations

from ..suite import Context, Suite


def run(ctx: Context) -> dict:
    from ..decoder_05b import bench_decoder_05b

    d = bench_decoder_05b(ctx.cfg.workdir / "decoder-0.5b", ctx.log)
    if "skipped" in d["onnxruntime_genai_int4"]:
        ctx.skip("onnxruntime_genai", d["onnxruntime_genai_int4"]["skipped"])
    if "skipped" in d.get("llamacpp_q4_0", {}):
        ctx.skip("llamacpp", d["llamacpp_q4_0"]["skipped"])
    return d


def _d05(report: dict) -> dict | None:
    return report.get("baselines", {}).get("decoder_0.5b")


def ratios(report: dict) -> dict:
    d05, r = _d05(report), {}
    if d05 and "tokens_per_s" in d05.get("onnxruntime_genai_int4", {}):
        ours = d05["locpath_fused_int4"]["tokens_per_s"]
        r["decoder_0.5b_vs_onnxruntime_genai_int4"] = ours / d05["onnxruntime_genai_int4"]["tokens_per_s"]
        r["decoder_0.5b_vs_transformers_eager"] = ours / d05["transformers_eager_fp32"]["tokens_per_s"]
        r["decoder_0.5b_fused_vs_plain_int4"] = ours / d05["locpath_int4"]["tokens_per_s"]
        if "tokens_per_s" in d05.get("onnxruntime_genai_int4_block128", {}):  # like for like at block 128
            b128 = d05["locpath_fused_int4_block128"]["tokens_per_s"]
            r["decoder_0.5b_block128_vs_onnxruntime_genai_int4_block128"] = (
                b128 / d05["onnxruntime_genai_int4_block128"]["tokens_per_s"])
            r["decoder_0.5b_block128_vs_onnxruntime_genai_int4"] = b128 / d05["onnxruntime_genai_int4"]["tokens_per_s"]
    peer = (d05 or {}).get("summary", {})
    if "decode_vs_best_peer" in peer:  # against the best peer of this run (genai INT4, llama.cpp Q4_0), bytes capped
        r["decoder_0.5b_vs_best_peer"] = peer["decode_vs_best_peer"]
        r["prefill_0.5b_best_peer_over_locpath"] = peer["prefill_best_peer_over_locpath"]
    return r


def targets(report: dict) -> dict:
    d05, r, t = _d05(report), report["ratios"], {}
    if "decoder_0.5b_vs_onnxruntime_genai_int4" in r:
        v = r["decoder_0.5b_vs_onnxruntime_genai_int4"]
        t["decoder_1.25x_onnxruntime_genai_int4_0.5b"] = {"target": 1.25, "value": v, "met": v >= 1.25}
    peer = (d05 or {}).get("summary", {})
    if "decode_vs_best_peer" in peer:
        v, p = peer["decode_vs_best_peer"], peer["prefill_best_peer_over_locpath"]
        t["decoder_0.5b_1.1x_best_peer"] = {"target": 1.1, "value": v, "met": v >= 1.1, "peer": peer["best_decode_peer"],
                                            "locpath": peer["locpath_decode"],
                                            "weight_bytes": [peer["locpath_decode_weight_bytes"],
                                                             peer["best_decode_peer_weight_bytes"]]}
        t["prefill_0.5b_no_slower_than_best_peer"] = {"target": 1.0, "value": p, "met": p >= 1.0,
                                                      "peer": peer["best_prefill_peer"], "locpath": peer["locpath_prefill"]}
    elif d05:
        why = peer.get("skipped", "no peer measured")
        for k in ("decoder_0.5b_1.1x_best_peer", "prefill_0.5b_no_slower_than_best_peer"):
            t[k] = {"target": 1.1 if k.startswith("decoder") else 1.0, "value": None, "met": None, "why": why}
    else:
        skipped = report.get("skipped", {})
        t["decoder_1.25x_onnxruntime_genai_int4_0.5b"] = {"target": 1.25, "value": None, "met": None,
                                                           "why": skipped.get("decoder_0.5b")
                                                           or skipped.get("onnxruntime_genai")}
    return t


SUITE = Suite("decoder_0.5b", "baselines.decoder_0.5b", run, flag="decoder_05b", needs_torch=True,
              off="pass --decoder-0.5b (and install torch and onnxruntime-genai) for the Qwen2.5-0.5B-shaped "
                  "decoder against onnxruntime-genai and transformers", ratios=ratios, targets=targets)
