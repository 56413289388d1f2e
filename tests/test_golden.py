"""The runtime's answers stay token-identical to golden answers recorded before the decoding refactor of issue 23
(scripts/golden_answers.py wrote tests/data/golden_answers.json): the shipped bundle, a real and two synthetic
slides, both decoder graphs, greedy and seeded sampling, one question at a time and batched (1 and 4 rows)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "golden_answers.py"


def _script():
    spec = importlib.util.spec_from_file_location("golden_answers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_answers_equal_the_golden_answers(tmp_path):
    g = _script()
    want = json.loads(g.GOLDEN.read_text())
    assert want["questions"] == g.questions() and want["sampling"] == g.SAMPLING
    got = g.compute(g.write_slides(tmp_path), tmp_path / "cache")
    assert g.differences(want["answers"], got) == []
    assert sorted(got) == sorted(want["answers"])
