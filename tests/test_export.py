import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")  # the whole file needs torch
from conftest import reseal

from locpath.cli import main
from locpath.bundle import names
from locpath.bundle.integrity import verify_bundle as load_manifest
from locpath.bundle.manifest import SCHEMA_VERSION, BundleError
from locpath.export.configs import export_configs
from locpath.export.exporter import ValidationError, export_component, validate_component


def test_manifest_records_every_component(exported_bundle):
    m = load_manifest(exported_bundle)
    assert m.schema_version == SCHEMA_VERSION
    assert set(m.components) == {"tile_encoder", "resampler", *names.RESAMPLER_CHUNKS, "tis", "cross_kv", "decoder",
                                 "decoder_fused"}
    enc = m.components["tile_encoder"]
    assert enc.inputs[0].name == "tiles" and enc.inputs[0].dtype == "uint8" and enc.inputs[0].shape == ["batch", 224, 224, 3]
    dec = m.components["decoder"]
    assert dec.templates["past_key"] == "past_key.{layer}" and dec.templates["num_layers"] == 4
    assert "past_key.3" in dec.input_names() and "present_value.0" in dec.output_names()
    assert dec.profiles["past"][0] == 0  # prefill runs the same graph with an empty past
    assert m.preprocessing.tile_size == 224 and m.preprocessing.target_mpp == 0.5
    assert m.tokenizer.im_end in m.generation.stop_tokens
    assert m.model_config.fusion == "cara"
    # the exporter validated every graph against PyTorch on fresh shapes
    for comp, diffs in m.export["validation"].items():
        assert diffs and max(diffs.values()) < 1e-4, comp


@pytest.mark.parametrize("victim", ["decoder.onnx", "tokenizer.json", "tile_encoder.onnx"])
def test_tampered_bundle_is_refused(ref_bundle, tmp_path, victim, capsys):
    b = tmp_path / "b"
    shutil.copytree(ref_bundle, b)
    data = bytearray((b / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / victim).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{victim}: checksum mismatch"):
        load_manifest(b)
    code = main(["ask", str(b), "slide.svs", "What is the diagnosis?", "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and victim in err and "checksum mismatch" in err and len(err.strip().splitlines()) == 1


def test_unknown_schema_and_missing_files_are_refused(ref_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(ref_bundle, b)
    mf = json.loads((b / "manifest.json").read_text())
    mf["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(BundleError, match="manifest.json: checksum mismatch with SHA256SUMS"):
        load_manifest(b)  # any edit of the manifest is caught by the checksum list first
    reseal(b)
    with pytest.raises(BundleError, match="unknown schema version 99"):
        load_manifest(b)  # and a consistent one by the schema check
    shutil.copytree(ref_bundle, tmp_path / "c")
    (tmp_path / "c" / "tis.onnx").unlink()
    with pytest.raises(BundleError, match="tis.onnx: listed in the manifest but missing"):
        load_manifest(tmp_path / "c")
    with pytest.raises(BundleError, match="not a locpath bundle"):
        load_manifest(tmp_path)


def test_validation_raises_typed_error_with_max_diff(shipped_reference, tmp_path):
    from locpath.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(shipped_reference)
    cfg = [c for c in export_configs(model) if c.component == "tis"][0]
    rep = export_component(cfg, model, tmp_path)
    assert validate_component(cfg, model, tmp_path / rep.file)["scores"] < 1e-5
    with torch.no_grad():
        model.tis.l_proj.weight.add_(0.05)  # the graph no longer matches the model
    with pytest.raises(ValidationError, match=r"tis: .*scores: \d") as exc:
        validate_component(cfg, model, tmp_path / rep.file)
    assert exc.value.diffs["scores"] > 1e-4


def test_export_from_a_local_hf_llama_folder(tmp_path, tokenizer):
    """A real HF-format folder (random Llama, saved with save_pretrained) with CARA attached exports and validates."""
    from locpath.config import LLMConfig, preset
    from locpath.export.bundle import export_bundle
    from locpath.models.checkpoint import save_checkpoint
    from locpath.models.llm import build_llm
    from locpath.models.slide_llm import LocPathModel
    from locpath.runtime.pipeline import Pipeline

    torch.manual_seed(0)
    hf = build_llm(LLMConfig(architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, rope_theta=10000.0))
    hf.save_pretrained(tmp_path / "llama")
    cfg = preset("tiny")
    cfg.tile_encoder.depth = 1
    cfg.llm = LLMConfig(pretrained_path=str(tmp_path / "llama"))
    cfg.cara.layers = (1,)
    model = LocPathModel(cfg).eval()
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "llama")  # the checkpoint must not depend on the HF folder any more
    bundle, summary = export_bundle(ckpt, tmp_path / "bundle", log=lambda m: None)
    m = load_manifest(bundle)
    assert m.model_config.llm.architecture == "llama" and m.model_config.llm.pretrained_path is None
    assert max(summary["max_abs_diff"]["decoder"].values()) < 1e-4
    # and the runtime drives it (random weights: any answer, but the full path runs)
    feats = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32)
    from locpath.wsi.features import FeatureFile, write_features

    h5 = write_features(tmp_path / "f.h5", FeatureFile(feats, np.stack([np.arange(20) * 224, np.zeros(20, int)], 1),
                                                        224, 224, 0.5, 0.5, cfg.tile_encoder.name))
    pipe = Pipeline.from_bundle(bundle, use_cache=False)
    ans = pipe.ask(h5, "What is the diagnosis?", max_new_tokens=3)
    # random weights: any tokens, but exactly as PyTorch greedy-decodes them from the same latents
    assert ans.generation["decoder"] == "decoder_fused" and ans.slide["tiles"] == 20
    assert ans.generation["new_tokens"] == len(ans.token_ids) >= 1
    assert ans.generation["stop_reason"] in ("stop_token", "max_new_tokens")
    lat = pipe.compress(pipe.read_feature_file(h5)).latents
    with torch.no_grad():
        want = model.answer_tokens(tokenizer, torch.from_numpy(lat), ["What is the diagnosis?"], max_new=3)[0]
    assert ans.token_ids == want


def test_export_refuses_to_overwrite_without_flag(ref_bundle, capsys):
    code = main(["export", str(ref_bundle)])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err
