"""Which resampler a large slide runs in a bundle whose resampler moved to OpenVINO: measured at build time.

Such a build used to drop the chunked graphs (runtime/resampler_chunks.py) so every slide ran OpenVINO's one
graph. But OpenVINO's CPU plugin prepares each shape larger than any it has run anew: at the published width
(1024 wide, 128 latents, 2 blocks), 8192 tokens took 806 ms the first time and 175 ms after (AMD EPYC, 2
threads), and a fresh `ask` meets that on every slide. The chunks run the same two shapes whatever the slide (the
chunk and the last one's remainder), so moved to OpenVINO at the resampler's precision they read 10k tokens in
266-280 ms there (ORT fp32 chunks in one pass 429-447 ms, OpenVINO's one graph 800-1000 ms on the first 10k slide
of a process), with latents at cosine 0.99998 to ORT fp32's. The build times both paths on the same synthetic
tokens, on the machine it builds for (as the engine configs record), and keeps the chunks unless OpenVINO's one
graph is clearly faster. Random tokens are enough: both paths do the same arithmetic whatever the values.
"""

from __future__ import annotations

import time

import numpy as np

from ..bundle import names
from ..runtime.runner import Runner

ROUTE_TOKENS = 8192  # well above the chunk (1024): where the two paths part
# The one graph must be this much faster on its first run to be chosen for large slides: that run's cost depends
# on the process and the machine's memory (8192 tokens after a small warm-up: 367 ms in the build's process, 806 ms
# beside a loaded published-scale pipeline, AMD EPYC).
ROUTE_MARGIN = 1.5


def _inputs(n: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    pos = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.float32)
    return feats, pos, np.ones(n, np.float32)


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return round((time.perf_counter() - t0) * 1000, 1)


def large_slide_route(whole: Runner, chunks: dict[str, Runner], cfg, tokens: int = ROUTE_TOKENS) -> dict:
    """`whole`: the built resampler, loaded; `chunks`: the chunk graphs' runners by component name, loaded;
    `cfg`: the bundle's model config. Each path runs a small slide first (tokens / 8, as a load's warm-up would), then a
    slide of `tokens` twice: the first run is what a slide larger than any before it costs (OpenVINO's CPU plugin
    prepares a larger shape anew: 8192 tokens took 806 ms the first time and 175 ms after on an AMD EPYC, and a
    fresh `ask` process always meets it), the second what a repeated shape costs. The chunks are kept unless
    the one graph's first run is ROUTE_MARGIN times faster (`keep_chunks`)."""
    from ..runtime.resampler_chunks import RESAMPLER_CHUNK, ChunkedResampler

    r = cfg.resampler
    small, big = _inputs(max(tokens // 8, 1), cfg.feature_dim, 0), _inputs(tokens, cfg.feature_dim, 1)
    chunked = ChunkedResampler(*(chunks[n] for n in names.RESAMPLER_CHUNKS), r.depth, r.num_heads, r.num_latents,
                               r.dim, RESAMPLER_CHUNK)

    def run_whole(x):
        f, p, c = x
        whole.run({"tokens": f[None], "positions": p[None], "counts": c[None],
                   "token_mask": np.ones((1, len(f)), bool)}, ["latents", "attention"])

    res: dict = {"tokens": tokens, "warm_up_tokens": len(small[0]), "one_pass": chunked.one_pass(tokens)}
    for name, fn in (("whole_graph", run_whole), ("chunks", lambda x: chunked.run(*x))):
        fn(small)
        res[f"{name}_first_ms"] = _ms(lambda: fn(big))
        res[f"{name}_again_ms"] = _ms(lambda: fn(big))
    res["keep_chunks"] = res["chunks_first_ms"] < ROUTE_MARGIN * res["whole_graph_first_ms"]
    return res
