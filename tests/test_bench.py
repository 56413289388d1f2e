import json

import pytest

from locpath.cli import main


def test_bench_writes_report_markdown_and_plots(ref_bundle, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report.json"
    code = main(["bench", str(ref_bundle), "--tiles", "40", "120", "--repeats", "1", "--warmup", "0",
                 "--workdir", str(tmp_path / "work"), "--json-file", str(out), "--markdown", str(tmp_path / "r.md"),
                 "--plots", str(tmp_path / "plots"), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["schema"] == "locpath-bench/1"
    for stage in ("tile_read", "encode", "stm", "resampler", "tis", "cross_kv", "prefill", "decode_per_token"):
        st = rep["stages"][stage]  # every stage really ran, once per repeat
        assert st["n"] == 1 and 0 < st["min"] <= st["median"] <= st["max"], (stage, st)
    thr = rep["throughput"]
    assert 0 < thr["tokens_after_stm"] <= thr["tiles"] and thr["peak_rss_mb"] > 50
    assert rep["ceilings"]["fp32_matmul_gflops"] > 0 and rep["ceilings"]["memory_bandwidth_gbs"] > 0
    assert rep["ceilings"]["read_bandwidth_gbs"] > 0 and rep["ceilings"]["read_bandwidth_threads"] >= 1
    assert [r["n_target"] for r in rep["scaling"]] == [40, 120]
    assert rep["scaling"][0]["tiles"] < rep["scaling"][1]["tiles"]
    for row in rep["scaling"]:
        assert row["tokens_after_stm"] <= row["tiles"]
    small, big = rep["scaling"]
    # the prefix baseline's KV cache grows with N (one position per tile), LoC-Path's does not
    per_tile = (big["prefix"]["kv_bytes"] - small["prefix"]["kv_bytes"]) / (big["tiles"] - small["tiles"])
    assert per_tile > 0 and big["locpath"]["kv_bytes"] == small["locpath"]["kv_bytes"]
    for key in ("kv_prefix_over_locpath_at_120", "ttft_prefix_over_locpath_at_120", "encoder_vs_pytorch_bf16",
                "decoder_fused_vs_plain"):
        assert 0 < rep["ratios"][key] < 1e6, key
    assert "encoder_1.2x_pytorch_bf16_at_cosine_0.999" in rep["targets"]
    assert "decoder_0.5b" in rep["skipped"] and rep["bundle"]["decoder"] == "decoder_fused"
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"ttft_vs_tiles.png", "kv_memory_vs_tiles.png", "stages.png"}
    assert "## Ratios" in (tmp_path / "r.md").read_text() and "## Stages" in printed


def test_locpath_kv_figures_are_the_arrays_the_runtime_allocated():
    """The scaling row's LoC-Path K/V (measured and formula) against the K/V arrays the runtime really holds after
    a prefill on the shipped bundle: the self-attention cache's buffers plus the question's cross K/V."""
    import numpy as np

    from locpath.bench.suites.scaling import kv_bytes_locpath, locpath_ttft
    from locpath.runtime.kv_cache import SharedKVCache
    from locpath.runtime.pipeline import Pipeline
    from locpath.wsi.features import FeatureFile
    from servers import shipped

    pipe = Pipeline.from_bundle(shipped(), use_cache=False)
    q, params = "What is the diagnosis?", pipe.sampling()
    rng = np.random.default_rng(0)
    for n in (40, 400):
        side = int(np.ceil(np.sqrt(n)))
        ff = FeatureFile(rng.standard_normal((n, pipe.cfg.feature_dim)).astype(np.float32),
                         np.stack([np.arange(n) % side, np.arange(n) // side], 1) * 224, 224, 224, 0.5, 0.5,
                         pipe.cfg.tile_encoder.name)
        _, _, reported = locpath_ttft(pipe, ff, q, params)
        qkv = pipe.question_kv(pipe.compress(ff).latents, q)
        gen = pipe.generator(qkv, q, params)  # the prefill sizes and fills the cache
        assert isinstance(gen.cache, SharedKVCache)
        held = sum(int(a.numpy().nbytes) for a in gen.cache.keys + gen.cache.values)
        held += sum(int(a.nbytes) for a in qkv.cross.values())
        assert reported == held  # the bench's figure is what the runtime allocated
        assert kv_bytes_locpath(pipe.cfg, len(pipe.prompt_ids(q)) + params.max_new_tokens) == held
    pipe.release()


def test_run_bench_walks_the_suite_registry(monkeypatch, small_tiff, tmp_path):
    """run_bench with a registry of three scripted suites: one runs (its section placed, its ratio and target
    collected), one is off by its flag (its reason under `skipped`), one raises Skip."""
    from locpath.bench import suites
    from locpath.bench.runner import BenchConfig, run_bench
    from locpath.bench.suite import Skip, Suite
    from servers import shipped

    seen = {}

    def run(ctx):
        seen["pipe"] = ctx.pipe
        return {"tiles": ctx.pipe.cfg.feature_dim}

    def cannot(ctx):
        raise Skip("not on this machine")

    monkeypatch.setattr(suites, "SUITES", [
        Suite("probe", "baselines.probe", run, ratios=lambda r: {"probe_x": 2.0},
              targets=lambda r: {"probe_2x": {"target": 2, "value": r["ratios"]["probe_x"], "met": True}}),
        Suite("published", "published", run, flag="published", off="pass --published"),
        Suite("cannot", "cannot", cannot)])
    rep = run_bench(BenchConfig(bundle=shipped(), slide=small_tiff, tiles=[], workdir=tmp_path, progress=False))
    assert rep["baselines"]["probe"] == {"tiles": seen["pipe"].cfg.feature_dim}
    assert rep["ratios"] == {"probe_x": 2.0} and rep["targets"]["probe_2x"]["value"] == 2.0
    assert rep["skipped"] == {"published": "pass --published", "cannot": "not on this machine"}
    assert "published" not in rep and "cannot" not in rep and rep["machine"]["peak_rss_mb_whole_bench"] > 0


def test_bench_bad_slide(ref_bundle, tmp_path, capsys):
    code = main(["bench", str(ref_bundle), "--slide", str(tmp_path / "none.svs"), "--quiet"])
    assert code == 2 and "none.svs: file not found" in capsys.readouterr().err


def test_decoder_05b_ratios_are_like_for_like():
    """The 0.5B target compares locpath's fused INT4 with onnxruntime-genai at the same block size."""
    from locpath.bench.output import decoder_05b_lines
    from locpath.bench.runner import ratios_and_targets

    d05 = {"shape": "Qwen2.5-0.5B (random weights)", "prompt_tokens": 64, "new_tokens": 64, "threads": 2,
           "locpath_fused_int4": {"prefill_ms": 240, "tokens_per_s": 46.0},
           "locpath_fused_int4_block128": {"prefill_ms": 180, "tokens_per_s": 58.0},
           "locpath_int4": {"prefill_ms": 330, "tokens_per_s": 34.0},
           "onnxruntime_genai_int4": {"prefill_ms": 310, "tokens_per_s": 46.0},
           "onnxruntime_genai_int4_block128": {"prefill_ms": 300, "tokens_per_s": 50.0},
           "transformers_eager_fp32": {"prefill_ms": 800, "tokens_per_s": 10.0}}
    rep = {"ratios": {}, "targets": {}, "skipped": {}, "baselines": {"decoder_0.5b": d05}}
    ratios_and_targets(rep)
    assert rep["ratios"]["decoder_0.5b_vs_onnxruntime_genai_int4"] == pytest.approx(1.0)
    assert rep["ratios"]["decoder_0.5b_block128_vs_onnxruntime_genai_int4_block128"] == pytest.approx(1.16)
    assert rep["ratios"]["decoder_0.5b_fused_vs_plain_int4"] == pytest.approx(46 / 34)
    t = rep["targets"]["decoder_1.25x_onnxruntime_genai_int4_0.5b"]
    assert t["value"] == pytest.approx(1.0) and t["met"] is False
    md = "\n".join(decoder_05b_lines(d05))
    assert "| locpath_fused_int4_block128 | 180 | 58.0 |" in md and "| onnxruntime_genai_int4 | 310 | 46.0 |" in md


def test_encoder_vit_b_target_takes_the_fastest_accurate_variant():
    from locpath.bench.output import encoder_vitb_lines
    from locpath.bench.runner import ratios_and_targets

    def v(tps, cos):
        return {"tiles_per_s": tps, "cosine_mean": cos, "cosine_min": cos, "vs_ort_fp32": tps / 7.0,
                "vs_pytorch_bf16": tps / 30.0}

    vb = {"shape": "ViT-B/16", "batch": 16, "variants": {
        "ort_fp32": v(7.0, 1.0), "openvino_bf16": v(31.0, 0.99996), "openvino_nncf_int8": v(45.0, 0.998),
        "ort_int8_dynamic": v(22.0, 0.9999), "pytorch_fp32": v(7.0, 1.0), "pytorch_bf16": v(30.0, 0.99996)}}
    rep = {"ratios": {}, "targets": {}, "skipped": {}, "baselines": {"encoder_vit_b": vb}}
    ratios_and_targets(rep)
    t = rep["targets"]["encoder_vit_b_1.2x_pytorch_bf16_at_cosine_0.999"]
    assert t["variant"] == "openvino_bf16" and t["value"] == pytest.approx(31 / 30) and t["met"] is False  # INT8 is below 0.999
    assert "| openvino_nncf_int8 | 45.0 | 6.43 | 1.50 | 0.99800 / 0.99800 |" in "\n".join(encoder_vitb_lines(vb))
