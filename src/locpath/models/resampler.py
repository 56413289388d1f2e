"""Perceiver resampler: L learned latents cross-attend to the N' merged tile tokens; and its MAE head.

Tokens carry their grid position (2-D sinusoidal) and log member count (from STM). The MAE head
reconstructs masked tile features from the latents, querying with the masked tiles' positions, which
pretrains the latents to summarise the whole slide before any question is seen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ResamplerConfig
from .layers import FeedForward, MultiHeadAttention, merge_heads, sincos_2d, split_heads


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


class ResamplerChunks(nn.Module):
    """The resampler's arithmetic split so its tokens can be read a chunk at a time (flash attention's online
    softmax), for the three graphs the runtime chains when a slide has many STM tokens: memory then grows with the
    chunk, not with N. `block` (int64, one element) picks a block's weights from the stacked blocks, so one graph
    serves every block.

    - `partial`: a chunk's share of block `block`'s cross-attention: per head and latent the chunk's max logit `m`,
      its sum of exp(logit - m) `s`, its own attention output `o` (values weighted by exp(logit - m) / s) and
      those weights `p` = exp(logit - m) per token; the chunks are merged outside (numpy) as flash attention
      does, each weighted by s exp(m - max m), and the evidence map is p exp(m - max m) / (merged s).
    - `weights`: given the whole slide's (m, s) as `m_ref`, `s_ref`, the chunk's part of the attention map
      (softmax probabilities, mean over heads): a second pass, for slides whose `p` would not fit in memory.
    - `finish`: the rest of the block from the merged attention output (`o / s`): output projection, residual,
      self-attention, MLP; the final norm (what the last block's caller keeps); and the learned latents block 0
      starts from (a constant output, so the runtime needs no other file)."""

    def __init__(self, r: Resampler):
        super().__init__()
        self.r = r

    def _pick(self, block, get):
        return torch.stack([get(b) for b in self.r.blocks])[block].squeeze(0)

    def _norm(self, x, block, get):
        mod = get(self.r.blocks[0])
        return F.layer_norm(x, mod.normalized_shape, self._pick(block, lambda b: get(b).weight),
                            self._pick(block, lambda b: get(b).bias), mod.eps)

    def _linear(self, x, block, get):
        return F.linear(x, self._pick(block, lambda b: get(b).weight), self._pick(block, lambda b: get(b).bias))

    def _logits(self, latents, block, tokens, positions, counts, token_mask):
        """Block `block`'s cross-attention logits (B, H, L, C) over a chunk, masked tokens at -inf; and the chunk's
        normed tokens (what the values are projected from)."""
        heads = self.r.cfg.num_heads
        tok = self.r.embed_tokens(tokens, positions, counts)
        q = split_heads(self._linear(self._norm(latents, block, lambda b: b.norm_lat), block, lambda b: b.cross.q), heads)
        kv = self._norm(tok, block, lambda b: b.norm_tok)
        k = split_heads(self._linear(kv, block, lambda b: b.cross.k), heads)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return logits.masked_fill(~token_mask[:, None, None, :], float("-inf")), kv

    def partial(self, latents, block, tokens, positions, counts, token_mask):
        logits, kv = self._logits(latents, block, tokens, positions, counts, token_mask)
        v = split_heads(self._linear(kv, block, lambda b: b.cross.v), self.r.cfg.num_heads)
        m = logits.amax(-1)
        m = torch.where(torch.isfinite(m), m, torch.full_like(m, -1e30))  # a chunk of masked tokens adds nothing
        p = torch.exp(logits - m.unsqueeze(-1))
        s = p.sum(-1)
        # s >= 1 (the max contributes exp(0)) unless all masked; p: what the runtime scales by the slide's final
        # (m, s) for the evidence map, so no second pass over the tokens is needed where p fits in memory
        return m, s, (p @ v) / s.clamp_min(1.0).unsqueeze(-1), p

    def weights(self, latents, block, tokens, positions, counts, token_mask, m_ref, s_ref):
        logits, _ = self._logits(latents, block, tokens, positions, counts, token_mask)
        return (torch.exp(logits - m_ref.unsqueeze(-1)) / s_ref.unsqueeze(-1)).mean(1)

    def finish(self, latents, block, attended):
        heads = self.r.cfg.num_heads
        lat = latents + self._linear(merge_heads(attended), block, lambda b: b.cross.o)
        h = self._norm(lat, block, lambda b: b.norm_self)
        q = split_heads(self._linear(h, block, lambda b: b.self_attn.q), heads)
        k = split_heads(self._linear(h, block, lambda b: b.self_attn.k), heads)
        v = split_heads(self._linear(h, block, lambda b: b.self_attn.v), heads)
        lat = lat + self._linear(merge_heads(F.scaled_dot_product_attention(q, k, v)), block, lambda b: b.self_attn.o)
        h = self._norm(lat, block, lambda b: b.norm_ff)
        lat = lat + self._linear(F.gelu(self._linear(h, block, lambda b: b.ff.fc1)), block, lambda b: b.ff.fc2)
        return lat, self.r.norm(lat), self.r.latents.detach().unsqueeze(0).expand(latents.shape[0], -1, -1)


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
