"""`locpath build --report`: per precision, encoder feature cosine vs fp32, answer agreement with fp32, held-out
accuracy, and tile-encoder tiles/s and decoder tokens/s measured back to back in one process."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def _median_time(fn, warmup: int = 2, repeats: int = 5) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of a with the same row of b (feature vectors per tile)."""
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(row_cosines(a, b)))


def encoder_speed(pipe, tiles: np.ndarray, batch: int = 32) -> float:
    x = np.ascontiguousarray(tiles[:batch])
    return len(x) / _median_time(lambda: pipe.encode_tiles(x))


def decode_speed(pipe, question: str = "What is the diagnosis?", steps: int = 32) -> float:
    """Decoder tokens/s over `steps` forced single-token steps after the prompt (cross K/V fixed)."""
    from ..runtime.sampler import SamplingParams

    lat = np.random.default_rng(0).normal(size=(1, pipe.cfg.resampler.num_latents, pipe.cfg.resampler.dim)).astype(np.float32)
    qkv = pipe.question_kv(lat, question)
    params = SamplingParams(max_new_tokens=steps + 1)

    def run():
        gen = pipe.generator(qkv, question, params)  # prefill
        t0 = time.perf_counter()
        for _ in range(steps):
            gen.append_tokens([7])
        return time.perf_counter() - t0

    run()
    return steps / float(np.median([run() for _ in range(3)]))


def build_report(reference: str | Path, built: dict[str, str | Path], tiles: np.ndarray, seed: int, count: int,
                 log=print) -> dict:
    """Compare each built bundle with the fp32 `reference` bundle (and, when the reference has a fused decoder,
    with its plain decoder graph too: row `fp32-plain`)."""
    from ..bundle.names import DECODER_FUSED
    from ..eval import evaluate_bundle
    from ..runtime.pipeline import Pipeline

    pipes = {"fp32": Pipeline.from_bundle(reference, use_cache=False)}
    sources = {"fp32": (reference, "auto")}
    if pipes["fp32"].decoder_component == DECODER_FUSED:
        pipes["fp32-plain"] = Pipeline.from_bundle(reference, use_cache=False, decoder="plain")
        sources["fp32-plain"] = (reference, "plain")
    pipes.update({k: Pipeline.from_bundle(v, use_cache=False) for k, v in built.items()})
    sources.update({k: (v, "auto") for k, v in built.items()})
    ref_feats = pipes["fp32"].encode_tiles(tiles)
    rows: dict[str, dict] = {}
    for name, pipe in pipes.items():
        cos = row_cosines(pipe.encode_tiles(tiles), ref_feats)
        rows[name] = {"feature_cosine_mean": float(cos.mean()), "feature_cosine_min": float(cos.min())}
    # speeds back to back, alternating so machine noise spreads evenly
    for _ in range(2):
        for name, pipe in pipes.items():
            rows[name].setdefault("tiles_per_s", []).append(encoder_speed(pipe, tiles))
            rows[name].setdefault("decode_tokens_per_s", []).append(decode_speed(pipe))
    for r in rows.values():
        r["tiles_per_s"] = float(np.median(r["tiles_per_s"]))
        r["decode_tokens_per_s"] = float(np.median(r["decode_tokens_per_s"]))
    results = {}
    for name in pipes:
        src, decoder = sources[name]
        rows[name]["decoder"] = pipes[name].decoder_component
        results[name] = evaluate_bundle(src, seed, count, decoder=decoder)
        rows[name]["accuracy"] = results[name].accuracy
        rows[name]["per_type"] = results[name].per_type
        log(f"report: {name}: accuracy {results[name].accuracy:.3f}")
    ref_tokens = [r["token_ids"] for r in results["fp32"].records]
    for name, res in results.items():
        same = sum(a == r["token_ids"] for a, r in zip(ref_tokens, res.records))
        rows[name]["answer_agreement"] = same / max(len(ref_tokens), 1)
        rows[name]["tiles_per_s_vs_fp32"] = rows[name]["tiles_per_s"] / rows["fp32"]["tiles_per_s"]
        rows[name]["decode_vs_fp32"] = rows[name]["decode_tokens_per_s"] / rows["fp32"]["decode_tokens_per_s"]
    for p in pipes.values():
        p.release()
    return {"seed": seed, "count": count, "tiles": int(len(tiles)), "precisions": rows}
