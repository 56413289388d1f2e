"""Which resampler a large slide runs in a bundle whose resampler moved to OpenVINO: measured at build time.

Such a build used to drop the chunked fp32 graphs (runtime/resampler_chunks.py) so every slide ran OpenVINO's one
graph. Whether that pays depends on the CPU: at the published width (1024 wide, 128 latents, 2 blocks) and 10k
tiles on 2 threads, OpenVINO's bf16 graph took 0.30-0.66 s on a Xeon with AMX against 0.94-3.07 s for ORT's fp32
chunks in two passes, but 0.80-0.99 s on an AMD EPYC without AMX against 0.44-0.55 s for the chunks in one pass
(each the first 10k-token slide of its process). So the build times both on the same synthetic tokens, on the
machine it builds for (as the engine configs record), and keeps the chunks unless OpenVINO's graph is clearly
faster: slides above the chunk then run them on ONNX Runtime in fp32, smaller ones OpenVINO's graph. Random
tokens are enough: both paths do the same arithmetic whatever the values.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..bundle import names
from ..runtime.runner import Runner

ROUTE_TOKENS = 8192  # well above the chunk (1024): where the two paths part
# OpenVINO's graph must be this much faster on its first run to be kept for large slides: that run's cost depends
# on the process and the machine's memory (8192 tokens after a small warm-up: 367 ms in the build's process, 806 ms
# in a loaded published-scale pipeline, AMD EPYC; 10k tiles cost 0.8-1.0 s there against 0.44-0.55 s for the
# chunks, which reuse the same buffers whatever the slide). On AMX OpenVINO's graph was 2-5x faster.
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


def large_slide_route(whole: Runner, chunk_graphs: dict[str, Path], cfg, tokens: int = ROUTE_TOKENS) -> dict:
    """`whole`: the built resampler, loaded; `chunk_graphs`: the fp32 chunk graphs by component name; `cfg`: the
    bundle's model config. Each path runs a small slide first (tokens / 8, as a load's warm-up would), then a
    slide of `tokens` twice: the first run is what a slide larger than any before it costs (OpenVINO's CPU plugin
    prepares a larger shape anew: 8192 tokens took 806 ms the first time and 175 ms after on an AMD EPYC, and a
    fresh `ask` process always meets it), the second what a repeated shape costs. The chunks are kept unless
    OpenVINO's first run is ROUTE_MARGIN times faster (`keep_chunks`)."""
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.resampler_chunks import RESAMPLER_CHUNK, ChunkedResampler

    r = cfg.resampler
    small, big = _inputs(max(tokens // 8, 1), cfg.feature_dim, 0), _inputs(tokens, cfg.feature_dim, 1)
    chunked = ChunkedResampler(*(OrtRunner(chunk_graphs[n], n).load() for n in names.RESAMPLER_CHUNKS), r.depth,
                               r.num_heads, r.num_latents, r.dim, RESAMPLER_CHUNK)

    def run_whole(x):
        f, p, c = x
        whole.run({"tokens": f[None], "positions": p[None], "counts": c[None],
                   "token_mask": np.ones((1, len(f)), bool)}, ["latents", "attention"])

    res: dict = {"tokens": tokens, "warm_up_tokens": len(small[0]), "one_pass": chunked.one_pass(tokens)}
    for name, fn in (("whole_graph", run_whole), ("onnxruntime_fp32_chunks", lambda x: chunked.run(*x))):
        fn(small)
        res[f"{name}_first_ms"] = _ms(lambda: fn(big))
        res[f"{name}_again_ms"] = _ms(lambda: fn(big))
    res["keep_chunks"] = res["onnxruntime_fp32_chunks_first_ms"] < ROUTE_MARGIN * res["whole_graph_first_ms"]
    return res
