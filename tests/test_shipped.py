"""The prebuilt reference bundle shipped in the package, and the demo a runtime-only install runs with it."""

import subprocess
import sys

import pytest

from locpath.bundle.integrity import verify_bundle
from locpath.bundle.paths import sha256_file
from locpath.checkpoints import shipped_bundle, shipped_checkpoint
from locpath.runtime.pipeline import Pipeline

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'timm', 'torchvision', 'peft'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from locpath.cli import main
code = main(sys.argv[1:])
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'timm')]
assert not bad, bad
sys.exit(code)
"""

# the shipped bundle seen as broken, so the demo falls back to an export of the shipped checkpoint; the export itself
# stands in as a copy of the shipped bundle (same weights, no torch: a real export takes minutes)
FALLBACK = """
import shutil, sys, types
from pathlib import Path
import locpath.demo
from locpath.checkpoints import shipped_bundle
real = shipped_bundle()
locpath.demo.shipped_bundle = lambda: Path(sys.argv[1])
def export_bundle(ckpt, out, overwrite=False, log=print):
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(real, out)
sys.modules["locpath.export.bundle"] = types.SimpleNamespace(export_bundle=export_bundle)
""" + BLOCK_TORCH.replace("sys.argv[1:]", "sys.argv[2:]")


@pytest.mark.torch
def test_shipped_bundle_is_an_export_of_the_shipped_checkpoint(exported_bundle, eval_slide):
    m = verify_bundle(shipped_bundle())
    assert m.source["weights_sha256"] == sha256_file(shipped_checkpoint("reference") / "model.safetensors"), \
        "the shipped checkpoint changed: re-export src/locpath/checkpoints/bundles/reference"
    assert set(m.components) == {"tile_encoder", "resampler", "resampler_partial", "resampler_weights",
                                 "resampler_finish", "tis", "cross_kv", "decoder", "decoder_fused"}
    shipped = Pipeline.from_bundle(shipped_bundle(), use_cache=False)
    fresh = Pipeline.from_bundle(exported_bundle, use_cache=False)
    for q in ("What is the diagnosis?", "Is necrosis present?", "Which organ is this?", "What is the tumor grade?"):
        assert shipped.ask(eval_slide, q).token_ids == fresh.ask(eval_slide, q).token_ids


def test_demo_runs_without_torch_and_reuses_everything(tmp_path):
    work = tmp_path / "demo"
    run = lambda: subprocess.run([sys.executable, "-c", BLOCK_TORCH, "demo", "--workdir", str(work)],  # noqa: E731
                                 capture_output=True, text=True, timeout=600)
    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    assert str(shipped_bundle()) in first.stdout and "accuracy" in first.stdout
    assert "tiles read and encoded" in first.stdout and "exporting" not in first.stdout
    assert "s (torch not used)" in first.stdout
    second = run()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "from cache, no tile read" in second.stdout and "writing" not in second.stdout
    assert "s (torch not used)" in second.stdout
    assert first.stderr == second.stderr == ""
    # the fallback path says it exports, and that torch was used for it; a later run reuses that export
    broken = tmp_path / "no-bundle"
    broken.mkdir()
    fallback = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", FALLBACK, str(broken), "demo", "--workdir", str(work)],
        capture_output=True, text=True, timeout=600)
    third = fallback()
    assert third.returncode == 0, third.stderr[-3000:]
    assert "using an export of the shipped checkpoint instead" in third.stdout
    assert f"exporting the shipped reference model to {work / 'reference-bundle'}" in third.stdout
    assert "(torch used once, to export the bundle; the runtime runs without it)" in third.stdout
    assert "torch not used" not in third.stdout and "accuracy" in third.stdout
    fourth = fallback()
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert f"bundle: {work / 'reference-bundle'} (cached)" in fourth.stdout and "exporting" not in fourth.stdout
    assert "s (torch not used)" in fourth.stdout
