"""CARA, the Cross-Attention Routing Adapter: gated cross-attention blocks in a few LLM decoder layers.

Design (LoC-Path publishes no formula): before decoder layer i (for i in cfg.layers), the hidden state h
takes in the selected latents z through
    h <- h + tanh(a_i) * r(h) * CrossAttn(norm(h), K_i(z), V_i(z))
    h <- h + tanh(b_i) * FFN(norm'(h))
where r(h) = sigmoid(w.h + c) is a per-token router (how much visual evidence each token draws).
The LLM never sees a visual prefix; its own weights and state-dict names stay untouched: the adapter is
attached with forward pre-hooks, so a Hugging Face model folder still loads and saves as usual.
K_i(z), V_i(z) depend only on the question's latents: they are computed once per question (`cross_kv`)
and reused at every decoding step, which is what the exported cross-KV engine does.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CARAConfig
from .layers import FeedForward, RMSNorm, merge_heads, split_heads
from .llm import decoder_layers


class CARABlock(nn.Module):
    def __init__(self, hidden: int, latent_dim: int, heads: int, ffn_mult: float, gate_init: float):
        super().__init__()
        self.heads = heads
        self.norm = RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(latent_dim, hidden, bias=False)
        self.v_proj = nn.Linear(latent_dim, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.router = nn.Linear(hidden, 1)
        self.attn_gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.ffn_norm = RMSNorm(hidden)
        self.ffn = FeedForward(hidden, ffn_mult)
        self.ffn_gate = nn.Parameter(torch.tensor(float(gate_init)))

    def cross_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, Dl) -> K, V each (B, heads, M, head_dim)."""
        return split_heads(self.k_proj(latents), self.heads), split_heads(self.v_proj(latents), self.heads)

    def forward(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        q = split_heads(self.q_proj(x), self.heads)
        att = merge_heads(F.scaled_dot_product_attention(q, k, v))
        route = torch.sigmoid(self.router(x))
        h = h + torch.tanh(self.attn_gate) * route * self.o_proj(att)
        return h + torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(h))


class CARAAdapter(nn.Module):
    def __init__(self, cfg: CARAConfig, hidden: int, latent_dim: int):
        super().__init__()
        self.cfg = cfg
        self.layer_ids = tuple(int(i) for i in cfg.layers)
        self.blocks = nn.ModuleDict(
            {str(i): CARABlock(hidden, latent_dim, cfg.num_heads, cfg.ffn_mult, cfg.gate_init) for i in self.layer_ids}
        )
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._handles = []

    def cross_kv(self, latents: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {i: self.blocks[str(i)].cross_kv(latents) for i in self.layer_ids}

    def attach(self, llm) -> None:
        """Register pre-hooks on the chosen decoder layers (idempotent)."""
        self.detach()
        layers = decoder_layers(llm)
        bad = [i for i in self.layer_ids if not 0 <= i < len(layers)]
        if bad:
            raise ValueError(f"CARA layers {bad} outside the LLM's {len(layers)} layers")
        for i in self.layer_ids:
            self._handles.append(layers[i].register_forward_pre_hook(self._make_hook(i), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, i: int):
        def hook(module, args, kwargs):
            if self._kv is None:
                return None  # text only: the LLM runs unchanged
            k, v = self._kv[i]
            if args:
                return (self.blocks[str(i)](args[0], k, v), *args[1:]), kwargs
            kwargs["hidden_states"] = self.blocks[str(i)](kwargs["hidden_states"], k, v)
            return args, kwargs

        return hook

    @contextlib.contextmanager
    def visual_context(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None):
        prev, self._kv = self._kv, kv
        try:
            yield
        finally:
            self._kv = prev

