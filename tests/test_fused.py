"""The fused decoder graph (GroupQueryAttention, shared K/V buffers, INT4 MatMulNBits + GatherBlockQuantized)."""

import numpy as np
import pytest

from locpath.engines.fused_graph import (FusedDecoderSpec, build_fused_decoder, dequantize_int4_rows,
                                         quantize_int4_rows, weights_from_fused_onnx)
from locpath.bundle.integrity import verify_bundle as load_manifest
from locpath.errors import LocpathError
from locpath.runtime.pipeline import Pipeline


def _model(arch: str, tied: bool, cara=(1,)):
    import torch

    from locpath.config import preset
    from locpath.models.slide_llm import LocPathModel

    torch.manual_seed(3)
    cfg = preset("tiny")
    cfg.llm.architecture = arch
    cfg.llm.tie_word_embeddings = tied
    cfg.llm.num_hidden_layers = 3
    cfg.cara.layers = tuple(cara)
    cfg.cara.gate_init = 0.8  # open gates, so a wrong cross-attention shows in the logits
    m = LocPathModel(cfg).eval()
    with torch.no_grad():  # non-zero biases and norms, so a dropped term shows
        for name, p in m.llm.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def test_int4_rows_round_trip_and_extremes():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(7, 70)).astype(np.float32)  # K not a multiple of the block: padded
    packed, scale, k = quantize_int4_rows(w, 32)
    assert packed.shape == (7, 3, 16) and packed.dtype == np.uint8 and scale.shape == (7, 3) and k == 70
    back = dequantize_int4_rows(packed, scale, k)
    err = np.abs(back - w)
    step = np.repeat(np.abs(scale), 32, axis=1)[:, :70]
    inside = np.abs(w) <= 7 * step  # the side opposite a block's extreme stops at 7 steps (ORT's symmetric form)
    assert (err[inside] <= step[inside] / 2 + 1e-6).all() and (err <= step + 1e-6).all()
    # the largest magnitude of each block is exact (it maps to -8)
    blk = np.abs(w[:, :32]).argmax(1)
    np.testing.assert_allclose(back[np.arange(7), blk], w[np.arange(7), blk], rtol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("llama", False)])
def test_fused_graph_matches_pytorch_step_by_step(arch, tied, tmp_path):
    from locpath.export.fused import fused_decoder_inputs, validate_fused

    model = _model(arch, tied, cara=(0, 2))
    spec, w = fused_decoder_inputs(model, 64)
    assert spec.qkv_bias == (arch == "qwen2") and spec.tied_embeddings == tied
    info = build_fused_decoder(spec, w, tmp_path / "d.onnx")
    assert info["ops"]["GroupQueryAttention"] == 3 and info["ops"]["MultiHeadAttention"] == 2
    # prefill of 9 then 4 single-token steps through the runtime's state, against PyTorch's full forward
    assert validate_fused(tmp_path / "d.onnx", model, spec) < 5e-5


@pytest.mark.torch
def test_fused_validation_fails_on_a_perturbed_weight(tmp_path):
    """Validation compares against PyTorch for real: a graph built before a weight changed must be refused."""
    import torch

    from locpath.export.exporter import ValidationError
    from locpath.export.fused import fused_decoder_inputs, validate_fused

    model = _model("qwen2", True, cara=(1,))
    spec, w = fused_decoder_inputs(model, 32)
    build_fused_decoder(spec, w, tmp_path / "d.onnx")
    assert validate_fused(tmp_path / "d.onnx", model, spec) < 5e-5
    with torch.no_grad():
        model.llm.model.layers[2].mlp.down_proj.weight.mul_(1.05)
    with pytest.raises(ValidationError, match=r"decoder_fused: .*logits: \d") as exc:
        validate_fused(tmp_path / "d.onnx", model, spec)
    assert exc.value.diffs["logits"] > 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("llama", False)])
def test_int4_graph_is_the_fp32_graph_of_the_dequantized_weights(arch, tied, tmp_path):
    """MatMulNBits and GatherBlockQuantized read our packing as we wrote it (zero point 8, low nibble first)."""
    from locpath.export.fused import fused_decoder_inputs
    from locpath.runtime.decoder_state import FusedDecoderState
    from locpath.runtime.ort_runner import OrtRunner

    model = _model(arch, tied, cara=(1,))
    spec, w = fused_decoder_inputs(model, 32)
    int4 = build_fused_decoder(spec, w, tmp_path / "q.onnx", quant="int4", accuracy_level=1)
    assert int4["float_matmul_weights"] == ["cara.1.router.weight"]  # everything else, lm_head included, is INT4
    assert int4["ops"]["GatherBlockQuantized"] == 1 and int4["ops"]["Gather"] == 1  # the other reads the mask's shape
    assert int4["embedding"] == ("GatherBlockQuantized (shared with lm_head)" if tied else "GatherBlockQuantized")
    deq = dict(w)
    for name, arr in w.items():
        if name in ("embed", "lm_head") or (name.endswith(".weight") and arr.ndim == 2 and arr.shape[1] > 1):
            rows = arr if name in ("embed", "lm_head") else arr.T
            back = dequantize_int4_rows(*quantize_int4_rows(rows, 32))
            deq[name] = back if name in ("embed", "lm_head") else np.ascontiguousarray(back.T)
    build_fused_decoder(spec, deq, tmp_path / "deq.onnx")

    def run(path):
        st = FusedDecoderState(OrtRunner(path, "d"), spec.contract())
        cache = st.new_cache(1, 12)
        cross = {k: np.random.default_rng(1).normal(size=(1, 4, 16, 32)).astype(np.float32)
                 for k in ("cross_key.1", "cross_value.1")}
        ids = np.random.default_rng(2).integers(0, spec.vocab, (1, 8))
        out = [st.step(ids[:, :6], cache, np.ones((1, 6), np.int64), cross)[0, -1].copy()]
        out.append(st.step(ids[:, 6:7], cache, np.ones((1, 7), np.int64), cross)[0, -1].copy())
        return np.stack(out)

    np.testing.assert_allclose(run(tmp_path / "q.onnx"), run(tmp_path / "deq.onnx"), atol=2e-4)


def test_shared_buffers_are_written_in_place_and_capped(ref_bundle):
    from locpath.runtime.decoder_state import FusedDecoderState
    from locpath.runtime.ort_runner import OrtRunner

    m = load_manifest(ref_bundle)
    e = m.components["decoder_fused"]
    st = FusedDecoderState(OrtRunner(ref_bundle / e.file, "decoder_fused"), m.decoder_contract("decoder_fused"))
    cache = st.new_cache(1, 6)
    cross = {n: np.zeros((1, 4, 16, 32), np.float32) for i in st.contract.cara_layers for n in st.contract.cross(i)}
    st.step(np.asarray([[5, 6, 7, 8]]), cache, np.ones((1, 4), np.int64), cross)
    keys = cache.keys[0].numpy()  # the host buffer itself
    assert np.abs(keys[:, :, :4]).sum() > 0 and np.abs(keys[:, :, 4:]).sum() == 0
    st.step(np.asarray([[9]]), cache, np.ones((1, 5), np.int64), cross)
    assert np.abs(cache.keys[0].numpy()[:, :, 4]).sum() > 0 and cache.length == 5
    st.step(np.asarray([[9]]), cache, np.ones((1, 6), np.int64), cross)
    with pytest.raises(LocpathError, match="KV cache full: 7 positions exceed the cap of 6"):
        st.step(np.asarray([[9]]), cache, np.ones((1, 7), np.int64), cross)


def test_fused_and_plain_decoders_answer_alike(ref_bundle, real_svs):
    plain = Pipeline.from_bundle(ref_bundle, decoder="plain", use_cache=False)
    fused = Pipeline.from_bundle(ref_bundle, use_cache=False)  # auto: the fused graph when the bundle has it
    assert fused.decoder_component == "decoder_fused" and "decoder" not in fused.runners
    for q in ("What is the diagnosis?", "Which organ is this?", "Describe the slide."):
        a, b = plain.ask(real_svs, q, max_new_tokens=12), fused.ask(real_svs, q, max_new_tokens=12)
        assert a.token_ids == b.token_ids
        assert b.generation["decoder"] == "decoder_fused"


def test_decoder_choice_errors(ref_bundle, tmp_path):
    with pytest.raises(LocpathError, match="unknown decoder 'gqa'"):
        Pipeline.from_bundle(ref_bundle, decoder="gqa")
    m = load_manifest(ref_bundle)
    m.components.pop("decoder_fused")
    from locpath.runtime.pipeline import choose_decoder

    assert choose_decoder(m, "auto", tmp_path) == "decoder"
    with pytest.raises(LocpathError, match="this bundle has no fused decoder"):
        choose_decoder(m, "fused", tmp_path)
    full = load_manifest(ref_bundle)
    assert choose_decoder(full, "auto", tmp_path, "cuda") == "decoder"  # CUDA GQA takes fp16/bf16 only
    with pytest.raises(LocpathError, match="fused decoder does not run on --device cuda"):
        choose_decoder(full, "fused", tmp_path, "cuda")


@pytest.mark.torch
def test_weights_are_checked_by_name_and_shape(ref_bundle, tmp_path):
    e = load_manifest(ref_bundle).components["decoder_fused"]
    spec = FusedDecoderSpec.from_templates(e.templates)
    w = weights_from_fused_onnx(ref_bundle / e.file, spec)
    bad = dict(w)
    bad.pop("layers.2.down.weight")
    with pytest.raises(LocpathError, match="fused decoder weights missing: layers.2.down.weight"):
        build_fused_decoder(spec, bad, tmp_path / "x.onnx")
    bad = dict(w, **{"norm": np.ones(7, np.float32)})
    with pytest.raises(LocpathError, match=r"wrong shape: norm \(7,\) \(want \(128,\)\)"):
        build_fused_decoder(spec, bad, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.torch
def test_int4_build_quantizes_the_fused_decoder_and_keeps_answers(ref_bundle, real_svs, tmp_path):
    from locpath.engines.build import build_bundle

    out = build_bundle(ref_bundle, tmp_path / "int4", "int4", log=lambda m: None)
    m = load_manifest(out)
    f = m.components["decoder_fused"]
    assert f.precision == "int4-fused" and f.parent_sha256 == load_manifest(ref_bundle).components["decoder_fused"].sha256
    assert f.quantization["embedding"].startswith("GatherBlockQuantized")
    assert f.quantization["float_matmul_weights"] == ["cara.1.router.weight", "cara.3.router.weight"]
    assert (out / f.file).stat().st_size < 0.3 * (ref_bundle / "decoder_fused.onnx").stat().st_size
    fp32, q = Pipeline.from_bundle(ref_bundle, use_cache=False), Pipeline.from_bundle(out, use_cache=False)
    for question in ("What is the diagnosis?", "Is necrosis present?", "Which organ is this?"):
        assert q.ask(real_svs, question).answer == fp32.ask(real_svs, question).answer


@pytest.mark.torch
def test_fp16_build_rebuilds_the_fused_decoder_in_fp16(ref_bundle, tmp_path):
    from locpath.engines.build import build_bundle

    out = build_bundle(ref_bundle, tmp_path / "fp16", "fp16", log=lambda m: None)
    m = load_manifest(out)
    assert m.components["decoder_fused"].file == "decoder_fused.fp16-fused.onnx"
    assert not (out / "decoder_fused.onnx").exists() and "decoder_fused.onnx" not in m.files
