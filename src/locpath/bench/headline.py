"""The headline, like for like: LoC-Path against the prefix baseline on the same runtime and precision.

Both sides start from the same tile features and run on ONNX Runtime through `OrtRunner`:
- LoC-Path: the bench's bundle through the Pipeline (STM, resampler, TIS, cross-KV, prefill, first token);
- prefix: the prefix baseline exported by `export/prefix.py` (projector graph, then the fused GroupQueryAttention
  decoder of the bundle's precision prefilled over N visual tokens + the prompt, in chunks of `chunk` positions
  through the same shared K/V buffers (`SharedKVCache`), then the first token).

Each side and tile count runs in its own child process (multiprocessing 'spawn', torch never imported there), so
its memory is its own: `kv_bytes` = the K/V arrays the runtime allocated (self-attention cache, plus the question's
cross K/V for LoC-Path); `kv_plus_activation_bytes` = how far the resident set rose above the loaded and warmed
models (one run on WARM_TILES tiles first: lazy init and weight prepacking; then malloc_trim, so freed heap pages
are not reused unseen) during the first time to first token at
N (Linux's peak-RSS mark reset through /proc/self/clear_refs just before it: K/V, activations and the ONNX Runtime
arena together); `peak_rss_mb` = the child's VmHWM (Python, libraries, models and the run; not ru_maxrss, which
Linux carries over from the parent across fork and exec). Times are medians after that first (cold) run and `warmup - 1` more.

Shapes: "reference" (the bench's bundle against the shipped prefix checkpoint) and, with `--headline-0.5b`,
"qwen2.5-0.5b": one random Qwen2.5-0.5B-shaped LLM (bench/decoder_05b.py) inside a LoC-Path bundle (reference
widths for the tile encoder, resampler and TIS; CARA at four layers; INT4 decoder streamed from its shards) and
behind a prefix projector (INT4 decoder from the same shards). Everything is cached under the work folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..bundle.names import DECODER_FUSED
from ..errors import LocpathError
from .memory import PeakGrowth, peak_rss_mb_of, status_kb
from .stats import spread

SHAPE_05B = "qwen2.5-0.5b"
CARA_05B = (5, 11, 17, 23)  # four CARA blocks over 24 layers, spaced as the published (3, 10, 17, 24) over 28


@dataclass
class HeadlineConfig:
    tiles: list[int]
    question: str
    workdir: Path
    warmup: int = 1
    repeats: int = 3
    chunk: int = 2048  # prefix prefill positions per decoder call (chunked prefill bounds its attention scratch)
    tiles_05b: list[int] | None = None  # None: the same as `tiles`
    slide_for: Callable[[int], Path] | None = None  # n -> a slide of about n tiles (slides.scaling_slide), when
    # the features of n tiles are not cached yet


# -- the prefix baseline at run time (torch-free) -----------------------------------------------------------
class PrefixSession:
    """The exported prefix baseline run by locpath's ONNX Runtime runner and K/V cache classes."""

    def __init__(self, folder: Path, threads: int | None = None):
        from ..engines.fused_graph import FusedDecoderSpec
        from ..runtime.ort_runner import OrtRunner

        folder = Path(folder)
        try:
            self.meta = json.loads((folder / "prefix.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LocpathError(f"{folder}/prefix.json: cannot read the exported prefix baseline ({exc})") from None
        self.spec = FusedDecoderSpec.from_dict(self.meta["spec"])
        self.contract = self.spec.contract()
        self.projector = OrtRunner(folder / self.meta["projector"], "projector", threads=threads).load()
        self.decoder = OrtRunner(folder / self.meta["decoder"], DECODER_FUSED, threads=threads, spin=True).load()

    def visual_tokens(self, features: np.ndarray, grid: np.ndarray) -> np.ndarray:
        return self.projector.run({"features": np.ascontiguousarray(features, np.float32),
                                   "grid": np.ascontiguousarray(grid, np.float32)}, ["visual_tokens"])["visual_tokens"]

    def prefill(self, vis: np.ndarray, prompt: list[int], max_new: int, chunk: int):
        """Prefill [visual tokens, prompt] in chunks; returns (cache, logits of the last position)."""
        from ..runtime.kv_cache import SharedKVCache

        n, p = vis.shape[1], len(prompt)
        total = n + p
        if total + max_new > self.spec.max_positions:
            raise LocpathError(f"prefix baseline: {total} + {max_new} positions exceed its "
                               f"{self.spec.max_positions} (re-export it with more)")
        cache = SharedKVCache(self.decoder, self.contract, 1, total + max_new)
        ids = np.asarray(prompt, np.int64)
        logits = None
        for a in range(0, total, max(1, chunk)):
            b = min(total, a + chunk)
            emb = vis[:, min(a, n):min(b, n)]
            feeds = {"inputs_embeds": np.ascontiguousarray(emb),
                     "input_ids": ids[max(a - n, 0):max(b - n, 0)][None],
                     "attention_mask": np.ones((1, b), np.int64)}
            logits = cache.run(feeds, b)
        return cache, logits

    def step(self, cache, token: int) -> np.ndarray:
        t = cache.length + 1
        return cache.run({"inputs_embeds": np.zeros((1, 0, self.spec.hidden), np.float32),
                          "input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, t), np.int64)}, t)

    def greedy(self, features, grid, prompt: list[int], max_new: int, stop_ids, chunk: int = 2048) -> list[int]:
        cache, logits = self.prefill(self.visual_tokens(features, grid), prompt, max_new, chunk)
        out = []
        for _ in range(max_new):
            tok = int(np.argmax(logits[0, -1]))
            if tok in stop_ids:
                break
            out.append(tok)
            if len(out) == max_new:
                break
            logits = self.step(cache, tok)
        return out


# -- one side, one N, in a child ------------------------------------------------------------------------------
WARM_TILES = 16  # each side first runs on this many tiles: session lazy init and weight prepacking (ONNX Runtime
# packs MatMulNBits weights on the first run) happen there, so the measured growth is the N-tile run's own
def measure_locpath(bundle: str, ff, question: str, warmup: int, repeats: int) -> dict:
    """LoC-Path's time to first token from features, and its memory (see the module docstring)."""
    from ..runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, use_cache=False)
    params = pipe.sampling()
    loaded = status_kb("VmRSS") * 1024

    def once():
        t = time.perf_counter()
        comp = pipe.compress(ff)
        qkv = pipe.question_kv(comp.latents, question)
        gen = pipe.generator(qkv, question, params)
        first = gen.next_token()
        ms = (time.perf_counter() - t) * 1000
        kv = gen.stats.kv_cache_bytes + sum(int(a.nbytes) for a in qkv.cross.values())
        return ms, kv, comp.tokens, first

    small = dataclasses.replace(ff, features=ff.features[:WARM_TILES], coords=ff.coords[:WARM_TILES])
    pipe.generator(pipe.question_kv(pipe.compress(small).latents, question), question, params)  # lazy init, prepack
    with PeakGrowth() as g:
        cold = once()
    runs = [once() for _ in range(max(0, warmup - 1) + repeats)][-repeats:]
    pipe.release()
    return {"ttft_ms": spread([r[0] for r in runs]), "cold_ttft_ms": round(cold[0], 2), "kv_bytes": cold[1],
            "tokens_after_stm": cold[2], "first_token": cold[3], "kv_plus_activation_bytes": g.bytes,
            "rss_loaded_mb": round(loaded / 2**20, 1), "peak_rss_mb": peak_rss_mb_of(g)}


def measure_prefix(folder: str, ff, prompt: list[int], max_new: int, chunk: int, warmup: int, repeats: int) -> dict:
    """The prefix baseline's time to first token from the same features (projector, chunked prefill, first
    token) and its memory."""
    sess = PrefixSession(Path(folder))
    loaded = status_kb("VmRSS") * 1024
    grid = ff.grid_index

    def once():
        t = time.perf_counter()
        vis = sess.visual_tokens(ff.features, grid)
        cache, logits = sess.prefill(vis, prompt, max_new, chunk)
        first = int(np.argmax(logits[0, -1]))
        return (time.perf_counter() - t) * 1000, cache.nbytes, first

    sess.prefill(sess.visual_tokens(ff.features[:WARM_TILES], grid[:WARM_TILES]), prompt, max_new, chunk)  # lazy init
    with PeakGrowth() as g:
        cold = once()
    runs = [once() for _ in range(max(0, warmup - 1) + repeats)][-repeats:]
    return {"ttft_ms": spread([r[0] for r in runs]), "cold_ttft_ms": round(cold[0], 2), "kv_bytes": cold[1],
            "visual_tokens": int(len(ff.features)), "first_token": cold[2], "kv_plus_activation_bytes": g.bytes,
            "rss_loaded_mb": round(loaded / 2**20, 1), "peak_rss_mb": peak_rss_mb_of(g),
            "prefill_chunk": chunk, "precision": sess.meta["quant"]}


def in_child(fn, *args):
    """fn(*args) in a fresh 'spawn' process: its peak resident set (VmHWM) and its arena are its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


# -- features (the same for both sides, cached) -----------------------------------------------------------------
def features_path(workdir: Path, pipe, n: int) -> Path:
    enc = pipe.manifest.components["tile_encoder"].sha256[:12]
    return Path(workdir) / f"features_{n}_{enc}.npz"


def save_features(workdir: Path, pipe, n: int, ff) -> None:
    """Keep a scaling slide's features (what the headline reads instead of encoding the slide again)."""
    from ..fsutil import atomic_file

    path = features_path(workdir, pipe, n)
    if not path.exists():
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=ff.features, coords=ff.coords,
                         meta=json.dumps({k: getattr(ff, k) for k in ("patch_size", "patch_size_level0",
                                                                      "level0_mpp", "target_mpp", "encoder",
                                                                      "overlap")}))


def load_features(workdir: Path, pipe, n: int, log, slide_for=None, progress: bool = False):
    from ..wsi.features import FeatureFile

    path = features_path(workdir, pipe, n)
    if not path.exists():
        from ..wsi import open_slide
        from ..wsi.extract import extract_features

        if slide_for is None:
            raise LocpathError(f"{path}: no cached features for {n} tiles and no slide to encode")
        slide = slide_for(n)
        t0 = time.perf_counter()
        with open_slide(slide) as s:
            ff, _ = extract_features(s, pipe.encode_tiles, pipe.plan_tiles(s), pipe.cfg.tile_encoder.name,
                                     progress=progress)
        log(f"headline: N={n}: {len(ff.features)} tiles read and encoded in {time.perf_counter() - t0:.1f} s")
        save_features(workdir, pipe, n, ff)
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return FeatureFile(features=z["features"], coords=z["coords"], **meta)


# -- the two shapes --------------------------------------------------------------------------------------------
def decoder_precision(manifest) -> tuple[str, int]:
    """The LoC-Path bundle's decoder precision and INT4 block, which the prefix decoder is built at (fp16 is a
    GPU build: the CPU comparison runs fp32)."""
    c = manifest.components.get(DECODER_FUSED) or manifest.components["decoder"]
    q = c.quantization or {}
    if c.precision == "int4":
        return "int4", int(q.get("block_size") or 32)
    return "fp32", 32


def max_positions_for(tiles: list[int], text: int) -> int:
    need = max(tiles) * 11 // 10 + text + 64  # synthetic slides land within 10 % of the asked tile count
    return 1 << max(10, (need - 1).bit_length())


def reference_prefix(pipe, cfg: HeadlineConfig, log) -> Path:
    from ..checkpoints import shipped_checkpoint
    from ..export.prefix import export_prefix_checkpoint
    from ..models.checkpoint import load_checkpoint

    quant, block = decoder_precision(pipe.manifest)
    text = len(pipe.prompt_ids(cfg.question)) + pipe.sampling().max_new_tokens
    maxpos = max_positions_for(cfg.tiles, text)
    folder = Path(cfg.workdir) / "headline" / f"prefix-reference-{quant}-b{block}-p{maxpos}"
    model, _tok = load_checkpoint(shipped_checkpoint("prefix"))
    export_prefix_checkpoint(model.eval(), folder, quant, block, maxpos, log=log)
    return folder


def bundle_05b(work: Path, log) -> tuple[Path, Path]:
    """(LoC-Path bundle, HF folder) at the Qwen2.5-0.5B shape, built once."""
    from ..config import preset
    from ..engines.hf_weights import HFFolder
    from ..export.streamed import export_streamed_bundle, skeleton_model
    from .decoder_05b import _hf_folder

    work.mkdir(parents=True, exist_ok=True)
    folder = _hf_folder(work, log)
    out = work / "locpath-0.5b-bundle"
    if not (out / "manifest.json").exists():
        import torch

        torch.manual_seed(0)
        cfg = preset("tiny")  # the reference's tile-encoder, resampler and TIS widths
        cfg.cara.layers = CARA_05B
        hf = HFFolder(folder)
        model = skeleton_model(cfg, hf)
        log("headline: building the 0.5B-shaped LoC-Path bundle (INT4 decoder streamed from the shards)")
        export_streamed_bundle(model, hf, out, quant="int4", block_size=32, max_length=1024, log=log)
    return out, folder


def prefix_05b(work: Path, folder: Path, feature_dim: int, tiles: list[int], text: int, log) -> Path:
    from ..config import preset
    from ..engines.hf_weights import HFFolder
    from ..export.prefix import export_prefix_hf

    maxpos = max_positions_for(tiles, text)
    out = work / f"prefix-0.5b-int4-b32-p{maxpos}"
    export_prefix_hf(HFFolder(folder), out, feature_dim, preset("tiny").prefix.projector_hidden, "int4", 32,
                     maxpos, log=log)
    return out


def _rows(bundle: Path, prefix: Path, feats: dict, prompt: list[int], max_new: int, cfg: HeadlineConfig,
          log, label: str) -> list[dict]:
    rows = []
    for n, ff in feats.items():
        lp = in_child(measure_locpath, str(bundle), ff, cfg.question, cfg.warmup, cfg.repeats)
        px = in_child(measure_prefix, str(prefix), ff, prompt, max_new, cfg.chunk, cfg.warmup, cfg.repeats)
        rows.append({"n_target": n, "tiles": int(len(ff.features)), "locpath": lp, "prefix": px})
        log(f"headline ({label}) N={n}: TTFT LoC-Path {lp['ttft_ms']['median']:.1f} ms, prefix "
            f"{px['ttft_ms']['median']:.1f} ms; KV+activations {lp['kv_plus_activation_bytes'] / 2**20:.1f} vs "
            f"{px['kv_plus_activation_bytes'] / 2**20:.1f} MiB; peak RSS {lp['peak_rss_mb']:.0f} vs "
            f"{px['peak_rss_mb']:.0f} MB")
    return rows


def bench_headline(pipe, cfg: HeadlineConfig, log, with_05b: bool = False) -> dict:
    """{"reference": {...}, "qwen2.5-0.5b": {...} | {"skipped"}}; rows as in the module docstring."""
    quant, block = decoder_precision(pipe.manifest)
    prompt = pipe.prompt_ids(cfg.question)
    max_new = pipe.sampling().max_new_tokens
    feats = {n: load_features(cfg.workdir, pipe, n, log, cfg.slide_for) for n in cfg.tiles}
    prefix = reference_prefix(pipe, cfg, log)
    out = {"method": "both sides on ONNX Runtime (OrtRunner), each N and side in its own spawned process; "
                     "prefix = projector graph + the fused GroupQueryAttention decoder at the bundle's precision, "
                     f"prefilled in chunks of {cfg.chunk} positions",
           "reference": {"decoder_precision": quant, "int4_block": block if quant == "int4" else None,
                         "prefix_folder": str(prefix),
                         "rows": _rows(pipe.bundle_dir, prefix, feats, prompt, max_new, cfg, log, "reference")}}
    if not with_05b:
        out[SHAPE_05B] = {"skipped": "pass --headline-0.5b for the Qwen2.5-0.5B-shaped LLM on both sides"}
        return out
    from ..runtime.pipeline import Pipeline

    work = Path(cfg.workdir) / "headline" / "qwen2.5-0.5b"
    tiles = cfg.tiles_05b or cfg.tiles
    bundle, folder = bundle_05b(work, log)
    p05 = Pipeline.from_bundle(bundle, use_cache=False)
    prompt05, max_new05 = p05.prompt_ids(cfg.question), p05.sampling().max_new_tokens
    p05.release()
    px = prefix_05b(work, folder, pipe.cfg.feature_dim, tiles, len(prompt05) + max_new05, log)
    feats05 = {n: feats[n] if n in feats else load_features(cfg.workdir, pipe, n, log, cfg.slide_for) for n in tiles}
    out[SHAPE_05B] = {"decoder_precision": "int4", "int4_block": 32, "bundle": str(bundle), "prefix_folder": str(px),
                      "cara_layers": list(CARA_05B),
                      "rows": _rows(bundle, px, feats05, prompt05, max_new05, cfg, log, SHAPE_05B)}
    return out


def headline_lines(headline: dict) -> list[str]:
    """The Markdown table of the headline section."""
    lines = ["## Headline: LoC-Path against the prefix baseline, same runtime and precision (from tile features)", "",
             headline.get("method", ""), "",
             "| shape | N tiles | LoC-Path TTFT ms | prefix TTFT ms | LoC-Path KV+act MB | prefix KV+act MB | "
             "LoC-Path KV MB | prefix KV MB | LoC-Path peak RSS MB | prefix peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in ("reference", SHAPE_05B):
        sec = headline.get(shape, {})
        for row in sec.get("rows", []):
            lp, px = row["locpath"], row["prefix"]
            lines.append(f"| {shape} ({sec.get('decoder_precision')}) | {row['tiles']} | {lp['ttft_ms']['median']:.1f} | "
                         f"{px['ttft_ms']['median']:.1f} | {lp['kv_plus_activation_bytes'] / 1e6:.1f} | "
                         f"{px['kv_plus_activation_bytes'] / 1e6:.1f} | {lp['kv_bytes'] / 1e6:.3f} | "
                         f"{px['kv_bytes'] / 1e6:.3f} | {lp['peak_rss_mb']:.0f} | {px['peak_rss_mb']:.0f} |")
        if "skipped" in sec:
            lines.append(f"| {shape} | - | {sec['skipped']} | | | | | | | |")
    return lines + [""]
