"""How far to trust an answer (issue 25), through the CLI and the service as users meet them, on the shipped bundle
and its trust.json: calibrated confidence, out-of-distribution and too-little-tissue warnings, abstaining, the fields
everywhere an answer goes, trust.json's integrity, and a small `eval --trust`."""

import json
import shutil

import numpy as np
import pytest
from servers import Server, cli, one_line, register, shipped, sse

Q = "What is the diagnosis?"
Q2 = "Which organ does this slide come from?"


def answers_of(res) -> list[dict]:
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)["answers"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory, small_svs, real_svs):
    """An in-distribution synthetic slide, the real H&E region, and a slide with one tissue tile."""
    from locpath.synth import make_spec
    from locpath.synth.world import render_region
    from locpath.trust.oodset import write_image_slide

    root = tmp_path_factory.mktemp("trust-roots")
    shutil.copy(small_svs, root / "synthetic.svs")
    shutil.copy(real_svs, root / "real.svs")
    spec = make_spec(4242)
    w, h = spec.dimensions
    img = np.full((1120, 1120, 3), 255, np.uint8)
    img[448:672, 448:672] = render_region(spec, w // 2 - 112, h // 2 - 112, 224, 224)  # one tile of tissue
    write_image_slide(img, root / "one_tile.svs", spec.mpp)
    return root


@pytest.fixture(scope="module")
def without_trust(tmp_path_factory):
    """The shipped bundle with trust.json taken out of it (manifest and checksums rewritten)."""
    from locpath.bundle.integrity import verify_bundle, write_manifest

    b = tmp_path_factory.mktemp("no-trust") / "bundle"
    shutil.copytree(shipped(), b)
    m = verify_bundle(b)
    m.drop_file("trust.json")
    (b / "trust.json").unlink()
    write_manifest(b, m)
    return b


@pytest.fixture(scope="module")
def asked(roots):
    """`ask --json` of the shipped bundle: the synthetic slide (two questions) and the real H&E region."""
    syn = answers_of(cli("ask", shipped(), roots / "synthetic.svs", Q, Q2, "--json", "--no-cache"))
    real = answers_of(cli("ask", shipped(), roots / "real.svs", Q, "--json", "--no-cache"))
    return syn, real


def test_confidence_is_a_probability_and_answers_do_not_change(asked, roots, without_trust):
    syn, _ = asked
    for a in syn:
        t = a["trust"]
        assert 0.0 <= t["confidence"] <= 1.0 and t["calibrated"] is True
        assert t["slide"]["out_of_distribution"] is False and t["slide"]["too_little_tissue"] is False
        assert t["warnings"] == [] and t["abstained"] is False
    plain = answers_of(cli("ask", without_trust, roots / "synthetic.svs", Q, Q2, "--json", "--no-cache"))
    assert [a["answer"] for a in plain] == [a["answer"] for a in syn]
    assert [a["generation"]["new_tokens"] for a in plain] == [a["generation"]["new_tokens"] for a in syn]
    assert all(a["trust"]["calibrated"] is False and a["trust"]["slide"]["ood_score"] is None for a in plain)


def test_a_real_he_slide_is_flagged_out_of_distribution(asked):
    _, real = asked
    t = real[0]["trust"]
    assert t["slide"]["out_of_distribution"] is True
    assert t["slide"]["ood_score"] > t["slide"]["ood_threshold"]
    assert "out_of_distribution" in [w["code"] for w in t["warnings"]]
    assert real[0]["answer"]  # still answered, with the warning


def test_one_tissue_tile_warns_and_abstain_answers_uncertain(roots):
    res = cli("ask", shipped(), roots / "one_tile.svs", Q, "--no-cache", "--abstain-below", "1")
    assert res.returncode == 0, res.stderr
    assert "A: uncertain" in res.stdout and "WARNING: too little tissue: 1 tissue tiles" in res.stdout
    a = answers_of(cli("ask", shipped(), roots / "one_tile.svs", Q, "--json", "--no-cache",
                       "--abstain-below", "1"))[0]
    t = a["trust"]
    assert t["slide"]["tissue_tiles"] == 1 and t["slide"]["too_little_tissue"] is True
    assert a["answer"] == "uncertain" and t["abstained"] is True and t["raw_answer"]
    assert {"too_little_tissue", "low_confidence"} <= {w["code"] for w in t["warnings"]}
    one_line(cli("ask", shipped(), roots / "one_tile.svs", Q, "--abstain-below", "2"), "--abstain-below")


def test_an_edited_trust_json_is_refused(tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(shipped(), b)
    t = json.loads((b / "trust.json").read_text())
    t["ood"]["threshold"] = 1e9  # silence the OOD warning
    (b / "trust.json").write_text(json.dumps(t))
    one_line(cli("verify", b), "trust.json", "modified")


def test_a_signed_bundle_refuses_a_resealed_trust_json(tmp_path):
    import hashlib

    b = tmp_path / "bundle"
    shutil.copytree(shipped(), b)
    assert cli("keygen", tmp_path / "k").returncode == 0
    assert cli("sign", b, "--key", tmp_path / "k.key").returncode == 0, "signing failed"
    pub = tmp_path / "k.pub"
    assert cli("verify", b, "--trusted-keys", pub).returncode == 0
    t = json.loads((b / "trust.json").read_text())
    t["confidence"]["threshold"] = 0.0
    (b / "trust.json").write_text(json.dumps(t))
    mf = json.loads((b / "manifest.json").read_text())  # the manifest and checksums rewritten to match
    mf["files"]["trust.json"] = {"sha256": hashlib.sha256((b / "trust.json").read_bytes()).hexdigest(),
                                 "bytes": (b / "trust.json").stat().st_size}
    (b / "manifest.json").write_text(json.dumps(mf, indent=2))
    lines = {ln.split("  ")[1]: ln.split("  ")[0] for ln in (b / "SHA256SUMS").read_text().splitlines()}
    lines["manifest.json"] = hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
    lines["trust.json"] = mf["files"]["trust.json"]["sha256"]
    (b / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in lines.items()))
    assert cli("verify", b).returncode == 0  # checksums alone agree now ...
    one_line(cli("verify", b, "--trusted-keys", pub), "signature")  # ... the signature does not


def test_trust_in_the_service_json_sse_and_openai(roots, tmp_path):
    with Server(shipped(), tmp_path, "--slide-root", roots) as s, s.client() as c:
        sid = register(c, roots / "real.svs")["id"]
        d = c.post(f"/v1/slides/{sid}/questions", json={"question": Q}).json()
        assert d["trust"]["slide"]["out_of_distribution"] is True and 0 <= d["trust"]["confidence"] <= 1
        r = c.post(f"/v1/slides/{sid}/questions", json={"question": Q, "stream": True, "abstain_below": 1.0})
        events = sse(r.text)
        done = json.loads([d for e, d in events if e == "done"][0])
        assert done["answer"] == "uncertain" and done["trust"]["abstained"] is True
        assert [json.loads(d)["text"] for e, d in events if e == "piece"] == ["uncertain"]  # never the raw text
        body = {"model": "locpath", "slide_id": sid, "messages": [{"role": "user", "content": Q}]}
        o = c.post("/v1/chat/completions", json=body).json()
        assert o["locpath"]["trust"]["slide"]["out_of_distribution"] is True
        r = c.post("/v1/chat/completions", json=dict(body, stream=True))
        chunks = [json.loads(d) for _, d in sse(r.text) if d != "[DONE]"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and "confidence" in chunks[-1]["locpath"]["trust"]
        bad = c.post(f"/v1/slides/{sid}/questions", json={"question": Q, "abstain_below": 1.5})
        assert bad.status_code in (400, 422) and "abstain_below" in bad.text


def test_batch_records_carry_trust(roots, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(roots / "real.svs", slides / "real.svs")
    (tmp_path / "q.txt").write_text(Q + "\n")
    res = cli("batch", shipped(), "--slides", slides, "--questions", tmp_path / "q.txt", "--out", tmp_path / "out",
              "--no-cache", "--quiet")
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "out" / "answers.jsonl").read_text().splitlines()[0])
    assert rec["slide_trust"]["out_of_distribution"] is True
    assert 0 <= rec["answers"][0]["trust"]["confidence"] <= 1


def test_trust_statistics():
    from locpath.trust import stats

    assert stats.auroc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0
    assert stats.auroc([0.5, 0.9], [0.1, 0.2]) == 0.0
    assert stats.ece(np.array([1.0, 1.0]), np.array([True, True])) == 0.0
    assert stats.ece(np.array([0.9] * 10), np.array([True] * 9 + [False])) == pytest.approx(0.0)
    table = stats.coverage_table(np.array([0.2, 0.6, 0.9, 0.95]), np.array([False, True, True, True]), [0.5])
    assert table == [{"threshold": 0.5, "coverage": 0.75, "accuracy": 1.0, "answered": 3}]


def test_eval_trust_reports_its_fields(real_svs):
    res = cli("eval", "--trust", "--bundle", shipped(), "--seed", "77", "--count", "2", "--ood-count", "1",
              "--real-slide", real_svs, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(res.stdout)
    cal, ood = rep["calibration"], rep["ood"]
    assert cal["answers"] == 8 and 0 <= cal["ece"] <= 1 and cal["coverage_table"][0]["coverage"] == 1.0
    assert set(ood["per_kind"]) == {"real", "stain", "blur", "pen", "nontissue"}
    assert ood["per_kind"]["real"]["slides"] == 5 and ood["per_kind"]["real"]["flagged"] == 1.0
    assert 0 <= ood["auroc"] <= 1 and ood["in_distribution_slides"] == 2
    one_line(cli("eval", "--trust"), "--bundle")
