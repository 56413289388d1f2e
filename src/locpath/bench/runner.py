"""The bench itself. Report schema (`locpath-bench/1`), all times in ms unless named otherwise:

  machine    {cpu, cores, python, onnxruntime, torch}
  bundle     {path, fusion, precisions: component -> precision/backend}
  ceilings   {fp32_matmul_gflops, bf16_matmul_gflops, int8_matmul_gops, memory_bandwidth_gbs}
  stages     stage -> {median, min, max, n}: open, tissue_grid, tile_read (reader alone), tiles_encode, encode,
             stm, resampler, tis, cross_kv, prefill, decode_per_token, time_to_first_token (cached slide)
  throughput {tiles, tokens_after_stm, read_tiles_per_s, encode_tiles_per_s, decode_tokens_per_s,
              peak_rss_mb (the runtime's, before any baseline is loaded), cold_time_to_first_token_ms}
  fraction_of_ceiling {encoder_compute, decoder_bandwidth}
  scaling    [{n_target, tiles, tokens_after_stm, read_encode_s, locpath: {ttft_ms, kv_bytes},
               prefix: {ttft_ms, kv_bytes} | {skipped}}]   (prefix in PyTorch eager, its KV bytes a formula)
  headline   {method, reference: {decoder_precision, rows}, qwen2.5-0.5b: {rows} | {skipped}}: rows [{n_target, tiles,
              locpath/prefix: {ttft_ms, cold_ttft_ms, kv_bytes, kv_plus_activation_bytes, rss_loaded_mb,
              peak_rss_mb, ...}}], both sides on ONNX Runtime, each in its own process (bench/headline.py)
  baselines  {pytorch_encoder_fp32/bf16: {tiles_per_s, cosine}, pytorch_decoder_fp32: {tokens_per_s},
              bundle_encoder/decoder: {...}, decoder_0.5b: {locpath_fused_int4, locpath_int4, onnxruntime_genai_int4,
              transformers_eager_fp32: {prefill_ms, tokens_per_s}, batched: {batch_N: {tokens_per_s, over_batch_1,
              identical_to_batch_1}}} (with --decoder-0.5b),
              encoder_vit_b: {variants: {ort_fp32, ort_int8_dynamic, ort_int8_static, openvino_bf16,
              openvino_nncf_int8, openvino_int8_safe, pytorch_fp32, pytorch_bf16: {tiles_per_s, cosine_mean,
              cosine_min, cosine_min_held_out, ...}}} (with --encoder-vit-b), encoder_vit_l (with --encoder-vit-l)}
  slides_per_hour (with --throughput) {slides, tiles_target, questions, sequential/overlapped: {slides_per_hour,
             cores_busy, cpu_seconds_per_slide, threads, lanes}, ratio, sequential_split, passes, seconds}
  ratios     name -> value (>1 means locpath's bundle or LoC-Path is better)
  targets    name -> {target, value, met}
  skipped    name -> reason
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle.names import DECODER, DECODER_FUSED
from ..errors import LocpathError


@dataclass
class BenchConfig:
    bundle: Path
    slide: Path | None = None
    tiles: list[int] = field(default_factory=lambda: [1000, 10000])
    repeats: int = 3
    warmup: int = 1
    workdir: Path = Path("runs/bench")
    baselines: bool = True
    question: str = "What is the diagnosis?"
    progress: bool = True
    decoder_05b: bool = False
    encoder_vitb: bool = False
    encoder_vitl: bool = False
    published: bool = False
    headline_05b: bool = False  # the like-for-like headline on a Qwen2.5-0.5B-shaped LLM too (bench/headline.py)
    headline_tiles_05b: list[int] | None = None  # its tile counts (default: `tiles`)
    throughput_pass: object = None  # batch.runner.run_pass (from the CLI): `bench --throughput`, bench/throughput.py
    throughput_slides: int = 4


def spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def _log(cfg: BenchConfig, msg: str):
    if cfg.progress:
        print(f"bench: {msg}", flush=True)


def vit_flops_per_tile(tc) -> float:
    t = (tc.img_size // tc.patch_size) ** 2 + int(tc.class_token)
    d = tc.embed_dim
    per_layer = t * (2 * 4 * d * d + 2 * 2 * d * int(d * tc.mlp_ratio)) + 2 * 2 * t * t * d
    patch = 2 * (tc.img_size // tc.patch_size) ** 2 * 3 * tc.patch_size**2 * d
    return float(tc.depth * per_layer + patch)


# -- stages on one slide ------------------------------------------------------------------
def bench_stages(pipe, slide: Path, cfg: BenchConfig) -> tuple[dict, dict]:
    from ..wsi import TileReader, open_slide

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


# -- scaling: LoC-Path against the prefix baseline as N grows ------------------------------
def scaling_slide(workdir: Path, n: int, log) -> Path:
    """A synthetic slide with about n tissue tiles, written once and reused."""
    from ..synth import make_spec, write_slide

    path = workdir / f"scaling_{n}.tiff"
    if path.exists():
        return path
    side = max(8, int(np.ceil(np.sqrt(n / 0.5))))
    spec = None
    for _ in range(4):
        spec = make_spec(7000 + n, tiles=(side, side), diagnosis="adenocarcinoma", grade="high grade")
        got = spec.meta["tissue_tiles"]
        if abs(got - n) <= 0.1 * n:
            break
        side = max(8, int(round(side * np.sqrt(n / max(got, 1)))))
    log(f"writing a {side}x{side}-tile synthetic slide ({spec.meta['tissue_tiles']} tissue tiles) to {path}")
    return write_slide(spec, path, fmt="tiff")


EAGER_PREFIX_MAX_TILES = 20000  # the PyTorch eager prefix row (kept for reference) is not run above this


def kv_bytes_prefix(pcfg: dict, n_visual: int, text_tokens: int) -> int:
    hd = pcfg["hidden_size"] // pcfg["num_attention_heads"]
    return 4 * 2 * pcfg["num_hidden_layers"] * pcfg["num_key_value_heads"] * hd * (n_visual + text_tokens)


def kv_bytes_locpath(mcfg, text_tokens: int) -> int:
    llm = mcfg.llm
    hd = llm.hidden_size // llm.num_attention_heads
    self_kv = 4 * 2 * llm.num_hidden_layers * llm.num_key_value_heads * hd * text_tokens
    cross = 4 * 2 * len(mcfg.cara.layers) * mcfg.tis.top_m * llm.hidden_size
    return self_kv + cross


def bench_scaling(pipe, cfg: BenchConfig, prefix, log) -> list[dict]:
    from ..wsi import open_slide
    from ..wsi.extract import extract_features

    rows = []
    prompt = pipe.prompt_ids(cfg.question)
    params = pipe.sampling()
    text_tokens = len(prompt) + params.max_new_tokens
    for n in cfg.tiles:
        path = scaling_slide(cfg.workdir, n, log)
        t0 = time.perf_counter()
        with open_slide(path) as s:
            plan = pipe.plan_tiles(s)
            ff, _ = extract_features(s, pipe.encode_tiles, plan, pipe.cfg.tile_encoder.name, progress=cfg.progress)
        read_encode = time.perf_counter() - t0
        log(f"N={n}: {len(ff.features)} tiles read and encoded in {read_encode:.1f} s")
        from .headline import save_features

        save_features(cfg.workdir, pipe, n, ff)  # the headline starts from the very same features

        def locpath_ttft():
            """STM, resampler, TIS, cross-KV and prefill; memory = the self-attention cache it allocated (for the
            prompt and the answer) plus the question's cross K/V, as measured."""
            t = time.perf_counter()
            comp = pipe.compress(ff)
            n_tok = comp.tokens
            qkv = pipe.question_kv(comp.latents, cfg.question)
            gen = pipe.generator(qkv, cfg.question, params)
            ms = (time.perf_counter() - t) * 1000
            return ms, n_tok, gen.stats.kv_cache_bytes + sum(int(a.nbytes) for a in qkv.cross.values())

        runs = [locpath_ttft() for _ in range(cfg.warmup + cfg.repeats)][cfg.warmup:]
        row = {"n_target": n, "tiles": int(len(ff.features)), "tokens_after_stm": runs[0][1],
               "read_encode_s": round(read_encode, 2),
               "locpath": {"ttft_ms": spread([r[0] for r in runs]), "kv_bytes": runs[0][2],
                           "kv_bytes_formula": kv_bytes_locpath(pipe.cfg, text_tokens)}}
        if prefix is None:
            row["prefix"] = {"skipped": "torch or the prefix checkpoint is not available"}
        elif len(ff.features) > EAGER_PREFIX_MAX_TILES:
            row["prefix"] = {"skipped": f"PyTorch eager attends over all {len(ff.features)} positions at once (its "
                                        "scores alone are tens of GB): the headline's chunked ONNX Runtime prefix "
                                        "measures this size"}
        else:
            row["prefix"] = prefix_ttft(prefix, ff, ff.grid_index, cfg, text_tokens)
        rows.append(row)
        log(f"N={n}: LoC-Path time to first token {row['locpath']['ttft_ms']['median']:.1f} ms"
            + (f", prefix {row['prefix']['ttft_ms']['median']:.1f} ms" if "ttft_ms" in row["prefix"] else ""))
    return rows


def prefix_ttft(prefix, ff, grid, cfg: BenchConfig, text_tokens: int) -> dict:
    """The prefix baseline from the same features: projector + prefill over N visual tokens + prompt (PyTorch)."""
    import torch

    from ..models.slide_llm import SlideFeatures

    model, tok = prefix
    sf = SlideFeatures(ff.features, grid)
    ids = model.prompt_ids(tok, cfg.question)

    def once():
        t = time.perf_counter()
        with torch.no_grad():
            vis = model.visual_tokens([sf])
            x, mask = model._inputs(tok, vis, [ids])
            model.llm(inputs_embeds=x, attention_mask=mask, use_cache=True).logits[:, -1].argmax(-1)
        return (time.perf_counter() - t) * 1000

    runs = [once() for _ in range(cfg.warmup + cfg.repeats)][cfg.warmup:]
    c = model.llm.config
    pcfg = {"hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
            "num_hidden_layers": c.num_hidden_layers, "num_key_value_heads": c.num_key_value_heads}
    return {"ttft_ms": spread(runs), "kv_bytes": kv_bytes_prefix(pcfg, len(ff.features), text_tokens)}


# -- PyTorch eager baselines for the same components -------------------------------------
def torch_baselines(pipe, checkpoint: Path, tiles: np.ndarray, cfg: BenchConfig) -> dict:
    import torch

    from .report import _median_time, decode_speed, encoder_speed, mean_cosine
    from ..models.checkpoint import load_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load_checkpoint(checkpoint)
    x = torch.from_numpy(np.ascontiguousarray(tiles[:32]))
    out = {}
    with torch.no_grad():
        f32 = model.tile_encoder.forward_uint8(x).numpy()
        t = _median_time(lambda: model.tile_encoder.forward_uint8(x), cfg.warmup, cfg.repeats)
        out["pytorch_encoder_fp32"] = {"tiles_per_s": len(x) / t}
        enc16 = model.tile_encoder.to(torch.bfloat16)
        b16 = enc16.forward_uint8(x).float().numpy()
        t = _median_time(lambda: enc16.forward_uint8(x), cfg.warmup, cfg.repeats)
        out["pytorch_encoder_bf16"] = {"tiles_per_s": len(x) / t, "cosine": mean_cosine(b16, f32)}
        model.tile_encoder.float()
        out["pytorch_decoder_fp32"] = {"tokens_per_s": _torch_decode_speed(model, tok, cfg.question)}
    ours = pipe.encode_tiles(tiles[:32])
    out["bundle_encoder"] = {"tiles_per_s": encoder_speed(pipe, tiles), "cosine": mean_cosine(ours, f32)}
    out["bundle_decoder"] = {"tokens_per_s": decode_speed(pipe, cfg.question), "graph": pipe.decoder_component}
    if pipe.decoder_component == DECODER_FUSED and DECODER in pipe.manifest.components:
        from ..runtime.pipeline import Pipeline  # the plain graph of the same bundle, back to back

        plain = Pipeline(pipe.bundle_dir, pipe.manifest, use_cache=False, decoder="plain")
        out["bundle_decoder_plain"] = {"tokens_per_s": decode_speed(plain, cfg.question), "graph": "decoder"}
        out["bundle_decoder"]["tokens_per_s_again"] = decode_speed(pipe, cfg.question)
        plain.release()
    return out


def _torch_decode_speed(model, tok, question: str, steps: int = 32) -> float:
    import torch

    lat = torch.randn(1, model.cfg.resampler.num_latents, model.cfg.resampler.dim)
    q_ids, q_mask = model.question_batch(tok, [question])
    kv, _, _ = model.question_kv(lat, q_ids, q_mask)
    ids = torch.tensor([model.prompt_ids(tok, question)])

    def run():
        with model.cara.visual_context(kv):
            out = model.llm(input_ids=ids, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            nxt = torch.tensor([[7]])
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model.llm(input_ids=nxt, cache=cache, use_cache=True)
            return time.perf_counter() - t0

    run()
    return steps / float(np.median([run() for _ in range(3)]))


# -- the whole bench --------------------------------------------------------------------
def run_bench(cfg: BenchConfig) -> dict:
    from . import ceilings as ceil
    from ..runtime.pipeline import Pipeline, peak_rss_mb

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    log = lambda m: _log(cfg, m)  # noqa: E731
    import onnxruntime as ort

    report: dict = {"schema": "locpath-bench/1", "skipped": {}, "ratios": {}, "targets": {}}
    from importlib import metadata

    try:  # not imported here: the runtime's own peak RSS is measured before any torch code loads
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    from ..runtime.machine import cpu_name

    report["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                         "onnxruntime": ort.__version__, "torch": torch_version}
    pipe = Pipeline.from_bundle(cfg.bundle, use_cache=False)
    report["bundle"] = {"path": str(cfg.bundle), "fusion": pipe.manifest.fusion,
                        "components": {k: f"{c.backend}/{c.precision}" for k, c in pipe.manifest.components.items()},
                        "decoder": pipe.decoder_component}
    slide = cfg.slide
    if slide is None:
        slide = scaling_slide(cfg.workdir, min(cfg.tiles) if cfg.tiles else 1000, log)
    log(f"stages on {slide} ({cfg.warmup} warm-up, {cfg.repeats} repeats)")
    stages, thr = bench_stages(pipe, Path(slide), cfg)
    thr["peak_rss_mb"] = peak_rss_mb()  # the runtime alone: no baseline or ceiling buffer loaded yet
    report["stages"], report["throughput"] = stages, thr
    log("measuring machine ceilings")
    report["ceilings"] = ceil.measure()

    tc = pipe.cfg.tile_encoder
    enc_prec = pipe.manifest.components["tile_encoder"].precision
    ceiling = {"bf16": "bf16_matmul_gflops", "int8-dynamic": "int8_matmul_gops",
               "int8-static": "int8_matmul_gops", "int8": "int8_matmul_gops"}.get(enc_prec, "fp32_matmul_gflops")
    dec_bytes = (Path(cfg.bundle) / pipe.manifest.components[pipe.decoder_component].file).stat().st_size
    report["fraction_of_ceiling"] = {
        "encoder_compute": (vit_flops_per_tile(tc) * thr["encode_tiles_per_s"] / 1e9) / (report["ceilings"][ceiling] or float("nan")),
        "encoder_ceiling": ceiling,
        "decoder_bandwidth": dec_bytes * thr["decode_tokens_per_s"] / 1e9 / report["ceilings"]["memory_bandwidth_gbs"],
    }
    if cfg.throughput_pass is not None:  # before torch is loaded: the batch runner as it runs in production
        from .throughput import ThroughputConfig, bench_throughput

        log(f"slides/hour: {cfg.throughput_slides} slides, sequential against overlapped")
        report["slides_per_hour"] = bench_throughput(cfg.throughput_pass, Path(cfg.bundle), cfg.workdir / "throughput",
                                                     log, ThroughputConfig(slides=cfg.throughput_slides))
    else:
        report["skipped"]["slides_per_hour"] = ("pass --throughput for `locpath batch` slides/hour, overlapped against "
                                                "sequential (4 synthetic ~1k-tile slides: about a minute)")

    prefix = None
    checkpoint = _source_checkpoint(pipe)
    if cfg.baselines and torch_version:
        from ..checkpoints import shipped_checkpoint
        from ..models.checkpoint import load_checkpoint

        if (shipped_checkpoint("prefix") / "model.safetensors").exists():
            prefix = load_checkpoint(shipped_checkpoint("prefix"))
    elif not cfg.baselines:
        report["skipped"]["baselines"] = "--no-baselines"
    else:
        report["skipped"]["pytorch"] = "torch is not installed"
    report["scaling"] = bench_scaling(pipe, cfg, prefix, log) if cfg.tiles else []
    if cfg.baselines and torch_version and cfg.tiles:  # like for like: both sides on ONNX Runtime, own processes
        from .headline import HeadlineConfig, bench_headline

        report["headline"] = bench_headline(pipe, HeadlineConfig(
            tiles=list(cfg.tiles), question=cfg.question, workdir=cfg.workdir, warmup=cfg.warmup,
            repeats=cfg.repeats, tiles_05b=cfg.headline_tiles_05b,
            slide_for=lambda n: scaling_slide(cfg.workdir, n, log)), log, with_05b=cfg.headline_05b)
    else:
        report["skipped"]["headline"] = "needs --tiles, the baselines and torch (to export the prefix baseline)"

    if cfg.baselines and torch_version and checkpoint is not None:
        from ..wsi import TileReader, open_slide

        with open_slide(slide) as s:
            tiles = next(iter(TileReader(s, pipe.plan_tiles(s).grid, batch_size=64))).tiles
        log("PyTorch eager baselines (fp32, bf16) for the encoder and the decoder")
        report["baselines"] = torch_baselines(pipe, checkpoint, tiles, cfg)
    elif cfg.baselines:
        report["skipped"]["pytorch_baselines"] = "torch or the bundle's source checkpoint is not available"
        report["baselines"] = {}
    else:
        report["baselines"] = {}
    if cfg.decoder_05b and torch_version:
        from .decoder_05b import bench_decoder_05b

        report["baselines"]["decoder_0.5b"] = d = bench_decoder_05b(cfg.workdir / "decoder-0.5b", log)
        if "skipped" in d["onnxruntime_genai_int4"]:
            report["skipped"]["onnxruntime_genai"] = d["onnxruntime_genai_int4"]["skipped"]
        if "skipped" in d.get("llamacpp_q4_0", {}):
            report["skipped"]["llamacpp"] = d["llamacpp_q4_0"]["skipped"]
        from .batched import bench_batched, contract_05b

        built = cfg.workdir / "decoder-0.5b" / "locpath-0.5b"
        d["batched"] = bench_batched({"int4_block32": built / "decoder_fused.int4.onnx",
                                      "int4_block128": built / "decoder_fused.int4-b128.onnx"},
                                     contract_05b(), os.cpu_count() or 1, log=log)
    else:
        report["skipped"]["decoder_0.5b"] = ("pass --decoder-0.5b (and install torch and onnxruntime-genai) for the "
                                             "Qwen2.5-0.5B-shaped decoder against onnxruntime-genai and transformers")
    if cfg.published and torch_version:
        from .published import bench_published

        report["published"] = bench_published(cfg.workdir / "published", log, tiles=tuple(cfg.tiles or (1000, 10000)))
    elif not cfg.published:
        report["skipped"]["published"] = ("pass --published for a Qwen2.5-7B-shaped bundle built from shards here "
                                          "(first run writes ~15 GB of shards and builds a ~5 GB bundle: minutes)")
    if cfg.encoder_vitb and torch_version:
        from .encoder_vitb import bench_encoder_vitb

        report["baselines"]["encoder_vit_b"] = bench_encoder_vitb(cfg.workdir / "encoder-vit-b", log, slide=cfg.slide)
    else:
        report["skipped"]["encoder_vit_b"] = ("pass --encoder-vit-b (with torch installed) for the tile-encoder recipes "
                                              "at a ViT-B/16 shape")
    if cfg.encoder_vitl and torch_version:
        from .encoder_vitb import bench_encoder_vitb

        report["baselines"]["encoder_vit_l"] = bench_encoder_vitb(cfg.workdir / "encoder-vit-l", log, shape="vit_l",
                                                                  slide=cfg.slide)
    else:
        report["skipped"]["encoder_vit_l"] = ("pass --encoder-vit-l (with torch installed) for the INT8 encoder "
                                              "recipes at UNI's ViT-L/16 shape")
    report["machine"]["peak_rss_mb_whole_bench"] = peak_rss_mb()  # baselines included
    _ratios_and_targets(report)
    pipe.release()
    return report


def _source_checkpoint(pipe) -> Path | None:
    """The checkpoint the bundle was exported from: the recorded folder when it is still there, else the shipped
    checkpoint whose weights have the recorded sha256 (a prebuilt bundle records the machine it was built on)."""
    from ..bundle.paths import sha256_file
    from ..checkpoints import shipped_checkpoint

    p = pipe.manifest.source.get("checkpoint")
    if p and (Path(p) / "model.safetensors").exists():
        return Path(p)
    want = pipe.manifest.source.get("weights_sha256")
    for name in ("reference",):
        w = shipped_checkpoint(name) / "model.safetensors"
        if want and w.exists() and sha256_file(w) == want:
            return w.parent
    return None


def _ratios_and_targets(report: dict) -> None:
    from .encoder_vitb import int8_summary

    r, t, b = report["ratios"], report["targets"], report.get("baselines", {})
    sph = report.get("slides_per_hour")
    if sph:
        r["slides_per_hour_overlapped_over_sequential"] = v = sph["ratio"]
        t["slides_per_hour_overlap_1.3x"] = {"target": 1.3, "value": v, "met": v >= 1.3,
                                             "overlap_bound": sph["sequential_split"]["overlap_bound"],
                                             "cores_busy_sequential": sph["sequential"]["cores_busy"]}
    if "pytorch_encoder_fp32" in b:
        r["encoder_vs_pytorch_fp32"] = b["bundle_encoder"]["tiles_per_s"] / b["pytorch_encoder_fp32"]["tiles_per_s"]
        r["encoder_vs_pytorch_bf16"] = b["bundle_encoder"]["tiles_per_s"] / b["pytorch_encoder_bf16"]["tiles_per_s"]
        r["decoder_vs_pytorch_fp32"] = b["bundle_decoder"]["tokens_per_s"] / b["pytorch_decoder_fp32"]["tokens_per_s"]
        t["encoder_1.2x_pytorch_bf16_at_cosine_0.999"] = {
            "target": 1.2, "value": r["encoder_vs_pytorch_bf16"], "cosine": b["bundle_encoder"]["cosine"],
            "met": r["encoder_vs_pytorch_bf16"] >= 1.2 and b["bundle_encoder"]["cosine"] >= 0.999}
    if "bundle_decoder_plain" in b:
        fused = float(np.median([b["bundle_decoder"]["tokens_per_s"], b["bundle_decoder"]["tokens_per_s_again"]]))
        r["decoder_fused_vs_plain"] = fused / b["bundle_decoder_plain"]["tokens_per_s"]
    for row in report.get("scaling", []):  # PyTorch eager prefix, formula KV: kept for reference, not the headline
        if "ttft_ms" in row["prefix"]:
            n = row["n_target"]
            r[f"ttft_prefix_pytorch_over_locpath_at_{n}"] = (row["prefix"]["ttft_ms"]["median"]
                                                             / row["locpath"]["ttft_ms"]["median"])
            r[f"kv_formula_prefix_over_locpath_at_{n}"] = row["prefix"]["kv_bytes"] / row["locpath"]["kv_bytes"]
    batched = b.get("decoder_0.5b", {}).get("batched")
    if batched and "batch_4" in batched:  # aggregate decode tokens/s, batch 4 over batch 1 of the same graph
        for name, g in batched["graphs"].items():
            if "batch_4" in g:
                r[f"decode_0.5b_batch4_over_batch1_{name}"] = g["batch_4"]["over_batch_1"]
        v = batched["batch_4"]["over_batch_1"]
        t["decode_0.5b_batch4_3x_batch1"] = {"target": 3.0, "value": v, "graph": batched["best"],
                                              "identical_to_batch_1": batched["batch_4"]["identical_to_batch_1"],
                                              "runtime_batches": batched["batch_4"]["runtime_batches"],
                                              "met": v >= 3.0 and batched["batch_4"]["identical_to_batch_1"]
                                              and batched["batch_4"]["runtime_batches"]}
    if "headline" in report:  # ttft/memory/kv/peak_rss prefix over LoC-Path, same runtime; the 20x/50x targets
        from .headline import headline_ratios

        headline_ratios(report["headline"], r, t)
    vb = b.get("encoder_vit_b")
    if vb:
        ok = {k: v for k, v in vb["variants"].items() if not k.startswith("pytorch") and v["cosine_mean"] >= 0.999}
        best = max(ok, key=lambda k: ok[k]["tiles_per_s"])
        r["encoder_vit_b_best_vs_pytorch_bf16"] = ok[best]["vs_pytorch_bf16"]
        r["encoder_vit_b_best_vs_ort_fp32"] = ok[best]["vs_ort_fp32"]
        t["encoder_vit_b_1.2x_pytorch_bf16_at_cosine_0.999"] = {
            "target": 1.2, "value": ok[best]["vs_pytorch_bf16"], "variant": best,
            "met": ok[best]["vs_pytorch_bf16"] >= 1.2}
    for size in ("b", "l"):  # the INT8 encoder: fastest INT8 variant whose worst tile holds cosine 0.995
        s = int8_summary(b[f"encoder_vit_{size}"]) if b.get(f"encoder_vit_{size}") else None
        if s is None:
            continue
        r[f"encoder_vit_{size}_int8_vs_pytorch_bf16"] = s["vs_pytorch_bf16"]
        t[f"encoder_vit_{size}_int8_1.3x_pytorch_bf16_at_min_cosine_0.995"] = dict(
            s, target=1.3, value=s["vs_pytorch_bf16"], met=s["holds_bound"] and s["vs_pytorch_bf16"] >= 1.3)
    d05 = b.get("decoder_0.5b")
    if d05 and "tokens_per_s" in d05.get("onnxruntime_genai_int4", {}):
        ours = d05["locpath_fused_int4"]["tokens_per_s"]
        r["decoder_0.5b_vs_onnxruntime_genai_int4"] = ours / d05["onnxruntime_genai_int4"]["tokens_per_s"]
        r["decoder_0.5b_vs_transformers_eager"] = ours / d05["transformers_eager_fp32"]["tokens_per_s"]
        r["decoder_0.5b_fused_vs_plain_int4"] = ours / d05["locpath_int4"]["tokens_per_s"]
        if "tokens_per_s" in d05.get("onnxruntime_genai_int4_block128", {}):  # like for like at block 128
            r["decoder_0.5b_block128_vs_onnxruntime_genai_int4_block128"] = (
                d05["locpath_fused_int4_block128"]["tokens_per_s"] / d05["onnxruntime_genai_int4_block128"]["tokens_per_s"])
            r["decoder_0.5b_block128_vs_onnxruntime_genai_int4"] = (d05["locpath_fused_int4_block128"]["tokens_per_s"]
                                                                    / d05["onnxruntime_genai_int4"]["tokens_per_s"])
        v = r["decoder_0.5b_vs_onnxruntime_genai_int4"]
        t["decoder_1.25x_onnxruntime_genai_int4_0.5b"] = {"target": 1.25, "value": v, "met": v >= 1.25}
    peer = (d05 or {}).get("summary", {})
    if "decode_vs_best_peer" in peer:  # against the best peer of this run (genai INT4, llama.cpp Q4_0), bytes capped
        r["decoder_0.5b_vs_best_peer"] = v = peer["decode_vs_best_peer"]
        r["prefill_0.5b_best_peer_over_locpath"] = p = peer["prefill_best_peer_over_locpath"]
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
        t["decoder_1.25x_onnxruntime_genai_int4_0.5b"] = {"target": 1.25, "value": None, "met": None,
                                                           "why": report["skipped"].get("decoder_0.5b")
                                                           or report["skipped"].get("onnxruntime_genai")}


def check_inputs(cfg: BenchConfig) -> None:
    if cfg.slide is not None and not Path(cfg.slide).exists():
        raise LocpathError(f"{cfg.slide}: file not found")
    if any(n < 1 for n in cfg.tiles):
        raise LocpathError("--tiles takes positive tile counts")
