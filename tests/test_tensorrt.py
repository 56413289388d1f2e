"""The TensorRT plan builder and runner, driven through stand-in `tensorrt` and cuda-python modules (tests/standins)
that give those libraries' API shape while running the graphs on ONNX Runtime's CPU provider."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from locpath.bundle.integrity import verify_bundle
from locpath.errors import LocpathError
from locpath.runtime.pipeline import Pipeline
from locpath.runtime.runner import RunnerError

STANDINS = Path(__file__).resolve().parent / "standins"
pytestmark = pytest.mark.torch  # the plans are built from graphs edited with the onnx package ([train])
QUESTIONS = ("What is the diagnosis?", "Is necrosis present?", "Which organ is this?", "What is the tumor grade?")


@pytest.fixture()
def standins(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "tensorrt" or m == "cuda" or m.startswith("cuda.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(STANDINS))
    monkeypatch.setenv("LOCPATH_CACHE", str(tmp_path / "cache"))
    import tensorrt
    from cuda.bindings import runtime as cudart

    cudart.reset_counts()
    yield tensorrt, cudart
    for name in [m for m in sys.modules if m == "tensorrt" or m == "cuda" or m.startswith("cuda.")]:
        sys.modules.pop(name, None)


@pytest.fixture()
def trt_bundle(standins, ref_bundle, tmp_path):
    from locpath.engines.build import build_bundle

    return build_bundle(ref_bundle, tmp_path / "trt", "fp32", backend="tensorrt", log=lambda m: None)


def _runner(bundle: Path, comp: str):
    from locpath.runtime.tensorrt_runner import TrtRunner

    m = verify_bundle(bundle)
    return TrtRunner(bundle / m.components[comp].file, comp).load(), m


def test_plans_answer_token_for_token_like_onnxruntime(standins, trt_bundle, ref_bundle, eval_slide):
    m = verify_bundle(trt_bundle)
    assert {c.backend for c in m.components.values()} == {"tensorrt"} and "decoder_fused" not in m.components
    info = m.components["decoder"].quantization
    assert info["tf32"] is False and Path(info["timing_cache"]).exists()  # fp32 plans: TF32 off; cache persists
    for name in m.components:
        body = json.loads((trt_bundle / m.components[name].file).read_bytes())
        assert body["tf32"] is False and body["strongly_typed"]
    cpu = Pipeline.from_bundle(ref_bundle, use_cache=False)
    gpu = Pipeline.from_bundle(trt_bundle, device="cuda", use_cache=False)
    for q in QUESTIONS:
        assert gpu.ask(eval_slide, q).token_ids == cpu.ask(eval_slide, q).token_ids


def test_prefill_with_an_empty_past_and_buffers_allocated_once(standins, trt_bundle):
    _, cudart = standins
    runner, m = _runner(trt_bundle, "decoder")
    contract = m.decoder_contract("decoder")
    allocated = dict(cudart.COUNTS)
    from locpath.runtime.decoder_state import DecoderState

    st = DecoderState(runner, contract)
    cache = st.new_cache(1, 64)
    cross = {n: np.zeros((1, contract.cara_heads, 16, contract.cara_head_dim), np.float32)
             for i in contract.cara_layers for n in contract.cross(i)}
    logits = st.step(np.arange(5, 14)[None], cache, np.ones((1, 9), np.int64), cross)  # past: 0 positions
    assert logits.shape == (1, 9, contract.vocab) and np.isfinite(logits).all()
    for t in range(20):
        st.step(np.asarray([[7 + t]]), cache, np.ones((1, cache.length + 1), np.int64), cross)
    assert cache.length == 29
    assert cudart.COUNTS == allocated  # no cudaMalloc / cudaMallocHost per step


def test_decoding_past_the_old_profile_limit_matches_onnxruntime(standins, trt_bundle, ref_bundle):
    """Prompt + answer beyond 192 positions (the old profile cap) while generation allows max_length."""
    from locpath.runtime.decoder_state import DecoderState
    from locpath.runtime.ort_runner import OrtRunner

    runner, m = _runner(trt_bundle, "decoder")
    assert m.components["decoder"].profiles["past"][2] == m.generation.max_length
    contract = m.decoder_contract("decoder")
    ref = DecoderState(OrtRunner(ref_bundle / "decoder.onnx", "decoder"), contract)
    ours = DecoderState(runner, contract)
    rng = np.random.default_rng(0)
    cross = {n: rng.normal(size=(1, contract.cara_heads, 16, contract.cara_head_dim)).astype(np.float32)
             for i in contract.cara_layers for n in contract.cross(i)}
    ids = rng.integers(0, contract.vocab, 260)
    caches = [st.new_cache(1, 300) for st in (ref, ours)]
    outs = [st.step(ids[None, :180], c, np.ones((1, 180), np.int64), cross) for st, c in zip((ref, ours), caches)]
    for t in range(180, 260):
        outs = [st.step(ids[None, t:t + 1], c, np.ones((1, t + 1), np.int64), cross) for st, c in zip((ref, ours), caches)]
    assert caches[1].length == 260
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)


def test_a_shape_outside_every_profile_is_one_clear_error(standins, trt_bundle):
    runner, m = _runner(trt_bundle, "decoder")
    contract = m.decoder_contract("decoder")
    too_long = m.generation.max_length + 5
    feeds = {"input_ids": np.zeros((1, 1), np.int64), "attention_mask": np.ones((1, too_long + 1), np.int64),
             "position_ids": np.zeros((1, 1), np.int64)}
    for j in range(contract.num_layers):
        for n in contract.past(j):
            feeds[n] = np.zeros((1, contract.num_kv_heads, too_long, contract.head_dim), np.float32)
    for i in contract.cara_layers:
        for n in contract.cross(i):
            feeds[n] = np.zeros((1, contract.cara_heads, 16, contract.cara_head_dim), np.float32)
    with pytest.raises(RunnerError, match=r"decoder: input shapes .*past_key.0.* fall outside every optimisation "
                                          r"profile of decoder.fp32.plan"):
        runner.run(feeds)
    feeds["input_ids"] = feeds["input_ids"].astype(np.int32)
    with pytest.raises(RunnerError, match="decoder: input input_ids is int32, the engine takes int64"):
        runner.run(feeds)


def test_dtypes_come_from_tensorrt_and_bf16_io_is_refused(standins, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from locpath.engines.tensorrt_build import build_plan
    from locpath.runtime.tensorrt_runner import TrtRunner

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n"])],
                          [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n"])])
    onnx.save(helper.make_model(g), tmp_path / "bf16.onnx")
    plan = tmp_path / "bf16.plan"
    plan.write_bytes(build_plan(tmp_path / "bf16.onnx", [{"x": ((1,), (4,), (8,))}], tmp_path / "t.cache"))
    with pytest.raises(RunnerError, match="tensor x is DataType.BF16, which has no numpy equivalent"):
        TrtRunner(plan, "toy").load()


def test_the_parser_takes_our_tile_encoder_and_refuses_a_uint8_transpose(standins, ref_bundle, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from locpath.engines.tensorrt_build import build_plan

    build_plan(ref_bundle / "tile_encoder.onnx", [{"tiles": ((1, 224, 224, 3),) * 2 + ((4, 224, 224, 3),)}],
               tmp_path / "t.cache")  # the exported encoder casts before it transposes
    g = helper.make_graph([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
                           helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])])
    onnx.save(helper.make_model(g), tmp_path / "u8.onnx")
    with pytest.raises(LocpathError, match="TensorRT cannot parse the graph .*UINT8"):
        build_plan(tmp_path / "u8.onnx", [{}], tmp_path / "t.cache")


def test_fp16_plans_keep_tf32_and_share_the_timing_cache(standins, ref_bundle, tmp_path):
    from locpath.engines.build import build_bundle

    out = build_bundle(ref_bundle, tmp_path / "trt16", "fp16", backend="tensorrt", log=lambda m: None)
    m = verify_bundle(out)
    cache = Path(m.components["tile_encoder"].quantization["timing_cache"])
    assert cache.read_text() == "standin-timing-cache:5"  # one persistent cache, every plan added to it
    assert json.loads((out / m.components["decoder"].file).read_bytes())["tf32"] is True
