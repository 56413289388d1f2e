"""The fused decoder's prefill graph (engines/prefill.py), `locpath build --prefill`, and the llama.cpp peer's
pieces that run without llama-cpp-python (GGUF writer, peer summary)."""

import json

import numpy as np
import pytest

from locpath.bench.decoder_05b import choose_prefill, peer_summary
from locpath.engines.fused_graph import build_fused_decoder
from locpath.engines.prefill import (PrefillRecipe, build_prefill_decoder, quantize_int8_blocks,
                                     quantize_int8_columns)
from locpath.errors import LocpathError


def _tiny(tmp_path):
    import torch

    from locpath.config import preset
    from locpath.export.fused import fused_decoder_inputs
    from locpath.models.slide_llm import LocPathModel

    torch.manual_seed(5)
    cfg = preset("tiny")
    cfg.llm.num_hidden_layers = 3
    cfg.cara.layers = (1,)
    cfg.cara.gate_init = 0.8
    spec, w = fused_decoder_inputs(LocPathModel(cfg).eval(), 48)
    build_fused_decoder(spec, w, tmp_path / "fp32.onnx")
    build_fused_decoder(spec, w, tmp_path / "int4.onnx", quant="int4")
    return spec, w


def _greedy(spec, decode, prefill, ids, new=8):
    """Greedy tokens and the prefill's last logits, prompts on `prefill` (when given) and single steps on `decode`."""
    from locpath.runtime.decoder_state import decoder_state
    from locpath.runtime.ort_runner import OrtRunner

    st = decoder_state(OrtRunner(decode, "d"), spec.contract(), OrtRunner(prefill, "p") if prefill else None)
    cross = {k: np.random.default_rng(1).normal(size=(1, 4, 16, 32)).astype(np.float32)
             for k in ("cross_key.1", "cross_value.1")}
    cache = st.new_cache(1, ids.shape[1] + new + 1)
    logits = st.step(ids, cache, np.ones(ids.shape, np.int64), cross)
    first = logits[0, -1].copy()
    toks = [int(first.argmax())]
    for _ in range(new - 1):
        logits = st.step(np.asarray([[toks[-1]]]), cache, np.ones((1, cache.length + 1), np.int64), cross)
        toks.append(int(logits[0, -1].argmax()))
    return toks, first


@pytest.mark.torch
@pytest.mark.parametrize("weights,block", [("int8", 32), ("int8-nbits", 32)])
def test_prefill_graph_then_decode_graph_answers_as_the_decode_graph_alone(weights, block, tmp_path):
    spec, w = _tiny(tmp_path)
    info = build_prefill_decoder(spec, w, tmp_path / "pre.onnx", PrefillRecipe(weights, block))
    op = "DynamicQuantizeMatMul" if weights == "int8" else "MatMulNBits"
    assert info["ops"][op] >= 3 * 4  # every layer's qkv, o, gate_up, down
    assert info["float_matmul_weights"] == ["cara.1.router.weight"]
    ids = np.random.default_rng(2).integers(3, spec.vocab, (1, 20))
    alone, q4_first = _greedy(spec, tmp_path / "int4.onnx", None, ids)
    mixed, pre_first = _greedy(spec, tmp_path / "int4.onnx", tmp_path / "pre.onnx", ids)
    _, fp32_first = _greedy(spec, tmp_path / "fp32.onnx", None, ids)
    assert mixed == alone
    # the K/V it leaves behind is what the decode graph reads: INT8 matmuls are closer to fp32 than INT4 ones
    assert np.abs(pre_first - fp32_first).max() < np.abs(q4_first - fp32_first).max()


@pytest.mark.torch
def test_a_wrong_prefill_graph_changes_the_answer(tmp_path):
    """The check above can fail: a prefill graph from other weights leaves other K/V behind."""
    spec, w = _tiny(tmp_path)
    bad = dict(w, **{"layers.0.qkv.weight": w["layers.0.qkv.weight"][:, ::-1].copy()})
    build_prefill_decoder(spec, bad, tmp_path / "bad.onnx", PrefillRecipe("int8"))
    ids = np.random.default_rng(2).integers(3, spec.vocab, (1, 20))
    alone, _ = _greedy(spec, tmp_path / "int4.onnx", None, ids)
    assert _greedy(spec, tmp_path / "int4.onnx", tmp_path / "bad.onnx", ids)[0] != alone


def test_int8_quantizers_round_trip():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(70, 9)).astype(np.float32)
    q, scale = quantize_int8_columns(w)
    assert q.dtype == np.int8 and scale.shape == (9,)
    assert (np.abs(q * scale - w) <= scale / 2 + 1e-7).all() and (np.abs(q).max(0) == 127).all()
    rows = w.T  # [N, K] with K=70: padded to 3 blocks of 32
    u, s, z = quantize_int8_blocks(rows, 32)
    assert u.shape == (9, 3, 32) and s.shape == (27,) and (z == 128).all()
    back = ((u.astype(np.float32) - 128) * s.reshape(9, 3, 1)).reshape(9, -1)[:, :70]
    assert (np.abs(back - rows) <= np.repeat(s.reshape(9, 3), 32, 1)[:, :70] / 2 + 1e-7).all()
    with pytest.raises(LocpathError, match="prefill weights must be one of"):
        PrefillRecipe("int3").check()


@pytest.mark.torch
def test_build_adds_the_prefill_graph_and_the_pipeline_runs_it(ref_bundle, real_svs, tmp_path):
    from locpath.bundle.integrity import verify_bundle
    from locpath.engines.build import build_bundle
    from locpath.runtime.pipeline import Pipeline

    out = build_bundle(ref_bundle, tmp_path / "b", "int4", log=lambda m: None, prefill="int8")
    m = verify_bundle(out)
    e = m.components["decoder_fused_prefill"]
    assert e.precision == "prefill-int8" and e.parent_sha256 == verify_bundle(ref_bundle).components["decoder_fused"].sha256
    assert m.decoder_contract("decoder_fused_prefill") == m.decoder_contract("decoder_fused")
    assert set(e.quantization["measured"]) >= {"prefill_graph_ms", "decode_graph_prefill_ms", "greedy_tokens_agree"}
    with_pre = Pipeline.from_bundle(out, use_cache=False)
    assert "decoder_fused_prefill" in with_pre.runners
    without = Pipeline.from_bundle(out, use_cache=False, prefill_graph=False)
    assert "decoder_fused_prefill" not in without.runners
    q = "What is the diagnosis?"
    assert with_pre.ask(real_svs, q, max_new_tokens=12).token_ids == without.ask(real_svs, q, max_new_tokens=12).token_ids
    with pytest.raises(LocpathError, match="--prefill must be auto, none or one of"):
        build_bundle(ref_bundle, tmp_path / "c", "int4", log=lambda m: None, prefill="fast")


def _qwen2_folder(tmp_path):
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from locpath.checkpoints import shipped_checkpoint

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=1e6, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_file=str(shipped_checkpoint("reference") / "tokenizer.json"),
                            eos_token="<|im_end|>").save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.torch
def test_gguf_writer_maps_every_qwen2_tensor(tmp_path):
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    from locpath.bench.llamacpp import gguf_name, write_gguf

    folder = _qwen2_folder(tmp_path)
    info = write_gguf(folder, tmp_path / "m.gguf")
    hf = load_file(str(folder / "model.safetensors"))
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    got = {t.name: t for t in r.tensors}
    assert info["tensors"] == len(got) == 2 * 12 + 2  # tied: no output.weight
    for k, a in hf.items():
        t = got[gguf_name(k)]
        np.testing.assert_allclose(np.asarray(t.data, np.float32).reshape(a.shape), a, atol=1e-3 * max(1, np.abs(a).max()))
    field = lambda k: r.fields[k].parts[r.fields[k].data[0]]  # noqa: E731
    assert str(bytes(field("general.architecture")), "utf-8") == "qwen2"
    assert int(field("qwen2.block_count")[0]) == 2 and int(field("qwen2.attention.head_count_kv")[0]) == 2
    assert float(field("qwen2.rope.freq_base")[0]) == 1e6
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 640  # padded to the model's vocabulary
    with pytest.raises(LocpathError, match="no qwen2 tensor for 'model.layers.0.mlp.extra.weight'"):
        gguf_name("model.layers.0.mlp.extra.weight")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(LocpathError, match="takes model_type qwen2, not 'llama'"):
        write_gguf(folder, tmp_path / "x.gguf")


@pytest.mark.torch
def test_gguf_writer_streams_a_sharded_bf16_folder(tmp_path, monkeypatch):
    """A sharded bf16 folder (what bench --published writes at 7B) is written tensor by tensor: each tensor is read
    from its shard only after the one before it is in the file (the writer never holds the model), and the GGUF
    reads back equal to the shards (bf16 -> f16 matrices, f32 norms and biases; untied: an output.weight)."""
    gguf = pytest.importorskip("gguf")
    from locpath.bench import llamacpp
    from locpath.bench.random_qwen2 import write_random_hf_folder
    from locpath.checkpoints import shipped_checkpoint
    from locpath.engines.hf_weights import HFFolder, SafetensorsFiles

    shape = dict(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=False)
    folder = write_random_hf_folder(tmp_path / "hf", shape, shipped_checkpoint("reference") / "tokenizer.json",
                                    shard_bytes=100_000, log=lambda m: None)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and not (folder / "model.safetensors").exists()
    out, reads = tmp_path / "m.gguf", []
    real_array = SafetensorsFiles.array

    def array(self, name, rows=None):  # the file's size when each read starts
        reads.append((name, out.stat().st_size if out.exists() else 0))
        return real_array(self, name, rows)

    monkeypatch.setattr(SafetensorsFiles, "array", array)
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", lambda *a, **k: pytest.fail("add_tensor holds every array"))
    info = llamacpp.write_gguf(folder, out, chunk=1000)
    monkeypatch.undo()
    firsts = [size for i, (name, size) in enumerate(reads) if i == 0 or reads[i - 1][0] != name]
    assert len(firsts) == info["tensors"] == 2 * 12 + 3
    assert all(b > a for a, b in zip(firsts, firsts[1:]))  # each tensor read after the previous one was written
    assert len(reads) > info["tensors"]  # the embedding and the output matrix converted a block of rows at a time
    hf, got = HFFolder(folder), {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    for k in hf.weights.names():
        a = hf.weights.array(k)
        t = got[llamacpp.gguf_name(k)]
        want = a.astype(np.float16 if a.ndim == 2 else np.float32)
        assert t.data.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(t.data).reshape(a.shape), want)
    hf.weights.close()


def test_peer_summary_compares_at_no_more_weight_bytes():
    res = {"onnxruntime_genai_int4": {"tokens_per_s": 50.0, "prefill_ms": 300.0, "weight_bytes_per_token": 300},
           "onnxruntime_genai_int4_block128": {"tokens_per_s": 64.0, "prefill_ms": 280.0, "weight_bytes_per_token": 260},
           "llamacpp_q4_0": {"tokens_per_s": 68.0, "prefill_ms": 70.0, "weight_bytes_per_token": 250},
           "locpath_fused_int4": {"tokens_per_s": 60.0, "prefill_ms": 60.0, "weight_bytes_per_token": 300},
           "locpath_fused_int4_block128": {"tokens_per_s": 75.0, "prefill_ms": 140.0, "weight_bytes_per_token": 245},
           "locpath_fused_int4_block128_prefill": {"tokens_per_s": 74.0, "prefill_ms": 50.0,
                                                   "weight_bytes_per_token": 245}}
    s = peer_summary(res)
    assert s["best_decode_peer"] == "llamacpp_q4_0" and s["locpath_decode"] == "locpath_fused_int4_block128"
    assert s["decode_vs_best_peer"] == pytest.approx(75 / 68) and s["decode_weight_bytes_ratio"] == 245 / 250
    # block 32 prefills fastest but reads more bytes than llama.cpp: it does not count
    assert s["locpath_prefill"] == "locpath_fused_int4_block128_prefill"
    assert s["prefill_best_peer_over_locpath"] == pytest.approx(70 / 50)
    res["llamacpp_q4_0"] = {"skipped": "not installed"}
    assert peer_summary(res)["best_decode_peer"] == "onnxruntime_genai_int4_block128"
    assert "skipped" in peer_summary({"llamacpp_q4_0": {"skipped": "x"}})


def test_choose_prefill_takes_the_fastest_graph_no_less_accurate():
    c = {"base": {"prefill_ms": 140, "cosine_vs_fp32": 0.990}, "int8": {"prefill_ms": 60, "cosine_vs_fp32": 0.999},
         "lossy": {"prefill_ms": 30, "cosine_vs_fp32": 0.95}}
    assert choose_prefill(c, "base") == "int8"
    c["int8"]["cosine_vs_fp32"] = 0.98
    assert choose_prefill(c, "base") == "base"


@pytest.mark.torch
def test_llamacpp_reads_our_gguf_as_pytorch_does(tmp_path):
    """Where llama-cpp-python is built (not in CI: docs/llamacpp.md), the written GGUF decodes greedily as
    PyTorch does (f16 weights, sharp logits so the order is stable)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from locpath.bench import llamacpp
    from locpath.checkpoints import shipped_checkpoint

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     rope_theta=1e6, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8)
    m.save_pretrained(tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_file=str(shipped_checkpoint("reference") / "tokenizer.json"),
                            eos_token="<|im_end|>").save_pretrained(tmp_path / "hf")
    llamacpp.write_gguf(tmp_path / "hf", tmp_path / "m.gguf")
    prompt = [int(x) for x in np.random.default_rng(0).integers(5, 400, 12)]
    got = llamacpp.runner(tmp_path / "m.gguf", prompt, 8, 2)()[3]
    ids, want = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(8):
            want.append(int(m(input_ids=ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[want[-1]]])], 1)
    assert got == want
