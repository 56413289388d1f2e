"""The resampler a chunk of STM tokens at a time: the same latents and evidence map as the one-graph resampler,
with memory that follows the chunk (models.resampler.ResamplerChunks, runtime/resampler_chunks.py)."""

import shutil

import numpy as np
import pytest
from conftest import reseal

from locpath.bundle import names
from locpath.bundle.integrity import verify_bundle
from locpath.bundle.manifest import BundleError
from locpath.runtime.pipeline import Pipeline


def _tokens(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    pos = rng.integers(0, 120, size=(n, 2)).astype(np.float32)
    counts = rng.integers(1, 5, size=n).astype(np.float32)
    return feats, pos, counts


@pytest.mark.torch
def test_chunked_arithmetic_equals_the_resampler_in_torch():
    """Online softmax over uneven chunks, then the rest of each block, against Resampler.forward; and a chunk whose
    tokens are all masked adds nothing."""
    import torch

    from locpath.config import preset
    from locpath.models.resampler import Resampler, ResamplerChunks

    torch.manual_seed(0)
    cfg = preset("tiny").resampler
    r = Resampler(cfg, 64).eval()
    c = ResamplerChunks(r)
    feats, pos, counts = (torch.from_numpy(a)[None] for a in _tokens(700, 64))
    mask = torch.ones(1, 700, dtype=torch.bool)
    with torch.no_grad():
        want, want_att = r(feats, pos, counts, mask, with_attention=True)
        lat = c.finish(r.latents[None], torch.tensor([0]), torch.zeros(1, cfg.num_heads, cfg.num_latents,
                                                                          cfg.dim // cfg.num_heads))[2]
        bounds = [(0, 300), (300, 301), (301, 700)]
        att = torch.zeros(1, cfg.num_latents, 700)
        for b in range(cfg.depth):
            blk = torch.tensor([b])
            parts = [c.partial(lat, blk, feats[:, a:z], pos[:, a:z], counts[:, a:z], mask[:, a:z]) for a, z in bounds]
            none = torch.zeros(1, 5, dtype=torch.bool)  # a fully masked chunk: m at the floor, s and o zero
            parts.append(c.partial(lat, blk, feats[:, :5], pos[:, :5], counts[:, :5], none))
            m = torch.stack([p[0] for p in parts]).amax(0)
            s = sum(p[1] * torch.exp(p[0] - m) for p in parts)
            o = sum(p[2] * (p[1] * torch.exp(p[0] - m))[..., None] for p in parts)
            for a, z in bounds:
                att[:, :, a:z] += c.weights(lat, blk, feats[:, a:z], pos[:, a:z], counts[:, a:z], mask[:, a:z], m, s)
            lat, normed, _ = c.finish(lat, blk, o / s[..., None])
    torch.testing.assert_close(normed, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(att / cfg.depth, want_att, atol=1e-6, rtol=0)


def test_chunked_graphs_give_the_one_graph_latents_and_evidence(ref_bundle):
    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False, resampler_chunk=64)
    ch = pipe.chunked_resampler
    assert ch is not None and ch.chunk == 64
    feats, pos, counts = _tokens(1000, pipe.cfg.feature_dim)  # 16 chunks, the last of 40 tokens
    lat, att = ch.run(feats, pos, counts)
    one = pipe.runners[names.RESAMPLER].run({"tokens": feats[None], "positions": pos[None], "counts": counts[None],
                                             "token_mask": np.ones((1, 1000), bool)}, ["latents", "attention"])
    np.testing.assert_allclose(lat, one["latents"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(att, one["attention"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-4)  # probabilities over the slide's tokens


@pytest.mark.torch
def test_one_pass_evidence_from_the_partial_graph_equals_the_second_pass(exported_bundle, ref_bundle):
    """A bundle whose partial graph gives each chunk's exp(logit - m) (`p`) gets its evidence map without the
    weights graph; over the budget, or from a bundle exported before `p`, the second pass gives it. Both are the
    one-graph resampler's."""
    from locpath.runtime.resampler_chunks import PROBS_BUDGET

    pipe = Pipeline.from_bundle(exported_bundle, use_cache=False, resampler_chunk=64)
    ch = pipe.chunked_resampler
    assert "p" in ch.partial.output_names and ch.probs_budget == PROBS_BUDGET
    feats, pos, counts = _tokens(1000, pipe.cfg.feature_dim, seed=3)  # 16 chunks, the last of 40 tokens
    runs = {"weights": 0}
    real = ch.weights.run
    ch.weights.run = lambda *a, **k: runs.__setitem__("weights", runs["weights"] + 1) or real(*a, **k)
    assert ch.one_pass(1000)
    lat1, att1 = ch.run(feats, pos, counts)
    assert runs["weights"] == 0  # no second pass
    ch.probs_budget = pipe.cfg.resampler.num_heads * pipe.cfg.resampler.num_latents * 4 * 999
    assert not ch.one_pass(1000) and ch.one_pass(999)
    lat2, att2 = ch.run(feats, pos, counts)
    assert runs["weights"] == 16 * pipe.cfg.resampler.depth
    one = pipe.runners[names.RESAMPLER].run({"tokens": feats[None], "positions": pos[None], "counts": counts[None],
                                             "token_mask": np.ones((1, 1000), bool)}, ["latents", "attention"])
    np.testing.assert_array_equal(lat1, lat2)
    for att in (att1, att2):
        np.testing.assert_allclose(att, one["attention"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(att1, att2, atol=2e-7, rtol=0)
    np.testing.assert_allclose(lat1, one["latents"], atol=2e-5, rtol=0)
    old = Pipeline.from_bundle(ref_bundle, use_cache=False, resampler_chunk=64).chunked_resampler
    assert "p" not in old.partial.output_names and not old.one_pass(10)  # exported before `p`: two passes


def test_pipeline_chunks_only_slides_above_the_chunk(ref_bundle, eval_slide):
    """At or below the chunk the one-graph resampler runs (bit for bit as before); above, the chunked graphs,
    with the same answer and the same evidence tiles."""
    whole = Pipeline.from_bundle(ref_bundle, use_cache=False, resampler_chunk=0)
    assert whole.chunked_resampler is None
    ctx = whole.prepare(eval_slide, keep_features=True)
    ff = ctx.features
    big = Pipeline.from_bundle(ref_bundle, use_cache=False, resampler_chunk=ctx.tokens)
    np.testing.assert_array_equal(big.compress(ff).latents, whole.compress(ff).latents)
    small = Pipeline.from_bundle(ref_bundle, use_cache=False, resampler_chunk=max(1, ctx.tokens // 5))
    a, b = whole.compress(ff), small.compress(ff)
    assert not np.array_equal(a.latents, b.latents)  # the chunked path really ran
    np.testing.assert_allclose(b.latents, a.latents, atol=2e-5, rtol=0)
    np.testing.assert_allclose(b.attention, a.attention, atol=1e-6, rtol=0)
    q = "What is the diagnosis?"
    assert small.ask(eval_slide, q).token_ids == whole.ask(eval_slide, q).token_ids
    with pytest.raises(Exception, match="resampler_chunk must be an integer >= 0"):
        Pipeline.from_bundle(ref_bundle, use_cache=False, resampler_chunk=-1)


def test_a_bundle_with_part_of_the_chunked_resampler_is_refused(ref_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(ref_bundle, b)
    reseal(b, lambda m: m["components"].pop(names.RESAMPLER_WEIGHTS))
    with pytest.raises(BundleError, match="resampler_partial without resampler_weights"):
        verify_bundle(b)


def test_warm_up_runs_the_chunk_shapes_every_large_slide_runs(ref_bundle):
    """A full chunk and a remainder at load, so the first large slide does not prepare them (OpenVINO prepares each
    larger shape anew; ONNX Runtime grows its arena)."""
    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False, resampler_chunk=64, warmup=False)
    seen = []
    real = pipe.chunked_resampler.partial.run
    pipe.chunked_resampler.partial.run = lambda feeds, outs: seen.append(feeds["tokens"].shape[1]) or real(feeds, outs)
    assert pipe.warm_up() > 0
    assert sorted(seen) == sorted([64, 1] * pipe.cfg.resampler.depth)
    small = Pipeline.from_bundle(ref_bundle, use_cache=False, resampler_chunk=0)  # no chunked resampler: no chunk run
    assert small.chunked_resampler is None and small.warmup_ms > 0
