"""Registered tile encoders (TRIDENT's names), built with timm's own definitions at their real widths and a reduced
depth; random weights written in each release's real key layout, read by the loader, exported through the
tile-encoder contract and validated against PyTorch on real H&E tiles read by locpath's own tiling."""

import math
import re
import time
from dataclasses import dataclass, replace

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from locpath.config import ModelConfig, TileEncoderConfig, preset  # noqa: E402
from locpath.encoders import ENCODERS, encoder_spec  # noqa: E402
from locpath.errors import CheckpointError, ConfigError  # noqa: E402
from locpath.models.encoders import (  # noqa: E402
    ConchVisionTower, TimmTileEncoder, build_tile_encoder, encoder_config, load_encoder_weights, random_state_dict,
    tile_target_mpp)

DEPTH = 1
N_TILES = 5


class NotWeights:
    """A class a weights-only unpickler must refuse."""

    def __reduce__(self):
        return (NotWeights, ())


# -- real tiles -------------------------------------------------------------------
_TILES: dict = {}


def tissue_tiles(svs, size: int, mpp: float, n: int = N_TILES) -> np.ndarray:
    """n tissue tiles of the real slide at the encoder's tile size and resolution, through plan_tiles/TileReader."""
    key = (size, mpp, n)
    if key not in _TILES:
        from locpath.wsi import GridConfig, TileReader, open_slide
        from locpath.wsi.extract import plan_tiles

        with open_slide(svs) as s:
            plan = plan_tiles(s, GridConfig(target_mpp=mpp, tile_size=size, min_tissue=0.5))
            order = np.argsort(-plan.grid.tissue, kind="stable")[: max(n, len(plan.grid) // 2)]
            pick = np.sort(order[np.linspace(0, len(order) - 1, n).astype(int)])
            reader = TileReader(s, plan.grid)
            _TILES[key] = np.stack([reader.read_tile(s, int(x), int(y)) for x, y in plan.grid.coords[pick]])
    return _TILES[key]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- random weights in the real layouts ---------------------------------------------
def conch_extras(g: torch.Generator) -> dict[str, torch.Tensor]:
    """The rest of CONCH v1's released checkpoint (coca_model.py, conch_ViT-B-16.json): the caption pooler (256
    queries at 768), the contrastive projection, and a sample of the text tower's and decoder's keys at their real
    shapes (the vocabulary-sized embeddings and decoder projection left out to keep the file small: they are ignored
    like the others)."""
    shapes = {
        "visual.proj_contrast": (512, 512),
        "visual.attn_pool_caption.query": (256, 768),
        "visual.attn_pool_caption.attn.in_proj_weight": (2304, 768),
        "visual.attn_pool_caption.attn.in_proj_bias": (2304,),
        "visual.attn_pool_caption.attn.out_proj.weight": (768, 768),
        "visual.attn_pool_caption.attn.out_proj.bias": (768,),
        "visual.attn_pool_caption.ln_q.weight": (768,), "visual.attn_pool_caption.ln_q.bias": (768,),
        "visual.attn_pool_caption.ln_k.weight": (768,), "visual.attn_pool_caption.ln_k.bias": (768,),
        "visual.ln_caption.weight": (768,), "visual.ln_caption.bias": (768,),
        "text.text_projection": (768, 512), "text.cls_emb": (768,), "text.positional_embedding": (128, 768),
        "text.transformer.resblocks.0.attn.in_proj_weight": (2304, 768),
        "text.transformer.resblocks.0.ln_1.weight": (768,), "text.ln_final.weight": (768,),
        "text_decoder.resblocks.0.attn.in_proj_weight": (2304, 768),
        "text_decoder.cross_attn.0.ln_1_kv.weight": (768,), "text_decoder.ln_final.weight": (768,),
        "logit_scale": (),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@dataclass(frozen=True)
class Release:
    """One release's tile-encoder checkpoint, as its model card loads it: timm's VisionTransformer names
    (`timm.create_model(...)` then `load_state_dict(strict=True)`; CONCH: open_clip's CoCa, its tower under
    `visual.`), at the real widths. Written out here from the cards' configurations, not taken from a built model."""

    file: str  # the file name and format the release ships
    width: int
    patch: int
    positions: int  # pos_embed rows: the patches, plus CLS and registers unless the model embeds only the patches
    registers: int
    fc1: int  # SwiGLUPacked releases pack gate and value in fc1: twice fc2's input
    fc2_in: int
    layer_scale: bool = True  # blocks.i.ls1.gamma / ls2.gamma
    prefix: str = ""
    fp16: bool = False  # written in half precision: the loader casts it to the model's dtype


RELEASES = {
    "conch_v1": Release("pytorch_model.bin", 768, 16, 785, 0, 3072, 3072, layer_scale=False, prefix="visual.trunk."),
    "uni_v1": Release("pytorch_model.bin", 1024, 16, 197, 0, 4096, 4096),
    "uni_v2": Release("pytorch_model.bin", 1536, 14, 256, 8, 8192, 4096),
    "virchow2": Release("model.safetensors", 1280, 14, 261, 4, 6832, 3416),
    "hoptimus0": Release("model.safetensors", 1536, 14, 256, 4, 8192, 4096),
    "hoptimus1": Release("model.safetensors", 1536, 14, 256, 4, 8192, 4096, fp16=True),
    "gigapath": Release("pytorch_model.bin", 1536, 16, 197, 0, 8192, 4096),
}
# CONCH v1's vision feature beside its trunk (coca_model.py: attn_pool_contrast with one query, 8 heads, then
# ln_contrast); the caption pooler, contrastive projection and text towers are `conch_extras`
CONCH_POOLER = {
    "visual.attn_pool_contrast.query": (1, 512),
    "visual.attn_pool_contrast.attn.q_proj_weight": (512, 512),
    "visual.attn_pool_contrast.attn.k_proj_weight": (512, 768),
    "visual.attn_pool_contrast.attn.v_proj_weight": (512, 768),
    "visual.attn_pool_contrast.attn.in_proj_bias": (1536,),
    "visual.attn_pool_contrast.attn.out_proj.weight": (512, 512),
    "visual.attn_pool_contrast.attn.out_proj.bias": (512,),
    "visual.attn_pool_contrast.ln_q.weight": (512,), "visual.attn_pool_contrast.ln_q.bias": (512,),
    "visual.attn_pool_contrast.ln_k.weight": (768,), "visual.attn_pool_contrast.ln_k.bias": (768,),
    "visual.ln_contrast.weight": (512,), "visual.ln_contrast.bias": (512,),
}


def vit_keys(r: Release) -> dict[str, tuple]:
    """Key -> shape of a one-block release (every further block is named like blocks.0)."""
    d = r.width
    keys = {"cls_token": (1, 1, d), "pos_embed": (1, r.positions, d),
            "patch_embed.proj.weight": (d, 3, r.patch, r.patch), "patch_embed.proj.bias": (d,),
            "blocks.0.norm1.weight": (d,), "blocks.0.norm1.bias": (d,),
            "blocks.0.attn.qkv.weight": (3 * d, d), "blocks.0.attn.qkv.bias": (3 * d,),
            "blocks.0.attn.proj.weight": (d, d), "blocks.0.attn.proj.bias": (d,),
            "blocks.0.norm2.weight": (d,), "blocks.0.norm2.bias": (d,),
            "blocks.0.mlp.fc1.weight": (r.fc1, d), "blocks.0.mlp.fc1.bias": (r.fc1,),
            "blocks.0.mlp.fc2.weight": (d, r.fc2_in), "blocks.0.mlp.fc2.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,)}
    if r.registers:
        keys["reg_token"] = (1, r.registers, d)
    if r.layer_scale:
        keys.update({"blocks.0.ls1.gamma": (d,), "blocks.0.ls2.gamma": (d,)})
    return {r.prefix + k: s for k, s in keys.items()}


def draw(key: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    """A random tensor of a plausible scale for its role (norms near 1, layer scale well above timm's 1e-5,
    matrices fan-in scaled), so that every tensor shows in the features the export check compares."""
    r = torch.randn(shape, generator=g)
    if key.endswith("gamma"):
        return 0.5 + 0.5 * r.abs()
    if len(shape) == 1 and key.endswith("weight"):
        return 1.0 + 0.1 * r
    if key.endswith("bias"):
        return 0.02 * r
    if key.endswith(("cls_token", "reg_token", "pos_embed", "query")):
        return 0.5 * r
    return r / math.sqrt(max(1, math.prod(shape[1:])))


def write_release(r: Release, layout: dict[str, tuple], path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the layout's names, saved in the release's format; returns what was written."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: draw(k, s, g) for k, s in layout.items()}
    if r.fp16:
        tensors = {k: v.half() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return tensors


def release_file(name: str, folder, seed: int = 0):
    """(path, {model key: tensor}) of a random checkpoint written as the release names and ships it; the model keys
    are the release's minus the prefix the loader strips (CONCH's `visual.`), without the groups it ignores."""
    r = RELEASES[name]
    layout = vit_keys(r)
    if name == "conch_v1":
        layout.update(CONCH_POOLER)
        layout.update({k: tuple(v.shape) for k, v in conch_extras(torch.Generator()).items()})
    written = write_release(r, layout, folder / r.file, seed)
    unused = set(conch_extras(torch.Generator())) if name == "conch_v1" else set()
    return folder / r.file, {k.removeprefix("visual."): v for k, v in written.items() if k not in unused}


# -- the registry and the config ------------------------------------------------------
def test_registry_configs_and_their_checks():
    conch = encoder_config("CONCH")
    assert (conch.family, conch.name, conch.img_size, conch.embed_dim, conch.out_dim) == ("conch_v1", "conch_v1", 448,
                                                                                        768, 512)
    assert conch.mean == encoder_spec("conch_v1").mean != ModelConfig().tile_encoder.mean  # OpenAI CLIP's, in graph
    assert encoder_config("Virchow2").out_dim == 2 * encoder_config("virchow2").embed_dim == 2560
    assert encoder_config("uni", depth=2).depth == 2 and encoder_config("uni").depth == 24
    with pytest.raises(ConfigError, match=r"embed_dim 768 \(registry: 1024\)"):
        build_tile_encoder(TileEncoderConfig(**{**encoder_config("uni_v1").__dict__, "embed_dim": 768,
                                                "num_heads": 16}))
    with pytest.raises(ConfigError, match="depth 25"):
        build_tile_encoder(encoder_config("uni_v1", depth=25))
    with pytest.raises(ConfigError, match="unknown tile encoder 'uni3'"):
        build_tile_encoder(TileEncoderConfig(family="uni3"))
    cfg = preset("tiny")
    cfg.tile_encoder = encoder_config("conch_v1", depth=1)
    assert tile_target_mpp(cfg) == 0.5
    cfg.target_mpp = 0.25
    with pytest.raises(ConfigError, match="target_mpp 0.25 differs from conch_v1's 0.5"):
        tile_target_mpp(cfg)
    # a registered encoder's config travels through a manifest's model dict and back
    cfg.target_mpp = 0.5
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back.tile_encoder == cfg.tile_encoder


def test_timm_builds_the_registered_poolings():
    """Virchow2: CLS next to the mean of the patch tokens (registers skipped); CONCH: the attentional pooler as the
    released model computes it (sequence-first MultiheadAttention over LayerNormed tokens, one query, then
    ln_contrast), checked against the same arithmetic written out."""
    torch.manual_seed(0)
    v = build_tile_encoder(encoder_config("virchow2", depth=1)).eval()
    assert isinstance(v, TimmTileEncoder) and v.num_prefix_tokens == 5
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        t = v.forward_features(x)
        torch.testing.assert_close(v(x), torch.cat([t[:, 0], t[:, 5:].mean(1)], -1))

    c = build_tile_encoder(encoder_config("conch_v1", depth=1)).eval()
    assert isinstance(c, ConchVisionTower)
    c.load_state_dict(random_state_dict(c, 3))
    tokens = torch.randn(3, 20, 768)
    p = c.attn_pool_contrast
    with torch.no_grad():
        got = c.ln_contrast(p(tokens)[:, 0])
        kv = torch.nn.functional.layer_norm(tokens, (768,), p.ln_k.weight, p.ln_k.bias)
        q = torch.nn.functional.layer_norm(p.query, (512,), p.ln_q.weight, p.ln_q.bias)  # (1, 512)
        bq, bk, bv = p.attn.in_proj_bias.chunk(3)
        qh = (q @ p.attn.q_proj_weight.T + bq).view(1, 8, 64).transpose(0, 1)  # (8, 1, 64)
        kh = (kv @ p.attn.k_proj_weight.T + bk).view(3, 20, 8, 64).permute(0, 2, 1, 3)  # (3, 8, 20, 64)
        vh = (kv @ p.attn.v_proj_weight.T + bv).view(3, 20, 8, 64).permute(0, 2, 1, 3)
        w = torch.softmax(qh[None] @ kh.transpose(-1, -2) / 8.0, dim=-1)  # (3, 8, 1, 20)
        o = (w @ vh).reshape(3, 512) @ p.attn.out_proj.weight.T + p.attn.out_proj.bias
        want = torch.nn.functional.layer_norm(o, (512,), c.ln_contrast.weight, c.ln_contrast.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    x448 = torch.randn(1, 3, 448, 448)
    with torch.no_grad():  # the tower's forward: the trunk's tokens (CLS and patches, after its norm) into the pooler
        torch.testing.assert_close(c(x448), c.ln_contrast(p(c.trunk.forward_features(x448))[:, 0]))


# -- every registered encoder: the release's own key names load, a neighbouring layout is refused ------------------
# a layout each encoder must refuse: a real neighbour's checkpoint, and the lines the loader names it by
WRONG = {
    "conch_v1": ("the tower without its attentional pooler", RELEASES["conch_v1"],
                 r"missing \['attn_pool_contrast\.attn\.in_proj_bias', 'attn_pool_contrast\.attn\.k_proj_weight'"),
    "uni_v1": ("timm's ImageNet ViT-L/16 (no layer scale)", replace(RELEASES["uni_v1"], layer_scale=False),
               r"missing \['blocks\.0\.ls1\.gamma', 'blocks\.0\.ls2\.gamma'\]\)$"),
    "uni_v2": ("H-optimus-0 (4 registers)", RELEASES["hoptimus0"],
               r"shape mismatch \['reg_token: file \(1, 4, 1536\) vs model \(1, 8, 1536\)'\]\)$"),
    "virchow2": ("Virchow v1 (no registers)", replace(RELEASES["virchow2"], registers=0, positions=257),
                 r"missing \['reg_token'\]; shape mismatch "
                 r"\['pos_embed: file \(1, 257, 1280\) vs model \(1, 261, 1280\)'\]\)$"),
    "hoptimus0": ("UNI2-h (8 registers)", RELEASES["uni_v2"],
                  r"shape mismatch \['reg_token: file \(1, 8, 1536\) vs model \(1, 4, 1536\)'\]\)$"),
    "hoptimus1": ("Prov-GigaPath (patch 16, no registers)", RELEASES["gigapath"],
                  r"missing \['reg_token'\]; shape mismatch "
                  r"\['pos_embed: file \(1, 197, 1536\) vs model \(1, 256, 1536\)', "
                  r"'patch_embed\.proj\.weight: file \(1536, 3, 16, 16\) vs model \(1536, 3, 14, 14\)'\]\)$"),
    "gigapath": ("H-optimus-0 (patch 14, 4 registers)", RELEASES["hoptimus0"],
                 r"unexpected \['reg_token'\]; shape mismatch "
                 r"\['pos_embed: file \(1, 256, 1536\) vs model \(1, 197, 1536\)', "
                 r"'patch_embed\.proj\.weight: file \(1536, 3, 14, 14\) vs model \(1536, 3, 16, 16\)'\]\)$"),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_each_release_layout_loads_by_its_names_and_a_neighbours_is_refused(name, tmp_path):
    """The file the release ships, keys as the release names them (RELEASES, written out above), loads strictly:
    every model tensor comes from the file under its release name, CONCH's other groups are ignored, fp16 is cast.
    The checkpoint of the nearest other layout is refused, naming the file and what differs."""
    path, want = release_file(name, tmp_path)
    torch.manual_seed(1)
    enc = build_tile_encoder(encoder_config(name, depth=DEPTH))
    info = load_encoder_weights(enc, path)
    own = enc.state_dict()
    assert info["loaded"] == len(own) == len(want) and set(own) == set(want)
    assert sorted(info["ignored"]) == (sorted(conch_extras(torch.Generator())) if name == "conch_v1" else [])
    assert info["cast_from"] == (["float16"] if RELEASES[name].fp16 else [])
    for k, v in want.items():
        assert torch.equal(own[k], v.float()), k

    what, other, refusal = WRONG[name]
    layout = vit_keys(other)
    wrong = tmp_path / "wrong" / other.file
    wrong.parent.mkdir()
    write_release(other, layout, wrong, seed=2)
    before = {k: v.clone() for k, v in own.items()}
    head = rf"^{re.escape(str(wrong))}: does not match the tile encoder {name} at depth 1 \("
    with pytest.raises(CheckpointError, match=head + ".*" + refusal):
        load_encoder_weights(enc, wrong)
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items()), f"{what}: a refused file loaded"


# -- every registered encoder: load, export, validate on real tissue ------------------
# CONCH (its own pooler around the timm trunk, at 448 px) in every run; the six timm-only towers differ from it and
# from each other only in widths, registers and pooling, which the layout test above loads: marked slow
@pytest.mark.parametrize("name", [n if n == "conch_v1" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(ENCODERS)])
def test_encoder_loads_exports_and_matches_pytorch_on_real_tiles(name, real_svs, tmp_path):
    import onnxruntime as ort

    from locpath.export.configs import tile_encoder_config
    from locpath.export.exporter import export_component, validate_component

    torch.set_num_threads(2)
    spec = encoder_spec(name)
    (tmp_path / "weights").mkdir()
    path, src = release_file(name, tmp_path / "weights")
    torch.manual_seed(1)  # a different random start: everything must come from the file
    enc = build_tile_encoder(encoder_config(name, depth=DEPTH), weights=path).eval()
    own = enc.state_dict()
    assert set(own) == set(src)
    for k, v in src.items():
        assert torch.equal(own[k], v.float()), k
    assert own[next(iter(own))].dtype == torch.float32

    ec = tile_encoder_config(enc)
    assert ec.inputs[0].shape == ("batch", spec.img_size, spec.img_size, 3)
    t0 = time.perf_counter()
    rep = export_component(ec, enc, tmp_path)
    export_s = time.perf_counter() - t0
    diff = validate_component(ec, enc, tmp_path / rep.file, rep)["features"]  # random uint8 tiles, atol 1e-4

    tiles = tissue_tiles(real_svs, spec.img_size, spec.target_mpp)
    assert tiles.shape == (N_TILES, spec.img_size, spec.img_size, 3)
    with torch.no_grad():
        ref = enc.forward_uint8(torch.from_numpy(tiles)).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(tmp_path / rep.file), opts, providers=["CPUExecutionProvider"])
    got = sess.run(["features"], {"tiles": tiles})[0]
    assert got.shape == ref.shape == (N_TILES, spec.out_dim)
    cos = cosines(got, ref)
    print(f"\n{name}: width {spec.out_dim}, depth {DEPTH}, {spec.img_size} px at {spec.target_mpp} um/px, export "
          f"{export_s:.1f} s, random-tile max abs diff {diff:.2e}, real-tile cosine min {cos.min():.7f} "
          f"(1 - min {1 - cos.min():.1e}), max abs diff {np.abs(got - ref).max():.2e}")
    assert cos.min() >= 0.9999
    assert np.isfinite(got).all() and float(np.std(ref, axis=0).mean()) > 0  # tiles give distinct features


def test_ort_dynamic_int8_recipe_applies_to_a_registered_encoder(real_svs, tmp_path):
    """The bundle's tile-encoder recipe `int8-dynamic` (engines.quantize_ort) on UNI at real width: it quantizes,
    runs, and stays close to fp32 on real tiles (random weights: a sanity bound, not an accuracy claim)."""
    import onnxruntime as ort

    from locpath.engines.quantize_ort import encoder_int8_dynamic
    from locpath.export.configs import tile_encoder_config
    from locpath.export.exporter import export_component

    torch.set_num_threads(2)
    path, _ = release_file("uni_v1", tmp_path)
    enc = build_tile_encoder(encoder_config("uni_v1", depth=DEPTH), weights=path).eval()
    rep = export_component(tile_encoder_config(enc), enc, tmp_path)
    fp32, int8 = tmp_path / rep.file, tmp_path / "tile_encoder.int8-dynamic.onnx"
    info = encoder_int8_dynamic(fp32, int8)
    assert info["method"] == "dynamic" and int8.stat().st_size < 0.4 * fp32.stat().st_size
    tiles = tissue_tiles(real_svs, 224, 0.5)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    run = {p.name: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]).run(
        ["features"], {"tiles": tiles})[0] for p in (fp32, int8)}
    cos = cosines(run[int8.name], run[fp32.name])
    print(f"\nuni_v1 depth {DEPTH} ORT dynamic INT8 vs fp32 on real tiles: cosine min {cos.min():.5f}, "
          f"mean {cos.mean():.5f}")
    assert cos.min() > 0.95


# -- the loader's refusals ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conch_release(tmp_path_factory):
    d = tmp_path_factory.mktemp("conch")
    path, _ = release_file("conch_v1", d)
    return path, torch.load(path, weights_only=True)


def test_loader_takes_the_vision_feature_and_ignores_only_the_known_groups(conch_release, tmp_path):
    path, layout = conch_release
    enc = build_tile_encoder(encoder_config("conch_v1", depth=DEPTH))
    info = load_encoder_weights(enc, path)
    assert sorted(info["ignored"]) == sorted(conch_extras(torch.Generator()))
    assert info["loaded"] == len(enc.state_dict()) and info["cast_from"] == []
    # the same file nested under 'state_dict' with DDP's prefix loads too
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in layout.items()}}, wrapped)
    assert load_encoder_weights(enc, wrapped)["loaded"] == info["loaded"]
    # a timm-only checkpoint saved from a wrapper with a `trunk.` prefix loads into a timm encoder
    uni = build_tile_encoder(TileEncoderConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    trunk = tmp_path / "trunk.safetensors"
    from safetensors.torch import save_file

    save_file({f"trunk.{k}": v.contiguous() for k, v in uni.state_dict().items()}, str(trunk))
    assert load_encoder_weights(uni, trunk)["loaded"] == len(uni.state_dict())


@pytest.mark.parametrize("case", ["unknown", "misshaped", "deeper"])
def test_loader_refuses_strays_and_wrong_shapes_naming_file_and_keys(conch_release, tmp_path, case):
    path, layout = conch_release
    bad = dict(layout)
    if case == "unknown":  # beside the known unused groups, anything else unmatched is refused
        bad["visual.attn_pool_contrast.extra_scale"] = torch.ones(512)
        want = r"unexpected \['attn_pool_contrast.extra_scale'\]"
    elif case == "misshaped":  # CONCH at 224 px instead of 448
        bad["visual.trunk.pos_embed"] = torch.zeros(1, 197, 768)
        want = r"shape mismatch \['trunk.pos_embed: file \(1, 197, 768\) vs model \(1, 785, 768\)'\]"
    else:  # a full-depth checkpoint is not a depth-1 model
        bad["visual.trunk.blocks.1.norm1.weight"] = torch.ones(768)
        want = r"unexpected \['trunk.blocks.1.norm1.weight'\]"
    p = tmp_path / f"{case}.bin"
    torch.save(bad, p)
    enc = build_tile_encoder(encoder_config("conch_v1", depth=DEPTH))
    with pytest.raises(CheckpointError, match=rf"{case}\.bin: does not match the tile encoder conch_v1.*{want}"):
        load_encoder_weights(enc, p)


def test_loader_never_unpickles_objects(tmp_path):
    enc = build_tile_encoder(TileEncoderConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    p = tmp_path / "pytorch_model.bin"
    torch.save({"cls_token": torch.zeros(1, 1, 32), "evil": NotWeights()}, p)
    refused = r"pytorch_model\.bin: cannot read .*weights-only torch file \(Unsupported global: GLOBAL \S*NotWeights"
    with pytest.raises(CheckpointError, match=refused):
        load_encoder_weights(enc, p)
    with pytest.raises(CheckpointError, match="nope.pth: tile encoder checkpoint not found"):
        load_encoder_weights(enc, tmp_path / "nope.pth")


def test_bundle_preprocessing_carries_the_encoder_geometry(tmp_path, tokenizer, monkeypatch):
    """A slide model on CONCH v1 exports a bundle whose preprocessing tiles at CONCH's 448 px and 0.5 um/px with
    OpenAI CLIP's mean/std, and whose model config names the encoder as TRIDENT does (the other components are left
    out here: test_export covers them)."""
    import json

    from locpath.export import bundle as eb
    from locpath.export.configs import tile_encoder_config
    from locpath.models.checkpoint import load_checkpoint, save_checkpoint
    from locpath.models.slide_llm import build_model

    torch.set_num_threads(2)
    cfg = preset("tiny")
    cfg.tile_encoder = encoder_config("conch_v1", depth=DEPTH)
    ck = save_checkpoint(build_model(cfg), tokenizer, tmp_path / "ck")
    model, _ = load_checkpoint(ck)  # strict keys: tile_encoder.trunk.*, tile_encoder.attn_pool_contrast.*, ...
    assert isinstance(model.tile_encoder, ConchVisionTower)
    monkeypatch.setattr(eb, "export_configs", lambda m: [tile_encoder_config(m)])
    monkeypatch.setattr(eb, "export_fused_decoder", lambda *a, **k: None)
    out, _ = eb.export_bundle(ck, tmp_path / "bundle", log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    pp = manifest["preprocessing"]
    assert (pp["tile_size"], pp["target_mpp"], pp["normalisation_in_graph"]) == (448, 0.5, True)
    assert tuple(pp["mean"]) == encoder_spec("conch_v1").mean and tuple(pp["std"]) == encoder_spec("conch_v1").std
    te = manifest["model"]["tile_encoder"]
    assert (te["name"], te["family"], te["out_dim"]) == ("conch_v1", "conch_v1", 512)
    assert manifest["components"]["tile_encoder"]["inputs"][0]["shape"] == ["batch", 448, 448, 3]
