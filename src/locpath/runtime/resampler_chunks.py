"""The resampler over a slide's STM tokens a chunk at a time, so its memory follows the chunk, not the slide.

The one-graph resampler holds every token's embedding, keys, values and logits at once (ONNX Runtime's arena grew
~23 MiB for 4k reference tokens, ~170 MiB for 27k). Here each block's cross-attention is read chunk by chunk with
flash attention's online softmax: the `resampler_partial` graph gives a chunk's per-head max logit `m`, sum of
exp(logit - m) `s` and own attention output `o`; they are merged here (each chunk weighted by s exp(m - max m)), then `resampler_finish` completes the block
from `o / s`. A second pass per block, `resampler_weights` with the slide's final (m, s), gives each chunk's
attention probabilities: the evidence map (mean over heads and blocks), the same as the one-graph resampler's up to
float rounding. Tokens are embedded again in each pass (cheap beside the keys), never held for the whole slide.
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



class ChunkedResampler:
    def __init__(self, partial: Runner, weights: Runner, finish: Runner, depth: int, heads: int, latents: int,
                 dim: int, chunk: int):
        if chunk < 1:
            raise LocpathError(f"resampler chunk must be at least 1 token, got {chunk}")
        self.partial, self.weights, self.finish = partial, weights, finish
        self.depth, self.heads, self.latents, self.dim, self.chunk = depth, heads, latents, dim, chunk
        self._initial: np.ndarray | None = None

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
        entering, final_stats, normed = [], [], None
        for blk in range(self.depth):
            block = np.array([blk], np.int64)
            m = s = o = None
            for a, b in bounds:
                out = self.partial.run(dict(self._chunk_feeds(tokens, positions, counts, a, b), latents=lat,
                                            block=block), ["m", "s", "o"])
                mc = self._shaped(out["m"], stat_shape, "m")
                sc = self._shaped(out["s"], stat_shape, "s")
                oc = self._shaped(out["o"], o_shape, "o")
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
            out = self.finish.run({"latents": lat, "block": block, "attended": o / s[..., None]},
                                  ["latents_out", "latents_normed"])
            lat = self._shaped(out["latents_out"], (1, L, d), "latents_out")
            normed = self._shaped(out["latents_normed"], (1, L, d), "latents_normed")
        attention = np.zeros((1, L, n), np.float32)
        for blk in range(self.depth):
            m, s = final_stats[blk]
            for a, b in bounds:
                feeds = dict(self._chunk_feeds(tokens, positions, counts, a, b), latents=entering[blk],
                             block=np.array([blk], np.int64), m_ref=m, s_ref=s)
                attention[:, :, a:b] += self._shaped(self.weights.run(feeds, ["weights"])["weights"], (1, L, b - a),
                                                     "weights")
        attention /= self.depth
        return normed, attention
