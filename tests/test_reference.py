"""The shipped reference model: accuracy on held-out slides, and dependence on the sparse evidence."""

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from locpath.cli import main  # noqa: E402
from locpath.synth import make_spec  # noqa: E402
from locpath.synth.world import CLASS, TUMOUR_CLASSES  # noqa: E402
from locpath.train.data import render_tile, tissue_tiles  # noqa: E402


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


def test_training_features_come_from_slide_files(monkeypatch, tmp_path):
    """Training reads its tiles as `locpath eval` does: slide files (SVS, TIFF alternating), open_slide,
    detected grid, TileReader; the files are gone afterwards."""
    from locpath.config import preset
    from locpath.models.encoders import build_tile_encoder
    from locpath.synth import write_slide
    from locpath.train import data, stages
    from locpath.wsi import open_slide
    from locpath.wsi.extract import extract_features, plan_tiles

    opened = []

    def spy(path, *args, **kwargs):
        opened.append(path)
        return open_slide(path, *args, **kwargs)

    monkeypatch.setattr(data, "open_slide", spy)
    torch.manual_seed(0)
    enc = build_tile_encoder(preset("tiny").tile_encoder).eval()
    examples = stages.stage_features(enc, stages.TrainConfig(seed=0), "eval", 2, stages.Log(quiet=True))
    assert [p.suffix for p in opened] == [".svs", ".tiff"]
    assert not any(p.exists() for p in opened)

    ex = examples[1]
    with open_slide(write_slide(ex.spec, tmp_path / "again.tiff", fmt="tiff")) as slide:
        plan = plan_tiles(slide)
        ff, _ = extract_features(slide, lambda t: stages.encode_tiles(enc, t), plan, "vit")
    np.testing.assert_array_equal(ex.slide.grid, plan.grid.grid_index)
    np.testing.assert_allclose(ex.slide.features, ff.features, atol=1e-5)


def test_file_slide_labels_follow_the_detected_grid():
    """A detected tile's label shares are the spec's at that column/row (0.5 um/px: one grid cell a tile)."""
    from locpath.train.data import file_slides

    spec = make_spec(502, diagnosis="squamous cell carcinoma", grade="low grade", organ="lung", necrosis=True)
    truth = tissue_tiles(spec)
    by_cell = {tuple(g): f for g, f in zip(truth.grid, truth.class_frac)}
    for fs in file_slides([spec]):
        frac = fs.class_frac()
        assert len(fs.grid) > 0.9 * len(truth.grid)
        for g, f in zip(fs.grid, frac):
            if tuple(g) in by_cell:
                np.testing.assert_array_equal(f, by_cell[tuple(g)])
        tumour = np.flatnonzero(frac[:, list(TUMOUR_CLASSES)].sum(1) > 0.5)
        assert len(tumour) and fs.read(tumour).shape == (len(tumour), 224, 224, 3)
