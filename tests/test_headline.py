"""The like-for-like headline (bench/headline.py): the prefix baseline exported as LoC-Path is, and measured."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from locpath.bench.headline import (HeadlineConfig, PrefixSession, bench_headline, features_path,  # noqa: E402
                                    headline_lines, headline_ratios, in_child, measure_locpath, measure_prefix,
                                    save_features)
from locpath.checkpoints import shipped_checkpoint  # noqa: E402
from locpath.export.prefix import export_prefix_checkpoint, torch_prefix_tokens  # noqa: E402
from locpath.models.checkpoint import load_checkpoint  # noqa: E402
from locpath.models.slide_llm import SlideFeatures  # noqa: E402
from locpath.text import IM_END  # noqa: E402
from locpath.wsi.features import FeatureFile  # noqa: E402

Q = "What is the diagnosis?"


@pytest.fixture(scope="module")
def prefix_model():
    model, tok = load_checkpoint(shipped_checkpoint("prefix"))
    return model.eval(), tok


@pytest.fixture(scope="module")
def prefix_fp32(prefix_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefix") / "fp32"
    export_prefix_checkpoint(prefix_model[0], folder, "fp32", 32, 1024, log=lambda m: None)
    return folder


def _slide(n: int, seed: int = 0) -> FeatureFile:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1) * 224
    return FeatureFile(features=rng.standard_normal((n, 64)).astype(np.float32), coords=coords, patch_size=224,
                       patch_size_level0=224, level0_mpp=0.5, target_mpp=0.5, encoder="locpath-tiny-vit")


def _torch_logits(model, tok, ff, prompt, extra):
    """PyTorch prefix model: logits at the last prompt position and after each forced token."""
    with torch.no_grad():
        vis = model.visual_tokens([SlideFeatures(ff.features, ff.grid_index)])
        x, mask = model._inputs(tok, vis, [prompt + extra])
        logits = model.llm(inputs_embeds=x, attention_mask=mask).logits[0]
    return logits[-(len(extra) + 1):].numpy()


def test_exported_prefix_answers_like_pytorch(prefix_model, prefix_fp32):
    model, tok = prefix_model
    ff = _slide(150)
    prompt = model.prompt_ids(tok, Q)
    sess = PrefixSession(prefix_fp32)
    forced = [7, 42, 300]
    want = _torch_logits(model, tok, ff, prompt, forced)
    for chunk in (4096, 64):  # one prefill call, and chunked through the same shared K/V buffers
        cache, logits = sess.prefill(sess.visual_tokens(ff.features, ff.grid_index), prompt, 8, chunk)
        got = [logits[0, -1].copy()] + [sess.step(cache, t)[0, -1].copy() for t in forced]
        assert np.abs(np.stack(got) - want).max() < 1e-3 * max(1.0, np.abs(want).max()), chunk
    stop = [tok.token_to_id(IM_END)]
    assert sess.greedy(ff.features, ff.grid_index, prompt, 8, stop) == torch_prefix_tokens(
        model, tok, ff.features, ff.grid_index, Q, 8)


def test_prefix_int4_is_the_bundle_recipe(prefix_model, tmp_path):
    model, tok = prefix_model
    meta = export_prefix_checkpoint(model, tmp_path / "int4", "int4", 32, 1024, log=lambda m: None)
    assert meta["decoder_build"]["precision"] == "int4" and meta["decoder_build"]["int4_weights"] > 0
    assert meta["decoder_build"]["float_matmul_weights"] == []  # every matmul INT4, as the LoC-Path INT4 decoder
    ff = _slide(80)
    prompt = model.prompt_ids(tok, Q)
    want = _torch_logits(model, tok, ff, prompt, [])[0]
    sess = PrefixSession(tmp_path / "int4")
    _, logits = sess.prefill(sess.visual_tokens(ff.features, ff.grid_index), prompt, 4, 4096)
    got = logits[0, -1]
    cos = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
    assert 0.98 < cos < 1.0  # quantized, so close but not equal


def test_measured_kv_grows_with_n_for_the_prefix_only(ref_bundle, prefix_fp32):
    from locpath.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False)
    prompt, max_new = pipe.prompt_ids(Q), pipe.sampling().max_new_tokens
    spec = PrefixSession(prefix_fp32).spec
    per_position = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4
    small, big = _slide(100), _slide(300, seed=1)
    ps, pb = (measure_prefix(str(prefix_fp32), f, prompt, max_new, 128, 0, 1) for f in (small, big))
    assert ps["kv_bytes"] == per_position * (100 + len(prompt) + max_new)  # the buffers the runtime allocated
    assert pb["kv_bytes"] - ps["kv_bytes"] == per_position * 200
    ls = in_child(measure_locpath, str(ref_bundle), small, Q, 0, 1)  # own process: its peak RSS is its own
    lb = measure_locpath(str(ref_bundle), big, Q, 0, 1)
    assert ls["kv_bytes"] == lb["kv_bytes"] > 0  # LoC-Path's cache does not depend on N
    for r in (ps, pb, ls, lb):
        assert r["kv_plus_activation_bytes"] >= 0 and r["peak_rss_mb"] >= r["rss_loaded_mb"] > 20
    assert all(isinstance(r["first_token"], int) for r in (ps, pb, ls, lb))  # each side reached a first token
    pipe.release()


def test_headline_section_and_ratios(ref_bundle, tmp_path):
    from locpath.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False)
    for n in (60, 200):  # features saved as the scaling section saves them: no slide is rendered here
        save_features(tmp_path, pipe, n, _slide(n, seed=n))
        assert features_path(tmp_path, pipe, n).exists()
    cfg = HeadlineConfig(tiles=[60, 200], question=Q, workdir=tmp_path, warmup=0, repeats=1)
    h = bench_headline(pipe, cfg, log=lambda m: None)
    pipe.release()
    ref = h["reference"]
    assert ref["decoder_precision"] == "fp32" and [r["tiles"] for r in ref["rows"]] == [60, 200]
    assert "skipped" in h["qwen2.5-0.5b"]
    small, big = ref["rows"]
    assert big["prefix"]["kv_bytes"] > small["prefix"]["kv_bytes"]
    assert big["locpath"]["kv_bytes"] == small["locpath"]["kv_bytes"]
    ratios, targets = {}, {}
    headline_ratios(h, ratios, targets)
    for key in ("ttft_prefix_over_locpath_at_200", "memory_prefix_over_locpath_at_200",
                "kv_prefix_over_locpath_at_200", "peak_rss_prefix_over_locpath_at_200"):
        assert 0 < ratios[key] < 1e6, key
    assert targets == {}  # the 20x/50x targets are set at 10k tiles only
    fake = json.loads(json.dumps(h))
    fake["reference"]["rows"][1]["n_target"] = 10000
    headline_ratios(fake, ratios, targets)
    assert set(targets) == {"ttft_20x_at_10000", "memory_50x_at_10000"}
    assert "| reference (fp32) | 200 |" in "\n".join(headline_lines(h))
