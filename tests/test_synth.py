import json

import numpy as np
import pytest

from locpath.cli import main
from locpath.synth import QUESTION_TYPES, TEMPLATES, make_spec, questions_for, render_region, write_slide
from locpath.synth.qa import ANSWERS
from locpath.synth.world import MAX_DIAGNOSTIC_FRACTION, NECROSIS, TUMOUR_CLASSES


def test_spec_is_deterministic_and_seeds_differ():
    a, b, c = make_spec(7), make_spec(7), make_spec(8)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.ground_truth() == b.ground_truth()
    assert a.labels.shape != c.labels.shape or not np.array_equal(a.labels, c.labels)
    np.testing.assert_array_equal(render_region(a, 300, 200, 64, 48), render_region(b, 300, 200, 64, 48))


@pytest.mark.parametrize("seed", range(12))
def test_diagnostic_region_is_sparse_and_decides_the_diagnosis(seed):
    spec = make_spec(seed)
    gt = spec.ground_truth()
    has_tumour = np.isin(spec.labels, TUMOUR_CLASSES).any()
    assert has_tumour == (spec.diagnosis != "benign")
    assert gt["diagnostic_fraction"] <= MAX_DIAGNOSTIC_FRACTION
    if has_tumour:
        assert gt["diagnostic_tiles"] >= 1
        # exactly one tumour class, the one the diagnosis and grade name
        classes = set(np.unique(spec.labels[np.isin(spec.labels, TUMOUR_CLASSES)]))
        assert len(classes) == 1
    assert (spec.labels == NECROSIS).any() == spec.necrosis
    assert 0.2 < gt["tissue_fraction"] < 0.8


def test_question_types_phrasings_and_answers():
    assert len(QUESTION_TYPES) >= 4
    for t in QUESTION_TYPES:
        assert len(set(TEMPLATES[t])) >= 2 and len(ANSWERS[t]) >= 2
    spec = make_spec(3, diagnosis="squamous cell carcinoma", grade="low grade", organ="kidney", necrosis=False)
    qs = {q["type"]: q for q in questions_for(spec)}
    assert qs["diagnosis"]["answer"] == "squamous cell carcinoma"
    assert qs["grade"]["answer"] == "low grade"
    assert qs["organ"]["answer"] == "kidney"
    assert qs["necrosis"]["answer"] == "no"
    benign = make_spec(3, diagnosis="benign")
    assert {q["type"]: q["answer"] for q in questions_for(benign)}["grade"] == "no tumor"


def test_rendering_is_resolution_independent():
    """A 40x slide downsampled 2x shows the same tissue as the 20x slide."""
    s20 = make_spec(9, tiles=(6, 6), mpp=0.5)
    s40 = make_spec(9, tiles=(6, 6), mpp=0.25)
    assert s40.dimensions == (2 * s20.dimensions[0], 2 * s20.dimensions[1])
    a = render_region(s20, 400, 400, 100, 100).astype(int)
    b = render_region(s40, 800, 800, 200, 200)[::2, ::2].astype(int)
    assert np.abs(a - b).mean() < 3


def test_synth_cli_writes_slides_and_truth(tmp_path, capsys):
    code = main(["synth", str(tmp_path), "--count", "2", "--seed", "4", "--format", "tiff", "--tiles", "8", "8"])
    assert code == 0
    slides = sorted(tmp_path.glob("*.tiff"))
    truths = sorted(tmp_path.glob("*.truth.json"))
    assert len(slides) == 2 and len(truths) == 2
    gt = json.loads(truths[0].read_text())
    assert {"organ", "diagnosis", "grade", "necrosis", "questions", "mpp"} <= set(gt)
    assert {q["type"] for q in gt["questions"]} == set(QUESTION_TYPES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_write_slide_cleans_up_on_failure(tmp_path, monkeypatch):
    import locpath.synth.writer as w

    spec = make_spec(1, tiles=(6, 6))

    def boom(*a, **k):
        raise RuntimeError("render failed")

    monkeypatch.setattr(w, "render_region", boom)
    with pytest.raises(RuntimeError, match="render failed"):
        write_slide(spec, tmp_path / "x.svs")
    assert list(tmp_path.iterdir()) == []
