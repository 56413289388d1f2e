"""Tile encoders built with timm's own model definitions, from a TileEncoderConfig; local weight files only.

- family "vit": timm's VisionTransformer from the config's sizes (the tiny reference). State-dict keys are timm's:
  patch_embed.proj, cls_token, pos_embed, blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2,
  ls2.gamma}, norm, fc_norm (average pooling), head (out_dim != embed_dim).
- a registered family (`locpath.encoders`, TRIDENT's names): `timm.create_model(spec.timm_model, pretrained=False,
  **spec.timm_kwargs)` with the layer classes the registry names as strings resolved here, and the config's depth
  (the real one, or fewer blocks for tests). Pooling as the encoder defines it: "token" (timm's own head),
  "cls+mean" (Virchow: CLS next to the mean of the patch tokens) or "conch" (CONCH v1's vision tower: the timm
  trunk's tokens into its attentional pooler with one query, then LayerNorm; `encode_image(proj_contrast=False,
  normalize=False)`).

timm models come out of `create_model` as timm's `VisionTransformer`; `build_tile_encoder` then sets their class to
`TimmTileEncoder`, a subclass that only adds the pooling and the uint8 entry, so every parameter, buffer and
state-dict key stays timm's. Tiles are always the encoder's own size, so timm's `dynamic_img_size` is turned off
(at the native size it resamples nothing; under export it would put a same-size bicubic resample in the graph).

Weights: `load_encoder_weights` reads .safetensors, or .bin/.pth through `torch.load(weights_only=True)` (never a
general pickle), unwraps 'state_dict'/'model', strips 'module.', the registry's key prefixes (CONCH: 'visual.') and
'trunk.' (timm-only checkpoints of a timm model), drops exactly the registry's known unused groups (CONCH's caption
pooler, contrastive projection and text towers), casts fp16/bf16 to the model's dtype and refuses anything else
that does not match, naming the file and the keys.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..config import ModelConfig, TileEncoderConfig
from ..encoders import EncoderSpec, check_tile_encoder, tile_encoder_fields
from ..errors import CheckpointError, ConfigError

VIT_BASE_MODEL = "vit_base_patch16_224"  # family "vit": timm's plain ViT with every size taken from the config


def encoder_config(name: str, depth: int | None = None) -> TileEncoderConfig:
    """The TileEncoderConfig of a registered encoder (any spelling of its name): its real sizes, tile size and
    normalisation, TRIDENT's name; `depth` below the real one for a shallower model of the real width (tests)."""
    return TileEncoderConfig(**tile_encoder_fields(name, depth))


def tile_target_mpp(cfg: ModelConfig) -> float:
    """The resolution tiles are read at for this model: a registered encoder's own (the ModelConfig's target_mpp
    must agree, or ConfigError), else ModelConfig.target_mpp."""
    spec = check_tile_encoder(cfg.tile_encoder)
    if spec is None:
        return cfg.target_mpp
    if abs(cfg.target_mpp - spec.target_mpp) > 1e-9:
        raise ConfigError(f"target_mpp {cfg.target_mpp} differs from {spec.name}'s {spec.target_mpp} um/px, the "
                          "resolution it was trained at")
    return spec.target_mpp


def _layer(value):
    if not isinstance(value, str):
        return value
    import timm.layers

    if hasattr(timm.layers, value):
        return getattr(timm.layers, value)
    if hasattr(nn, value):
        return getattr(nn, value)
    raise ConfigError(f"tile encoder: unknown layer class {value!r} (neither in timm.layers nor in torch.nn)")


def timm_arguments(cfg: TileEncoderConfig) -> tuple[str, dict, EncoderSpec | None]:
    """(timm model name, create_model keyword arguments, registry entry or None) for a config."""
    spec = check_tile_encoder(cfg)
    if spec is None:
        kwargs = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                      num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, class_token=cfg.class_token,
                      global_pool=cfg.global_pool, init_values=cfg.layer_scale_init,
                      num_classes=cfg.out_dim if cfg.has_head else 0)
        return VIT_BASE_MODEL, kwargs, None
    kwargs = {k: _layer(v) if k.endswith("_layer") else v for k, v in spec.timm_kwargs.items()}
    kwargs["depth"] = cfg.depth
    return spec.timm_model, kwargs, spec


def _create(name: str, kwargs: dict) -> VisionTransformer:
    import timm

    kwargs = dict(kwargs, dynamic_img_size=False)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if type(model) is not VisionTransformer:
        raise ConfigError(f"tile encoder: timm built {type(model).__name__} for {name!r}, not a VisionTransformer")
    return model


def _pixel_buffers(module: nn.Module, cfg: TileEncoderConfig) -> None:
    module.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
    module.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0, persistent=False)


class _Uint8Entry:
    """forward_uint8 for a module with `mean`/`std` buffers (x255) and a `_dtype()`."""

    def forward_uint8(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC tiles, as the tile reader yields them -> features. Normalisation inside the graph. The cast
        comes first: TensorRT's ONNX parser takes UINT8 only as a network input, not through a Transpose."""
        x = tiles.to(self._dtype()).permute(0, 3, 1, 2)
        return self.forward((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


class TimmTileEncoder(_Uint8Entry, VisionTransformer):
    """timm's VisionTransformer as `timm.create_model` built it, plus the tile pooling and the uint8 entry.

    Made only by `build_tile_encoder` (which sets an instance's class to this one): no parameter of timm's model
    changes, so its checkpoints load as timm saves them.
    """

    pooling: str = "token"

    def _dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float NCHW images -> (B, out_dim) features."""
        if self.pooling == "cls+mean":
            t = self.forward_features(x)
            return torch.cat([t[:, 0], t[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)
        return super().forward(x)  # timm's own pooling, fc_norm and head


class ConchAttentionalPooler(nn.Module):
    """CONCH v1's `attn_pool_contrast`: learned queries attend over the LayerNormed tokens. The attention is
    `nn.MultiheadAttention` with kdim/vdim = the trunk width, sequence-first as in the released model, so the
    checkpoint's q_proj_weight / k_proj_weight / v_proj_weight / in_proj_bias / out_proj keys load unchanged."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, context_dim) tokens -> (B, queries, dim)."""
        kv = self.ln_k(tokens).transpose(0, 1)  # (N, B, C)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, kv.shape[1], -1)  # (queries, B, dim)
        return self.attn(q, kv, kv, need_weights=False)[0].transpose(0, 1)


class ConchVisionTower(_Uint8Entry, nn.Module):
    """CONCH v1's image feature: timm trunk tokens (after its final norm) -> attentional pooler -> ln_contrast.
    Keys as the released checkpoint's `visual.*` (trunk.*, attn_pool_contrast.*, ln_contrast.*)."""

    def __init__(self, trunk: VisionTransformer, cfg: TileEncoderConfig, heads: int):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = ConchAttentionalPooler(cfg.out_dim, trunk.embed_dim, heads, queries=1)
        self.ln_contrast = nn.LayerNorm(cfg.out_dim)

    def _dtype(self) -> torch.dtype:
        return self.trunk.patch_embed.proj.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float NCHW images -> (B, out_dim) features."""
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


def _check_built(model: VisionTransformer, cfg: TileEncoderConfig, spec: EncoderSpec | None, name: str) -> None:
    got = {"embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads
           if len(model.blocks) else cfg.num_heads, "patch_size": model.patch_embed.patch_size[0],
           "img_size": model.patch_embed.img_size[0]}
    if spec is not None:
        got["num_prefix_tokens"] = model.num_prefix_tokens
    want = {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "patch_size": cfg.patch_size,
            "img_size": cfg.img_size}
    if spec is not None:
        want["num_prefix_tokens"] = spec.num_prefix_tokens
    bad = [f"{k} {got[k]} (config/registry: {want[k]})" for k in want if got[k] != want[k]]
    if bad:
        raise ConfigError(f"tile encoder {cfg.name}: timm's {name!r} is not what the registry says: {'; '.join(bad)}")


def build_tile_encoder(cfg: TileEncoderConfig, weights: str | os.PathLike | None = None) -> nn.Module:
    """The tile encoder module for a config (random weights, or `weights` loaded with `load_encoder_weights`).

    Every module has `forward(normalised float NCHW) -> (B, out_dim)`, `forward_uint8(uint8 NHWC)` and `cfg`.
    """
    cfg.validate()
    name, kwargs, spec = timm_arguments(cfg)
    trunk = _create(name, kwargs)
    _check_built(trunk, cfg, spec, name)
    pooling = spec.pooling if spec is not None else "token"
    if pooling == "conch":
        model: nn.Module = ConchVisionTower(trunk, cfg, heads=int(spec.extra.get("pooler_heads", 8)))
    elif pooling in ("token", "cls+mean"):
        trunk.__class__ = TimmTileEncoder
        trunk.pooling = pooling
        model = trunk
        width = trunk.embed_dim * (2 if pooling == "cls+mean" else 1) if trunk.num_classes == 0 else trunk.num_classes
        if width != cfg.out_dim:
            raise ConfigError(f"tile encoder {cfg.name}: {pooling!r} pooling gives {width} features, config out_dim "
                              f"{cfg.out_dim}")
    else:
        raise ConfigError(f"tile encoder {cfg.name}: unknown pooling {pooling!r}")
    model.cfg = cfg
    _pixel_buffers(model, cfg)
    if weights is not None:
        load_encoder_weights(model, weights)
    return model


# -- weights ------------------------------------------------------------------------
def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from .safetensors or a weights-only torch file (.bin/.pth), unwrapped from
    'state_dict'/'model'. Anything torch.load(weights_only=True) refuses (a pickle of other objects) is an error."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: tile encoder checkpoint not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{p}: cannot read tile encoder weights as safetensors or a weights-only torch file "
                              f"({_load_error(exc)}); other pickled objects are never loaded") from exc
    while isinstance(sd, dict):
        inner = next((sd[k] for k in ("state_dict", "model") if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict):
        raise CheckpointError(f"{p}: not a state dict (a {type(sd).__name__})")
    odd = sorted(str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if odd:
        raise CheckpointError(f"{p}: entries that are not named tensors: {odd[:5]}{'...' if len(odd) > 5 else ''}")
    return sd


def _load_error(exc: Exception) -> str:
    """The reason in one line: for a refused pickle, the global it holds (not torch's advice to drop weights_only)."""
    text = str(exc).strip()
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0][:300]
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _listed(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}... ({len(keys)} in all)" if len(keys) > n else f"{keys}"


def load_encoder_weights(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a local checkpoint into a module from `build_tile_encoder`, strictly. Returns what was done:
    {"file", "loaded" (tensors), "ignored" (the file's keys in the registry's known unused groups), "cast_from"
    (dtypes cast to the model's)}."""
    p = Path(path)
    cfg: TileEncoderConfig = model.cfg
    spec = check_tile_encoder(cfg)
    raw = read_weights(p)
    has_trunk = isinstance(getattr(model, "trunk", None), nn.Module)
    sd: dict[str, torch.Tensor] = {}
    ignored, dup = [], []
    for key, v in raw.items():
        k = key.removeprefix("module.")
        if spec is not None and any(k == g or k.startswith(g + ".") for g in spec.unused_keys):
            ignored.append(key)
            continue
        for pre in spec.key_prefixes if spec is not None else ():
            if k.startswith(pre):
                k = k[len(pre):]
                break
        if not has_trunk:
            k = k.removeprefix("trunk.")
        if k in sd:
            dup.append(key)
        sd[k] = v
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape_bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape_bad or dup:
        parts = []
        if missing:
            parts.append(f"missing {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listed(unexpected)}")
        if shape_bad:
            parts.append(f"shape mismatch {_listed(shape_bad, 3)}")
        if dup:
            parts.append(f"keys that name the same tensor once prefixes are stripped {_listed(dup)}")
        what = f"{cfg.family} at depth {cfg.depth}" if spec is not None else f"'vit' ({cfg.name})"
        raise CheckpointError(f"{p}: does not match the tile encoder {what} ({'; '.join(parts)})")
    cast = set()
    for k, v in sd.items():
        if v.dtype != own[k].dtype:
            if not (v.is_floating_point() and own[k].is_floating_point()):
                raise CheckpointError(f"{p}: {k} is {v.dtype}, the model holds {own[k].dtype}")
            cast.add(str(v.dtype).removeprefix("torch."))
            sd[k] = v.to(own[k].dtype)
    model.load_state_dict(sd, strict=True)
    return {"file": str(p), "loaded": len(sd), "ignored": ignored, "cast_from": sorted(cast)}


def random_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in a model's own layout for tests and benches (nothing is downloaded). timm's init leaves
    LayerNorms at 1/0, layer scale at 1e-5 and CLS/registers near 0, which would hide the blocks from a check:
    every tensor is drawn instead, matrices fan-in scaled."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        r = torch.randn(v.shape, generator=g)
        if k.endswith("gamma"):
            out[k] = 0.5 + 0.5 * r.abs()
        elif v.ndim == 1 and k.endswith("weight"):  # norms
            out[k] = 1.0 + 0.1 * r
        elif k.endswith("bias"):
            out[k] = 0.02 * r
        elif k.endswith(("cls_token", "reg_token", "pos_embed", "query")):
            out[k] = 0.5 * r
        else:  # matrices and the patch projection
            out[k] = r / math.sqrt(max(1, v[0].numel()))
    return out
