"""llama.cpp beside `bench --published`: the same 7B-shaped shards as GGUF Q4_0, decoded at locpath's thread count.

The GGUF is written streamed from the shards by locpath (bench/llamacpp.py write_gguf: one tensor in memory at a
time), quantized by llama.cpp's own quantizer, and cached in the work folder beside the shards as
`<folder>-q4_0.gguf` with its build report (`<folder>-q4_0.build.json`); the f16 intermediate (15 GB at 7B) is
removed. The build and the measurement each run in a fresh child (bench/child.py), so each peak RSS is that step's
own. The measurement uses as many prompt tokens and new tokens as locpath's runtime decode (`runtime.decode`), with
`n_threads = n_threads_batch =` locpath's default intra-op threads (the machine's physical cores); once with
llama.cpp's defaults (the file mapped) and once reading it (`no_mmap`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import llamacpp
from .memory import status_kb


def gguf_path(folder: Path, work: Path) -> Path:
    """Where bench_published keeps the folder's Q4_0 GGUF (reused by later runs)."""
    return work / f"{folder.name}-q4_0.gguf"


def measure(gguf: str, prompt_tokens: int, new_tokens: int, threads: int, runs: int = 2,
            use_mmap: bool = True) -> dict:
    """A bench step (in a fresh child): load the GGUF, one untimed generation (pages the mapped weights in), then
    `runs` timed greedy generations of `new_tokens` after a prompt of `prompt_tokens` ids; medians. `use_mmap`:
    llama.cpp's default (True) maps the file, and the pages of the weights its CPU backend repacks stay mapped
    beside the repacked copy."""
    wb = llamacpp.gguf_weight_bytes(Path(gguf))
    prompt = [int(x) for x in np.random.default_rng(0).integers(100, 400, prompt_tokens)]
    t0 = time.perf_counter()
    run = llamacpp.runner(Path(gguf), prompt, new_tokens + 1, threads, use_mmap)  # first new token: the prefill's
    load_s = time.perf_counter() - t0
    first = run()
    timed = [run() for _ in range(runs)]
    held = {"anon_mb": round(status_kb("RssAnon") / 1024), "file_mb": round(status_kb("RssFile") / 1024),
            "note": "after the runs; anonymous: llama.cpp's buffers and the weights its CPU backend repacks at load, "
                    "file: the GGUF's mapped pages (repacking on)"}
    return {"load_seconds": round(load_s, 2), "rss_after_runs": held,
            "first_run": {"prefill_ms": round(first[0] * 1000, 1), "tokens_per_s": round(first[2] / first[1], 2)},
            "prefill_ms": round(float(np.median([t[0] for t in timed])) * 1000, 1),
            "tokens_per_s": round(float(np.median([t[2] / t[1] for t in timed])), 2),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": threads, "runs": runs,
            "use_mmap": use_mmap,
            "weight_bytes": wb["total"], "weight_types": wb["by_type"], "token_embd_type": wb["token_embd"],
            "file_bytes": Path(gguf).stat().st_size}


def published_peer(folder: Path, work: Path, runtime: dict, log) -> dict:
    """The `llamacpp` entry of bench_published: the GGUF built (or its cached build report) and measured, with
    locpath's decode tokens/s over llama.cpp's; `skipped` where llama-cpp-python is not built."""
    if not llamacpp.available():
        return {"skipped": llamacpp.INSTALL_HINT + " (docs/llamacpp.md)"}
    from ..runtime.runner import default_threads
    from .child import run_step

    out = gguf_path(folder, work)
    report = out.with_suffix(".build.json")
    if not out.exists():
        log(f"published: {folder.name} as GGUF f16 (streamed), then llama.cpp's Q4_0, in a child process")
        build = run_step("locpath.bench.llamacpp:build_q4_0", {"folder": str(folder), "out": str(out)})
        report.write_text(json.dumps(build, indent=1))
    else:
        build = (json.loads(report.read_text()) if report.exists() else {}) | {"cached": True}
    dec = runtime.get("decode", {})
    prompt = dec.get("prompt_tokens") or next(iter(runtime.get("time_to_first_token", {}).values()), {}).get(
        "prompt_tokens", 13)
    threads = default_threads()
    log(f"published: llama.cpp Q4_0 decode ({prompt} prompt tokens, {dec.get('new_tokens', 32)} new, "
        f"{threads} threads) in a child process")
    args = {"gguf": str(out), "prompt_tokens": int(prompt), "new_tokens": int(dec.get("new_tokens", 32)),
            "threads": threads}
    res = {"gguf": str(out), "build": build} | run_step("locpath.bench.published_llamacpp:measure", args)
    # without the map: the repacked weights held once (measured at 7B: 4.3 GB peak against 7.8 GB, and faster)
    res["no_mmap"] = run_step("locpath.bench.published_llamacpp:measure", args | {"use_mmap": False})
    for r in (res, res["no_mmap"]):
        if dec.get("tokens_per_s") and r.get("tokens_per_s"):
            r["locpath_over_llamacpp_decode"] = round(dec["tokens_per_s"] / r["tokens_per_s"], 3)
    return res
