"""`bench --published --slide FILE`: the whole path from a slide file, in a fresh process of its own.

A cold `ask` as a user's first one is: the bundle loaded, the slide's tissue found, its tiles read and encoded by
the bundle's tile encoder, STM and the resampler, TIS and cross-K/V, the prefill and the decode. Then a second
question on the same slide (its latents held in memory: no tile read, no encoder). Measured in a child started
for this step alone (bench/child.py), so the peak resident set is the cold ask's own, not the bench's.
"""

from __future__ import annotations

import time
from dataclasses import replace

QUESTIONS = ("What is the diagnosis?", "Is there necrosis?")


def _answer_figures(ans) -> dict:
    t = ans.timings_ms
    per_token = t.get("decode_per_token") or 0.0
    return {"time_to_first_token_ms": t["time_to_first_token"], "prefill_ms": t.get("prefill"),
            "decode_tokens_per_s": round(1000.0 / per_token, 2) if per_token else None,
            "new_tokens": ans.generation["new_tokens"], "prompt_tokens": ans.generation["prompt_tokens"],
            "cache_hit": ans.slide["cache_hit"], "tiles_read": ans.slide["tiles_read"], "total_ms": t.get("total")}


def cold_ask(bundle: str, slide: str, new_tokens: int = 8, questions=QUESTIONS, threads: int | None = None,
             tile_batch: int | None = None, log=print) -> dict:
    """Load the bundle, ask the first question from the slide file (slide cache off: nothing prepared before),
    then the second on the slide now held in memory. Returns the figures of both and the cold/warm ratio."""
    from ..runtime.options import RuntimeOptions
    from ..runtime.pipeline import Pipeline
    from ..runtime.results import peak_rss_mb
    from .memory import status_kb

    t0 = time.perf_counter()
    opts = RuntimeOptions(use_cache=False, threads=threads)
    pipe = Pipeline.from_bundle(bundle, opts if tile_batch is None else replace(opts, tile_batch=tile_batch))
    load_s = time.perf_counter() - t0
    rss_load = status_kb("VmRSS") / 1024
    log(f"published: slide: bundle loaded in {load_s:.1f} s (RSS {rss_load:.0f} MB); cold ask from {slide}")
    first = pipe.ask(slide, questions[0], max_new_tokens=new_tokens, progress=False)
    cold = _answer_figures(first)
    t = first.timings_ms
    tiles = first.slide["tiles"]
    encode_ms = float(t.get("encode") or 0.0)
    read_encode_ms = float(t.get("tiles_encode") or 0.0)
    cold.update({"tiles": tiles, "tokens_after_stm": first.slide["tokens_after_stm"], "encode_ms": encode_ms,
                 "tiles_read_and_encode_ms": read_encode_ms,
                 "tiles_per_s": round(tiles / (read_encode_ms / 1000), 2) if read_encode_ms else None,
                 "encoder_tiles_per_s": round(tiles / (encode_ms / 1000), 2) if encode_ms else None,
                 "stages_ms": {k: t[k] for k in ("open", "tissue_grid", "stm", "resampler", "tis", "cross_kv")
                               if k in t}})
    second = pipe.ask(slide, questions[1], max_new_tokens=new_tokens, progress=False)
    warm = _answer_figures(second)
    bound = 2 * warm["time_to_first_token_ms"] + read_encode_ms
    log(f"published: slide: {tiles} tiles, cold first token {cold['time_to_first_token_ms'] / 1000:.2f} s, "
        f"warm {warm['time_to_first_token_ms'] / 1000:.2f} s")
    res = {"slide": str(slide), "load_seconds": round(load_s, 2), "rss_after_load_mb": round(rss_load),
           "cold": cold, "warm": warm,
           "cold_ttft_over_2x_warm_plus_encoder": round(cold["time_to_first_token_ms"] / bound, 3) if bound else None,
           "peak_rss_mb": round(peak_rss_mb()), "runtime_options": pipe.options.__dict__ | {"trusted_keys": None}}
    pipe.release()
    return res
