"""A ViT tile encoder whose parameter names and shapes match timm's VisionTransformer.

So a UNI/CONCH-style checkpoint saved from timm loads with `load_timm_checkpoint` without timm installed.
Normalisation can run inside the model (`forward_uint8`) so exported graphs take raw uint8 NHWC tiles.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TileEncoderConfig
from ..errors import CheckpointError


class PatchEmbed(nn.Module):
    def __init__(self, cfg: TileEncoderConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: TileEncoderConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d, cfg.layer_scale_init) if cfg.layer_scale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ls2 = LayerScale(d, cfg.layer_scale_init) if cfg.layer_scale_init else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: TileEncoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.embed_dim
        n_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + int(cfg.class_token), d) * 0.02)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        use_fc_norm = cfg.global_pool == "avg"  # timm's rule: avg pooling normalises after pooling
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(d, eps=1e-6)
        self.fc_norm = nn.LayerNorm(d, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(d, cfg.out_dim) if cfg.has_head else nn.Identity()
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0, persistent=False)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float NCHW images -> (B, out_dim) features."""
        x = self.forward_tokens(x)
        if self.cfg.global_pool == "avg":
            x = x[:, int(self.cfg.class_token):].mean(dim=1)
        else:
            x = x[:, 0]
        return self.head(self.fc_norm(x))

    def forward_uint8(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC tiles, as the tile reader yields them -> features. Normalisation inside the graph. The cast
        comes first: TensorRT's ONNX parser takes UINT8 only as a network input, not through a Transpose."""
        x = tiles.to(self.pos_embed.dtype).permute(0, 3, 1, 2)
        return self.forward((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def load_timm_checkpoint(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Load a timm-layout state dict (.safetensors, .bin or .pth; optionally nested under 'state_dict'/'model')."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: tile encoder checkpoint not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{p}: cannot read tile encoder weights ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    sd = {k.removeprefix("module.").removeprefix("trunk."): v for k, v in sd.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape_bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shape_bad:
            parts.append(f"shape mismatch {shape_bad[:3]}")
        raise CheckpointError(f"{p}: does not match the tile encoder config ({'; '.join(parts)})")
    model.load_state_dict(sd)
