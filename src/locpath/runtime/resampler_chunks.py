"""The resampler over a slide's STM tokens a chunk at a time, so its memory follows the chunk, not the slide.

The one-graph resampler holds every token's embedding, keys, values and logits at once (ONNX Runtime's arena grew
~23 MiB for 4k reference tokens, ~170 MiB for 27k). Here each block's cross-attention is read chunk by chunk with
flash attention's online softmax: the `resampler_partial` graph gives a chunk's per-head max logit `m`, sum of
exp(logit - m) `s` and own attention output `o`; they are merged here (each chunk weighted by s exp(m - max m)), then `resampler_finish` completes the block
from `o / s`. The evidence map (attention probabilities, mean over heads and blocks; the same as the one-graph
resampler's up to float rounding) comes one of two ways:
- one pass: the partial graph also gives each chunk's exp(logit - m) per head, `p`; kept until the block's final
  (m, s) are known, each chunk's is scaled by exp(m_chunk - m) / s and summed over heads. It costs heads x latents
  x 4 bytes per token for one block (41 MB for 10k tokens at the published 8 x 128), so it is used while that fits
  in `probs_budget` and the graph has `p` (bundles exported before it was added do not);
- two passes: `resampler_weights` run on every chunk again with the slide's final (m, s), re-embedding the tokens
  and recomputing the keys. At published width this second pass was 40 % of the resampler's time at 10k tiles
  (0.31 of 0.77 s, AMD EPYC, 2 threads).
Tokens are never held for the whole slide.
"""

from __future__ import annotations

import numpy as np

from ..errors import LocpathError
from .runner import Runner

# STM tokens per chunk, Pipeline's default. Measured on the reference bundle, 2 threads (peak RSS growth and time of
# Pipeline.compress from features): 10k tiles / 3,995 tokens: one graph 24.4 MiB 18 ms; chunks of 512 12.1 MiB
# 38 ms, 1024 17.9 MiB 34 ms, 2048 28.2 MiB 44 ms. 50k tiles / 26,693 tokens: one graph 168 MiB 121 ms; 512
# 20.8 MiB 268 ms, 1024 26.1 MiB 208 ms, 2048 37.1 MiB 194 ms. Memory stays near the chunk's whatever the slide;
# the time, ~2x the one graph's, is well under 1 % of encoding the slide's tiles.
RESAMPLER_CHUNK = 1024
# One block's kept `p` at most (bytes): 256 MiB is 65k STM tokens at the published 8 heads x 128 latents.
PROBS_BUDGET = 256 << 20


class ChunkedResampler:
    def __init__(self, partial: Runner, weights: Runner, finish: Runner, depth: int, heads: int, latents: int,
                 dim: int, chunk: int, probs_budget: int = PROBS_BUDGET):
        if chunk < 1:
            raise LocpathError(f"resampler chunk must be at least 1 token, got {chunk}")
        self.partial, self.weights, self.finish = partial, weights, finish
        self.depth, self.heads, self.latents, self.dim, self.chunk = depth, heads, latents, dim, chunk
        self.probs_budget = probs_budget
        self._initial: np.ndarray | None = None

    def one_pass(self, n: int) -> bool:
        """Whether the evidence map of `n` tokens comes from the partial graph's `p` (no second pass)."""
        return "p" in self.partial.output_names and self.heads * self.latents * n * 4 <= self.probs_budget

    def initial_latents(self) -> np.ndarray:
        """The learned latents block 0 starts from (a constant output of the finish graph)."""
        if self._initial is None:
            h, L, d = self.heads, self.latents, self.dim
            out = self.finish.run({"latents": np.zeros((1, L, d), np.float32), "block": np.zeros(1, np.int64),
                                   "attended": np.zeros((1, h, L, d // h), np.float32)}, ["initial_latents"])
            self._initial = self._shaped(out["initial_latents"], (1, L, d), "initial_latents")
        return self._initial

    def _shaped(self, a: np.ndarray, shape: tuple, name: str) -> np.ndarray:
        if a.shape != shape:
            raise LocpathError(f"chunked resampler: {name} has shape {a.shape}, expected {shape} (the bundle's "
                               "resampler graphs disagree with its model config)")
        return a

    def _chunk_feeds(self, tokens, positions, counts, a: int, b: int) -> dict:
        return {"tokens": tokens[None, a:b], "positions": positions[None, a:b], "counts": counts[None, a:b],
                "token_mask": np.ones((1, b - a), bool)}

    def run(self, tokens: np.ndarray, positions: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens (N, F), positions (N, 2), counts (N,) -> (latents (1, L, D) after the final norm, attention
        (1, L, N): each latent's cross-attention probabilities over the tokens, mean over heads and blocks)."""
        tokens = np.ascontiguousarray(tokens, np.float32)
        positions = np.ascontiguousarray(positions, np.float32)
        counts = np.ascontiguousarray(counts, np.float32)
        n = len(tokens)
        if n == 0:
            raise LocpathError("chunked resampler: no tokens")
        h, L, d = self.heads, self.latents, self.dim
        stat_shape, o_shape = (1, h, L), (1, h, L, d // h)
        bounds = [(a, min(n, a + self.chunk)) for a in range(0, n, self.chunk)]
        lat = self.initial_latents()
        one_pass = self.one_pass(n)
        attention = np.zeros((1, L, n), np.float32)
        entering, final_stats, normed = [], [], None
        for blk in range(self.depth):
            block = np.array([blk], np.int64)
            m = s = o = None
            kept = []  # one pass: each chunk's (m, p)
            for a, b in bounds:
                out = self.partial.run(dict(self._chunk_feeds(tokens, positions, counts, a, b), latents=lat,
                                            block=block), ["m", "s", "o"] + (["p"] if one_pass else []))
                mc = self._shaped(out["m"], stat_shape, "m")
                sc = self._shaped(out["s"], stat_shape, "s")
                oc = self._shaped(out["o"], o_shape, "o")
                if one_pass:
                    kept.append((mc, self._shaped(out["p"], (1, h, L, b - a), "p")))
                if m is None:  # o: the exp-weighted values so far, relative to m (the chunk gives them over sc)
                    m, s, o = mc, sc, oc * sc[..., None]
                    continue
                top = np.maximum(m, mc)
                keep, add = np.exp(m - top), sc * np.exp(mc - top)
                s = s * keep + add
                o = o * keep[..., None] + oc * add[..., None]
                m = top
            entering.append(lat)
            final_stats.append((m, s))
            for (a, b), (mc, pc) in zip(bounds, kept):  # exp(logit - m) / s per head, then the mean over heads
                scale = (np.exp(mc[0] - m[0]) / (s[0] * h)).astype(np.float32)
                attention[0, :, a:b] += np.einsum("hl,hlc->lc", scale, pc[0])
            out = self.finish.run({"latents": lat, "block": block, "attended": o / s[..., None]},
                                  ["latents_out", "latents_normed"])
            lat = self._shaped(out["latents_out"], (1, L, d), "latents_out")
            normed = self._shaped(out["latents_normed"], (1, L, d), "latents_normed")
        if not one_pass:
            self._second_pass(attention, tokens, positions, counts, bounds, entering, final_stats)
        attention /= self.depth
        return normed, attention

    def _second_pass(self, attention, tokens, positions, counts, bounds, entering, final_stats) -> None:
        """The evidence map from `resampler_weights`: every chunk again, with each block's final (m, s)."""
        L = self.latents
        for blk in range(self.depth):
            m, s = final_stats[blk]
            for a, b in bounds:
                feeds = dict(self._chunk_feeds(tokens, positions, counts, a, b), latents=entering[blk],
                             block=np.array([blk], np.int64), m_ref=m, s_ref=s)
                attention[:, :, a:b] += self._shaped(self.weights.run(feeds, ["weights"])["weights"], (1, L, b - a),
                                                     "weights")
