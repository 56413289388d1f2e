import json

import pytest

from locpath.cli import main


def test_bench_writes_report_markdown_and_plots(ref_bundle, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report.json"
    code = main(["bench", str(ref_bundle), "--tiles", "40", "120", "--repeats", "1", "--warmup", "0",
                 "--workdir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(tmp_path / "r.md"),
                 "--plots", str(tmp_path / "plots"), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["schema"] == "locpath-bench/1"
    for stage in ("tile_read", "encode", "stm", "resampler", "tis", "cross_kv", "prefill", "decode_per_token"):
        assert rep["stages"][stage]["median"] >= 0
    assert rep["ceilings"]["fp32_matmul_gflops"] > 0 and rep["ceilings"]["memory_bandwidth_gbs"] > 0
    assert [r["n_target"] for r in rep["scaling"]] == [40, 120]
    big = rep["scaling"][1]
    # the prefix baseline's KV cache grows with N, LoC-Path's does not
    assert big["prefix"]["kv_bytes"] > rep["scaling"][0]["prefix"]["kv_bytes"]
    assert big["locpath"]["kv_bytes"] == rep["scaling"][0]["locpath"]["kv_bytes"]
    assert "kv_prefix_over_locpath_at_120" in rep["ratios"] and "encoder_vs_pytorch_bf16" in rep["ratios"]
    assert "decoder_0.5b" in rep["skipped"]
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"ttft_vs_tiles.png", "kv_memory_vs_tiles.png", "stages.png"}
    assert "## Ratios" in (tmp_path / "r.md").read_text() and "## Stages" in printed


def test_bench_bad_slide(ref_bundle, tmp_path, capsys):
    code = main(["bench", str(ref_bundle), "--slide", str(tmp_path / "none.svs"), "--quiet"])
    assert code == 2 and "none.svs: file not found" in capsys.readouterr().err
