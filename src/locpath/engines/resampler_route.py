"""Which resampler a large slide runs in a bundle whose resampler moved to OpenVINO: measured at build time.

Such a build used to drop the chunked fp32 graphs (runtime/resampler_chunks.py) so every slide ran OpenVINO's one
graph. Whether that pays depends on the CPU: at the published width (1024 wide, 128 latents, 2 blocks) and 10k
tiles on 2 threads, OpenVINO's bf16 graph took 0.30-0.66 s on a Xeon with AMX against 0.94-3.07 s for ORT's fp32
chunks in two passes, but 0.80-0.99 s on an AMD EPYC without AMX against 0.44-0.55 s for the chunks in one pass.
So the build times both on the same synthetic tokens, on the machine it builds for (as the engine configs record),
and keeps the chunks only where they are faster: slides above the chunk then run them on ONNX Runtime in fp32,
smaller ones OpenVINO's graph. Random tokens are enough: both paths do the same arithmetic whatever the values.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..bundle import names
from ..runtime.runner import Runner

ROUTE_TOKENS = 8192  # well above the chunk (1024): where the two paths part


def _best_ms(fn, runs: int = 2) -> float:
    fn()  # the first run allocates (and OpenVINO compiles its shapes)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 1)


def large_slide_route(whole: Runner, chunk_graphs: dict[str, Path], cfg, tokens: int = ROUTE_TOKENS) -> dict:
    """`whole`: the built resampler, loaded; `chunk_graphs`: the fp32 chunk graphs by component name; `cfg`: the
    bundle's model config. Returns both times and `keep_chunks` (True: the chunks were faster here)."""
    from ..runtime.ort_runner import OrtRunner
    from ..runtime.resampler_chunks import RESAMPLER_CHUNK, ChunkedResampler

    r = cfg.resampler
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(tokens)))
    feats = rng.normal(size=(tokens, cfg.feature_dim)).astype(np.float32)
    pos = np.stack([np.arange(tokens) % side, np.arange(tokens) // side], 1).astype(np.float32)
    counts = np.ones(tokens, np.float32)
    feeds = {"tokens": feats[None], "positions": pos[None], "counts": counts[None],
             "token_mask": np.ones((1, tokens), bool)}
    chunked = ChunkedResampler(*(OrtRunner(chunk_graphs[n], n).load() for n in names.RESAMPLER_CHUNKS), r.depth,
                               r.num_heads, r.num_latents, r.dim, RESAMPLER_CHUNK)
    whole_ms = _best_ms(lambda: whole.run(feeds, ["latents", "attention"]))
    chunks_ms = _best_ms(lambda: chunked.run(feats, pos, counts))
    return {"tokens": tokens, "whole_graph_ms": whole_ms, "onnxruntime_fp32_chunks_ms": chunks_ms,
            "one_pass": chunked.one_pass(tokens), "keep_chunks": chunks_ms < whole_ms}
