"""The ONNX Runtime GPU paths, checked on the CPU: the fp16 bundle (fp16 fused decoder with float16 K/V, RMSNorm
statistics in fp32) answers like fp32; the device-resident plain decoder state gives the plain state's logits;
the TensorRT provider's options come from the manifest; a silent provider fallback is refused."""

import numpy as np
import pytest

import locpath.runtime.pipeline as pipeline_mod
from locpath.bundle.integrity import verify_bundle
from locpath.runtime.pipeline import Pipeline, choose_decoder
from locpath.runtime.runner import RunnerError

QUESTIONS = ("What is the diagnosis?", "Is necrosis present?", "Which organ is this?", "What is the tumor grade?")


@pytest.fixture(scope="module")
def fp16_bundle(ref_bundle, tmp_path_factory):
    from locpath.engines.build import build_bundle

    return build_bundle(ref_bundle, tmp_path_factory.mktemp("b16") / "fp16", "fp16", log=lambda m: None)


def _on_cpu(bundle, **kw) -> Pipeline:
    """A GPU build run on ONNX Runtime's CPU provider: its engine configs say CUDA, so the device check is
    bypassed here (and only here) to compare numbers."""
    real = pipeline_mod.check_engines
    pipeline_mod.check_engines = lambda *a, **k: None
    try:
        return Pipeline(bundle, verify_bundle(bundle), use_cache=False, **kw)
    finally:
        pipeline_mod.check_engines = real


@pytest.mark.torch
def test_fp16_bundle_keeps_a_float16_fused_decoder_and_fp32_norm_statistics(fp16_bundle):
    import onnx

    m = verify_bundle(fp16_bundle)
    assert not {"resampler_partial", "resampler_weights", "resampler_finish"} & set(m.components)  # fp16 resampler
    fused = m.components["decoder_fused"]
    assert fused.precision == "fp16-fused" and m.decoder_contract("decoder_fused").kv_dtype == "float16"
    assert [s.dtype for s in fused.inputs if s.name.startswith("past_")] == ["float16"] * 8
    assert {s.dtype for s in fused.outputs if s.name == "logits"} == {"float32"}
    dec = m.components["decoder"]
    assert dec.quantization["float32_nodes"] == 13 * 6  # every RMSNorm's statistics chain
    g = onnx.load(fp16_bundle / dec.file).graph
    onnx.checker.check_model(onnx.load(fp16_bundle / dec.file))  # topologically sorted again
    pows = [n for n in g.node if n.op_type == "Pow"]
    assert pows and all(n.name in {x.name for x in g.node} for n in pows)
    assert choose_decoder(m, "auto", fp16_bundle, "cuda") == "decoder_fused"
    assert choose_decoder(m, "auto", fp16_bundle, "tensorrt") == "decoder"


@pytest.mark.torch
def test_fp16_bundle_answers_like_fp32(fp16_bundle, ref_bundle, eval_slide, real_svs):
    fp32 = Pipeline.from_bundle(ref_bundle, use_cache=False)
    for decoder in ("fused", "plain"):
        fp16 = _on_cpu(fp16_bundle, decoder=decoder)
        for slide in (eval_slide, real_svs):
            for q in QUESTIONS:
                assert fp16.ask(slide, q).token_ids == fp32.ask(slide, q).token_ids, (decoder, slide, q)


def test_bound_plain_state_keeps_kv_on_the_device_and_matches(ref_bundle):
    from locpath.runtime.decoder_state import BoundDecoderState, DecoderState
    from locpath.runtime.ort_runner import OrtRunner

    m = verify_bundle(ref_bundle)
    contract = m.decoder_contract("decoder")
    runner = OrtRunner(ref_bundle / "decoder.onnx", "decoder")
    plain, bound = DecoderState(runner, contract), BoundDecoderState(runner, contract)
    rng = np.random.default_rng(0)
    cross = {n: rng.normal(size=(1, contract.cara_heads, 16, contract.cara_head_dim)).astype(np.float32)
             for i in contract.cara_layers for n in contract.cross(i)}
    dev_cross = bound.prepare_cross(cross)
    assert all(not isinstance(v, np.ndarray) for v in dev_cross.values())  # OrtValues, placed once
    ids = rng.integers(0, contract.vocab, 20)
    c1, c2 = plain.new_cache(1, 32), bound.new_cache(1, 32)
    a = plain.step(ids[None, :12], c1, np.ones((1, 12), np.int64), plain.prepare_cross(cross))
    b = bound.step(ids[None, :12], c2, np.ones((1, 12), np.int64), dev_cross)
    for t in range(12, 20):
        a = plain.step(ids[None, t:t + 1], c1, np.ones((1, t + 1), np.int64), cross)
        b = bound.step(ids[None, t:t + 1], c2, np.ones((1, t + 1), np.int64), dev_cross)
    assert not isinstance(c2.past["past_key.0"], np.ndarray) and c2.nbytes == c1.nbytes
    np.testing.assert_allclose(b, a, atol=1e-6)


@pytest.mark.torch
def test_tensorrt_provider_options_come_from_the_manifest(ref_bundle, fp16_bundle, tmp_path):
    from locpath.runtime.ort_runner import tensorrt_provider_options

    m = verify_bundle(ref_bundle)
    opts = tensorrt_provider_options(m.components["decoder"], tmp_path, fp16=False)
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_timing_cache_path"] == str(tmp_path) and opts["trt_fp16_enable"] == "False"
    max_len = m.generation.max_length
    lo = dict(x.split(":") for x in opts["trt_profile_min_shapes"].split(","))
    hi = dict(x.split(":") for x in opts["trt_profile_max_shapes"].split(","))
    assert lo["past_key.0"] == "1x2x0x32" and hi["past_key.0"] == f"16x2x{max_len - 1}x32"  # prefill to the cap
    assert lo["input_ids"] == "1x1" and hi["attention_mask"] == f"16x{max_len}"
    enc = tensorrt_provider_options(m.components["tile_encoder"], tmp_path, fp16=True)
    assert enc["trt_profile_max_shapes"] == "tiles:64x224x224x3" and enc["trt_fp16_enable"] == "True"


def test_a_silent_provider_fallback_is_refused():
    from locpath.runtime.ort_runner import check_providers

    check_providers("x.onnx", "CUDAExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RunnerError, match="did not start TensorrtExecutionProvider .*runs CUDAExecutionProvider"):
        check_providers("x.onnx", "TensorrtExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RunnerError, match="did not start CUDAExecutionProvider"):
        check_providers("x.onnx", "CUDAExecutionProvider", ["CPUExecutionProvider"])
