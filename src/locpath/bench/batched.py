"""Batched decoding on a fused decoder graph (the Qwen2.5-0.5B-shaped INT4 one of `bench --decoder-0.5b`):
aggregate decode tokens/s at batch 1, 2, 4 and 8, each row a different ragged prompt decoded greedily without
stop tokens, through the runtime's own BatchGenerator (what ask/chat/serve/batch run). Rows at every batch size
are checked token for token against the same prompts decoded alone.

Aggregate tokens/s = tokens produced by the batched decode steps / the time of those steps (prefills, one row
at a time, excluded; they are the same work at any batch size). Batch sizes run in alternating rounds; medians.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..bundle.decoder_io import DecoderContract


def _prompts(n: int, vocab: int, seed: int = 3) -> list[list[int]]:
    """n ragged prompts (16 to 64 tokens) of ordinary token ids."""
    rng = np.random.default_rng(seed)
    lengths = [64, 40, 56, 24, 48, 16, 60, 32][:n] + list(rng.integers(16, 65, max(0, n - 8)))
    return [[int(t) for t in rng.integers(100, min(vocab, 20000), int(k))] for k in lengths]


def _cross(contract: DecoderContract, selected: int = 96, seed: int = 5) -> dict:
    """Seeded cross K/V for the CARA layers a decoder has (none for a text-only graph)."""
    rng = np.random.default_rng(seed)
    shape = (1, contract.cara_heads, selected, contract.cara_head_dim)
    return {n: rng.standard_normal(shape).astype(contract.kv_dtype) for i in contract.cara_layers
            for n in contract.cross(i)}


def _run(state, prompts: list[list[int]], rows: int, new: int) -> tuple[float, int, list[list[int]]]:
    """(decode seconds, tokens from decode steps, tokens of each prompt) for `prompts` decoded `rows` at a time."""
    from ..runtime.batch_generator import BatchGenerator
    from ..runtime.sampler import SamplingParams

    params = SamplingParams(max_new_tokens=new)
    gen = BatchGenerator(state, rows, max(len(p) for p in prompts) + new + 1, [])
    pending = list(range(len(prompts)))
    slot_of: dict[int, int] = {}
    out = {i: [] for i in range(len(prompts))}
    seconds, produced = 0.0, 0
    while pending or gen.active:
        while pending and gen.free:
            i = pending.pop(0)
            slot_of[gen.add(_cross(state.contract), prompts[i], params)] = i
        t0 = time.perf_counter()
        events = gen.step()
        dt = time.perf_counter() - t0
        fed = [s for s, t in events if t is not None and gen.rows[s] is not None]
        if fed:  # a step that ran the decoder (not only the last samples)
            seconds += dt
            produced += len(fed)
        for s, t in events:
            if t is not None:
                out[slot_of[s]].append(t)
    return seconds, produced, [out[i] for i in range(len(prompts))]


def contract_05b(max_positions: int = 2048) -> DecoderContract:
    """The fused decoder contract of `bench --decoder-0.5b`'s text-only Qwen2.5-0.5B-shaped graphs."""
    from .decoder_05b import QWEN25_05B as q

    return DecoderContract("fused", q["num_hidden_layers"], q["num_key_value_heads"],
                           q["hidden_size"] // q["num_attention_heads"], q["vocab_size"], (), 0, 0, max_positions)


def bench_batched(graphs: dict[str, Path], contract: DecoderContract, threads: int, batches=(1, 2, 4, 8),
                  new: int = 64, rounds: int = 2, log=print) -> dict:
    """Each graph (name -> fused decoder ONNX) at each batch size; `best` names the graph whose batch 4 gives the
    most aggregate tokens/s (its ratio is the one a deployment of that graph gets)."""
    from ..runtime.batch_generator import rows_are_exact
    from ..runtime.decoder_state import decoder_state
    from ..runtime.ort_runner import OrtRunner

    prompts = _prompts(max(batches), contract.vocab)
    out: dict = {"graphs": {}, "prompt_tokens": [len(p) for p in prompts], "new_tokens": new, "threads": threads}
    for name, graph in graphs.items():
        if not Path(graph).exists():
            out["graphs"][name] = {"skipped": f"{graph} is not built"}
            continue
        runner = OrtRunner(graph, "decoder", threads=threads, spin=True)
        state = decoder_state(runner, contract)
        alone = [_run(state, [p], 1, new)[2][0] for p in prompts]
        tps: dict[int, list[float]] = {b: [] for b in batches}
        identical: dict[int, bool] = {}
        log(f"batched decoding on {name}: batch {', '.join(map(str, batches))}, {new} new tokens per row")
        for _ in range(rounds):  # alternating rounds spread machine noise over the batch sizes
            for b in batches:
                sec, n, toks = _run(state, prompts[:b], b, new)
                tps[b].append(n / sec)
                identical[b] = identical.get(b, True) and toks == alone[:b]
        res = {f"batch_{b}": {"tokens_per_s": float(np.median(v)), "tokens_per_s_runs": [round(x, 2) for x in v],
                              "identical_to_batch_1": identical[b]} for b, v in tps.items()}
        for b in batches:
            res[f"batch_{b}"]["over_batch_1"] = res[f"batch_{b}"]["tokens_per_s"] / res["batch_1"]["tokens_per_s"]
            # what the runtime does with this graph: batch (its batched steps are bit-exact) or interleave
            res[f"batch_{b}"]["runtime_batches"] = b == 1 or rows_are_exact(state, b)
        res["graph"] = str(graph)
        out["graphs"][name] = res
        runner.release()
    best = best_batched(out["graphs"])
    if best is not None:
        out["best"] = best
        out["batch_4"] = out["graphs"][best]["batch_4"]
    return out


def best_batched(graphs: dict) -> str | None:
    """The graph whose batch 4 gives the most aggregate tokens/s among those the runtime really batches (a graph
    failing the exactness probe answers interleaved, so its batched speed is not what a deployment gets); among
    all measured graphs only when none batches."""
    done = {k: v for k, v in graphs.items() if "batch_4" in v}
    batched = {k: v for k, v in done.items() if v["batch_4"].get("runtime_batches")}
    pool = batched or done
    return max(pool, key=lambda k: pool[k]["batch_4"]["tokens_per_s"]) if pool else None
