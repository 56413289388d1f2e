"""The shipped reference model: accuracy on held-out slides, and dependence on the sparse evidence."""

import numpy as np
import pytest
import torch

from locpath.cli import main
from locpath.synth import make_spec
from locpath.synth.world import CLASS, TUMOUR_CLASSES
from locpath.train.data import render_tile, tissue_tiles


@pytest.fixture(scope="module")
def reference(shipped_reference):
    from locpath.models.checkpoint import load_checkpoint

    return load_checkpoint(shipped_reference)


def _diagnose(model, tok, spec) -> str:
    from locpath.models.slide_llm import SlideFeatures

    tt = tissue_tiles(spec)
    tiles = np.stack([render_tile(spec, c, r) for c, r in tt.grid])
    with torch.no_grad():
        feats = model.tile_encoder.forward_uint8(torch.from_numpy(tiles)).numpy()
        lat = model.slide_latents([SlideFeatures(feats, tt.grid).merged(model.cfg)])
        return model.answer(tok, lat, ["What is the diagnosis?"])[0]


@pytest.mark.parametrize("seed,diagnosis,grade,organ", [
    (501, "adenocarcinoma", "high grade", "colon"),
    (502, "squamous cell carcinoma", "low grade", "lung"),
    (503, "adenocarcinoma", "low grade", "kidney"),
])
def test_diagnosis_depends_on_the_sparse_region(reference, seed, diagnosis, grade, organ):
    model, tok = reference
    spec = make_spec(seed, diagnosis=diagnosis, grade=grade, organ=organ, necrosis=False)
    assert spec.ground_truth()["diagnostic_fraction"] <= 0.05
    assert _diagnose(model, tok, spec) == diagnosis
    # replace the diagnostic tiles' tumour with the organ's ordinary tissue: the answer must change
    spec.labels[np.isin(spec.labels, TUMOUR_CLASSES)] = CLASS[organ]
    assert _diagnose(model, tok, spec) == "benign"


def test_shipped_reference_on_held_out_slide_files(shipped_reference, capsys):
    import json

    code = main(["eval", "--seed", "11", "--count", "4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(out["per_type"]) == {"diagnosis", "necrosis", "organ", "grade"}
    assert out["accuracy"] >= 0.75  # the full held-out numbers (>= 0.95) are in the checkpoint's train.json


def test_shipped_prefix_baseline_answers(shipped_reference):
    from locpath.checkpoints import shipped_checkpoint
    from locpath.eval import evaluate_checkpoint

    res = evaluate_checkpoint(shipped_checkpoint("prefix"), seed=11, count=2)
    assert len(res.records) == 8 and all(r["answer"] for r in res.records)


def test_quick_training_run_writes_loadable_checkpoints(tmp_path, capsys):
    from locpath.models.checkpoint import load_checkpoint

    assert main(["train", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("reference", "prefix"):
        model, tok = load_checkpoint(tmp_path / name)
        info = (tmp_path / name / "train.json").read_text()
        assert "locpath train" in info
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_demo_runs_and_second_run_reuses_everything(ref_bundle, tmp_path, capsys):
    import shutil

    work = tmp_path / "demo"
    work.mkdir()
    shutil.copytree(ref_bundle, work / "reference-bundle")  # the export is tested elsewhere
    assert main(["demo", "--workdir", str(work)]) == 0
    first = capsys.readouterr().out
    assert "(cached)" in first and "accuracy" in first and "tiles read and encoded" in first
    assert main(["demo", "--workdir", str(work)]) == 0
    second = capsys.readouterr().out
    assert "from cache, no tile read" in second and "writing" not in second
