"""scripts/gpu_check.py, the one measured GPU run, dry-run on the CPU (`--cpu`): every part that does not need a GPU
runs (fp16 build, provider check, fp16 vs fp32 answers, ViT shapes exported and timed against PyTorch, the
0.5B-shaped fused decoder, a slide end to end), so a broken import or a wrong result fails here and not on the
GPU machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("build_fp16", "providers", "agreement", "encoders", "decoder_0.5b", "slide_10k")

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def test_gpu_check_dry_run_on_the_cpu_passes_every_check(tmp_path):
    pytest.importorskip("onnxscript")
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--budget", "1500",
                          "--out", str(out), "--work", str(tmp_path / "work")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    for name in CHECKS:
        assert f"check {name}: passed" in res.stdout, res.stdout[-4000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["errors"] == {} and report["skipped"] == {}
    assert Path(report["card"]["locpath"]) == ROOT / "src" / "locpath"  # this tree's code ran
    assert all(v.startswith("passed") for v in report["checks"].values()) and set(report["checks"]) == set(CHECKS)
    assert all(r["providers"] == ["CPUExecutionProvider"] for r in report["providers"].values())
    agree = report["agreement_fp16_gpu_vs_fp32_cpu"]
    assert agree["questions"] == 12 and agree["token_identical"] >= 11  # fp16 weights on the CPU answer like fp32
    for shape in ("vit_b16", "vit_l16"):
        assert report["encoders"][shape]["cosine_min"] > 0.999 and report["encoders"][shape]["batch"] == 16
    dec = report["decoder_0.5b"]
    assert dec["locpath_fused_fp16"]["tokens_per_s"] > 0 and dec["torch_bf16"]["tokens_per_s"] > 0
    slide = report["slide_10k"]
    assert slide["tiles"] > 500 and all(slide["answers"]) and slide["torch_bf16"]["answer"]
