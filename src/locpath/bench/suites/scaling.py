"""Scaling: LoC-Path's time to first token from tile features against the prefix baseline's in PyTorch eager, on
synthetic slides of N tissue tiles (JSON `scaling`; kept for reference, the headline is like for like). LoC-Path's
K/V bytes are measured (the buffers the runtime allocated), the eager prefix's are a formula."""

from __future__ import annotations

import time

from ..slides import scaling_slide
from ..stats import spread
from ..suite import Context, Suite

EAGER_PREFIX_MAX_TILES = 20000  # the PyTorch eager prefix row (kept for reference) is not run above this


def kv_bytes_prefix(pcfg: dict, n_visual: int, text_tokens: int) -> int:
    hd = pcfg["hidden_size"] // pcfg["num_attention_heads"]
    return 4 * 2 * pcfg["num_hidden_layers"] * pcfg["num_key_value_heads"] * hd * (n_visual + text_tokens)


def kv_bytes_locpath(mcfg, text_tokens: int) -> int:
    llm = mcfg.llm
    hd = llm.hidden_size // llm.num_attention_heads
    self_kv = 4 * 2 * llm.num_hidden_layers * llm.num_key_value_heads * hd * text_tokens
    cross = 4 * 2 * len(mcfg.cara.layers) * mcfg.tis.top_m * llm.hidden_size
    return self_kv + cross


def locpath_ttft(pipe, ff, question: str, params) -> tuple[float, int, int]:
    """STM, resampler, TIS, cross-KV and prefill: (ms, tokens after STM, K/V bytes); memory = the self-attention
    cache it allocated (for the prompt and the answer) plus the question's cross K/V, as measured."""
    t = time.perf_counter()
    comp = pipe.compress(ff)
    qkv = pipe.question_kv(comp.latents, question)
    gen = pipe.generator(qkv, question, params)
    ms = (time.perf_counter() - t) * 1000
    return ms, comp.tokens, gen.stats.kv_cache_bytes + sum(int(a.nbytes) for a in qkv.cross.values())


def bench_scaling(pipe, cfg, prefix, log) -> list[dict]:
    from ..headline import save_features
    from ...wsi import open_slide
    from ...wsi.extract import extract_features

    rows = []
    params = pipe.sampling()
    text_tokens = len(pipe.prompt_ids(cfg.question)) + params.max_new_tokens
    for n in cfg.tiles:
        path = scaling_slide(cfg.workdir, n, log)
        t0 = time.perf_counter()
        with open_slide(path) as s:
            plan = pipe.plan_tiles(s)
            ff, _ = extract_features(s, pipe.encode_tiles, plan, pipe.cfg.tile_encoder.name, progress=cfg.progress)
        read_encode = time.perf_counter() - t0
        log(f"N={n}: {len(ff.features)} tiles read and encoded in {read_encode:.1f} s")
        save_features(cfg.workdir, pipe, n, ff)  # the headline starts from the very same features
        runs = [locpath_ttft(pipe, ff, cfg.question, params) for _ in range(cfg.warmup + cfg.repeats)][cfg.warmup:]
        row = {"n_target": n, "tiles": int(len(ff.features)), "tokens_after_stm": runs[0][1],
               "read_encode_s": round(read_encode, 2),
               "locpath": {"ttft_ms": spread([r[0] for r in runs]), "kv_bytes": runs[0][2],
                           "kv_bytes_formula": kv_bytes_locpath(pipe.cfg, text_tokens)}}
        if prefix is None:
            row["prefix"] = {"skipped": "torch or the prefix checkpoint is not available"}
        elif len(ff.features) > EAGER_PREFIX_MAX_TILES:
            row["prefix"] = {"skipped": f"PyTorch eager attends over all {len(ff.features)} positions at once (its "
                                        "scores alone are tens of GB): the headline's chunked ONNX Runtime prefix "
                                        "measures this size"}
        else:
            row["prefix"] = prefix_ttft(prefix, ff, ff.grid_index, cfg, text_tokens)
        rows.append(row)
        log(f"N={n}: LoC-Path time to first token {row['locpath']['ttft_ms']['median']:.1f} ms"
            + (f", prefix {row['prefix']['ttft_ms']['median']:.1f} ms" if "ttft_ms" in row["prefix"] else ""))
    return rows


def prefix_ttft(prefix, ff, grid, cfg, text_tokens: int) -> dict:
    """The prefix baseline from the same features: projector + prefill over N visual tokens + prompt (PyTorch)."""
    import torch

    from ...models.slide_llm import SlideFeatures

    model, tok = prefix
    sf = SlideFeatures(ff.features, grid)
    ids = model.prompt_ids(tok, cfg.question)

    def once():
        t = time.perf_counter()
        with torch.no_grad():
            vis = model.visual_tokens([sf])
            x, mask = model._inputs(tok, vis, [ids])
            model.llm(inputs_embeds=x, attention_mask=mask, use_cache=True).logits[:, -1].argmax(-1)
        return (time.perf_counter() - t) * 1000

    runs = [once() for _ in range(cfg.warmup + cfg.repeats)][cfg.warmup:]
    c = model.llm.config
    pcfg = {"hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
            "num_hidden_layers": c.num_hidden_layers, "num_key_value_heads": c.num_key_value_heads}
    return {"ttft_ms": spread(runs), "kv_bytes": kv_bytes_prefix(pcfg, len(ff.features), text_tokens)}


def _prefix_model(ctx: Context):
    """The shipped prefix checkpoint in PyTorch (None, and why in `skipped`, when the baselines do not run)."""
    if not ctx.cfg.baselines:
        ctx.skip("baselines", "--no-baselines")
        return None
    if not ctx.torch:
        ctx.skip("pytorch", "torch is not installed")
        return None
    from ...checkpoints import shipped_checkpoint
    from ...models.checkpoint import load_checkpoint

    if (shipped_checkpoint("prefix") / "model.safetensors").exists():
        return load_checkpoint(shipped_checkpoint("prefix"))
    return None


def run(ctx: Context) -> list:
    prefix = _prefix_model(ctx)
    return bench_scaling(ctx.pipe, ctx.cfg, prefix, ctx.log) if ctx.cfg.tiles else []


def ratios(report: dict) -> dict:
    """PyTorch eager prefix over LoC-Path, formula KV: kept for reference, not the headline."""
    r = {}
    for row in report.get("scaling", []):
        if "ttft_ms" in row["prefix"]:
            n = row["n_target"]
            r[f"ttft_prefix_pytorch_over_locpath_at_{n}"] = (row["prefix"]["ttft_ms"]["median"]
                                                             / row["locpath"]["ttft_ms"]["median"])
            r[f"kv_formula_prefix_over_locpath_at_{n}"] = row["prefix"]["kv_bytes"] / row["locpath"]["kv_bytes"]
    return r


SUITE = Suite("scaling", "scaling", run, ratios=ratios)
