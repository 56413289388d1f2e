"""The bench itself: the suites of bench/suites/ run in their registry order, each filling its section. Report
schema (`locpath-bench/1`), all times in ms unless named otherwise:

  machine    {cpu, cores, python, onnxruntime, torch}
  bundle     {path, fusion, precisions: component -> precision/backend}
  ceilings   {fp32_matmul_gflops, bf16_matmul_gflops, int8_matmul_gops, memory_bandwidth_gbs (one-thread copy),
              read_bandwidth_gbs (read by the runtime's thread count), read_bandwidth_threads}
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
  encoders_giant (with --encoders-giant) {encoders: name -> {ok, params, export_s, validation_s, onnx_bytes,
             data_bytes, out_dim, validation: {max_abs_diff, cosine_min, ...}, ort_fp32: {tiles_per_s, ...},
             peak_rss_mb, phase_peak_rss_mb} | {ok: false, error, phase}, failed} (bench/encoders_giant.py)
  ratios     name -> value (>1 means locpath's bundle or LoC-Path is better)
  targets    name -> {target, value, met}
  skipped    name -> reason
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from ..errors import LocpathError
from .config import BenchConfig
from .slides import scaling_slide
from .suite import Context, Skip

__all__ = ["BenchConfig", "check_inputs", "run_bench", "ratios_and_targets"]


def _log(cfg: BenchConfig, msg: str):
    if cfg.progress:
        print(f"bench: {msg}", flush=True)


def _torch_version() -> str | None:
    """torch's version, not imported: the runtime's own peak RSS is measured before any torch code loads."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _context(cfg: BenchConfig) -> Context:
    """The report's head (machine, bundle) and what every suite uses."""
    import onnxruntime as ort

    from ..runtime.machine import cpu_name
    from ..runtime.pipeline import Pipeline

    log = lambda m: _log(cfg, m)  # noqa: E731
    torch = _torch_version()
    report: dict = {"schema": "locpath-bench/1", "skipped": {}, "ratios": {}, "targets": {}, "baselines": {},
                    "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                                "onnxruntime": ort.__version__, "torch": torch}}
    pipe = Pipeline.from_bundle(cfg.bundle, use_cache=False)
    report["bundle"] = {"path": str(cfg.bundle), "fusion": pipe.manifest.fusion,
                        "components": {k: f"{c.backend}/{c.precision}" for k, c in pipe.manifest.components.items()},
                        "decoder": pipe.decoder_component}
    slide = cfg.slide or scaling_slide(cfg.workdir, min(cfg.tiles) if cfg.tiles else 1000, log)
    return Context(cfg=cfg, pipe=pipe, report=report, torch=torch, slide=Path(slide), log=log)


def _place(report: dict, section: str, value) -> None:
    """Put a suite's result at its dotted section ("" merges it into the top level; a dict into an existing one)."""
    *parents, key = section.split(".") if section else [None]
    node = report
    for p in parents:
        node = node[p]
    if key is None or (isinstance(node.get(key), dict) and isinstance(value, dict)):
        (node if key is None else node[key]).update(value)
    else:
        node[key] = value


def run_bench(cfg: BenchConfig) -> dict:
    from ..runtime.pipeline import peak_rss_mb
    from .suites import SUITES

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    ctx = _context(cfg)
    try:
        for suite in SUITES:
            if not suite.enabled(ctx):
                if suite.off:
                    ctx.skip(suite.name, suite.off)
                continue
            try:
                _place(ctx.report, suite.section, suite.run(ctx))
            except Skip as why:
                ctx.skip(suite.name, str(why))
    finally:
        ctx.pipe.release()
    ctx.report["machine"]["peak_rss_mb_whole_bench"] = peak_rss_mb()  # baselines included
    ratios_and_targets(ctx.report)
    return ctx.report


def ratios_and_targets(report: dict) -> None:
    """Every suite's ratios, then its targets (which may read the ratios), into the report."""
    from .suites import SUITES

    for suite in SUITES:
        report["ratios"].update(suite.ratios(report))
        report["targets"].update(suite.targets(report))


def check_inputs(cfg: BenchConfig) -> None:
    if cfg.slide is not None and not Path(cfg.slide).exists():
        raise LocpathError(f"{cfg.slide}: file not found")
    if any(n < 1 for n in cfg.tiles):
        raise LocpathError("--tiles takes positive tile counts")
