"""The two slide-level models on one tile encoder and one LLM:

- LocPathModel (fusion="cara"): STM tokens -> resampler latents -> TIS top-M -> CARA cross-attention.
- PrefixModel (fusion="prefix"): every tile token projected into the LLM input (SlideChat/LLaVA-style),
  the brute-force baseline the benchmarks compare against.

Both take per-slide tile features (the tile encoder runs once per slide, upstream) and answer with a
greedy loop over the Hugging Face KV cache, batched with left padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..stm import MergedTokens, merge_tokens
from ..text import IM_END, PAD, format_prompt
from .cara import CARAAdapter
from .encoders import build_tile_encoder, tile_target_mpp
from .layers import sincos_2d
from .llm import build_llm
from .resampler import MAEHead, Resampler
from .tis import TokenImportanceScorer, select_top_m


@dataclass
class SlideFeatures:
    """One slide's tile features and their grid positions (column, row)."""

    features: np.ndarray  # float32 (N, F)
    grid: np.ndarray  # int64 (N, 2)

    def merged(self, cfg: ModelConfig) -> MergedTokens:
        return merge_tokens(self.features, self.grid, cfg.stm.window, cfg.stm.threshold, cfg.stm.enabled)


def pad_tokens(items: list[tuple[np.ndarray, ...]], device="cpu") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Right-pad per-slide arrays (same leading N within an item) to a batch; returns tensors and a valid mask."""
    n_max = max(len(it[0]) for it in items)
    outs = []
    for j in range(len(items[0])):
        shape = (len(items), n_max) + items[0][j].shape[1:]
        buf = np.zeros(shape, np.float32)
        for b, it in enumerate(items):
            buf[b, : len(it[j])] = it[j]
        outs.append(torch.from_numpy(buf).to(device))
    mask = torch.zeros(len(items), n_max, dtype=torch.bool, device=device)
    for b, it in enumerate(items):
        mask[b, : len(it[0])] = True
    return outs, mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, t - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, t - len(s):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class SlideLLMBase(nn.Module):
    def __init__(self, cfg: ModelConfig, llm=None):
        """`llm`: an already built LLM (e.g. one on the meta device, when only the other parts are exported)."""
        super().__init__()
        self.cfg = cfg.validate()
        tile_target_mpp(cfg)  # a registered encoder reads tiles at its own resolution
        self.tile_encoder = build_tile_encoder(cfg.tile_encoder)
        self.llm = build_llm(cfg.llm) if llm is None else llm
        self.hidden = self.llm.config.hidden_size

    # -- text side --------------------------------------------------------------
    def _ids(self, tok, text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, tok, question: str) -> list[int]:
        """The question through the checkpoint's chat template (`load_checkpoint` sets `chat_template`: an imported
        LLM's own), else locpath's ChatML (`format_prompt`), as the runtime renders the bundle's template."""
        tmpl = getattr(self, "chat_template", None)
        return self._ids(tok, tmpl.render(question) if tmpl is not None else format_prompt(question))

    def answer_ids(self, tok, answer: str) -> list[int]:
        return self._ids(tok, answer) + [tok.token_to_id(IM_END)]

    @torch.no_grad()
    def _greedy(self, first_kwargs: dict, mask: torch.Tensor, eos_id: int, max_new: int) -> list[list[int]]:
        pos = positions_from_mask(mask)
        out = self.llm(attention_mask=mask, position_ids=pos, use_cache=True, **first_kwargs)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        b = mask.shape[0]
        done = torch.zeros(b, dtype=torch.bool)
        result: list[list[int]] = [[] for _ in range(b)]
        nxt = out.logits[:, -1].argmax(-1)
        for _step in range(max_new):
            for i in range(b):
                if not done[i]:
                    if int(nxt[i]) == eos_id:
                        done[i] = True
                    else:
                        result[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.llm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
        return result

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)


class LocPathModel(SlideLLMBase):
    """LoC-Path: compress before fusion; the LLM cross-attends to M question-selected latents."""

    def __init__(self, cfg: ModelConfig, llm=None):
        super().__init__(cfg, llm)
        f = cfg.feature_dim
        self.resampler = Resampler(cfg.resampler, f)
        self.mae_head = MAEHead(cfg.resampler, f)
        self.tis = TokenImportanceScorer(cfg.tis, cfg.resampler.dim, self.llm.config.vocab_size)
        self.cara = CARAAdapter(cfg.cara, self.hidden, cfg.resampler.dim)
        self.cara.attach(self.llm)

    def slide_latents(self, merged: list[MergedTokens]) -> torch.Tensor:
        (feats, pos, counts), mask = pad_tokens([(m.features, m.positions, m.counts) for m in merged])
        dt = self.resampler.latents.dtype
        return self.resampler(feats.to(dt), pos, counts.to(dt), mask)

    def question_kv(self, latents: torch.Tensor, q_ids: torch.Tensor, q_mask: torch.Tensor):
        scores = self.tis(latents, q_ids, q_mask)
        selected, idx = select_top_m(latents, scores, self.cfg.tis.top_m)
        return self.cara.cross_kv(selected), scores, idx

    def question_batch(self, tok, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self._ids(tok, q.strip()) for q in questions]
        ids, mask = left_pad(seqs, tok.token_to_id(PAD))
        return ids, mask

    def forward_qa(self, tok, latents: torch.Tensor, questions: list[str], answers: list[str]) -> torch.Tensor:
        """Teacher-forced loss of answers given latents (B, L, D), one question per row."""
        q_ids, q_mask = self.question_batch(tok, questions)
        kv, _, _ = self.question_kv(latents, q_ids, q_mask)
        seqs, label_seqs = [], []
        for q, a in zip(questions, answers):
            p, t = self.prompt_ids(tok, q), self.answer_ids(tok, a)
            seqs.append(p + t)
            label_seqs.append([-100] * len(p) + t)
        ids, mask = left_pad(seqs, tok.token_to_id(PAD))
        labels = torch.full_like(ids, -100)
        for b, ls in enumerate(label_seqs):
            labels[b, ids.shape[1] - len(ls):] = torch.tensor(ls)
        with self.cara.visual_context(kv):
            out = self.llm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
        return self.lm_loss(out.logits, labels)

    @torch.no_grad()
    def answer_tokens(self, tok, latents: torch.Tensor, questions: list[str], max_new: int | None = None) -> list[list[int]]:
        q_ids, q_mask = self.question_batch(tok, questions)
        kv, _, _ = self.question_kv(latents, q_ids, q_mask)
        ids, mask = left_pad([self.prompt_ids(tok, q) for q in questions], tok.token_to_id(PAD))
        with self.cara.visual_context(kv):
            return self._greedy({"input_ids": ids}, mask, tok.token_to_id(IM_END), max_new or self.cfg.max_answer_tokens)

    def answer(self, tok, latents: torch.Tensor, questions: list[str], max_new: int | None = None) -> list[str]:
        return [tok.decode(o) for o in self.answer_tokens(tok, latents, questions, max_new)]


class PrefixModel(SlideLLMBase):
    """The brute-force baseline: all N tile tokens, projected, form the LLM's visual prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        h = self.hidden
        self.projector = nn.Sequential(
            nn.Linear(cfg.feature_dim, cfg.prefix.projector_hidden), nn.GELU(), nn.Linear(cfg.prefix.projector_hidden, h)
        )

    def visual_tokens(self, slides: list[SlideFeatures]) -> list[torch.Tensor]:
        out = []
        for s in slides:
            f = torch.from_numpy(np.asarray(s.features, np.float32))
            pos = torch.from_numpy(np.asarray(s.grid, np.float32)).unsqueeze(0)
            out.append(self.projector(f) + sincos_2d(pos, self.hidden)[0] * 0.1)
        return out

    def _inputs(self, tok, vis: list[torch.Tensor], text_seqs: list[list[int]]):
        emb = self.llm.get_input_embeddings()
        lens = [v.shape[0] + len(t) for v, t in zip(vis, text_seqs)]
        total = max(lens)
        x = torch.zeros(len(vis), total, self.hidden)
        mask = torch.zeros(len(vis), total, dtype=torch.long)
        for b, (v, t) in enumerate(zip(vis, text_seqs)):
            seq = torch.cat([v, emb(torch.tensor(t, dtype=torch.long))], dim=0)
            x[b, total - len(seq):] = seq
            mask[b, total - len(seq):] = 1
        return x, mask

    def forward_qa(self, tok, vis: list[torch.Tensor], questions: list[str], answers: list[str]) -> torch.Tensor:
        seqs, label_seqs = [], []
        for q, a in zip(questions, answers):
            p, t = self.prompt_ids(tok, q), self.answer_ids(tok, a)
            seqs.append(p + t)
            label_seqs.append([-100] * len(p) + t)
        x, mask = self._inputs(tok, vis, seqs)
        labels = torch.full(mask.shape, -100, dtype=torch.long)
        for b, ls in enumerate(label_seqs):
            labels[b, mask.shape[1] - len(ls):] = torch.tensor(ls)
        out = self.llm(inputs_embeds=x, attention_mask=mask, position_ids=positions_from_mask(mask))
        return self.lm_loss(out.logits, labels)

    @torch.no_grad()
    def answer_tokens(self, tok, vis: list[torch.Tensor], questions: list[str], max_new: int | None = None) -> list[list[int]]:
        x, mask = self._inputs(tok, vis, [self.prompt_ids(tok, q) for q in questions])
        return self._greedy({"inputs_embeds": x}, mask, tok.token_to_id(IM_END), max_new or self.cfg.max_answer_tokens)

    def answer(self, tok, vis: list[torch.Tensor], questions: list[str], max_new: int | None = None) -> list[str]:
        return [tok.decode(o) for o in self.answer_tokens(tok, vis, questions, max_new)]


def build_model(cfg: ModelConfig) -> SlideLLMBase:
    return LocPathModel(cfg) if cfg.fusion == "cara" else PrefixModel(cfg)
