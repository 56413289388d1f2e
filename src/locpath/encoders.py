"""The registry of tile encoders locpath deploys, under TRIDENT's names, torch-free.

What each entry holds is what the rest of locpath needs without building the model: the feature width, the tile
geometry the runtime reads (tile px at the model's input, mpp), the normalisation the graph bakes in, and how timm
builds it (model name plus keyword arguments, with layer classes named as strings so the entry stays plain data).
`models/encoders.py` turns an entry into a PyTorch module; the runtime and the feature readers only resolve names.

Sources: each model's card and public configuration (UNI, UNI2-h, Virchow2, H-optimus-0/1, Prov-GigaPath: timm
`model_args`; CONCH v1: MahmoodLab's `conch_ViT-B-16.json` and `coca_model.py`). CONCH normalises with OpenAI CLIP's
mean/std (its factory overwrites the tower's mean/std with them), not ImageNet's.
Tile geometry: every encoder here was trained on 20x tissue; tiles are read at 0.5 um/px at the model's input
size, so no resize runs between slide and graph (TRIDENT reads CONCH at 512 px and resizes to 448: a 256 um field;
locpath reads 448 px at 0.5 um/px, a 224 um field; features-in keeps whatever geometry the h5 records).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class EncoderSpec:
    """One registered tile encoder.

    pooling: "token" (the CLS token after the final norm, timm's default), "cls+mean" (Virchow: CLS concatenated
    with the mean of the patch tokens, registers excluded) or "conch" (CONCH v1's attentional pooler with one query
    and its LayerNorm: `encode_image(proj_contrast=False, normalize=False)`).
    """

    name: str  # TRIDENT's name, what feature files carry
    aliases: tuple[str, ...]
    timm_model: str
    timm_kwargs: dict
    embed_dim: int
    depth: int
    num_heads: int
    out_dim: int
    img_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str = "token"
    num_prefix_tokens: int = 1  # CLS + registers: what "cls+mean" skips
    target_mpp: float = 0.5
    key_prefixes: tuple[str, ...] = ()  # stripped from checkpoint keys (open_clip, DDP, Lightning wrappers)
    # key groups of the released checkpoint that the tile feature does not use (matched before key_prefixes are
    # stripped: a key equal to a group or under "group."); the loader drops exactly these and refuses other strays
    unused_keys: tuple[str, ...] = ()
    card: str = ""
    extra: dict = field(default_factory=dict)


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

_HOPTIMUS0 = EncoderSpec(
    "hoptimus0", ("h-optimus-0", "H-optimus-0", "hoptimus-0", "bioptimus/H-optimus-0"), "vit_giant_patch14_reg4_dinov2",
    {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token", "dynamic_img_size": False},
    embed_dim=1536, depth=40, num_heads=24, out_dim=1536, img_size=224, patch_size=14,
    mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, num_prefix_tokens=5,
    card="bioptimus/H-optimus-0: ViT-g/14 DINOv2 layout, 4 registers, CLS token, 1536-d")

ENCODERS: dict[str, EncoderSpec] = {e.name: e for e in (
    EncoderSpec("conch_v1", ("conch", "conch-v1", "conchv1", "CONCH"), "vit_base_patch16_224",
                {"img_size": 448, "num_classes": 0, "global_pool": "", "dynamic_img_size": True},
                embed_dim=768, depth=12, num_heads=12, out_dim=512, img_size=448, patch_size=16,
                mean=OPENAI_MEAN, std=OPENAI_STD, pooling="conch", key_prefixes=("visual.",),
                unused_keys=("visual.proj_contrast", "visual.attn_pool_caption", "visual.ln_caption", "text",
                             "text_decoder", "logit_scale"),
                card="MahmoodLab/CONCH: ViT-B/16 at 448 px, attentional pooler (1 query, 8 heads) + LayerNorm, 512-d",
                extra={"pooler_heads": 8}),
    EncoderSpec("uni_v1", ("uni", "UNI", "uni-v1"), "vit_large_patch16_224",
                {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
                embed_dim=1024, depth=24, num_heads=16, out_dim=1024, img_size=224, patch_size=16,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, card="MahmoodLab/UNI: ViT-L/16, CLS token, 1024-d"),
    EncoderSpec("uni_v2", ("uni2", "uni2-h", "UNI2-h", "uni_2h"), "vit_giant_patch14_224",
                {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                 "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                 "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
                embed_dim=1536, depth=24, num_heads=24, out_dim=1536, img_size=224, patch_size=14,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, num_prefix_tokens=9,
                card="MahmoodLab/UNI2-h: ViT-H/14 SwiGLU, 8 registers, CLS token, 1536-d"),
    EncoderSpec("virchow2", ("virchow-2", "Virchow2", "paige-ai/Virchow2"), "vit_huge_patch14_224",
                {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "reg_tokens": 4,
                 "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
                embed_dim=1280, depth=32, num_heads=16, out_dim=2560, img_size=224, patch_size=14,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls+mean", num_prefix_tokens=5,
                card="paige-ai/Virchow2: ViT-H/14 SwiGLU, 4 registers, CLS + mean of patch tokens, 2560-d"),
    _HOPTIMUS0,
    # H-optimus-1: the same architecture and normalisation as H-optimus-0, other weights
    dataclasses.replace(_HOPTIMUS0, name="hoptimus1",
                        aliases=("h-optimus-1", "H-optimus-1", "hoptimus-1", "bioptimus/H-optimus-1"),
                        card="bioptimus/H-optimus-1: ViT-g/14 DINOv2 layout, 4 registers, CLS token, 1536-d"),
    EncoderSpec("gigapath", ("prov-gigapath", "Prov-GigaPath", "gigapath_tile", "prov_gigapath"),
                "vit_giant_patch14_dinov2",
                {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                 "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0},
                embed_dim=1536, depth=40, num_heads=24, out_dim=1536, img_size=224, patch_size=16,
                mean=IMAGENET_MEAN, std=IMAGENET_STD,
                card="prov-gigapath/prov-gigapath tile encoder: ViT-g DINOv2 layout at patch 16, CLS token, 1536-d"),
)}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {}
for _spec in ENCODERS.values():
    for _n in (_spec.name, *_spec.aliases):
        _BY_KEY[_key(_n)] = _spec.name


def canonical_encoder(name: str) -> str | None:
    """TRIDENT's name for a registered encoder given any of its spellings, or None if it is not registered."""
    return _BY_KEY.get(_key(str(name)))


def encoder_spec(name: str) -> EncoderSpec:
    canon = canonical_encoder(name)
    if canon is None:
        raise ConfigError(f"unknown tile encoder {name!r} (registered: {', '.join(sorted(ENCODERS))})")
    return ENCODERS[canon]


def same_encoder(a: str, b: str) -> bool:
    """Whether two encoder names denote the same encoder (aliases of one registered entry, or equal strings)."""
    ca, cb = canonical_encoder(a), canonical_encoder(b)
    if ca is not None or cb is not None:
        return ca == cb
    return a == b


# TileEncoderConfig fields a registered encoder fixes (the config must repeat them; depth may be smaller)
_FIXED = ("img_size", "patch_size", "embed_dim", "num_heads", "out_dim", "mean", "std")


def tile_encoder_fields(name: str, depth: int | None = None) -> dict:
    """TileEncoderConfig keyword arguments for a registered encoder (`TileEncoderConfig(**tile_encoder_fields(n))`);
    `depth` below the real one builds a shallower model of the real width (tests)."""
    spec = encoder_spec(name)
    fields = {k: getattr(spec, k) for k in _FIXED}
    fields.update(depth=spec.depth if depth is None else int(depth), name=spec.name, family=spec.name)
    return fields


def check_tile_encoder(cfg) -> EncoderSpec | None:
    """The registry entry a TileEncoderConfig names (None for family "vit"), after checking that the config repeats
    the entry's sizes, tile size and normalisation; one ConfigError naming every field that differs."""
    if cfg.family == "vit":
        return None
    spec = encoder_spec(cfg.family)
    bad = []
    for k in _FIXED:
        mine, theirs = getattr(cfg, k), getattr(spec, k)
        if isinstance(theirs, tuple):
            same = len(tuple(mine)) == len(theirs) and all(abs(float(a) - b) <= 1e-9 for a, b in zip(mine, theirs))
        else:
            same = mine == theirs
        if not same:
            bad.append(f"{k} {mine!r} (registry: {theirs!r})")
    if not 1 <= cfg.depth <= spec.depth:
        bad.append(f"depth {cfg.depth!r} (registry: 1..{spec.depth})")
    other = canonical_encoder(cfg.name)
    if other is not None and other != spec.name:
        bad.append(f"name {cfg.name!r} (another registered encoder; use {spec.name!r})")
    if bad:
        raise ConfigError(f"tile encoder {spec.name}: the config differs from the registry: {'; '.join(bad)}")
    return spec
