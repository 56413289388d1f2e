"""Batched decoding (runtime/generator.py, runtime/answer_batch.py): answers decoded together equal the
answers decoded one by one, token for token, with ragged prompts, rows reused, per-row stop and sampling; one
failing answer fails alone; the prefill graph hook of the fused decoder."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import reseal

QUESTIONS = ["What is the diagnosis?", "Is necrosis present? Describe the whole slide in detail, please.", "grade?",
             "Describe the tissue.", "Any mitoses?", "x"]


@pytest.fixture(scope="module")
def ref_bundle():
    """The shipped bundle: the export of the shipped reference checkpoint, with no torch and no export here."""
    from locpath.checkpoints import shipped_bundle

    return shipped_bundle()


@pytest.fixture(scope="module")
def int4_bundle(ref_bundle, tmp_path_factory):
    from locpath.engines.build import build_bundle

    return build_bundle(ref_bundle, tmp_path_factory.mktemp("int4") / "b", "int4", log=lambda m: None)


@pytest.fixture(scope="module")
def latents(ref_bundle):
    from locpath.bundle.integrity import verify_bundle

    cfg = verify_bundle(ref_bundle).model_config
    return np.random.default_rng(1).standard_normal((1, cfg.resampler.num_latents, cfg.resampler.dim)).astype(np.float32)


def one_by_one(pipe, lat, questions, params_of, stop=True):
    """Each question alone: a batch of one row."""
    return [batched(pipe, lat, [q], lambda _: params_of(i), 1, stop)[0][0] for i, q in enumerate(questions)]


def batched(pipe, lat, questions, params_of, rows, stop=True, cross_of=None):
    from locpath.runtime.generator import GenerationStats, Generator

    b = Generator(pipe.decoder_state, rows, pipe.max_length, pipe.stop_ids if stop else [])
    pending, slot_of, got = list(range(len(questions))), {}, {i: [] for i in range(len(questions))}
    stats = {i: GenerationStats() for i in range(len(questions))}
    most = 0
    while pending or b.active:
        while pending and b.free:
            i = pending.pop(0)
            cross = cross_of(i) if cross_of else pipe.question_kv(lat, questions[i]).cross
            slot_of[b.add(cross, pipe.prompt_ids(questions[i]), params_of(i), stats[i])] = i
        live = len(b.rows) - b.free
        most = max(most, live)
        for slot, tok in b.step():
            if tok is not None:
                got[slot_of[slot]].append(tok)
    return [got[i] for i in range(len(questions))], stats, most


@pytest.mark.torch
@pytest.mark.parametrize("which", ["fp32", "int4"])
def test_batched_answers_equal_one_by_one_token_for_token(which, ref_bundle, int4_bundle, latents):
    """Ragged prompts (1 to 20 tokens of question), more questions than rows (freed rows are reused), greedy
    without stop tokens so every row decodes 30 steps at its own length."""
    from locpath.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(ref_bundle if which == "fp32" else int4_bundle, use_cache=False)
    assert pipe.decoder_component == "decoder_fused"
    params = pipe.sampling(max_new_tokens=30)
    want = one_by_one(pipe, latents, QUESTIONS, lambda i: params, stop=False)
    assert len({tuple(w) for w in want}) > 1  # the rows really differ
    assert want == [pipe.decoder_state.greedy(pipe.prompt_ids(q), pipe.question_kv(latents, q).cross, 30).tokens
                    for q in QUESTIONS]  # a batch of one row is the graph's own greedy answer
    for rows in (2, 4):
        got, stats, most = batched(pipe, latents, QUESTIONS, lambda i: params, rows, stop=False)
        assert got == want, rows
        assert most == rows and max(s.batch_peak for s in stats.values()) == rows


def test_per_row_stop_and_sampling(ref_bundle, latents):
    """Each row its own max_new_tokens, sampling settings and seed, decoded beside the others."""
    from locpath.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False)
    per = [pipe.sampling(max_new_tokens=3), pipe.sampling(do_sample=True, temperature=1.5, top_k=40, seed=7,
                                                          max_new_tokens=12),
           pipe.sampling(max_new_tokens=1), pipe.sampling(do_sample=True, top_p=0.8, seed=11, max_new_tokens=9,
                                                          repetition_penalty=1.3)]
    qs = QUESTIONS[:4]
    want = one_by_one(pipe, latents, qs, lambda i: per[i], stop=False)
    got, stats, _ = batched(pipe, latents, qs, lambda i: per[i], rows=4, stop=False)
    assert got == want
    assert [len(g) for g in got] == [3, 12, 1, 9]
    assert all(stats[i].stop_reason == "max_new_tokens" for i in range(4))


def test_one_damaged_answer_fails_alone(ref_bundle, latents):
    """NaN cross K/V in one row: that answer ends with an error, the others answer as alone."""
    from locpath.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False)
    params = pipe.sampling(max_new_tokens=6)
    qs = QUESTIONS[:3]

    def cross_of(i):
        cross = pipe.question_kv(latents, qs[i]).cross
        return {k: np.full_like(v, np.nan) for k, v in cross.items()} if i == 1 else cross

    want = one_by_one(pipe, latents, qs, lambda i: params, stop=False)
    got, stats, _ = batched(pipe, latents, qs, lambda i: params, rows=3, stop=False, cross_of=cross_of)
    assert got[0] == want[0] and got[2] == want[2]
    assert got[1] == [] and stats[1].stop_reason == "error" and "non-finite" in stats[1].error


def test_plain_decoder_interleaves_with_the_same_answers(ref_bundle, latents):
    from locpath.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False, decoder="plain")
    params = pipe.sampling(max_new_tokens=5)
    want = one_by_one(pipe, latents, QUESTIONS[:3], lambda i: params, stop=False)
    got, stats, _ = batched(pipe, latents, QUESTIONS[:3], lambda i: params, rows=2, stop=False)
    assert got == want and all(len(g) == 5 for g in got)
    assert not pipe.batch(2).gen.shared  # each row its own cache, stepped in turn


def test_answer_and_ask_with_several_questions_equal_answers_one_by_one(ref_bundle, eval_slide):
    from locpath.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False, decode_batch=2)
    qs = ["What is the diagnosis?", "Is necrosis present?", "Which organ is this?", "What is the grade?"]
    ctx = pipe.prepare(eval_slide)
    alone = [pipe.stream(ctx, q) for q in qs]
    for s in alone:
        list(s)
    alone = [s.result for s in alone]
    pieces: dict = {}
    many = pipe.answer(ctx, qs, on_piece=lambda i, p: pieces.setdefault(i, []).append(p))
    assert [a.token_ids for a in many] == [a.token_ids for a in alone]
    assert [a.answer for a in many] == [a.answer for a in alone]
    assert all("".join(pieces.get(i, [])).strip() == a.answer for i, a in enumerate(many))
    assert all(a.generation["batch_rows"] == 2 for a in many)
    assert many[0].timings_ms.get("tiles_encode") and not any("tiles_encode" in a.timings_ms for a in many[1:])
    asked = pipe.ask(eval_slide, qs)
    assert [a.answer for a in asked] == [a.answer for a in alone]
    assert asked[0].slide["cache_hit"] is True  # prepared above: served from memory


def test_ask_with_several_questions_batches_and_prints_in_order(ref_bundle, eval_slide):
    qs = ["What is the diagnosis?", "Is necrosis present?", "Which organ is this?"]
    base = [sys.executable, "-m", "locpath.cli", "ask", str(ref_bundle), str(eval_slide), *qs, "--no-cache"]
    one = subprocess.run(base + ["--decode-batch", "1"], capture_output=True, text=True, timeout=300)
    many = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and many.returncode == 0, one.stderr + many.stderr

    def qa(out):
        return [ln for ln in out.splitlines() if ln.startswith(("Q: ", "A: "))]

    assert qa(many.stdout) == qa(one.stdout) and len(qa(many.stdout)) == 6


def test_chat_batches_questions_waiting_on_stdin(ref_bundle, eval_slide):
    qs = ["What is the diagnosis?", "Is necrosis present?", "", "Which organ is this?"]
    cmd = [sys.executable, "-m", "locpath.cli", "chat", str(ref_bundle), str(eval_slide), "--no-cache"]
    out = subprocess.run(cmd, input="\n".join(qs) + "\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [ln[3:] for ln in out.stdout.splitlines() if ln.startswith("A: ")]
    assert len(answers) == 2  # the empty line ends the session: the question after it is not answered
    one = subprocess.run([sys.executable, "-m", "locpath.cli", "ask", str(ref_bundle), str(eval_slide), *qs[:2],
                          "--json", "--no-cache", "--decode-batch", "1"], capture_output=True, text=True, timeout=300)
    import json

    assert answers == [a["answer"] for a in json.loads(one.stdout)["answers"]]


# -- the prefill graph hook ------------------------------------------------------------------------------------------
def _with_prefill(src, dst, prefill_file):
    """`src` with decoder_fused_prefill = `prefill_file` (a graph with the fused decoder's contract)."""
    import hashlib

    shutil.copytree(src, dst)
    shutil.copy(prefill_file, dst / "decoder_fused_prefill.onnx")
    data = (dst / "decoder_fused_prefill.onnx").read_bytes()
    digest = hashlib.sha256(data).hexdigest()

    def add(mf):
        entry = dict(mf["components"]["decoder_fused"], file="decoder_fused_prefill.onnx", sha256=digest)
        entry.pop("engine_config", None)
        mf["components"]["decoder_fused_prefill"] = entry
        mf["files"]["decoder_fused_prefill.onnx"] = {"sha256": digest, "bytes": len(data)}

    reseal(dst, add)
    with open(dst / "SHA256SUMS", "a") as f:
        f.write(f"{digest}  decoder_fused_prefill.onnx\n")
    return dst


def prefill_logits(pipe, qkv, q, params):
    """The last logits of the prompt's prefill (one row)."""
    from locpath.runtime.generator import Generator

    gen = Generator(pipe.decoder_state, 1, pipe.max_length, pipe.stop_ids)
    return gen.rows[gen.add(qkv.cross, pipe.prompt_ids(q), params)].logits.copy()


@pytest.mark.torch
def test_prefill_graph_runs_the_prompt_and_the_decoder_the_steps(ref_bundle, int4_bundle, latents, tmp_path):
    """An fp32 bundle whose prefill graph is the INT4 one: the prompt's logits come from the INT4 graph (they
    differ from fp32's), the steps from fp32, on one shared cache; prefill_graph=False ignores it."""
    from locpath.bundle.integrity import verify_bundle
    from locpath.runtime.pipeline import Pipeline

    int4_file = int4_bundle / verify_bundle(int4_bundle).components["decoder_fused"].file
    b = _with_prefill(ref_bundle, tmp_path / "b", int4_file)
    pipe = Pipeline.from_bundle(b, use_cache=False)
    assert pipe.decoder_state.prefill_runner is pipe.runners["decoder_fused_prefill"]
    q = QUESTIONS[1]
    params = pipe.sampling(max_new_tokens=8)
    qkv = pipe.question_kv(latents, q)
    mixed = prefill_logits(pipe, qkv, q, params)
    plain = Pipeline.from_bundle(b, use_cache=False, prefill_graph=False)
    assert "decoder_fused_prefill" not in plain.runners
    fp32 = prefill_logits(plain, qkv, q, params)
    int4 = prefill_logits(Pipeline.from_bundle(int4_bundle, use_cache=False), qkv, q, params)
    assert np.allclose(mixed, int4, atol=1e-5) and not np.allclose(mixed, fp32, atol=1e-5)
    # batched rows prefill on it too, and answer as the one-by-one path of the same pipeline
    want = one_by_one(pipe, latents, QUESTIONS[:3], lambda i: params, stop=False)
    got, _, _ = batched(pipe, latents, QUESTIONS[:3], lambda i: params, rows=3, stop=False)
    assert got == want


def test_prefill_graph_needs_the_fused_decoder_and_its_contract(ref_bundle, tmp_path):
    from locpath.bundle.integrity import verify_bundle
    from locpath.bundle.manifest import BundleError

    fused = ref_bundle / verify_bundle(ref_bundle).components["decoder_fused"].file
    b = _with_prefill(ref_bundle, tmp_path / "b", fused)

    def other_contract(mf):
        mf["components"]["decoder_fused_prefill"]["templates"]["max_positions"] = 256

    reseal(b, other_contract)
    with pytest.raises(BundleError, match="differ from decoder_fused"):
        verify_bundle(b)


def test_bench_batched_reports_each_graph(ref_bundle, tmp_path):
    from locpath.bench.batched import bench_batched
    from locpath.bundle.integrity import verify_bundle

    m = verify_bundle(ref_bundle)
    graph = ref_bundle / m.components["decoder_fused"].file
    res = bench_batched({"ref": graph, "missing": tmp_path / "none.onnx"}, m.decoder_contract("decoder_fused"), 2,
                        batches=(1, 2, 4), new=4, rounds=1, log=lambda s: None)
    g = res["graphs"]["ref"]
    assert res["best"] == "ref" and "skipped" in res["graphs"]["missing"]
    assert all(g[f"batch_{b}"]["identical_to_batch_1"] and g[f"batch_{b}"]["runtime_batches"] for b in (1, 2, 4))
    assert g["batch_1"]["over_batch_1"] == 1.0 and g["batch_4"]["tokens_per_s"] > 0
    assert res["prompt_tokens"] == [64, 40, 56, 24]


def test_bench_target_takes_the_fastest_graph_the_runtime_batches():
    """A graph failing the exactness probe answers interleaved: its batch-4 speed is not what a deployment gets, so
    the target's graph is the fastest batched one, and the fastest of all only when none batches."""
    from locpath.bench.batched import best_batched

    def g(tps, batches):
        return {"batch_1": {"tokens_per_s": 50.0}, "batch_4": {"tokens_per_s": tps, "runtime_batches": batches}}

    assert best_batched({"b32": g(150.0, True), "b128": g(200.0, False), "off": {"skipped": "not built"}}) == "b32"
    assert best_batched({"b32": g(150.0, False), "b128": g(200.0, False)}) == "b128"
    assert best_batched({"off": {"skipped": "not built"}}) is None


@pytest.mark.torch
def test_batching_only_where_batched_steps_are_exact(ref_bundle, int4_bundle):
    """The runtime batches a fused graph only when a batched step gives every row its one-row logits bit for bit
    (probed once); a graph whose multi-row kernel differs in the last bits gets interleaved answers instead."""
    from locpath.runtime.generator import Generator, rows_are_exact
    from locpath.runtime.pipeline import Pipeline

    for b in (ref_bundle, int4_bundle):
        pipe = Pipeline.from_bundle(b, use_cache=False)
        assert rows_are_exact(pipe.decoder_state, 4)
        assert pipe.batch(4).gen.shared

    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False)
    state = pipe.decoder_state
    real = state.decode_rows

    def last_bit_off(cache, tokens, lengths, cross):  # as a kernel with another path for several rows
        out = real(cache, tokens, lengths, cross)
        if len(tokens) > 1:
            out = np.nextafter(out, np.inf)
        return out

    state.decode_rows = last_bit_off
    assert not rows_are_exact(state, 4)
    assert not Generator(state, 4, pipe.max_length, pipe.stop_ids).shared
    assert Generator(state, 1, pipe.max_length, pipe.stop_ids).shared
