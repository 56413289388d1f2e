"""`locpath bench --published`: LoC-Path at published scale on this machine.

A full-depth Qwen2.5-7B-shaped LLM with random weights is written here as bf16 safetensors shards (the layout the
hub ships; nothing is downloaded), and a LoC-Path bundle is built from it the way a real one would be: the
resampler, TIS and cross-KV graphs at published widths with a CONCH-shaped tile encoder, and the fused INT4
decoder streamed from the shards (`export/streamed.py`). Measured: the build's time and peak RSS (in a child
process, so the number is the build's own), the bundle's size, the runtime's load time and RSS, decode tokens/s,
and time to first token at 1k and 10k tiles; with a slide file, a cold `ask` from it and a second question
(published_slide.py). Each step runs in a fresh child (bench/child.py) whose own VmHWM is its memory figure. The tile encoder is timed on a few tiles and extrapolated to 1k and
10k (said so in the report); STM, resampler, TIS, cross-KV and prefill run for real at those sizes.
onnxruntime-genai's builder is run on the same shards under an RSS watchdog: where it does not fit in memory the
report says at what RSS and after how long it was stopped.
Where llama-cpp-python is built, llama.cpp Q4_0 runs beside it on the same shards at the same thread count
(bench/published_llamacpp.py).

Everything is cached under the work folder (the shards, the bundle), so only the first run pays for them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import LocpathError
from .random_qwen2 import write_random_hf_folder

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


# -- the build, in a child process (its own peak RSS) ------------------------------------------------------
def build_bundle(folder: str | Path, bundle: str | Path, encoder: str = "conch_v1", size: str = "published",
                 block_size: int = 32) -> dict:
    """Build the bundle (called in a child: bench/child.py, or `python -m locpath.bench.published`). `size` "tiny"
    keeps the reference's small resampler/TIS/CARA and encoder (what the test of this path uses); `block_size`:
    INT4 weights per scale in the decoder."""
    from ..config import preset
    from ..engines.hf_weights import HFFolder
    from ..export.streamed import export_streamed_bundle, skeleton_model
    from .memory import own_peak_rss_mb

    t0 = time.time()
    folder, bundle = Path(folder), Path(bundle)
    cfg = preset(size)
    hf = HFFolder(folder)
    if size == "published":
        cfg.tile_encoder = tile_encoder_config(encoder)
    else:
        cfg.cara.layers = tuple(range(0, int(hf.config["num_hidden_layers"]), 2))
    cfg.tis.question_dim = int(hf.config["hidden_size"])  # LoC-Path's TIS embeds with the LLM's matrix (key map)
    model = skeleton_model(cfg, hf)
    model.tis.embed.to("meta")  # declared the LLM's: the bundle's TIS reads the decoder's rows (export/tis_shared.py)
    _, rep = export_streamed_bundle(model, hf, bundle, quant="int4", block_size=block_size, max_length=2048,
                                    overwrite=True,
                                    source={"note": "random weights, Qwen2.5-7B shape"},
                                    log=lambda m: print(m, file=sys.stderr, flush=True))
    rep["build_seconds"] = round(time.time() - t0, 1)
    rep["peak_rss_mb"] = round(own_peak_rss_mb())  # this child's own (ru_maxrss would carry the parent's over)
    return rep


def tile_encoder_config(encoder: str):
    """The registered encoder's config (CONCH v1 by default) at full depth."""
    from ..models.encoders import encoder_config

    return encoder_config(encoder)


# -- onnxruntime-genai on the same shards, under a watchdog -----------------------------------------------
def run_watched(cmd: list[str], limit_mb: float, timeout_s: float, log) -> dict:
    """Run a command, stopping it when its RSS passes `limit_mb` (before the kernel's OOM killer would take the
    machine down) or after `timeout_s`; report how it ended and its peak RSS."""
    from ..export.streamed import current_rss_mb

    t0, peak = time.time(), 0.0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ended = "finished"
    while proc.poll() is None:
        peak = max(peak, current_rss_mb(proc.pid))
        if peak > limit_mb:
            ended = "stopped: out of memory budget"
            proc.kill()
            break
        if time.time() - t0 > timeout_s:
            ended = "stopped: time limit"
            proc.kill()
            break
        time.sleep(0.5)
    err = proc.communicate()[1] or ""
    if ended == "finished" and proc.returncode != 0:
        ended = f"failed (exit {proc.returncode}): {err.strip().splitlines()[-1][:300] if err.strip() else ''}"
    return {"ended": ended, "seconds": round(time.time() - t0, 1), "peak_rss_mb": round(peak),
            "limit_mb": round(limit_mb)}


def genai_build(folder: Path, out: Path, log, timeout_s: float = 1800) -> dict:
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is None:
        return {"ended": "skipped: onnxruntime-genai is not installed"}
    if (out / "genai_config.json").exists():
        return {"ended": "finished (cached)"}
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    limit = 0.85 * mem_total
    log(f"published: onnxruntime-genai's builder on the same shards (INT4, CPU), stopped above {limit / 1024:.1f} GB RSS")
    return run_watched([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache")], limit, timeout_s, log)


# -- the runtime ---------------------------------------------------------------------------------------------
def _features(n: int, dim: int, seed: int):
    from ..wsi.features import FeatureFile

    side = int(math.ceil(math.sqrt(n)))
    idx = np.arange(n)
    coords = np.stack([idx % side, idx // side], 1) * 448
    feats = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return FeatureFile(feats, coords, 448, 448, 0.5, 0.5, "bench")


def measure_runtime(bundle: str | Path, tiles: list[int], question: str, new_tokens: int, encoder_tiles: int,
                    latents_dir: str | None = None, log=print) -> dict:
    """From features (run in a child of its own: bench/child.py): load, encoder tiles/s, first token at each tile
    count, decode tokens/s; `peak_rss_mb` is this process's VmHWM. `latents_dir`: each tile count's latents saved
    there (latents-<bundle name>-<n>.npy) and 8 greedy tokens recorded, to compare bundles on the same features."""
    from ..runtime.generator import GenerationStats
    from ..runtime.pipeline import Pipeline, peak_rss_mb
    from .memory import status_kb

    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(bundle, use_cache=False)
    res: dict = {"load_seconds": round(time.perf_counter() - t0, 1), "rss_after_load_mb": round(status_kb("VmRSS") / 1024),
                 "peak_rss_after_load_mb": round(peak_rss_mb())}
    size = pipe.manifest.preprocessing.tile_size
    batch = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    pipe.encode_tiles(batch[:1])
    t0, done = time.perf_counter(), 0
    while done < encoder_tiles:
        pipe.encode_tiles(batch)
        done += len(batch)
    enc_tps = done / (time.perf_counter() - t0)
    res["encoder"] = {"tiles_per_s": round(enc_tps, 2), "measured_tiles": done, "tile_px": size,
                      "precision": pipe.manifest.components["tile_encoder"].precision,
                      "note": "measured on these tiles; per-slide encoder time below is extrapolated from it"}
    dim = pipe.cfg.feature_dim
    res["time_to_first_token"] = {}
    warm = pipe.compress(_features(min(tiles), dim, 0))  # first runs allocate and prepack: not what a user waits for
    pipe.generator(pipe.question_kv(warm.latents, question, {}), question, pipe.sampling(max_new_tokens=1))
    for n in tiles:
        timings: dict = {}
        comp = pipe.compress(_features(n, dim, n), timings)
        qkv = pipe.question_kv(comp.latents, question, timings)
        params = pipe.sampling(max_new_tokens=1)
        stats = GenerationStats()
        t0 = time.perf_counter()
        gen = pipe.generator(qkv, question, params, stats)
        next(iter(gen.tokens()))
        first_ms = (time.perf_counter() - t0) * 1000
        encode_ms = n / enc_tps * 1000
        after = timings["stm"] + timings["resampler"] + timings["tis"] + timings["cross_kv"] + first_ms
        res["time_to_first_token"][str(n)] = {
            "encode_ms_extrapolated": round(encode_ms), "stm_ms": timings["stm"], "resampler_ms": timings["resampler"],
            "tis_ms": timings["tis"], "cross_kv_ms": timings["cross_kv"], "prefill_ms": round(first_ms, 1),
            "prompt_tokens": stats.prompt_tokens,
            "from_features_ms": round(after, 1), "from_slide_ms": round(encode_ms + after),
            "kv_cache_bytes": stats.kv_cache_bytes}
        if latents_dir is not None:
            np.save(Path(latents_dir) / f"latents-{Path(bundle).name}-{n}.npy", comp.latents)
            greedy = pipe.decoder_state.greedy(pipe.prompt_ids(question), qkv.cross, 8)
            res["time_to_first_token"][str(n)]["greedy_tokens"] = greedy.tokens
        log(f"published: {n} tiles: first token {after / 1000:.2f} s from features "
            f"(+{encode_ms / 1000:.0f} s encoder, extrapolated)")
    res["decode"] = _decode_rate(pipe, comp.latents, question, new_tokens)
    res["peak_rss_mb"] = round(peak_rss_mb())
    pipe.release()
    return res


def decode_read_bytes(path: Path) -> int:
    """Weight bytes one decode step reads from a decoder graph: every initializer but the rotary caches and an
    embedding table read through a gather (one row per token), unless another node reads that table too (a
    tied INT4 lm_head reads all of it)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    gathers = ("Gather", "GatherBlockQuantized")
    gathered = {x for n in m.graph.node if n.op_type in gathers for x in n.input[:1]}
    gathered |= {n.input[2] for n in m.graph.node if n.op_type == "GatherBlockQuantized" and len(n.input) > 2}
    elsewhere = {x for n in m.graph.node if n.op_type not in gathers for x in n.input}
    skip = (gathered - elsewhere) | {t.name for t in m.graph.initializer if "cos_cache" in t.name or "sin_cache" in t.name}
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in m.graph.initializer if t.name not in skip)


def _decode_rate(pipe, latents, question: str, new_tokens: int) -> dict:
    """Greedy steps straight on the decoder state (a random model may emit a stop token at any step), with the
    weight bytes each step reads and the rate it reads them at; each run right after a read of 256 MiB by the
    runtime's thread count, the machine's read bandwidth then (a shared host's moved 36-47 GB/s between bench
    runs and decode with it, 9.3-13.8 tok/s: a ceiling measured minutes before says little)."""
    from ..runtime.runner import default_threads
    from .ceilings import read_bandwidth_gbs

    qkv = pipe.question_kv(latents, question, {})
    prompt = pipe.prompt_ids(question)
    st = pipe.decoder_state
    rates, bandwidths = [], []
    for _ in range(3):
        bandwidths.append(read_bandwidth_gbs(default_threads(), mb=256))
        run = st.greedy(prompt, qkv.cross, new_tokens + 1)  # the first token comes from the prefill
        rates.append(run.steps / run.decode_s)
    rate = float(np.median(rates))
    read = decode_read_bytes(pipe.bundle_dir / pipe.manifest.components[pipe.decoder_component].file)
    return {"tokens_per_s": round(rate, 2), "new_tokens": new_tokens, "runs": len(rates),
            "prompt_tokens": len(prompt), "weight_bytes_per_token": read,
            "weights_read_gbs": round(rate * read / 1e9, 2),
            "read_bandwidth_gbs": round(float(np.median(bandwidths)), 2),
            "read_bandwidth_each_run_gbs": [round(b, 2) for b in bandwidths],
            "tokens_per_s_each_run": [round(r, 2) for r in rates]}


def _part(fn, log) -> dict:
    """One optional part of the report: its result, or {"failed": the error line} (minutes of measurements already
    made are not thrown away for it)."""
    try:
        return fn()
    except LocpathError as exc:
        log(f"published: part failed: {exc}")
        return {"failed": str(exc)}


def _vision(work: Path, bundle: Path, fp32_runtime: dict, log, tiles, question: str, new_tokens: int,
            encoder_tiles: int, slide: Path | None, slide_tokens: int, synthetic_tiles: int) -> dict:
    """The bundle with its vision graphs on OpenVINO (bench/published_vision.py): built once (cached), then the
    from-features and from-slide steps as for the fp32 bundle, the parity of the two, and a synthetic slide."""
    from ..runtime.machine import openvino_version
    from . import published_vision as pv
    from .child import run_step

    if openvino_version() is None:
        return {"skipped": "OpenVINO is not installed (pip install 'locpath[openvino]')"}
    ov = work / f"{bundle.name}-openvino-int8-safe"
    out: dict = {}
    if not (ov / "manifest.json").exists():
        log("published: the vision graphs on OpenVINO (int8-safe tile encoder, bf16 resampler), in a child")
        out["build"] = run_step("locpath.bench.published_vision:build_vision",
                                {"bundle": str(bundle), "out": str(ov), "slide": str(slide) if slide else None,
                                 "calibration": str(work / "vision-calibration.npz")})
        (work / f"{ov.name}.build.json").write_text(json.dumps(out["build"], indent=1))
    elif (work / f"{ov.name}.build.json").exists():
        out["build"] = json.loads((work / f"{ov.name}.build.json").read_text()) | {"cached": True}
    out["runtime"] = run_step("locpath.bench.published:measure_runtime",
                              {"bundle": str(ov), "tiles": list(tiles), "question": question,
                               "new_tokens": new_tokens, "encoder_tiles": encoder_tiles, "latents_dir": str(work)})
    fp32 = dict(fp32_runtime, name=bundle.name)
    out["parity_with_fp32_vision"] = pv.parity(work, fp32, dict(out["runtime"], name=ov.name), tiles)
    if slide is not None:
        out["from_slide"] = run_step("locpath.bench.published_slide:cold_ask",
                                     {"bundle": str(ov), "slide": str(slide), "new_tokens": slide_tokens})
    if synthetic_tiles:
        syn = pv.synthetic_slide(work, synthetic_tiles, int(fp32_runtime["encoder"]["tile_px"]), log)
        out["from_synthetic_slide"] = run_step("locpath.bench.published_slide:cold_ask",
                                               {"bundle": str(ov), "slide": syn["path"], "new_tokens": slide_tokens})
        out["from_synthetic_slide"]["synthetic_slide"] = syn
    return out


def genai_decode(out: Path, prompt_len: int, new_tokens: int) -> dict:
    import onnxruntime_genai as og

    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = os.cpu_count() or 1
    cfg_path.write_text(json.dumps(cfg, indent=2))
    model = og.Model(str(out))
    prompt = [int(x) for x in np.random.default_rng(0).integers(100, 400, prompt_len)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + new_tokens + 1, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()
    t1 = time.perf_counter()
    n = 0
    while not gen.is_done() and n < new_tokens:
        gen.generate_next_token()
        n += 1
    return {"prefill_ms": round((t1 - t0) * 1000, 1), "tokens_per_s": round(n / (time.perf_counter() - t1), 2),
            "prompt_tokens": prompt_len}


def bench_published(work: Path, log, tiles=(1000, 10000), question: str = "What is the diagnosis?",
                    new_tokens: int = 32, encoder_tiles: int = 16, genai: bool = True, shape: dict | None = None,
                    size: str = "published", slide: Path | None = None, slide_tokens: int = 8,
                    block_size: int = 128, vision: bool = True, synthetic_tiles: int = 1000,
                    encoders: tuple = (), llamacpp: bool = True) -> dict:
    """`shape`/`size`: the LLM shape and the size of the other parts (the test runs this path small); `slide`: also
    a cold `ask` from this slide file and a second question on it (bench/published_slide.py); `block_size`: INT4
    weights per scale (128: ONNX Runtime's int8-compute packing adds an fp32 scale and a block sum per block, so
    block 32 holds 1.33x its file in memory; measured at 7B: 7.2 GB after load against 5.2 GB, 8.1 tok/s against
    14.3); `vision`: also the bundle with its vision graphs on OpenVINO (int8-safe encoder, bf16 resampler) where
    OpenVINO is installed, measured the same way and compared with the fp32 ones (bench/published_vision.py), and
    from a synthetic slide of `synthetic_tiles` tissue tiles (0: none); `encoders`: other registered encoders, each
    in a bundle of its own at full depth with its int8-safe build measured against its fp32 graph; `llamacpp`: also the
    shards as llama.cpp Q4_0 GGUF at the same thread count, where llama-cpp-python is built (bench/published_llamacpp.py)."""
    from .child import run_step

    from ..checkpoints import shipped_checkpoint

    shape = dict(shape or QWEN25_7B)
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "qwen2.5-shaped"
    bundle = work / ("locpath-int4" if block_size == 32 else f"locpath-int4-b{block_size}")
    if int(shape["hidden_size"]) % block_size:  # the TIS reads the decoder's INT4 embedding rows block by block
        raise LocpathError(f"bench --published: INT4 block size {block_size} does not divide the hidden size "
                           f"{shape['hidden_size']}")
    res: dict = {"int4_block_size": block_size}
    res |= {"shape": f"Qwen2.5 ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}; random bf16 "
                          f"weights) with the {size} preset's resampler/TIS/CARA"
                          + (" and a CONCH-shaped tile encoder" if size == "published" else ""), "llm": shape}
    if not (folder / "config.json").exists():
        t0 = time.time()
        write_random_hf_folder(folder, shape, shipped_checkpoint("reference") / "tokenizer.json", log=log)
        res["shards_written_seconds"] = round(time.time() - t0, 1)
    res["shards_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if not (bundle / "manifest.json").exists():
        log("published: building the bundle (streamed INT4 decoder) in a child process")
        res["build"] = run_step("locpath.bench.published:build_bundle",
                                {"folder": str(folder), "bundle": str(bundle), "size": size,
                                 "block_size": block_size})
        (work / f"{bundle.name}.build.json").write_text(json.dumps(res["build"], indent=1))
    elif (work / f"{bundle.name}.build.json").exists():
        res["build"] = json.loads((work / f"{bundle.name}.build.json").read_text()) | {"cached": True}
    res["bundle_bytes"] = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())
    res["bundle_files"] = {p.name: p.stat().st_size for p in sorted(bundle.iterdir()) if p.is_file()}
    # every step in a fresh child: each memory figure is that step's own (bench/child.py)
    res["runtime"] = run_step("locpath.bench.published:measure_runtime",
                              {"bundle": str(bundle), "tiles": list(tiles), "question": question,
                               "new_tokens": new_tokens, "encoder_tiles": encoder_tiles, "latents_dir": str(work)})
    if slide is not None:
        res["from_slide"] = run_step("locpath.bench.published_slide:cold_ask",
                                     {"bundle": str(bundle), "slide": str(slide), "new_tokens": slide_tokens})
    for enc in encoders:  # a part that fails is reported as such; the rest of the report stands
        from .published_vision import encoder_bundle

        res.setdefault("encoder_bundles", {})[enc] = _part(lambda: encoder_bundle(work / "encoders", enc, slide, log),
                                                           log)
    if vision:
        res["openvino_vision"] = _part(lambda: _vision(work, bundle, res["runtime"], log, tiles, question, new_tokens,
                                                       encoder_tiles, slide, slide_tokens, synthetic_tiles), log)
    if llamacpp:
        from .published_llamacpp import published_peer

        res["llamacpp"] = _part(lambda: published_peer(folder, work, res["runtime"], log), log)
    if genai:
        g = genai_build(folder, work / "genai-7b-int4", log)
        res["onnxruntime_genai"] = {"build": g}
        if g["ended"].startswith("finished"):
            res["onnxruntime_genai"]["run"] = genai_decode(work / "genai-7b-int4", 64, new_tokens)
    return res


if __name__ == "__main__":  # the build's child process: JSON report on stdout, progress on stderr
    print(json.dumps(build_bundle(Path(sys.argv[1]), Path(sys.argv[2]), size=sys.argv[3] if len(sys.argv) > 3
                                  else "published")))
