"""Attention building blocks shared by the resampler, MAE head and CARA. Written with plain Linear
layers and scaled_dot_product_attention so every piece exports to ONNX without custom ops."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, hd = x.shape
    return x.transpose(1, 2).reshape(b, n, h * hd)


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)

    def weights(self, x, ctx, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention probabilities forward() uses, averaged over heads: (B, Nq, Nk)."""
        q, k = split_heads(self.q(x), self.heads), split_heads(self.k(ctx), self.heads)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return logits.softmax(-1).mean(1)

    def forward(self, x, ctx, key_mask: torch.Tensor | None = None):
        """x (B, Nq, D) attends to ctx (B, Nk, Dk); key_mask (B, Nk) True where valid."""
        q, k, v = split_heads(self.q(x), self.heads), split_heads(self.k(ctx), self.heads), split_heads(self.v(ctx), self.heads)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return self.o(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mult))
        self.fc2 = nn.Linear(int(dim * mult), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def sincos_2d(pos: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """2-D sinusoidal embedding of (x, y) grid positions (B, N, 2) -> (B, N, dim); dim divisible by 4."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(max_period) * torch.arange(quarter, device=pos.device, dtype=torch.float32) / quarter)
    x = pos[..., 0:1].float() * freqs
    y = pos[..., 1:2].float() * freqs
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)
