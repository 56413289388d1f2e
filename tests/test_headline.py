"""The like-for-like headline (bench/headline.py): the prefix baseline exported as LoC-Path is, and measured."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from locpath.bench.headline import (HeadlineConfig, PrefixSession, bench_headline, features_path,  # noqa: E402
                                    headline_lines, in_child, measure_locpath, measure_prefix, save_features)
from locpath.bench.suites import headline as headline_suite  # noqa: E402
from locpath.bench.suites.scaling import kv_bytes_prefix  # noqa: E402
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


def _allocated(cache) -> int:
    """Bytes of the K/V tensors a SharedKVCache really holds (read from the arrays, not from its own count)."""
    return sum(int(a.numpy().nbytes) for a in cache.keys + cache.values)


def test_measured_kv_is_the_allocated_cache_and_grows_with_n_for_the_prefix_only(ref_bundle, prefix_fp32,
                                                                                 prefix_model):
    from locpath.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False)
    prompt, max_new = pipe.prompt_ids(Q), pipe.sampling().max_new_tokens
    sess = PrefixSession(prefix_fp32)
    c = prefix_model[0].llm.config
    pcfg = {k: getattr(c, k) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                                       "num_key_value_heads")}
    small, big = _slide(100), _slide(300, seed=1)
    for ff in (small, big):
        cache, _ = sess.prefill(sess.visual_tokens(ff.features, ff.grid_index), prompt, max_new, 128)
        got = measure_prefix(str(prefix_fp32), ff, prompt, max_new, 128, 0, 1)
        assert got["kv_bytes"] == _allocated(cache)  # what the bench reports is what the runtime allocated
        # the scaling section's formula for the eager prefix (same model) is that allocation, N + text positions
        assert kv_bytes_prefix(pcfg, len(ff.features), len(prompt) + max_new) == _allocated(cache)
        assert isinstance(got["first_token"], int)
    ls = in_child(measure_locpath, str(ref_bundle), small, Q, 0, 1)  # own process: its peak RSS is its own
    lb = measure_locpath(str(ref_bundle), big, Q, 0, 1)
    assert ls["kv_bytes"] == lb["kv_bytes"] > 0  # LoC-Path's cache does not depend on N
    assert all(isinstance(r["first_token"], int) for r in (ls, lb))  # each side reached a first token
    pipe.release()


PROBE = """
import json, sys
import numpy as np
from locpath.bench.memory import PeakGrowth, peak_rss_mb_of

def hwm_kb():  # read here, not through the code under test
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

mib = int(sys.argv[1])
early = np.ones(3 * mib * 2**20, np.uint8)  # raises the peak mark well before the measured block
del early
before = hwm_kb()
with PeakGrowth() as g:
    buf = np.ones(mib * 2**20, np.uint8)  # touched, then freed inside the block: only a peak sees it
    del buf
print(json.dumps({"growth": g.bytes, "peak_mb": peak_rss_mb_of(g), "hwm_before_kb": before, "hwm_after_kb": hwm_kb()}))
"""


def test_memory_figures_read_a_known_allocation():
    """The headline's memory figures against independent readings: a block that allocates and frees 96 MiB grows
    by ~96 MiB (not by the earlier, larger peak; not by ~0 after the free), and the process peak is VmHWM's."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", PROBE, "96"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert 92 * 2**20 <= m["growth"] <= 104 * 2**20, m["growth"] / 2**20
    assert abs(m["peak_mb"] * 1024 - max(m["hwm_before_kb"], m["hwm_after_kb"])) <= 1024  # the life-time peak
    assert m["hwm_before_kb"] >= 3 * 96 * 1024  # the early 288 MiB peak was real (and the figure above kept it)


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
    rep = {"headline": h, "ratios": {}}
    ratios = rep["ratios"] = headline_suite.ratios(rep)
    targets = headline_suite.targets(rep)
    for key in ("ttft_prefix_over_locpath_at_200", "memory_prefix_over_locpath_at_200",
                "kv_prefix_over_locpath_at_200", "peak_rss_prefix_over_locpath_at_200"):
        assert 0 < ratios[key] < 1e6, key
    assert targets == {}  # the 20x/50x targets are set at 10k tiles only
    fake = json.loads(json.dumps(h))
    fake["reference"]["rows"][1]["n_target"] = 10000
    rep = {"headline": fake, "ratios": {}}
    rep["ratios"] = headline_suite.ratios(rep)
    assert set(headline_suite.targets(rep)) == {"ttft_20x_at_10000", "memory_50x_at_10000"}
    assert "| reference (fp32) | 200 |" in "\n".join(headline_lines(h))
