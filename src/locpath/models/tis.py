"""TIS, the Token Importance Scorer: scores each latent against the question and keeps the top M.

Design: the question is embedded with the scorer's own small embedding table (so the scorer runs before
and apart from the LLM), mean-pooled over its tokens and projected; score_i = <W_l z_i, W_q q> / sqrt(d).
Top-M selection happens outside the graph (in torch here, in numpy in the runtime); the kept latents are
scaled by sigmoid(score), which is how the scorer receives gradient through the hard selection.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TISConfig


class TokenImportanceScorer(nn.Module):
    def __init__(self, cfg: TISConfig, latent_dim: int, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.question_dim)
        self.q_proj = nn.Linear(cfg.question_dim, latent_dim)
        self.l_proj = nn.Linear(latent_dim, latent_dim)
        self.scale = 1.0 / math.sqrt(latent_dim)

    def forward(self, latents: torch.Tensor, q_ids: torch.Tensor, q_mask: torch.Tensor) -> torch.Tensor:
        """latents (B, L, D), question ids/mask (B, T) -> scores (B, L)."""
        e = self.embed(q_ids)
        m = q_mask.unsqueeze(-1).to(e.dtype)
        q = (e * m).sum(1) / m.sum(1).clamp_min(1.0)
        return torch.einsum("bld,bd->bl", self.l_proj(latents), self.q_proj(q)) * self.scale


def select_top_m(latents: torch.Tensor, scores: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the M highest-scoring latents (in latent order), scaled by sigmoid(score)."""
    idx = torch.topk(scores, m, dim=1).indices.sort(dim=1).values
    sel = torch.gather(latents, 1, idx.unsqueeze(-1).expand(-1, -1, latents.shape[-1]))
    w = torch.sigmoid(torch.gather(scores, 1, idx)).unsqueeze(-1)
    return sel * w, idx
