"""`bench --published`: a Qwen2.5-7B-shaped bundle built from shards here, its build and runtime measured
(bench/published.py; JSON `published`); with `--slide FILE`, also a cold `ask` from that slide file and a second
question on it (bench/published_slide.py; JSON `published.from_slide`), each step in a process of its own; then
the same bundle with its vision graphs on OpenVINO and a synthetic 1k-tile slide (bench/published_vision.py; JSON
`published.openvino_vision`)."""

from __future__ import annotations

from ..suite import Context, Suite


def run(ctx: Context) -> dict:
    from ..published import bench_published

    return bench_published(ctx.cfg.workdir / "published", ctx.log, tiles=tuple(ctx.cfg.tiles or (1000, 10000)),
                           slide=ctx.cfg.slide, vision=ctx.cfg.published_vision,
                           synthetic_tiles=ctx.cfg.published_synthetic_tiles,
                           encoders=tuple(ctx.cfg.published_encoders))


GB = 1e9
MIB = 1 << 20
FIRST_TOKEN_10K_S, COLD_PEAK_GB, COLD_OVER_WARM, DECODE_OF_BANDWIDTH = 1.2, 6.0, 1.0, 0.85


def _met(value, target, at_most: bool, **extra) -> dict:
    ok = None if value is None else (value <= target if at_most else value >= target)
    return dict({"target": target, "value": value, "met": ok}, **extra)


def targets(report: dict) -> dict:
    """Issue 24's lines, read back from this run's report: the 10k first token from features (the fastest bundle
    measured), a cold ask's peak RSS and its first token against 2x the warm one plus the encoder (each bundle
    asked from the slide), the bundles that meet those three together, and decode's weight reads against the read
    bandwidth measured beside the decode runs (else `ceilings`)."""
    pub, t = report.get("published"), {}
    if not pub:
        return t
    runs = {"onnxruntime": pub.get("runtime") or {}}
    vision = pub.get("openvino_vision") or {}
    if "runtime" in vision:
        runs["openvino_vision"] = vision["runtime"]
    firsts = {k: r["time_to_first_token"]["10000"]["from_features_ms"] / 1000
              for k, r in runs.items() if "10000" in r.get("time_to_first_token", {})}
    if firsts:
        best = min(firsts, key=firsts.get)
        t["published_first_token_10k_from_features_1.2s"] = _met(round(firsts[best], 3), FIRST_TOKEN_10K_S, True,
                                                                  bundle=best, seconds=firsts)
    asks = {k: v for k, v in (("onnxruntime", pub.get("from_slide")), ("openvino_vision", vision.get("from_slide")))
            if v and "peak_rss_mb" in v}
    if asks:
        gb = {k: round(v["peak_rss_mb"] * MIB / GB, 2) for k, v in asks.items()}
        best = min(gb, key=gb.get)
        t["published_cold_ask_peak_rss_6gb"] = _met(gb[best], COLD_PEAK_GB, True, bundle=best, gb=gb)
        ratio = {k: v.get("cold_ttft_over_2x_warm_plus_encoder") for k, v in asks.items()}
        t["published_cold_first_token_within_2x_warm_plus_encoder"] = _met(ratio[best], COLD_OVER_WARM, True,
                                                                           bundle=best, ratios=ratio)
    if firsts and asks:  # the lines above are met together only by a bundle that meets each of them
        every = [k for k in asks if firsts.get(k, 1e9) <= FIRST_TOKEN_10K_S
                 and asks[k]["peak_rss_mb"] * MIB / GB <= COLD_PEAK_GB
                 and (ratio[k] or 1e9) <= COLD_OVER_WARM]
        t["published_one_bundle_meets_the_first_token_and_memory_lines"] = {
            "target": "one bundle", "value": ", ".join(every) or None, "met": bool(every)}
    # against what the runtime's threads can read, measured beside the decode runs themselves (else the bench's
    # ceiling); the one-thread copy (the first yardstick) is beaten by the decoder itself on 2 cores, so a
    # fraction of it says nothing (kept beside, as copy_fraction)
    dec, ceil = (runs["onnxruntime"].get("decode") or {}), (report.get("ceilings") or {})
    read = dec.get("read_bandwidth_gbs") or ceil.get("read_bandwidth_gbs")
    if "weights_read_gbs" in dec and read:
        copy = ceil.get("memory_bandwidth_gbs")
        t["published_decode_85pct_of_bandwidth"] = _met(
            round(dec["weights_read_gbs"] / read, 3), DECODE_OF_BANDWIDTH, False,
            weights_read_gbs=dec["weights_read_gbs"],
            read_bandwidth_gbs=round(read, 2), beside_decode="read_bandwidth_gbs" in dec,
            threads=ceil.get("read_bandwidth_threads"),
            copy_fraction=round(dec["weights_read_gbs"] / copy, 3) if copy else None)
    return t


SUITE = Suite("published", "published", run, flag="published", needs_torch=True, targets=targets,
              off="pass --published for a Qwen2.5-7B-shaped bundle built from shards here (first run writes ~15 GB "
                  "of shards and builds a ~5 GB bundle: minutes)")
