import json
import subprocess
import sys

import numpy as np
import pytest

from locpath.cli import main
from locpath.errors import ConfigError, LocpathError
from locpath.runtime.detok import StreamingDetokenizer
from locpath.runtime.kv_cache import KVCache
from locpath.runtime.pipeline import Pipeline
from locpath.runtime.ort_runner import OrtRunner
from locpath.runtime.runner import RunnerError
from locpath.runtime.sampler import Sampler, SamplingParams


@pytest.mark.torch
def test_bundle_answers_token_identical_to_pytorch(ref_bundle, shipped_reference):
    from locpath.eval import evaluate_bundle, evaluate_checkpoint

    torch_res = evaluate_checkpoint(shipped_reference, seed=7, count=3)
    onnx_res = evaluate_bundle(ref_bundle, seed=7, count=3)
    assert len(torch_res.records) == len(onnx_res.records) == 12
    for a, b in zip(torch_res.records, onnx_res.records):
        assert a["question"] == b["question"]
        assert a["token_ids"] == b["token_ids"], (a, b)
    assert torch_res.accuracy == onnx_res.accuracy


def test_second_question_reads_no_tile(ref_bundle, eval_slide, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = Pipeline.from_bundle(ref_bundle, cache_dir=cache).ask(eval_slide, "What is the diagnosis?")
    assert first.slide["tiles_read"] > 0 and not first.slide["cache_hit"]

    import locpath.wsi.reader as reader

    def no_tiles(self):
        raise AssertionError("a tile was read")

    monkeypatch.setattr(reader.TileReader, "__iter__", no_tiles)
    pipe = Pipeline.from_bundle(ref_bundle, cache_dir=cache)  # a new process would start like this
    again = pipe.ask(eval_slide, "What is the diagnosis?")
    assert again.slide["cache_hit"] and again.slide["tiles_read"] == 0
    assert again.answer == first.answer and again.token_ids == first.token_ids
    many = pipe.ask(eval_slide, ["Is necrosis present?", "What is the tumor grade?"])
    assert all(a.slide["tiles_read"] == 0 for a in many)
    assert "tiles_encode" not in again.timings_ms


def test_streaming_pieces_make_the_answer(ref_bundle, eval_slide, tmp_path):
    pipe = Pipeline.from_bundle(ref_bundle, cache_dir=tmp_path)
    stream = pipe.stream(pipe.prepare(eval_slide), "What is the diagnosis?")
    pieces = list(stream)
    assert "".join(pieces).strip() == stream.result.answer
    assert stream.result.timings_ms["time_to_first_token"] > 0


def test_features_in_mode_matches_slide_mode(ref_bundle, eval_slide, tmp_path):
    pipe = Pipeline.from_bundle(ref_bundle, cache_dir=tmp_path)
    a = pipe.ask(eval_slide, "What organ is this tissue from?")
    entry = next((tmp_path / pipe.bundle_key()).iterdir())
    b = Pipeline.from_bundle(ref_bundle, use_cache=False).ask(entry / "features.h5", "What organ is this tissue from?")
    assert a.token_ids == b.token_ids


def test_runtime_imports_no_torch(ref_bundle, eval_slide, tmp_path):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'timm'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from locpath.runtime.pipeline import Pipeline
from locpath.cli import main
a = Pipeline.from_bundle({str(ref_bundle)!r}, cache_dir={str(tmp_path)!r}).ask({str(eval_slide)!r}, 'Is necrosis present?')
assert a.answer, a
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'timm')]
assert not bad, bad
print('ok', a.answer)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_ask_cli_json(ref_bundle, eval_slide, tmp_path, capsys):
    code = main(["ask", str(ref_bundle), str(eval_slide), "What is the diagnosis?", "--json", "--cache-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads(out)
    assert rep["schema"] == "locpath-answers/1" and len(rep["answers"]) == 1  # a list, even for one question
    one = rep["answers"][0]
    assert one["answer"] and one["peak_rss_mb"] > 0 and rep["peak_rss_mb"] == one["peak_rss_mb"]
    for stage in ("tiles_encode", "stm", "resampler", "tis", "cross_kv", "prefill", "time_to_first_token"):
        assert stage in one["timings_ms"]
    code = main(["ask", str(ref_bundle), str(eval_slide), "What is the diagnosis?", "Is necrosis present?", "--json",
                 "--cache-dir", str(tmp_path)])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0 and len(rep["answers"]) == 2 and all(r["slide"]["cache_hit"] for r in rep["answers"])
    assert [a["question"] for a in rep["answers"]] == ["What is the diagnosis?", "Is necrosis present?"]


def test_ask_cli_bad_slide(ref_bundle, tmp_path, capsys):
    bad = tmp_path / "x.svs"
    bad.write_text("no")
    code = main(["ask", str(ref_bundle), str(bad), "What is the diagnosis?", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1


def test_sampler():
    logits = np.array([1.0, 3.0, 2.0, -1.0])
    assert Sampler(SamplingParams())(logits, []) == 1
    assert Sampler(SamplingParams(do_sample=True, top_k=1, seed=3))(logits, []) == 1
    assert Sampler(SamplingParams(do_sample=True, top_p=0.01, seed=3))(logits, []) == 1
    # repetition penalty pushes a repeated token below the next best
    assert Sampler(SamplingParams(repetition_penalty=2.0))(logits, [1]) == 2
    draws = [Sampler(SamplingParams(do_sample=True, temperature=5.0, seed=s))(logits, []) for s in range(40)]
    assert len(set(draws)) > 1  # sampling samples
    again = [Sampler(SamplingParams(do_sample=True, temperature=5.0, seed=s))(logits, []) for s in range(40)]
    assert draws == again  # seeded
    for bad, field in ((dict(top_p=0), "top_p"), (dict(temperature=0), "temperature"),
                       (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
                       (dict(repetition_penalty=float("inf")), "repetition_penalty"), (dict(seed=-1), "seed"),
                       (dict(top_k=-2), "top_k"), (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(ConfigError, match=field):
            SamplingParams(**bad).validate()


def test_streaming_detokenizer_never_emits_broken_characters(tokenizer):
    text = "colon ✓ café 肺"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    d = StreamingDetokenizer(tokenizer)
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(text.split())  # multi-byte characters really were split across tokens


def test_plain_kv_cache_swaps_present_into_past_and_is_capped():
    from locpath.bundle.decoder_io import DecoderContract

    contract = DecoderContract("plain", num_layers=2, num_kv_heads=2, head_dim=4, vocab=10, cara_layers=(),
                               cara_heads=0, cara_head_dim=0)
    c = KVCache(contract, batch=1, max_length=5)
    assert c.past["past_key.1"].shape == (1, 2, 0, 4) and c.nbytes == 0
    present = {n: np.full((1, 2, 3, 4), j, np.float32) for j, n in enumerate(
        ["present_key.0", "present_value.0", "present_key.1", "present_value.1"])}
    c.update(present, 3)
    assert c.past["past_value.1"] is present["present_value.1"]  # no copy: the output becomes the next input
    assert c.length == 3 and c.nbytes == 4 * 3 * 2 * 4 * 4
    c.check_room(5)
    with pytest.raises(LocpathError, match="KV cache full: 6 positions exceed the cap of 5"):
        c.check_room(6)


def test_unavailable_provider_is_a_clear_error(ref_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present")
    with pytest.raises(RunnerError, match="CUDAExecutionProvider is not available"):
        OrtRunner(ref_bundle / "tis.onnx", "tis", device="cuda").load()


@pytest.mark.gpu
def test_cuda_provider_matches_cpu(ref_bundle, eval_slide, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a CUDA device")
    cpu = Pipeline.from_bundle(ref_bundle, use_cache=False).ask(eval_slide, "What is the diagnosis?")
    gpu = Pipeline.from_bundle(ref_bundle, device="cuda", use_cache=False).ask(eval_slide, "What is the diagnosis?")
    assert cpu.token_ids == gpu.token_ids


def test_chat_answers_each_stdin_line(ref_bundle, eval_slide, tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the diagnosis?\nIs necrosis present?\n\n"))
    code = main(["chat", str(ref_bundle), str(eval_slide), "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("A: ") == 2


def test_ask_rejects_empty_questions_and_bad_sampling_before_output(ref_bundle, eval_slide, capsys):
    code = main(["ask", str(ref_bundle), str(eval_slide), "  ", "--no-cache"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "question 1 is empty" in err
    code = main(["ask", str(ref_bundle), str(eval_slide), "What is the diagnosis?", "--top-p", "2", "--no-cache"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "top_p must be a finite number > 0 and <= 1, got 2.0" in err


def test_slide_cache_keys_on_mpp_override(ref_bundle, eval_slide, tmp_path):
    pipe = Pipeline.from_bundle(ref_bundle, cache_dir=tmp_path)
    a = pipe.ask(eval_slide, "What is the diagnosis?")
    b = Pipeline.from_bundle(ref_bundle, cache_dir=tmp_path).ask(eval_slide, "What is the diagnosis?", mpp_override=0.25)
    assert not b.slide["cache_hit"] and b.slide["tiles"] != a.slide["tiles"]  # 0.25 um/px: larger tiles, fewer
