"""The generation loop, in the manner of onnxruntime-genai: a Generator owns the decoder State (the graph and
its I/O names), a KV cache sized to a capped max length, a cross cache filled once per question, and a Search.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..engines.manifest import ComponentEntry
from .kv_cache import KVCache, SharedKVCache
from .runners import Runner
from .sampler import Sampler, SamplingParams


class DecoderState:
    """Feeds the decoder graph: ids, mask, positions, past K/V from the cache, fixed cross K/V."""

    def __init__(self, runner: Runner, entry: ComponentEntry):
        t = entry.templates
        self.runner = runner
        self.num_layers = int(t["num_layers"])
        self.kv_heads = int(t["num_kv_heads"])
        self.head_dim = int(t["head_dim"])
        self.cara_layers = [int(i) for i in t["cara_layers"]]
        self.past = [(t["past_key"].format(layer=j), t["past_value"].format(layer=j)) for j in range(self.num_layers)]
        self.present = [(t["present_key"].format(layer=j), t["present_value"].format(layer=j)) for j in range(self.num_layers)]
        self.cross = [(t["cross_key"].format(layer=i), t["cross_value"].format(layer=i)) for i in self.cara_layers]
        self.outputs = ["logits"] + [n for kv in self.present for n in kv]

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        return KVCache(self.num_layers, batch, self.kv_heads, self.head_dim, max_length)

    def step(self, input_ids: np.ndarray, cache: KVCache, mask: np.ndarray, cross: dict[str, np.ndarray]) -> np.ndarray:
        b, s = input_ids.shape
        p = cache.length
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": mask.astype(np.int64),
            "position_ids": (np.arange(p, p + s, dtype=np.int64)[None, :]).repeat(b, 0),
        }
        for j, (kn, vn) in enumerate(self.past):
            feeds[kn], feeds[vn] = cache.past(j)
        feeds.update(cross)
        out = self.runner.run(feeds, self.outputs)
        for j, (kn, vn) in enumerate(self.present):
            cache.append(j, out[kn], out[vn])
        cache.advance(p + s)
        return out["logits"]


class FusedDecoderState(DecoderState):
    """Feeds the fused graph (engines/fused_graph.py): ids and mask only (positions and rotary are inside
    GroupQueryAttention), K/V buffers shared between past and present, fixed cross K/V; last-position logits."""

    kind = "fused"

    def __init__(self, runner: Runner, entry: ComponentEntry):
        super().__init__(runner, entry)
        self.max_positions = int(entry.templates["spec"]["max_positions"])
        self.vocab = int(entry.templates["spec"]["vocab"])

    def new_cache(self, batch: int, max_length: int) -> SharedKVCache:
        cache = SharedKVCache(self.runner, self.num_layers, batch, self.kv_heads, self.head_dim,
                              min(max_length, self.max_positions))
        cache.logits = np.zeros((batch, 1, self.vocab), np.float32)
        state = {}
        for j, ((kn, vn), (pk, pv)) in enumerate(zip(self.past, self.present)):
            state[kn] = (cache.keys[j], pk)
            state[vn] = (cache.values[j], pv)
        cache.binder = self.runner.binder(state, {"logits": cache.logits})  # bound once per question
        return cache

    def step(self, input_ids: np.ndarray, cache: SharedKVCache, mask: np.ndarray, cross: dict[str, np.ndarray]) -> np.ndarray:
        b, s = input_ids.shape
        p = cache.length
        cache.check_room(p + s)
        feeds = {"input_ids": np.ascontiguousarray(input_ids, np.int64),
                 "attention_mask": np.ascontiguousarray(mask, np.int64)}
        feeds.update(cross)
        logits = cache.binder.run(feeds)["logits"]
        cache.advance(p + s)
        return logits


def decoder_state(runner: Runner, entry: ComponentEntry) -> DecoderState:
    """The state that feeds this decoder entry's graph: fused (GroupQueryAttention) or plain."""
    return FusedDecoderState(runner, entry) if entry.templates.get("kind") == "fused" else DecoderState(runner, entry)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0  # time to first token, from the decoder's point of view
    decode_ms: list = field(default_factory=list)
    kv_cache_bytes: int = 0
    stop_reason: str = ""

    @property
    def decode_ms_per_token(self) -> float:
        return float(np.median(self.decode_ms)) if self.decode_ms else 0.0


class Generator:
    def __init__(self, state: DecoderState, max_length: int, stop_ids: list[int]):
        self.state = state
        self.max_length = max_length
        self.stop_ids = set(stop_ids)

    def generate(self, prompt_ids: list[int], cross: dict[str, np.ndarray], params: SamplingParams,
                 stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield new token ids until a stop token (not yielded) or max_new_tokens."""
        stats = stats if stats is not None else GenerationStats()
        search = Sampler(params)
        need = len(prompt_ids) + params.max_new_tokens
        cache = self.state.new_cache(1, min(self.max_length, need))
        stats.kv_cache_bytes = cache.nbytes
        stats.prompt_tokens = len(prompt_ids)
        history = list(prompt_ids)
        ids = np.asarray([prompt_ids], dtype=np.int64)
        t0 = time.perf_counter()
        logits = self.state.step(ids, cache, np.ones((1, len(prompt_ids)), np.int64), cross)
        tok = search(logits[0, -1], history)
        stats.prefill_ms = (time.perf_counter() - t0) * 1000
        for n in range(params.max_new_tokens):
            if tok in self.stop_ids:
                stats.stop_reason = "stop_token"
                return
            stats.new_tokens += 1
            history.append(tok)
            yield tok
            if n + 1 == params.max_new_tokens:
                break
            t0 = time.perf_counter()
            logits = self.state.step(np.asarray([[tok]], np.int64), cache, np.ones((1, cache.length + 1), np.int64), cross)
            tok = search(logits[0, -1], history)
            stats.decode_ms.append((time.perf_counter() - t0) * 1000)
        stats.stop_reason = "max_new_tokens"
