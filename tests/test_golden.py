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


# -- the same answers through the CLI and the service ---------------------------------------------------------
import pytest  # noqa: E402

from servers import Server, cli, register, shipped  # noqa: E402

CLI_SAMPLING = {"greedy": [], "sampled": ["--sample", "--seed", "1234", "--temperature", "3.0", "--top-k", "200",
                                          "--top-p", "0.97", "--repetition-penalty", "1.3"]}
HTTP_SAMPLING = {"greedy": {}, "sampled": dict(sample=True, seed=1234, temperature=3.0, top_k=200, top_p=0.97,
                                               repetition_penalty=1.3)}


def _golden_texts(decoder: str, label: str, mode: str) -> list[str]:
    """The golden token ids of the real slide as text (the JSON answers carry text, not ids)."""
    from locpath.runtime.pipeline import Pipeline

    want = json.loads(_script().GOLDEN.read_text())
    tok = Pipeline.from_bundle(shipped(), use_cache=False).tokenizer
    return [tok.decode(ids).strip() for ids in want["answers"]["cmu_small_region"][decoder][label][mode]]


@pytest.mark.parametrize("decoder,batch", [("fused", 1), ("plain", 4)])
def test_cli_ask_gives_the_golden_answers(real_svs, tmp_path, decoder, batch):
    qs = _script().questions()
    for label, flags in CLI_SAMPLING.items():
        r = cli("ask", shipped(), real_svs, *qs, "--json", "--decoder", decoder, "--decode-batch", batch,
                "--cache-dir", tmp_path / "cache", *flags)
        assert r.returncode == 0, r.stderr
        got = [a["answer"] for a in json.loads(r.stdout)["answers"]]
        assert got == _golden_texts(decoder, label, "ask" if batch == 1 else "batch4"), label


def test_the_service_gives_the_golden_answers(real_svs, tmp_path):
    qs = _script().questions()
    with Server(shipped(), tmp_path, "--slide-root", real_svs.parent, "--decoder", "plain") as s, s.client() as c:
        sid = register(c, real_svs)["id"]
        for label, body in HTTP_SAMPLING.items():
            got = []
            for q in qs:
                r = c.post(f"/v1/slides/{sid}/questions", json=dict(body, question=q))
                assert r.status_code == 200, r.text
                got.append(r.json()["answer"])
            assert got == _golden_texts("plain", label, "ask"), label
