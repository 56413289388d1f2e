import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from locpath.cli import main
from locpath.bundle import names
from locpath.bundle.engine_config import EngineConfig, EngineMismatchError, check_engine_config
from locpath.bundle.integrity import verify_bundle as load_manifest
from locpath.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def calibration(ref_bundle, eval_slide, tmp_path_factory):
    from locpath.calibration.sets import build_calibration

    out = tmp_path_factory.mktemp("cal") / "cal.npz"
    return build_calibration(ref_bundle, [eval_slide], tiles_per_slide=24, out=out, log=lambda m: None)


@pytest.fixture(scope="module")
def int8_bundle(ref_bundle, tmp_path_factory):
    from locpath.engines.build import build_bundle

    return build_bundle(ref_bundle, tmp_path_factory.mktemp("built") / "int8", "int8", log=lambda m: None)


def test_calibration_set_is_keyed_and_cached(ref_bundle, eval_slide, calibration, tmp_path):
    from locpath.calibration.sets import build_calibration

    assert calibration.tiles().shape == (24, 224, 224, 3) and calibration.tiles().dtype == np.uint8
    assert calibration.samples("resampler", "tokens")[0].ndim == 3
    assert len(calibration.samples("tis", "question_ids")) == 4  # one per question type
    again = build_calibration(ref_bundle, [eval_slide], tiles_per_slide=24, out=calibration.path, log=lambda m: None)
    assert again.cached
    np.testing.assert_array_equal(again.tiles(), calibration.tiles())


@pytest.mark.torch
def test_int8_bundle_records_what_was_done_and_keeps_answers(ref_bundle, int8_bundle, eval_slide, calibration):
    m = load_manifest(int8_bundle)
    assert set(names.RESAMPLER_CHUNKS) <= set(m.components)  # the resampler stays fp32 ORT: so do its chunk graphs
    enc, dec = m.components["tile_encoder"], m.components["decoder"]
    assert (enc.precision, dec.precision) == ("int8-dynamic", "int4")
    assert enc.parent_sha256 == load_manifest(ref_bundle).components["tile_encoder"].sha256
    assert dec.quantization["folded_transposes"] == 1  # the tied lm_head is quantized too
    assert dec.quantization["float_matmuls_with_weights"] == 0
    assert m.components["resampler"].precision == "fp32"
    fp32 = Pipeline.from_bundle(ref_bundle, use_cache=False)
    q = Pipeline.from_bundle(int8_bundle, use_cache=False)
    tiles = calibration.tiles()
    a, b = fp32.encode_tiles(tiles), q.encode_tiles(tiles)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.mean() >= 0.995
    for question in ("What is the diagnosis?", "Is necrosis present?"):
        assert q.ask(eval_slide, question).answer == fp32.ask(eval_slide, question).answer


def test_int4_block_size_is_checked(ref_bundle, tmp_path, capsys):
    code = main(["build", str(ref_bundle), str(tmp_path / "x"), "--precision", "int4", "--int4-block-size", "48"])
    assert code == 2 and "INT4 block size must be one of 16, 32, 64, 128, 256, not 48" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_static_int8_needs_calibration(ref_bundle, tmp_path, capsys):
    code = main(["build", str(ref_bundle), str(tmp_path / "x"), "--precision", "int8-static"])
    assert code == 2 and "calibration" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.torch
def test_engine_config_mismatch_is_refused(int8_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(int8_bundle, b)
    m = load_manifest(b)
    ec_name = m.components["decoder"].engine_config
    cfg = json.loads((b / ec_name).read_text())
    cfg["device"]["kind"] = "cuda"  # as if built for a GPU
    (b / ec_name).write_text(json.dumps(cfg))
    # the manifest's checksum over the engine config catches the edit first ...
    with pytest.raises(Exception, match="the file was modified or truncated|checksum mismatch"):
        Pipeline.from_bundle(b)
    # ... and the machine check refuses a consistent config built for another device
    from locpath.bundle.integrity import verify_bundle, write_manifest

    m = verify_bundle(b, check_files=False)
    m.record_file(b, ec_name)
    write_manifest(b, m)
    with pytest.raises(EngineMismatchError, match="built for device 'cuda', running on 'cpu'; rebuild"):
        Pipeline.from_bundle(b)


def _cfg(**kw):
    base = dict(component="decoder", backend="tensorrt", precision="fp16", artifact="decoder.plan", artifact_sha256="a" * 64,
                onnx_sha256="b" * 64, device={"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
                libraries={"tensorrt": "10.13.0", "cuda": "12.8"})
    base.update(kw)
    return EngineConfig(**base)


MACHINE = {"device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
           "libraries": {"tensorrt": "10.13.0", "cuda": "12.9"}}


def test_tensorrt_engine_config_rules():
    check_engine_config(_cfg(), MACHINE, "b" * 64, "a" * 64, "decoder.plan")  # same GPU, same TRT, CUDA 12.x
    bad = [
        ({"device": {**MACHINE["device"], "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}}, "GPU name"),
        ({"device": {**MACHINE["device"], "compute_capability": "8.9"}}, "compute_capability"),
        ({"libraries": {"tensorrt": "10.9.0", "cuda": "12.9"}}, "TensorRT 10.13.0"),
        ({"libraries": {"tensorrt": "10.13.0", "cuda": "13.0"}}, "CUDA 12.8"),
    ]
    for change, words in bad:
        with pytest.raises(EngineMismatchError, match=f"decoder.plan: .*{words}.*rebuild"):
            check_engine_config(_cfg(), {**MACHINE, **change}, "b" * 64, "a" * 64, "decoder.plan")
    with pytest.raises(EngineMismatchError, match="built from ONNX bbbbbbbbbbbb"):
        check_engine_config(_cfg(), MACHINE, "c" * 64, "a" * 64, "decoder.plan")
    with pytest.raises(EngineMismatchError, match="does not match its engine config"):
        check_engine_config(_cfg(), MACHINE, "b" * 64, "d" * 64, "decoder.plan")


def test_onnxruntime_engine_config_rules():
    cfg = _cfg(backend="onnxruntime", device={"kind": "cpu"}, libraries={"onnxruntime": "1.20.1"})
    check_engine_config(cfg, {"device": {"kind": "cpu"}, "libraries": {"onnxruntime": "1.32.0"}}, None, None, "x")
    with pytest.raises(EngineMismatchError, match="older 1.17.0"):
        check_engine_config(cfg, {"device": {"kind": "cpu"}, "libraries": {"onnxruntime": "1.17.0"}}, None, None, "x")


def test_tensorrt_profiles_come_from_the_manifest(ref_bundle):
    from locpath.bundle.profiles import optimization_profiles

    m = load_manifest(ref_bundle)
    enc = optimization_profiles("tile_encoder", m.components["tile_encoder"])
    assert enc == [{"tiles": ((1, 224, 224, 3), (32, 224, 224, 3), (64, 224, 224, 3))}]
    prefill, decode = optimization_profiles("decoder", m.components["decoder"])
    assert prefill["past_key.0"][2][2] == 0 and prefill["input_ids"][2][1] == prefill["attention_mask"][2][1]
    assert decode["input_ids"] == ((1, 1), (1, 1), (16, 1))
    lo, opt, hi = decode["attention_mask"]
    assert (lo[1], hi[1]) == (decode["past_key.0"][0][2] + 1, decode["past_key.0"][2][2] + 1)
    assert decode["cross_key.1"][0][2] == m.model_config.tis.top_m


def test_tensorrt_build_is_a_clear_error_without_tensorrt(ref_bundle, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed: the GPU test covers it")
    except ImportError:
        pass
    code = main(["build", str(ref_bundle), str(tmp_path / "trt"), "--backend", "tensorrt", "--precision", "fp16"])
    assert code == 2 and "TensorRT is not installed" in capsys.readouterr().err
    assert not (tmp_path / "trt").exists()


@pytest.mark.gpu
def test_tensorrt_plans_match_onnxruntime(ref_bundle, eval_slide, tmp_path):
    pytest.importorskip("tensorrt")
    from locpath.engines.build import build_bundle

    trt_bundle = build_bundle(ref_bundle, tmp_path / "trt", "fp32", backend="tensorrt", log=lambda m: None)
    cpu = Pipeline.from_bundle(ref_bundle, use_cache=False).ask(eval_slide, "What is the diagnosis?")
    gpu = Pipeline.from_bundle(trt_bundle, device="cuda", use_cache=False).ask(eval_slide, "What is the diagnosis?")
    assert cpu.answer == gpu.answer


def test_openvino_bf16_bundle(ref_bundle, eval_slide, tmp_path, calibration):
    pytest.importorskip("openvino")
    from locpath.engines.build import build_bundle

    ov = build_bundle(ref_bundle, tmp_path / "ov", "bf16+int4", backend="openvino", log=lambda m: None)
    m = load_manifest(ov)
    assert m.components["tile_encoder"].backend == "openvino" and m.components["tile_encoder"].precision == "bf16"
    assert m.components["decoder"].precision == "int4" and m.components["decoder"].backend == "onnxruntime"
    # the fp32 ORT twin of the resampler is kept for large slides only where it measured faster here
    route = EngineConfig.load(ov / m.components["resampler"].engine_config).build["large_slides"]
    times = [route[f"{p}_{w}_ms"] for p in ("whole_graph", "chunks") for w in ("first", "again")]
    assert min(times) > 0 and (route["tokens"], route["warm_up_tokens"]) == (8192, 1024)
    assert route["keep_chunks"] == (route["chunks_first_ms"] < 1.5 * route["whole_graph_first_ms"])
    assert (set(names.RESAMPLER_CHUNKS) <= set(m.components)) == route["keep_chunks"]
    for c in set(names.RESAMPLER_CHUNKS) & set(m.components):  # on OpenVINO at the resampler's precision
        assert (m.components[c].backend, m.components[c].precision) == ("openvino", "bf16")
    assert route["keep_chunks"] or not set(names.RESAMPLER_CHUNKS) & set(m.components)
    fp32 = Pipeline.from_bundle(ref_bundle, use_cache=False)
    pipe = Pipeline.from_bundle(ov, use_cache=False)
    a, b = fp32.encode_tiles(calibration.tiles()), pipe.encode_tiles(calibration.tiles())
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.995
    assert pipe.ask(eval_slide, "What is the diagnosis?").answer == fp32.ask(eval_slide, "What is the diagnosis?").answer


@pytest.mark.parametrize("chunks_faster", [True, False, None])
def test_openvino_build_routes_large_slides_by_what_it_measured(ref_bundle, tmp_path, monkeypatch, chunks_faster):
    """Kept, the chunks run slides above the chunk on OpenVINO (the fp32 bundle's latents and evidence within bf16
    rounding) and smaller ones OpenVINO's one graph; dropped, every slide runs the one graph; chunks that OpenVINO
    cannot run (None) are dropped with the reason, and the build goes on."""
    pytest.importorskip("openvino")
    from locpath.engines import resampler_route
    from locpath.engines.build import build_bundle
    from locpath.runtime.runner import RunnerError

    real = resampler_route.large_slide_route

    def route(*a, **k):
        if chunks_faster is None:
            raise RunnerError("resampler_partial: inference failed (a forged failure)")
        return dict(real(*a, **k, tokens=2048), keep_chunks=chunks_faster)

    monkeypatch.setattr(resampler_route, "large_slide_route", route)
    ov = build_bundle(ref_bundle, tmp_path / "ov", "bf16", backend="openvino", log=lambda m: None)
    m = load_manifest(ov)
    if chunks_faster is None:
        ec = EngineConfig.load(ov / m.components["resampler"].engine_config)
        assert ec.build["large_slides"] == {"keep_chunks": False, "failed": "resampler_partial: inference failed "
                                                                            "(a forged failure)"}
        chunks_faster = False
    assert (set(names.RESAMPLER_CHUNKS) <= set(m.components)) == chunks_faster
    assert chunks_faster or not set(names.RESAMPLER_CHUNKS) & set(m.components)
    rng = np.random.default_rng(0)
    pipe, fp32 = (Pipeline.from_bundle(b, use_cache=False, resampler_chunk=256) for b in (ov, ref_bundle))
    feats = rng.normal(size=(1500, pipe.cfg.feature_dim)).astype(np.float32)
    pos = np.stack([np.arange(1500) % 40, np.arange(1500) // 40], 1).astype(np.float32)
    counts = np.ones(1500, np.float32)
    assert (pipe.chunked_resampler is not None) == chunks_faster
    if chunks_faster:  # the fp32 bundle's chunk graphs, on OpenVINO bf16
        assert {pipe.runners[c].__class__.__name__ for c in names.RESAMPLER_CHUNKS} == {"OpenVinoRunner"}
        (la, aa), (lb, ab) = (p.chunked_resampler.run(feats, pos, counts) for p in (pipe, fp32))
        cos = np.sum(la * lb, -1) / (np.linalg.norm(la, axis=-1) * np.linalg.norm(lb, axis=-1))
        assert cos.min() > 0.999 and not np.array_equal(la, lb)
        assert np.abs(aa - ab).max() < 0.01 and np.corrcoef(aa.ravel(), ab.ravel())[0, 1] > 0.99  # bf16 logits
        np.testing.assert_allclose(aa.sum(-1), 1.0, atol=1e-3)
    assert pipe.runners[names.RESAMPLER].__class__.__name__ == "OpenVinoRunner"


def test_int4_fused_decoder_on_openvino_answers_as_onnx_runtime_does(ref_bundle, eval_slide, tmp_path):
    """`+int4-ov`: the INT4 fused decoder moved to OpenVINO (its INT4 embedding gather as plain ops, the shared
    K/V cache copied back each step) gives ONNX Runtime's INT4 tokens, one answer and a batch of four; built from
    the fp32 bundle or from a bundle whose decoder is already INT4 (the streamed published-scale path)."""
    pytest.importorskip("openvino")
    import onnx

    from locpath.engines.build import build_bundle
    from locpath.engines.openvino_fused import openvino_fused_variant
    from locpath.errors import LocpathError

    ort4 = build_bundle(ref_bundle, tmp_path / "ort4", "int4", log=lambda m: None)
    ov = build_bundle(ref_bundle, tmp_path / "ov", "fp32+int4-ov", backend="openvino", log=lambda m: None)
    again = build_bundle(ort4, tmp_path / "again", "fp32+int4-ov", backend="openvino", log=lambda m: None)
    questions = ["What is the diagnosis?", "Is there necrosis?", "What is the tumor grade?", "Which organ is this?"]
    want_pipe = Pipeline.from_bundle(ort4, use_cache=False)
    ctx = want_pipe.prepare(eval_slide)
    want = [a.token_ids for a in want_pipe.answer(ctx, questions)]
    for b in (ov, again):
        m = load_manifest(b)
        e = m.components[names.DECODER_FUSED]
        assert (e.backend, e.precision) == ("openvino", "int4-fused") and e.file.endswith(".openvino.onnx")
        assert names.DECODER_FUSED_PREFILL not in m.components
        assert not (b / "decoder_fused.int4-fused.onnx").exists()  # the ORT graph is not left behind
        ops = {n.op_type for n in onnx.load(str(b / e.file), load_external_data=False).graph.node}
        assert "MatMulNBits" in ops and "GatherBlockQuantized" not in ops
        pipe = Pipeline.from_bundle(b, use_cache=False)
        assert type(pipe.decoder_state.runner).__name__ == "OpenVinoRunner"
        assert [pipe.answer(ctx, [q])[0].token_ids for q in questions] == want
        assert [a.token_ids for a in pipe.answer(ctx, questions)] == want  # each answer in a cache of its own
    with pytest.raises(LocpathError, match="must sit beside"):
        openvino_fused_variant(ref_bundle / "decoder_fused.onnx", tmp_path / "x.onnx", 128)
    with pytest.raises(LocpathError, match="no INT4 embedding gather"):  # the fp32 graph: nothing to rewrite
        openvino_fused_variant(ref_bundle / "decoder_fused.onnx", ref_bundle / "x.onnx", 128)
    assert not (ref_bundle / "x.onnx").exists()


def test_openvino_refuses_weights_outside_the_bundle_in_one_line(tmp_path):
    """A graph whose external data points out of its folder (a hostile bundle's decoder) is refused by OpenVINO's
    reader; the runner's one line says why, not OpenVINO's source locations."""
    pytest.importorskip("openvino")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from locpath.runtime.openvino_runner import OpenVinoRunner
    from locpath.runtime.runner import RunnerError

    np.arange(16, dtype=np.float32).tofile(tmp_path / "secret.bin")
    w = numpy_helper.from_array(np.zeros(16, np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "64")):
        e = w.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["X", "W"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [16])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [16])], [w])
    (tmp_path / "b").mkdir()
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "b" / "m.onnx"))
    with pytest.raises(RunnerError) as err:
        OpenVinoRunner(tmp_path / "b" / "m.onnx", "decoder_fused", precision="int4-fused").load()
    msg = str(err.value)
    assert "outside the base directory" in msg and "\n" not in msg and "Exception from" not in msg, msg


def test_openvino_nncf_int8_encoder(ref_bundle, eval_slide, tmp_path, calibration, capsys):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from locpath.engines.build import build_bundle
    from locpath.bundle.manifest import BundleError

    assert main(["build", str(ref_bundle), str(tmp_path / "nocal"), "--backend", "openvino", "--precision", "int8"]) == 2
    assert "needs a calibration set" in capsys.readouterr().err and not (tmp_path / "nocal").exists()
    out = build_bundle(ref_bundle, tmp_path / "ov8", "int8+int4", backend="openvino", calibration=calibration,
                       log=lambda m: None)
    m = load_manifest(out)
    enc = m.components["tile_encoder"]
    assert (enc.backend, enc.precision, enc.file) == ("openvino", "int8", "tile_encoder.openvino-int8.xml")
    assert set(enc.data_files) == {"tile_encoder.openvino-int8.bin"} and enc.quantization["calibration_tiles"] == 24
    hint = enc.quantization["ov_hint"]  # measured at build time, used at run time
    assert hint == max(enc.quantization["ov_hint_tiles_per_s"], key=enc.quantization["ov_hint_tiles_per_s"].get)
    assert m.components["resampler"].precision == "bf16"
    fp32 = Pipeline.from_bundle(ref_bundle, use_cache=False)
    pipe = Pipeline.from_bundle(out, use_cache=False)
    assert pipe.runners["tile_encoder"].hint == hint
    a, b = fp32.encode_tiles(calibration.tiles()), pipe.encode_tiles(calibration.tiles())
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.mean() >= 0.995
    assert pipe.ask(eval_slide, "Which organ is this?").answer == fp32.ask(eval_slide, "Which organ is this?").answer
    # the weights file is covered by the manifest's checksums
    with open(out / "tile_encoder.openvino-int8.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match=r"tile_encoder.openvino-int8.bin: checksum mismatch"):
        load_manifest(out)


def test_auto_decision_takes_the_fastest_accurate_candidate_per_stage():
    from locpath.bench.auto import decide

    enc = {"ort-fp32": {"tiles_per_s": 100, "cosine_min": 1.0}, "ort-int8": {"tiles_per_s": 150, "cosine_min": 0.999},
           "openvino-bf16": {"tiles_per_s": 300, "cosine_min": 0.99999}, "openvino-int8": {"tiles_per_s": 400, "cosine_min": 0.99}}
    dec = {"ort-fp32": {"tokens_per_s": 50, "agreement": 1.0}, "ort-int4": {"tokens_per_s": 90, "agreement": 0.9}}
    # INT8 is fastest but below the cosine bound; INT4 is fastest but changes an answer
    assert decide(enc, dec) == ("openvino-bf16", "ort-fp32", ("openvino", "bf16"))
    dec["ort-int4"]["agreement"] = 1.0
    enc["openvino-int8"]["cosine_min"] = 0.996
    assert decide(enc, dec) == ("openvino-int8", "ort-int4", ("openvino", "int8-safe+int4"))
    slow = {"ort-fp32": {"tiles_per_s": 100, "cosine_min": 1.0}, "ort-int8": {"tiles_per_s": 90, "cosine_min": 1.0}}
    assert decide(slow, {"ort-fp32": {"tokens_per_s": 1, "agreement": 1.0}})[2] == ("ort", "fp32")


@pytest.mark.torch
def test_auto_build_records_its_measurements_and_answers_like_fp32(ref_bundle, calibration, eval_slide, tmp_path):
    from locpath.bench.auto import RECIPES, build_auto

    out = build_auto(ref_bundle, tmp_path / "auto", calibration, log=lambda m: None)
    m = load_manifest(out)
    auto = m.export["build"]["auto"]
    backend, precision = RECIPES[(auto["encoder"], auto["decoder"])]
    assert auto["recipe"] == [backend, precision] and m.export["build"]["precision"] == precision
    assert set(auto["encoder_candidates"]) >= {"ort-fp32", "ort-int8"} and auto["decoder_candidates"]
    want = {"ort-fp32": ("onnxruntime", "fp32"), "ort-int8": ("onnxruntime", "int8-dynamic"),
            "openvino-bf16": ("openvino", "bf16"), "openvino-int8": ("openvino", "int8")}[auto["encoder"]]
    assert (m.components["tile_encoder"].backend, m.components["tile_encoder"].precision) == want
    assert m.components["decoder"].precision == ("int4" if auto["decoder"] == "ort-int4" else "fp32")
    fp32 = Pipeline.from_bundle(ref_bundle, use_cache=False)
    built = Pipeline.from_bundle(out, use_cache=False)  # loads: engine configs agree with this machine
    for q in ("What is the diagnosis?", "Which organ is this?"):
        assert built.ask(eval_slide, q).token_ids == fp32.ask(eval_slide, q).token_ids


def test_a_built_decoder_is_kept_when_a_recipe_rebuilds_only_the_vision_graphs(tmp_path, capsys):
    """The published-scale bundle is streamed with its INT4 decoder already built: its fp32 vision graphs can still
    move to OpenVINO (the decoder kept byte for byte, the earlier build recorded), while a recipe that would rebuild
    the INT4 decoder again is refused naming it."""
    pytest.importorskip("openvino")
    from locpath.engines.build import build_bundle
    from tests.servers import shipped

    int4 = build_bundle(shipped(), tmp_path / "int4", "int4", log=lambda m: None)
    m4 = load_manifest(int4)
    ov = build_bundle(int4, tmp_path / "ov", "bf16", backend="openvino", log=lambda m: None)
    m = load_manifest(ov)
    assert (m.components["resampler"].backend, m.components["resampler"].precision) == ("openvino", "bf16")
    for comp in (names.DECODER, names.DECODER_FUSED):
        assert m.components[comp].sha256 == m4.components[comp].sha256
        assert m.components[comp].precision == m4.components[comp].precision != "fp32"
    assert m.export["build"]["earlier"]["precision"] == "int4"
    assert main(["build", str(int4), str(tmp_path / "again"), "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "decoder is already built (onnxruntime int4)" in err and not (tmp_path / "again").exists()
    slide = Path(__file__).parent / "data" / "cmu_small_region.svs"
    q = "What is the diagnosis?"
    a4 = Pipeline.from_bundle(int4, use_cache=False).ask(slide, q, max_new_tokens=8)
    assert Pipeline.from_bundle(ov, use_cache=False).ask(slide, q, max_new_tokens=8).answer == a4.answer
