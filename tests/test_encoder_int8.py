"""The safe INT8 tile encoder (engines/encoder_int8.py) and `auto`'s per-tile bound: a small timm ViT on real H&E
tiles; auto's decision on a minimum, not a mean; the recipe's float layers really float; its bundle runs."""

import numpy as np
import pytest

from locpath.bench.auto import decide, tile_cosine_summary
from locpath.errors import LocpathError


def _dec():
    return {"ort-fp32": {"tokens_per_s": 50, "agreement": 1.0}}


def test_auto_refuses_an_int8_encoder_whose_worst_tile_is_below_the_bound_though_its_mean_is_above():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 32))
    feats = ref + 0.01 * rng.normal(size=ref.shape)  # every tile ~0.9999
    feats[7] = ref[7] + 0.25 * rng.normal(size=32)  # one tile broken (cosine ~0.97)
    s = tile_cosine_summary(feats, ref)
    assert s["cosine_mean"] >= 0.995 > s["cosine_min"] and s["tiles"] == 40
    assert s["held_out_cosine_min"] < 0.995 <= s["calibration_cosine_min"]  # tile 7 is one the recipe holds out
    enc = {"ort-fp32": {"tiles_per_s": 10, "cosine_min": 1.0, "cosine_mean": 1.0},
           "openvino-bf16": {"tiles_per_s": 30, "cosine_min": 0.9999, "cosine_mean": 0.99999},
           "openvino-int8": dict(s, tiles_per_s=50)}
    assert decide(enc, _dec())[0] == "openvino-bf16"
    enc["openvino-int8"] = dict(tile_cosine_summary(ref + 0.01 * rng.normal(size=ref.shape), ref), tiles_per_s=50)
    assert decide(enc, _dec()) == ("openvino-int8", "ort-fp32", ("openvino", "int8-safe"))


def test_int8_encoder_target_needs_both_the_speed_and_the_worst_tile():
    from locpath.bench.runner import ratios_and_targets

    def v(tps, cmin):
        return {"tiles_per_s": tps, "cosine_mean": 0.9995, "cosine_min": cmin, "vs_ort_fp32": tps / 10,
                "vs_pytorch_bf16": tps / 40}

    vb = {"variants": {"ort_fp32": v(10, 1.0), "pytorch_bf16": v(40, 0.9999), "openvino_bf16": v(41, 0.9999),
                       "openvino_nncf_int8": v(60, 0.991), "openvino_int8_safe": v(55, 0.996),
                       "ort_int8_dynamic": v(30, 0.999)}}
    rep = {"ratios": {}, "targets": {}, "skipped": {}, "baselines": {"encoder_vit_b": vb, "encoder_vit_l": vb}}
    ratios_and_targets(rep)
    t = rep["targets"]["encoder_vit_b_int8_1.3x_pytorch_bf16_at_min_cosine_0.995"]
    assert t["variant"] == "openvino_int8_safe" and t["value"] == pytest.approx(55 / 40) and t["met"] is True
    assert rep["ratios"]["encoder_vit_l_int8_vs_pytorch_bf16"] == pytest.approx(55 / 40)
    vb["variants"]["openvino_int8_safe"]["cosine_min"] = vb["variants"]["ort_int8_dynamic"]["cosine_min"] = 0.99
    ratios_and_targets(rep)  # no INT8 variant holds the bound: the fastest is reported, not met
    t = rep["targets"]["encoder_vit_b_int8_1.3x_pytorch_bf16_at_min_cosine_0.995"]
    assert (t["variant"], t["holds_bound"], t["met"]) == ("openvino_nncf_int8", False, False)


# -- a small ViT on real tiles ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_vit(real_svs, tmp_path_factory):
    """A 2-block, 64-wide timm ViT exported as the bundle's tile encoder, and 24 real tissue tiles."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import torch

    from locpath.config import TileEncoderConfig
    from locpath.export.configs import tile_encoder_config
    from locpath.export.exporter import export_component
    from locpath.models.encoders import build_tile_encoder
    from locpath.wsi import GridConfig, TileReader, open_slide
    from locpath.wsi.extract import plan_tiles

    torch.manual_seed(0)
    enc = build_tile_encoder(TileEncoderConfig(embed_dim=64, depth=2, num_heads=2, out_dim=32, name="tiny")).eval()
    d = tmp_path_factory.mktemp("vit")
    rep = export_component(tile_encoder_config(enc), enc, d)
    with open_slide(real_svs) as s:
        plan = plan_tiles(s, GridConfig(target_mpp=0.5, tile_size=224, min_tissue=0.5))
        reader = TileReader(s, plan.grid)
        tiles = np.stack([reader.read_tile(s, int(x), int(y)) for x, y in plan.grid.coords[:24]])
    return d / rep.file, tiles


def _fq_fed(model) -> set[str]:
    """Names of the ops with a FakeQuantize on an input (what OpenVINO runs in INT8)."""
    return {op.get_friendly_name() for op in model.get_ordered_ops()
            if any(i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in op.inputs())}


def test_layer_roles_are_read_from_the_graph(small_vit):
    from locpath.engines.encoder_int8 import encoder_layers, layer_groups

    layers = encoder_layers(small_vit[0])
    roles = [(x.role, x.block) for x in layers]
    block = ["qkv", "attn_scores", "attn_values", "proj", "fc1", "fc2"]
    assert roles == [("patch_embed", -1)] + [(r, b) for b in (0, 1) for r in block] + [("head", -1)]
    g = layer_groups(layers)
    assert len(g["block1"]) == 6 and len(g["all_fc2"]) == 2 and g["head"] == [layers[-1].name]


def test_recipe_keeps_the_chosen_layers_float_and_records_every_tile(small_vit, tmp_path):
    import openvino as ov

    from locpath.engines.encoder_int8 import (Int8SafeConfig, build_int8_safe, encoder_layers, fp32_features,
                                              openvino_names)

    onnx_path, tiles = small_vit
    info = build_int8_safe(onnx_path, tmp_path, "tile_encoder", tiles,
                           Int8SafeConfig(min_cosine=0.98, float_groups=("block1", "head"), hints=("f32",)),
                           log=lambda m: None)
    model = ov.Core().read_model(str(tmp_path / info["artifact"]))
    fed = _fq_fed(model)
    layers = openvino_names(onnx_path, encoder_layers(onnx_path))
    float_names = {x.name for x in layers if x.block == 1 or x.role == "head"}
    assert float_names == set(info["float_layers"]) and not (fed & float_names)
    assert {x.name for x in layers if x.block == 0 and x.role in ("qkv", "proj", "fc1", "fc2")} <= fed
    assert (info["calibration_tiles"], info["held_out_tiles"]) == (18, 6) and info["ov_hint"] == "f32"
    # the recorded minimum is what the saved model gives on those tiles
    from locpath.engines.encoder_int8 import run_model, tile_cosines

    cos = tile_cosines(run_model(model, tiles, "f32"), fp32_features(onnx_path, tiles))
    assert abs(cos.min() - info["cosine_min"]) < 1e-4 and info["cosine_min"] >= 0.98
    assert info["held_out_min"] >= info["cosine_min"] and info["rounds"][0]["float_groups"] == ["block1", "head"]


def test_recipe_ranks_groups_by_measurement_and_refuses_an_unreachable_bound(small_vit, tmp_path):
    from locpath.engines.encoder_int8 import Int8SafeConfig, build_int8_safe

    onnx_path, tiles = small_vit
    msgs = []
    with pytest.raises(LocpathError, match=r"no tried float set keeps every tile at cosine >= 1.0 \(best 0\.9"):
        build_int8_safe(onnx_path, tmp_path, "tile_encoder", tiles,
                        Int8SafeConfig(min_cosine=1.0, max_rounds=1, groups_per_round=1, hints=("f32",)), log=msgs.append)
    assert len(msgs) == 2 and "round 1: float groups ['" in msgs[1]  # the most sensitive group, measured
    with pytest.raises(LocpathError, match="unknown layer group"):
        build_int8_safe(onnx_path, tmp_path, "tile_encoder", tiles, Int8SafeConfig(float_groups=("block9",)))


# -- the bundle ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibration(ref_bundle, eval_slide, tmp_path_factory):
    from locpath.calibration.sets import build_calibration

    out = tmp_path_factory.mktemp("cal8") / "cal.npz"
    return build_calibration(ref_bundle, [eval_slide], tiles_per_slide=24, out=out, log=lambda m: None)


def test_int8_safe_bundle_runs_and_holds_the_bound_on_every_tile(ref_bundle, calibration, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from locpath.bench.report import row_cosines
    from locpath.bundle.integrity import verify_bundle
    from locpath.engines.build import build_bundle
    from locpath.runtime.pipeline import Pipeline

    out = build_bundle(ref_bundle, tmp_path / "safe", "int8-safe", backend="openvino", calibration=calibration,
                       log=lambda m: None)
    m = verify_bundle(out)
    enc = m.components["tile_encoder"]
    q = enc.quantization
    assert (enc.backend, enc.precision, m.export["build"]["precision"]) == ("openvino", "int8", "int8-safe")
    assert q["recipe"] == "int8-safe" and q["cosine_min"] >= 0.995 and q["held_out_tiles"] == 6
    pipe, fp32 = Pipeline.from_bundle(out, use_cache=False), Pipeline.from_bundle(ref_bundle, use_cache=False)
    assert pipe.runners["tile_encoder"].hint == q["ov_hint"]
    cos = row_cosines(pipe.encode_tiles(calibration.tiles()), fp32.encode_tiles(calibration.tiles()))
    assert cos.min() >= 0.995 and abs(cos.min() - q["cosine_min"]) < 1e-3
