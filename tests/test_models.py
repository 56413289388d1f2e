import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from locpath.config import ModelConfig, TileEncoderConfig, preset  # noqa: E402
from locpath.errors import CheckpointError, ConfigError  # noqa: E402
from locpath.models.slide_llm import LocPathModel, SlideFeatures, build_model  # noqa: E402
from locpath.models.encoders import build_tile_encoder, load_encoder_weights  # noqa: E402
from locpath.stm import merge_tokens  # noqa: E402

# timm's VisionTransformer names, for a depth-1 model (vit_base_patch16_224 layout)
TIMM_KEYS = {
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
}


def small_vit(**kw):
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, out_dim=16)
    base.update(kw)
    return build_tile_encoder(TileEncoderConfig(**base))


def test_vit_family_is_timm_with_its_state_dict_layout():
    from timm.models.vision_transformer import VisionTransformer

    m = small_vit()
    assert isinstance(m, VisionTransformer)  # timm's own class (with the uint8 entry added), not a copy
    sd = m.state_dict()
    assert set(sd) == TIMM_KEYS | {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert sd["pos_embed"].shape == (1, 17, 32) and sd["blocks.0.attn.qkv.weight"].shape == (96, 32)
    # UNI-style: layer scale, no head, average pooling with fc_norm
    uni = small_vit(layer_scale_init=1e-5, out_dim=32, global_pool="avg").state_dict()
    assert set(uni) == TIMM_KEYS | {"blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "fc_norm.weight", "fc_norm.bias"}


def test_vit_checkpoint_loads_and_mismatch_is_refused(tmp_path):
    from safetensors.torch import save_file

    src = small_vit()
    p = tmp_path / "enc.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(p))  # DDP prefix
    dst = small_vit()
    load_encoder_weights(dst, p)
    x = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(dst.forward_uint8(x), src.forward_uint8(x))
    with pytest.raises(CheckpointError, match="enc.safetensors.*shape mismatch"):
        load_encoder_weights(small_vit(embed_dim=64), p)
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder_weights(dst, tmp_path / "nope.pth")


def test_uint8_entry_normalises_inside_the_model():
    m = small_vit().eval()
    x = torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8)
    mean = torch.tensor(m.cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(m.cfg.std).view(1, 3, 1, 1)
    manual = m((x.permute(0, 3, 1, 2).float() / 255 - mean) / std)
    torch.testing.assert_close(m.forward_uint8(x), manual, atol=1e-5, rtol=1e-5)


def test_stm_merges_near_duplicates_only_within_windows():
    rng = np.random.default_rng(0)
    base = rng.normal(size=8).astype(np.float32)
    grid = np.array([[c, r] for r in range(4) for c in range(4)])
    feats = np.tile(base, (16, 1)) + rng.normal(scale=1e-3, size=(16, 8)).astype(np.float32)
    odd = 5  # one tile unlike its neighbours: must survive as its own token
    feats[odd] = rng.normal(size=8)
    m = merge_tokens(feats, grid, window=2, threshold=0.95)
    assert len(m) == 5  # four 2x2 windows, plus the odd tile
    assert m.counts.sum() == 16
    assert m.counts[m.assignment[odd]] == 1
    np.testing.assert_allclose(m.features[m.assignment[odd]], feats[odd])
    # identical features far apart are not merged (adjacency, not only similarity)
    far = merge_tokens(np.tile(base, (2, 1)), np.array([[0, 0], [3, 3]]), window=2, threshold=0.5)
    assert len(far) == 2
    # merged position is the mean position of its members
    i = m.assignment[0]
    np.testing.assert_allclose(m.positions[i], grid[m.assignment == i].mean(0))


def test_resampler_ignores_padding():
    cfg = preset("tiny")
    from locpath.models.resampler import Resampler

    r = Resampler(cfg.resampler, cfg.feature_dim).eval()
    f = torch.randn(1, 7, cfg.feature_dim)
    p = torch.rand(1, 7, 2) * 10
    c = torch.ones(1, 7)
    out = r(f, p, c, torch.ones(1, 7, dtype=torch.bool))
    fp = torch.cat([f, torch.randn(1, 3, cfg.feature_dim)], 1)
    pp = torch.cat([p, torch.rand(1, 3, 2)], 1)
    mask = torch.tensor([[True] * 7 + [False] * 3])
    out2 = r(fp, pp, torch.ones(1, 10), mask)
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)


def test_tis_keeps_the_highest_scores():
    from locpath.models.tis import select_top_m

    lat = torch.arange(6, dtype=torch.float32).view(1, 6, 1).repeat(1, 1, 3)
    scores = torch.tensor([[0.1, 5.0, -1.0, 3.0, 4.0, 0.0]])
    sel, idx = select_top_m(lat, scores, 3)
    assert idx.tolist() == [[1, 3, 4]]
    torch.testing.assert_close(sel[0, :, 0], torch.tensor([1.0, 3.0, 4.0]) * torch.sigmoid(torch.tensor([5.0, 3.0, 4.0])))


def _slides(n=2, tiles=30, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    return [SlideFeatures(rng.normal(size=(tiles + 5 * i, dim)).astype(np.float32),
                          rng.integers(0, 8, (tiles + 5 * i, 2))) for i in range(n)]


def test_cara_leaves_llm_untouched_at_zero_gate_and_changes_it_otherwise(tokenizer):
    cfg = preset("tiny")
    cfg.cara.gate_init = 0.0
    m = LocPathModel(cfg).eval()
    # the LLM keeps Hugging Face's own parameter names: adapters are hooks, not wrappers
    assert not any("cara" in k for k in m.llm.state_dict())
    ids = torch.tensor([m.prompt_ids(tokenizer, "What is the diagnosis?")])
    plain = m.llm(input_ids=ids).logits
    lat = m.slide_latents([s.merged(cfg) for s in _slides(1)])
    kv, _, _ = m.question_kv(lat, ids, torch.ones_like(ids))
    with m.cara.visual_context(kv):
        gated = m.llm(input_ids=ids).logits
    torch.testing.assert_close(plain, gated)
    with torch.no_grad():
        for blk in m.cara.blocks.values():
            blk.attn_gate.fill_(1.0)
    with m.cara.visual_context(kv):
        opened = m.llm(input_ids=ids).logits
    assert (opened - plain).abs().max() > 1e-3
    torch.testing.assert_close(m.llm(input_ids=ids).logits, plain)  # context gone: text-only again


@pytest.mark.parametrize("fusion", ["cara", "prefix"])
def test_batched_greedy_equals_one_by_one(tokenizer, fusion):
    torch.manual_seed(0)
    cfg = preset("tiny", fusion)
    m = build_model(cfg).eval()
    qs = ["What is the diagnosis?", "Is necrosis present?", "Identify the organ of origin."]
    slides = _slides(3)
    if fusion == "cara":
        ctx = m.slide_latents([s.merged(cfg) for s in slides])
        batched = m.answer(tokenizer, ctx, qs, max_new=6)
        single = [m.answer(tokenizer, ctx[i : i + 1], [q], max_new=6)[0] for i, q in enumerate(qs)]
    else:
        ctx = m.visual_tokens(slides)
        batched = m.answer(tokenizer, ctx, qs, max_new=6)
        single = [m.answer(tokenizer, [ctx[i]], [q], max_new=6)[0] for i, q in enumerate(qs)]
    assert batched == single


def test_loss_decreases_on_a_tiny_batch(tokenizer):
    torch.manual_seed(0)
    cfg = preset("tiny")
    m = LocPathModel(cfg)
    slides = _slides(2)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        lat = m.slide_latents([s.merged(cfg) for s in slides])
        loss = m.forward_qa(tokenizer, lat, ["What is the diagnosis?"] * 2, ["benign", "adenocarcinoma"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_llm_from_a_local_hf_folder_llama_and_qwen(tmp_path, tokenizer):
    from locpath.config import LLMConfig
    from locpath.models.llm import build_llm, sync_llm_config

    for arch in ("qwen2", "llama"):
        small = LLMConfig(architecture=arch, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
        hf = build_llm(small)
        folder = tmp_path / arch
        hf.save_pretrained(folder)
        cfg = preset("tiny")
        cfg.llm = LLMConfig(pretrained_path=str(folder))
        cfg.cara.layers = (0, 2)
        m = LocPathModel(cfg).eval()
        assert m.llm.config.model_type == arch
        torch.testing.assert_close(m.llm.model.embed_tokens.weight, hf.model.embed_tokens.weight)
        lat = m.slide_latents([s.merged(cfg) for s in _slides(1)])
        assert len(m.answer(tokenizer, lat, ["What is the diagnosis?"], max_new=3)) == 1
        synced = sync_llm_config(cfg.llm, m.llm)
        assert synced.architecture == arch and synced.hidden_size == 64 and synced.pretrained_path is None
    with pytest.raises(CheckpointError, match="no config.json"):
        build_llm(LLMConfig(pretrained_path=str(tmp_path / "absent")))


def test_config_roundtrip_and_validation():
    for name in ("tiny", "published"):
        for fusion in ("cara", "prefix"):
            c = preset(name, fusion)
            assert ModelConfig.from_dict(c.to_dict()) == c
    bad = preset("tiny").to_dict()
    bad["tis"]["top_m"] = 999
    with pytest.raises(ConfigError, match="top_m"):
        ModelConfig.from_dict(bad)
    bad = preset("tiny").to_dict()
    bad["resampler"]["bogus"] = 1
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict(bad)


@pytest.mark.slow  # published widths (a 152k vocabulary, a 3584-wide LLM): about 20 s; the tiny preset runs the same code
def test_published_preset_runs_a_forward_pass():
    """LoC-Path's published sizes (CONCH-like ViT-B/16 to 512-d, L=128, M=96, Qwen2.5-7B-shaped LLM with CARA),
    depth reduced so random weights fit a test: 1 ViT block, 2 LLM layers with CARA in the second."""
    cfg = preset("published")
    assert (cfg.tile_encoder.embed_dim, cfg.feature_dim, cfg.resampler.num_latents, cfg.tis.top_m) == (768, 512, 128, 96)
    assert (cfg.llm.hidden_size, cfg.llm.num_attention_heads, cfg.llm.num_key_value_heads) == (3584, 28, 4)
    cfg.tile_encoder.depth = 1
    cfg.llm.num_hidden_layers = 2
    cfg.llm.vocab_size = 152064
    cfg.cara.layers = (1,)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # halves the memory of the 152k-token embedding tables
    try:
        with torch.device("cpu"):
            m = LocPathModel(cfg).eval()
        with torch.no_grad():
            tiles = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8)
            feats = m.tile_encoder.forward_uint8(tiles)
            assert feats.shape == (2, 512)
            sl = SlideFeatures(np.random.default_rng(0).normal(size=(200, 512)).astype(np.float32),
                               np.random.default_rng(1).integers(0, 20, (200, 2)))
            lat = m.slide_latents([sl.merged(cfg)]).to(torch.bfloat16)
            assert lat.shape == (1, 128, 1024)
            ids = torch.randint(0, 152064, (1, 12))
            kv, scores, idx = m.question_kv(lat, ids, torch.ones_like(ids))
            assert idx.shape == (1, 96) and kv[1][0].shape == (1, 28, 96, 128)
            with m.cara.visual_context(kv):
                logits = m.llm(input_ids=ids).logits
            assert logits.shape == (1, 12, 152064) and torch.isfinite(logits.float()).all()
    finally:
        torch.set_default_dtype(prev)


def _stm_oracle(feats, grid, window, threshold):
    """The plain loop the vectorised STM must equal (block by block, member by member)."""
    unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    block = grid // window
    order = np.lexsort((np.arange(len(feats)), block[:, 0], block[:, 1]))
    assignment = np.empty(len(feats), np.int64)
    n_out, cur, founders = 0, None, []
    for i in order:
        if cur is None or tuple(block[i]) != cur:
            cur, founders = tuple(block[i]), []
        for f, fid in founders:
            if float(unit[i] @ unit[f]) >= threshold:
                assignment[i] = fid
                break
        else:
            founders.append((i, n_out))
            assignment[i] = n_out
            n_out += 1
    return assignment


@pytest.mark.parametrize("window,threshold,seed,chunk", [(2, 0.9, 0, 1 << 16), (2, 0.97, 1, 1), (3, 0.8, 2, 100),
                                                         (1, 0.9, 3, 1 << 16), (4, 0.9, 4, 300)])
def test_stm_vectorised_equals_the_greedy_loop(window, threshold, seed, chunk):
    rng = np.random.default_rng(seed)
    n = 500
    grid = rng.permutation(np.array([[c, r] for r in range(30) for c in range(30)]))[:n]
    base = rng.normal(size=(4, 16))
    feats = (base[rng.integers(0, 4, n)] + rng.normal(scale=0.3, size=(n, 16))).astype(np.float32)
    m = merge_tokens(feats, grid, window=window, threshold=threshold, chunk_elements=chunk)
    want = _stm_oracle(feats, grid, window, threshold) if window > 1 else np.arange(n)
    np.testing.assert_array_equal(m.assignment, want)
    for t in range(len(m)):
        np.testing.assert_allclose(m.features[t], feats[m.assignment == t].mean(0), rtol=1e-5, atol=1e-6)


def test_stm_memory_is_its_output_plus_one_chunk():
    """A 100k-tile slide of a 1024-wide encoder holds 400 MB of features: merging must not copy them (it once held
    the normalised features, their block gather and a float64 sum, ~4x the input). Counted by tracemalloc, which
    sees numpy's allocations: the peak may exceed the merged output by the per-tile integer arrays and one chunk."""
    import tracemalloc

    rng = np.random.default_rng(7)
    n, d = 20_000, 256
    side = int(np.ceil(np.sqrt(n)))
    grid = np.array([[c, r] for r in range(side) for c in range(side)])[:n]
    feats = rng.normal(size=(n, d)).astype(np.float32)
    feats[1::2] = feats[::2]  # pairs of duplicates: about half the tiles merge
    tracemalloc.start()
    try:
        m = merge_tokens(feats, grid, window=2, threshold=0.97)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out = m.features.nbytes + m.positions.nbytes + m.counts.nbytes + m.assignment.nbytes
    assert len(m) < 0.6 * n
    assert peak < out + 80 * n + 4 * 2**20, (peak, out, feats.nbytes)
