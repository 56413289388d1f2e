"""Bench outputs: the JSON report (schema in runner.py), a Markdown summary and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_file


def write_json(report: dict, path: str | Path) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=float))
    return Path(path)


def _f(v, fmt="{:.2f}"):
    """A number in `fmt`; None as "-"; anything else (a target's named bundles) as it is."""
    if v is None:
        return "-"
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def decoder_05b_lines(d05: dict) -> list[str]:
    lines = [f"## Decoder alone, {d05['shape']}, {d05['prompt_tokens']}-token prompt, {d05['new_tokens']} new "
             f"tokens, {d05['threads']} threads", "", "| runtime | prefill ms | decode tokens/s |", "|---|---|---|"]
    for k in ("locpath_fused_int4", "onnxruntime_genai_int4", "locpath_fused_int4_block128",
              "onnxruntime_genai_int4_block128", "locpath_int4", "transformers_eager_fp32"):
        v = d05.get(k, {})
        lines.append(f"| {k} | {_f(v.get('prefill_ms'), '{:.0f}')} | "
                     f"{_f(v.get('tokens_per_s'), '{:.1f}') if 'tokens_per_s' in v else v.get('skipped', '-')} |")
    return lines + [""]


def batched_lines(bt: dict) -> list[str]:
    """Aggregate decode tokens/s per batch size, each fused graph (bench/batched.py)."""
    sizes = sorted({int(k.split("_")[1]) for g in bt["graphs"].values() for k in g if k.startswith("batch_")})
    lines = [f"## Batched decoding, 0.5B shape, {bt['new_tokens']} new tokens per row, ragged prompts "
             f"{bt['prompt_tokens']}", "", "| graph | " + " | ".join(f"batch {b} tok/s (x batch 1)" for b in sizes)
             + " | rows = batch 1 |", "|---|" + "---|" * (len(sizes) + 1)]
    for name, g in bt["graphs"].items():
        if "skipped" in g:
            lines.append(f"| {name} | skipped: {g['skipped']} |")
            continue
        cells = [f"{g[f'batch_{b}']['tokens_per_s']:.1f} ({g[f'batch_{b}']['over_batch_1']:.2f}x)" for b in sizes]
        same = all(g[f"batch_{b}"]["identical_to_batch_1"] for b in sizes)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    return lines + [""]


def encoder_vitb_lines(vb: dict) -> list[str]:
    lines = [f"## Tile encoder recipes, {vb['shape']}, batch {vb['batch']}", "",
             "| variant | tiles/s | vs ORT fp32 | vs PyTorch bf16 | cosine mean / min |", "|---|---|---|---|---|"]
    for k, v in vb["variants"].items():
        lines.append(f"| {k} | {v['tiles_per_s']:.1f} | {v['vs_ort_fp32']:.2f} | {v['vs_pytorch_bf16']:.2f} | "
                     f"{v['cosine_mean']:.5f} / {v['cosine_min']:.5f} |")
    lines += [f"- {k}: skipped ({why})" for k, why in vb.get("skipped", {}).items()]
    return lines + [""]


def markdown(report: dict) -> str:
    m, c, thr = report["machine"], report["ceilings"], report["throughput"]
    lines = [f"# locpath bench: {report['bundle']['path']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}, torch {m['torch']}.", "",
             "## Ceilings", "", "| fp32 matmul GFLOP/s | bf16 matmul GFLOP/s | int8 matmul GOP/s | memory GB/s (copy, "
             "1 thread) | memory read GB/s |", "|---|---|---|---|---|",
             f"| {_f(c['fp32_matmul_gflops'], '{:.0f}')} | {_f(c['bf16_matmul_gflops'], '{:.0f}')} | "
             f"{_f(c['int8_matmul_gops'], '{:.0f}')} | {_f(c['memory_bandwidth_gbs'], '{:.1f}')} | "
             f"{_f(c.get('read_bandwidth_gbs'), '{:.1f}')} ({c.get('read_bandwidth_threads', '-')} threads) |", "",
             f"## Stages ({thr['tiles']} tiles -> {thr['tokens_after_stm']} tokens after STM)", "",
             "| stage | median ms | min | max |", "|---|---|---|---|"]
    for k, s in report["stages"].items():
        lines.append(f"| {k} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} |")
    fc = report["fraction_of_ceiling"]
    lines += ["", f"Tile read {thr['read_tiles_per_s']:.0f} tiles/s; encode {thr['encode_tiles_per_s']:.0f} tiles/s "
              f"({fc['encoder_compute']:.1%} of {fc['encoder_ceiling']}); decode {thr['decode_tokens_per_s']:.0f} "
              f"tokens/s ({fc['decoder_bandwidth']:.1%} of memory bandwidth); cold time to first token "
              f"{thr['cold_time_to_first_token_ms']:.0f} ms; peak RSS {thr['peak_rss_mb']:.0f} MB.", ""]
    if report.get("scaling"):
        lines += ["## LoC-Path against the prefix baseline in PyTorch eager (KV of the prefix: formula)", "",
                  "| N tiles | STM tokens | LoC-Path TTFT ms | prefix TTFT ms | LoC-Path KV MB | prefix KV MB |",
                  "|---|---|---|---|---|---|"]
        for row in report["scaling"]:
            p = row["prefix"]
            lines.append(f"| {row['tiles']} | {row['tokens_after_stm']} | {row['locpath']['ttft_ms']['median']:.1f} | "
                         f"{_f(p.get('ttft_ms', {}).get('median'), '{:.1f}')} | {row['locpath']['kv_bytes'] / 1e6:.3f} | "
                         f"{_f(p['kv_bytes'] / 1e6 if 'kv_bytes' in p else None, '{:.3f}')} |")
        lines.append("")
    if report.get("headline"):
        from .headline import headline_lines

        lines += headline_lines(report["headline"])
    d05 = report.get("baselines", {}).get("decoder_0.5b")
    if d05:
        lines += decoder_05b_lines(d05)
        if d05.get("batched"):
            lines += batched_lines(d05["batched"])
    for key in ("encoder_vit_b", "encoder_vit_l"):
        vb = report.get("baselines", {}).get(key)
        if vb:
            lines += encoder_vitb_lines(vb)
    sph = report.get("slides_per_hour")
    if sph:
        lines += [f"## Slides per hour, `locpath batch`, {sph['slides']} synthetic ~{sph['tiles_target']}-tile slides, "
                  f"{len(sph['questions'])} questions each", "", "| run | slides/hour | cores busy |", "|---|---|---|"]
        lines += [f"| {k} | {sph[k]['slides_per_hour']:.0f} | {sph[k]['cores_busy']:.2f} |"
                  for k in ("sequential", "overlapped")]
        lines += ["", f"Overlapped over sequential: {sph['ratio']:.2f}x.", ""]
    if report.get("published"):
        lines += published_lines(report["published"])
    if report.get("ratios"):
        lines += ["## Ratios (>1: locpath / LoC-Path ahead)", "", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
        lines.append("")
    if report.get("targets"):
        lines += target_lines(report["targets"])
    if report.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in report["skipped"].items()] + [""]
    return "\n".join(lines)


def target_lines(targets: dict) -> list[str]:
    lines = ["## Targets", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
    for k, v in targets.items():
        lines.append(f"| {k} | {v['target']} | {_f(v['value'])} | {v['met'] if v['met'] is not None else 'not measured'} |")
    return lines + [""]


def published_lines(pub: dict) -> list[str]:
    """`bench --published`: the build, the runtime at each tile count, and onnxruntime-genai's builder."""
    b, rt = pub.get("build", {}), pub["runtime"]
    dec = b.get("components", {}).get("decoder_fused", {})
    lines = [f"## Published scale: {pub['shape']}", "", "| what | measured |", "|---|---|",
             f"| shards | {pub['shards_bytes'] / 1e9:.2f} GB |",
             f"| build (child process) | {_f(b.get('build_seconds'))} s, decoder streamed in {_f(dec.get('seconds'))} s; "
             f"RSS {_f(dec.get('rss_before_mb'))} MB before the decoder, at most {_f(dec.get('rss_max_while_streaming_mb'))} MB "
             f"while it streamed, peak {_f(b.get('peak_rss_mb'))} MB{' (cached)' if b.get('cached') else ''} |",
             f"| bundle | {pub['bundle_bytes'] / 1e9:.2f} GB |",
             f"| load | {rt['load_seconds']} s |",
             f"| decode | {rt['decode']['tokens_per_s']} tokens/s |",
             f"| tile encoder ({rt['encoder']['precision']}, {rt['encoder']['tile_px']} px) | "
             f"{rt['encoder']['tiles_per_s']} tiles/s over {rt['encoder']['measured_tiles']} tiles |"]
    for n, t in rt["time_to_first_token"].items():
        lines.append(f"| first token, {n} tiles | {t['from_features_ms'] / 1000:.2f} s from features (prefill "
                     f"{t['prefill_ms']:.0f} ms); +{t['encode_ms_extrapolated'] / 1000:.0f} s encoder, extrapolated |")
    lines.append(f"| runtime peak RSS (from features, its own process) | {rt['peak_rss_mb']} MB |")
    lines += _from_slide_lines(pub.get("from_slide"))
    lines += _vision_lines(pub.get("openvino_vision"))
    for enc, e in pub.get("encoder_bundles", {}).items():
        if "failed" in e:
            lines.append(f"| {enc} bundle, int8-safe on OpenVINO | failed: {e['failed']} |")
            continue
        r = e["tiles_per_s"]
        checks = e.get("build", {}).get("tile_encoder", {}).get("checks", {})
        lines.append(f"| {enc} bundle, int8-safe on OpenVINO by locpath build | {r['openvino_int8_safe']['tiles_per_s']} "
                     f"tiles/s against ORT fp32 {r['ort_fp32']['tiles_per_s']} ({e['int8_safe_over_ort_fp32']}x); min "
                     "tile cosine " + (", ".join(f"{h} {c['cosine_min']:.5f} (held out {_f(c['held_out_min'])})"
                                                 for h, c in checks.items()) or "(build cached)") + " |")
    g = pub.get("onnxruntime_genai")
    if g:
        gb = g["build"]
        lines.append(f"| onnxruntime-genai builder | {gb['ended']}" + (f" after {gb['seconds']} s at {gb['peak_rss_mb']} MB "
                     f"RSS (limit {gb['limit_mb']} MB)" if "seconds" in gb else "") + " |")
        if "run" in g:
            lines.append(f"| onnxruntime-genai decode | {g['run']['tokens_per_s']} tokens/s |")
    return lines + _llamacpp_lines(pub.get("llamacpp")) + [""]


def _llamacpp_lines(lc: dict | None) -> list[str]:
    """`bench --published`: llama.cpp Q4_0 on the same shards, at the same thread count."""
    if not lc:
        return []
    if "skipped" in lc:
        return [f"| llama.cpp Q4_0 | skipped: {lc['skipped']} |"]
    b = lc.get("build", {})
    built = (" (cached)" if b.get("cached") else "") + (
        f"; f16 written in {_f(b.get('write_f16_seconds'))} s, quantized in {_f(b.get('quantize_seconds'))} s, "
        f"build peak RSS {_f(b.get('process', {}).get('peak_rss_mb'), '{:.0f}')} MB" if "quantize_seconds" in b else "")
    return [f"| llama.cpp Q4_0 GGUF | {lc['weight_bytes'] / 1e9:.2f} GB of weights{built} |",
            _llamacpp_run_line(f"llama.cpp Q4_0 ({lc['threads']} threads, its own process)", lc,
                               f" ({lc['prompt_tokens']} tokens)")
            ] + ([_llamacpp_run_line("llama.cpp Q4_0, file read (no mmap)", lc["no_mmap"])] if lc.get("no_mmap") else [])


def _llamacpp_run_line(label: str, r: dict, prompt: str = "") -> str:
    """One measured llama.cpp run: load, prefill, decode, its process's peak, and locpath's decode over it."""
    ratio = r.get("locpath_over_llamacpp_decode")
    return (f"| {label} | load {r['load_seconds']} s; prefill {r['prefill_ms']:.0f} ms{prompt}; decode "
            f"{r['tokens_per_s']} tokens/s; peak RSS {r['process']['peak_rss_mb']} MB"
            + (f"; locpath / llama.cpp decode {ratio:.2f}x" if ratio else "") + " |")


def _from_slide_lines(fs: dict | None) -> list[str]:
    """`bench --published --slide FILE`: the cold ask from the slide file and the second question on it."""
    if not fs:
        return []
    c, w = fs["cold"], fs["warm"]
    return [f"| cold ask from {Path(fs['slide']).name} (its own process) | {c['tiles']} tiles read and encoded at "
            f"{_f(c['tiles_per_s'])} tiles/s; first token {c['time_to_first_token_ms'] / 1000:.2f} s (prefill "
            f"{_f(c['prefill_ms'])} ms), decode {_f(c['decode_tokens_per_s'])} tokens/s; load {fs['load_seconds']} s; "
            f"peak RSS {fs['process']['peak_rss_mb']} MB |",
            f"| second question, cached slide | first token {w['time_to_first_token_ms'] / 1000:.2f} s (prefill "
            f"{_f(w['prefill_ms'])} ms); cold / (2 x warm + encoder) = {_f(fs['cold_ttft_over_2x_warm_plus_encoder'])} |"]


def _vision_lines(ov: dict | None) -> list[str]:
    """`bench --published`: the same bundle with its vision graphs on OpenVINO (bench/published_vision.py)."""
    if not ov:
        return []
    if "skipped" in ov or "failed" in ov:
        return [f"| vision graphs on OpenVINO | {'skipped: ' + ov['skipped'] if 'skipped' in ov else 'failed: ' + ov['failed']} |"]
    b, rt = ov.get("build", {}), ov["runtime"]
    checks = b.get("tile_encoder", {}).get("checks", {})
    lines = [f"| vision on OpenVINO: build (child process) | {_f(b.get('seconds'))} s, peak "
             f"{_f(b.get('process', {}).get('peak_rss_mb'))} MB; int8-safe encoder min tile cosine "
             + ", ".join(f"{h} {c['cosine_min']:.5f}" for h, c in checks.items())
             + f"{' (cached)' if b.get('cached') else ''} |",
             f"| vision on OpenVINO: tile encoder ({rt['encoder']['precision']}) | {rt['encoder']['tiles_per_s']} "
             "tiles/s |"]
    for n, t in rt["time_to_first_token"].items():
        par = ov.get("parity_with_fp32_vision", {}).get(n, {})
        lines.append(f"| vision on OpenVINO: first token, {n} tiles | {t['from_features_ms'] / 1000:.2f} s from "
                     f"features (resampler {t['resampler_ms']:.0f} ms); latents cosine "
                     f"{_f(par.get('latents_cosine_min'))}, greedy tokens identical: "
                     f"{par.get('greedy_tokens_identical')} |")
    lines += [ln.replace("| cold ask", "| vision on OpenVINO: cold ask").replace("| second question",
              "| vision on OpenVINO: second question") for ln in _from_slide_lines(ov.get("from_slide"))]
    syn = ov.get("from_synthetic_slide")
    if syn:
        lines += [ln.replace("| cold ask", "| vision on OpenVINO: cold ask").replace(
                  "| second question", "| vision on OpenVINO: second question") for ln in _from_slide_lines(syn)]
    return lines


def write_markdown(report: dict, path: str | Path) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(markdown(report))
    return Path(path)


def write_plots(report: dict, out_dir: str | Path) -> list[Path]:
    """ttft_vs_tiles.png, kv_memory_vs_tiles.png, stages.png (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from ..errors import LocpathError

        raise LocpathError("--plots needs matplotlib (pip install 'locpath[bench]')") from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    rows = report.get("scaling", [])
    if rows:
        n = [r["tiles"] for r in rows]
        for key, label, fname, scale in (("ttft_ms", "time to first token (ms)", "ttft_vs_tiles.png", None),
                                         ("kv_bytes", "KV cache (MB)", "kv_memory_vs_tiles.png", 1e6)):
            fig, ax = plt.subplots(figsize=(6, 4))
            lp = [(r["locpath"][key]["median"] if scale is None else r["locpath"][key] / scale) for r in rows]
            ax.plot(n, lp, "o-", label="LoC-Path (bundle)")
            if all(key in r["prefix"] for r in rows):
                pf = [(r["prefix"][key]["median"] if scale is None else r["prefix"][key] / scale) for r in rows]
                ax.plot(n, pf, "s-", label="prefix baseline")
            ax.set_xlabel("tissue tiles N")
            ax.set_ylabel(label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
            fig.tight_layout()
            with atomic_file(out / fname, suffix=".png") as tmp:
                fig.savefig(tmp, format="png", dpi=120)
            plt.close(fig)
            written.append(out / fname)
    st = report["stages"]
    keys = [k for k in ("tile_read", "encode", "stm", "resampler", "tis", "cross_kv", "prefill", "decode_per_token") if k in st]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(keys, [st[k]["median"] for k in keys])
    ax.set_xlabel("median ms")
    ax.set_xscale("log")
    ax.set_title("stage breakdown")
    fig.tight_layout()
    with atomic_file(out / "stages.png", suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    written.append(out / "stages.png")
    return written
