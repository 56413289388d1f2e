"""Perceiver resampler: L learned latents cross-attend to the N' merged tile tokens; and its MAE head.

Tokens carry their grid position (2-D sinusoidal) and log member count (from STM). The MAE head
reconstructs masked tile features from the latents, querying with the masked tiles' positions, which
pretrains the latents to summarise the whole slide before any question is seen.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ResamplerConfig
from .layers import FeedForward, MultiHeadAttention, sincos_2d


class ResamplerBlock(nn.Module):
    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        d = cfg.dim
        self.norm_lat = nn.LayerNorm(d)
        self.norm_tok = nn.LayerNorm(d)
        self.cross = MultiHeadAttention(d, cfg.num_heads)
        self.norm_self = nn.LayerNorm(d)
        self.self_attn = MultiHeadAttention(d, cfg.num_heads)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = FeedForward(d, cfg.mlp_ratio)

    def forward(self, lat, tok, mask, attention: list | None = None):
        q, kv = self.norm_lat(lat), self.norm_tok(tok)
        if attention is not None:  # which tokens each latent read: the evidence trail back to tiles
            attention.append(self.cross.weights(q, kv, mask))
        lat = lat + self.cross(q, kv, mask)
        h = self.norm_self(lat)
        lat = lat + self.self_attn(h, h)
        return lat + self.ff(self.norm_ff(lat))


class Resampler(nn.Module):
    def __init__(self, cfg: ResamplerConfig, feature_dim: int):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(feature_dim, cfg.dim)
        self.count_proj = nn.Linear(1, cfg.dim)
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList([ResamplerBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)

    def embed_tokens(self, feats, pos, counts):
        pe = sincos_2d(pos, self.cfg.dim).to(feats.dtype)  # positions stay float32 until here
        return self.in_proj(feats) + pe + self.count_proj(torch.log(counts.clamp_min(1.0)).unsqueeze(-1))

    def forward(self, feats: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor | None = None,
                with_attention: bool = False):
        """feats (B, N, F), pos (B, N, 2) grid units, counts (B, N), mask (B, N) True=valid -> (B, L, dim); with
        `with_attention` also the cross-attention of every latent over the tokens, averaged over heads and
        blocks (B, L, N)."""
        tok = self.embed_tokens(feats, pos, counts)
        lat = self.latents.unsqueeze(0).expand(feats.shape[0], -1, -1)
        maps: list | None = [] if with_attention else None
        for blk in self.blocks:
            lat = blk(lat, tok, mask, maps)
        lat = self.norm(lat)
        return (lat, torch.stack(maps).mean(0)) if with_attention else lat


class MAEHead(nn.Module):
    """Reconstruct masked tile features from the latents (pretraining only; not exported)."""

    def __init__(self, cfg: ResamplerConfig, feature_dim: int):
        super().__init__()
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(cfg.dim))
        self.blocks = nn.ModuleList([MultiHeadAttention(cfg.dim, cfg.num_heads) for _ in range(cfg.mae_decoder_depth)])
        self.norms = nn.ModuleList([nn.LayerNorm(cfg.dim) for _ in range(cfg.mae_decoder_depth)])
        self.ff = FeedForward(cfg.dim, 2.0)
        self.out = nn.Linear(cfg.dim, feature_dim)

    def forward(self, latents, pos):
        q = self.mask_token + sincos_2d(pos, self.cfg.dim).to(latents.dtype)
        for norm, attn in zip(self.norms, self.blocks):
            q = q + attn(norm(q), latents)
        return self.out(q + self.ff(q))
