#!/usr/bin/env python3
"""One measured run of locpath's GPU paths on a machine with an NVIDIA GPU (issue 17), in under 5 minutes on an H100.

Needs: locpath installed (its runtime dependencies and `onnx`), onnxruntime-gpu (a CUDA build; install from a local
wheel, `pip install --no-deps --target`), PyTorch with CUDA. Optional: transformers (PyTorch baselines of the
decoder and of the whole model), onnxscript (exporting the ViT shapes; without it they are skipped). No network.

    python scripts/gpu_check.py --out gpu_check.json

It prints the card, builds the fp16 bundle from the shipped reference bundle, asserts ONNX Runtime's CUDA provider
runs every component (and reports which would need the CPU), compares answers with the CPU fp32 bundle on
held-out synthetic slides, and times, against PyTorch bf16 on the same card: the tile encoder at the reference,
ViT-B/16 and ViT-L/16 shapes, a Qwen2.5-0.5B-shaped decoder (prefill and decode), and a 10k-tile slide end to
end. Everything lands in the JSON (schema locpath-gpu-check/1); a part that cannot run says why under `skipped`.
It ends with one line per check (`check NAME: passed (...)` or `FAILED: why`, also under `checks`) and exits 1
when a part raised or a check failed. `--cpu` runs the same code on the CPU at small sizes (how the script itself
is tested without a GPU: tests/test_gpu_check_script.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

QUESTIONS = ("What is the diagnosis?", "Is necrosis present?", "Which organ is this?", "What is the tumor grade?")
VIT_SHAPES = {"vit_b16": dict(embed_dim=768, depth=12, num_heads=12, out_dim=512),
              "vit_l16": dict(embed_dim=1024, depth=24, num_heads=16, out_dim=1024, layer_scale_init=1e-5)}
QWEN25_05B = dict(num_layers=24, hidden=896, num_heads=14, num_kv_heads=2, head_dim=64, intermediate=4864,
                  vocab=151936, rms_eps=1e-6, tied_embeddings=True, qkv_bias=True)


class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median_time(fn, warmup: int = 2, repeats: int = 5, sync=None) -> float:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


# -- the 10k-tile slide, written in another process while the GPU works ---------------------------------------------
def _write_slide(path: str, tiles: int) -> None:
    from locpath.bench.runner import scaling_slide

    scaling_slide(Path(path).parent, tiles, lambda m: None)


def card(device: str) -> dict:
    import onnxruntime as ort

    import locpath

    info = {"python": platform.python_version(), "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(), "locpath": str(Path(locpath.__file__).parent)}
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=torch.cuda.get_device_name(0), compute_capability=f"{p.major}.{p.minor}",
                        memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    except ImportError:
        info["torch"] = None
    return info


# -- 1. the fp16 bundle on the CUDA provider ------------------------------------------------------------------------
def provider_checks(bundle: Path, device: str) -> dict:
    """Which provider each component's session runs, and whether it loads with CPU fallback disabled."""
    import onnxruntime as ort

    from locpath.bundle.integrity import verify_bundle

    m = verify_bundle(bundle)
    out = {}
    for name, c in m.components.items():
        so = ort.SessionOptions()
        so.log_severity_level = 4
        providers = ["CPUExecutionProvider"]
        if device == "cuda":  # the CUDA provider alone, CPU fallback off: a node without a CUDA kernel fails the load
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            providers = ["CUDAExecutionProvider"]
        try:
            s = ort.InferenceSession(str(bundle / c.file), so, providers=providers)
            out[name] = {"providers": s.get_providers(), "all_nodes_on_device": True}
        except Exception as exc:  # some node has no kernel on the device
            out[name] = {"all_nodes_on_device": False, "why": str(exc).splitlines()[0][:300]}
    return out


def agreement(fp16, fp32, slides: list[Path]) -> dict:
    same, total, records = 0, 0, []
    for s in slides:
        for q in QUESTIONS:
            a, b = fp16.ask(s, q), fp32.ask(s, q)
            total += 1
            same += a.token_ids == b.token_ids
            records.append({"slide": s.name, "question": q, "gpu_fp16": a.answer, "cpu_fp32": b.answer})
    return {"questions": total, "token_identical": same, "agreement": same / max(total, 1), "records": records}


# -- 2. tile encoders ---------------------------------------------------------------------------------------------------
def encoder_timings(work: Path, tiles: np.ndarray, device: str, batch: int, clock: Clock, small: bool) -> dict:
    import torch

    from locpath.bench.report import row_cosines
    from locpath.config import TileEncoderConfig
    from locpath.engines.quantize_ort import to_fp16
    from locpath.models.encoders import build_tile_encoder
    from locpath.runtime.ort_runner import OrtRunner

    out = {}
    tdev = torch.device("cuda" if device == "cuda" else "cpu")
    x = np.ascontiguousarray(tiles[:batch])
    for name, kw in VIT_SHAPES.items():
        if clock.left() < 60:
            out[name] = {"skipped": "time budget"}
            continue
        torch.manual_seed(0)
        cfg = TileEncoderConfig(name=name, **dict(kw, depth=2) if small else kw)
        enc = build_tile_encoder(cfg).eval()
        fp32 = work / f"{name}.onnx"
        try:
            from types import SimpleNamespace

            from locpath.export.configs import tile_encoder_config
            from locpath.export.exporter import export_component

            holder = SimpleNamespace(tile_encoder=enc, cfg=SimpleNamespace(tile_encoder=cfg))
            (work / name).mkdir(exist_ok=True)
            rep = export_component(tile_encoder_config(holder), holder, work / name)
            fp32 = work / name / rep.file
        except Exception as exc:
            out[name] = {"skipped": f"export needs torch.onnx + onnxscript ({str(exc).splitlines()[0][:200]})"}
            continue
        f16 = work / name / "tile_encoder.fp16.onnx"
        to_fp16(fp32, f16)
        runner = OrtRunner(f16, name, device=device).load()
        ours = runner.run({"tiles": x}, ["features"])["features"]
        t_ort = median_time(lambda: runner.run({"tiles": x}, ["features"]))
        with torch.no_grad():
            ref = enc.to(tdev).forward_uint8(torch.from_numpy(x).to(tdev)).float().cpu().numpy()
            enc_bf16 = enc.to(torch.bfloat16)
            xt = torch.from_numpy(x).to(tdev)
            sync = torch.cuda.synchronize if device == "cuda" else None
            t_torch = median_time(lambda: enc_bf16.forward_uint8(xt), sync=sync)
        cos = row_cosines(ours, ref)
        out[name] = {"batch": len(x), "ort_fp16_tiles_per_s": len(x) / t_ort, "torch_bf16_tiles_per_s": len(x) / t_torch,
                     "ratio_vs_torch_bf16": t_torch / t_ort, "cosine_mean": float(cos.mean()),
                     "cosine_min": float(cos.min())}
        log(f"encoder {name}: ORT fp16 {len(x) / t_ort:.0f} tiles/s, PyTorch bf16 {len(x) / t_torch:.0f} "
            f"({t_torch / t_ort:.2f}x), cosine min {cos.min():.5f}")
        runner.release()
        enc = enc_bf16 = None  # free the card before the next shape
    return out


# -- 3. the 0.5B-shaped decoder -------------------------------------------------------------------------------------------
def decoder_timings(work: Path, device: str, prompt_len: int, new: int, small: bool) -> dict:
    from locpath.engines.fused_graph import FusedDecoderSpec, build_fused_decoder
    from locpath.runtime.decoder_state import decoder_state
    from locpath.runtime.ort_runner import OrtRunner

    shape = dict(QWEN25_05B, num_layers=2, vocab=4096) if small else QWEN25_05B
    spec = FusedDecoderSpec(max_positions=prompt_len + new + 8, cara_layers=[], **shape)
    rng = np.random.default_rng(0)
    weights = {k: (rng.standard_normal(v, dtype=np.float32) * 0.02 if len(v) else np.float32(0.5))
               for k, v in spec.expected_weights().items()}
    for k in weights:
        if k.endswith(("ln1", "ln2")) or k == "norm":
            weights[k] = np.ones_like(weights[k])
    path = work / "decoder_0.5b.fp16.onnx"
    build_fused_decoder(spec, weights, path, quant="fp16")
    st = decoder_state(OrtRunner(path, "decoder_fused", device=device, spin=device == "cpu"), spec.contract("float16"))
    prompt = rng.integers(100, 4000, prompt_len)

    def run():
        cache = st.new_cache(1, prompt_len + new)
        t0 = time.perf_counter()
        logits = st.step(prompt[None], cache, np.ones((1, prompt_len), np.int64), {})
        t1 = time.perf_counter()
        tok = int(logits[0, -1].argmax())
        for _ in range(new - 1):
            logits = st.step(np.asarray([[tok]]), cache, np.ones((1, cache.length + 1), np.int64), {})
            tok = int(logits[0, -1].argmax())
        return t1 - t0, time.perf_counter() - t1

    run()
    runs = [run() for _ in range(3)]
    out = {"shape": "Qwen2.5-0.5B" + (" (2 layers, small vocab: --cpu)" if small else ""), "prompt_tokens": prompt_len,
           "new_tokens": new, "locpath_fused_fp16": {"prefill_ms": 1000 * float(np.median([r[0] for r in runs])),
                                                   "tokens_per_s": float(np.median([(new - 1) / r[1] for r in runs]))}}
    try:
        out["torch_bf16"] = _torch_decoder(shape, weights, prompt, new, device)
        out["ratio_decode_vs_torch_bf16"] = out["locpath_fused_fp16"]["tokens_per_s"] / out["torch_bf16"]["tokens_per_s"]
    except ImportError as exc:
        out["torch_bf16"] = {"skipped": f"transformers is not installed ({exc})"}
    return out


def _torch_decoder(shape: dict, weights: dict, prompt: np.ndarray, new: int, device: str) -> dict:
    """transformers' Qwen2 at the same shape (random weights, bf16, its KV cache), greedy: the PyTorch baseline."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                      num_key_value_heads=shape["num_kv_heads"], rms_norm_eps=shape["rms_eps"],
                      tie_word_embeddings=True, max_position_embeddings=4096)
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    model = Qwen2ForCausalLM(cfg).to(dev, torch.bfloat16).eval()
    ids = torch.tensor(prompt[None], device=dev)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run():
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            sync()
            t1 = time.perf_counter()
            cache = getattr(out, "cache", None) or out.past_key_values  # transformers 5 names it `cache`
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(new - 1):
                out = model(input_ids=tok, use_cache=True, **{cache_kw: cache})
                cache, tok = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            return t1 - t0, time.perf_counter() - t1

    run()
    runs = [run() for _ in range(3)]
    return {"prefill_ms": 1000 * float(np.median([r[0] for r in runs])),
            "tokens_per_s": float(np.median([(new - 1) / r[1] for r in runs]))}


# -- 4. a 10k-tile slide end to end -----------------------------------------------------------------------------------------
def slide_end_to_end(bundle: Path, slide: Path, device: str) -> dict:
    from locpath.runtime.options import RuntimeOptions
    from locpath.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, RuntimeOptions(device=device, use_cache=False, tile_batch=256,
                                                       reader_workers=8))
    a = pipe.ask(slide, QUESTIONS[0])
    b = pipe.ask(slide, QUESTIONS[1])  # the slide is in memory now: the question alone
    out = {"tiles": a.slide["tiles"], "tokens_after_stm": a.slide["tokens_after_stm"], "cold_ms": a.timings_ms,
           "cold_total_ms": a.timings_ms["total"], "next_question_ttft_ms": b.timings_ms["time_to_first_token"],
           "answers": [a.answer, b.answer]}
    try:
        out["torch_bf16"] = _torch_end_to_end(slide, device)
        out["ratio_vs_torch_bf16"] = out["torch_bf16"]["total_ms"] / out["cold_total_ms"]
    except ImportError as exc:
        out["torch_bf16"] = {"skipped": f"transformers is not installed ({exc})"}
    return out


def _torch_end_to_end(slide: Path, device: str) -> dict:
    """The shipped checkpoint in PyTorch bf16 on the same card: the same tile reader, encoder, STM, resampler,
    TIS, CARA and greedy answer."""
    import torch

    from locpath.checkpoints import shipped_checkpoint
    from locpath.models.checkpoint import load_checkpoint
    from locpath.models.slide_llm import SlideFeatures
    from locpath.wsi import open_slide
    from locpath.wsi.extract import extract_features, plan_tiles

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    model, tok = load_checkpoint(shipped_checkpoint("reference"))
    model = model.to(dev, torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with open_slide(slide) as s:
        plan = plan_tiles(s)

        def encode(tiles):
            with torch.no_grad():
                return model.tile_encoder.forward_uint8(torch.from_numpy(tiles).to(dev)).float().cpu().numpy()

        ff, _ = extract_features(s, encode, plan, model.cfg.tile_encoder.name, batch_size=256, workers=8)
    with torch.no_grad():
        merged = SlideFeatures(ff.features, ff.grid_index).merged(model.cfg)
        lat = model.slide_latents([merged])
        answer = model.answer(tok, lat, [QUESTIONS[0]])[0]
    sync()
    return {"total_ms": 1000 * (time.perf_counter() - t0), "answer": answer}


# -- verdicts --------------------------------------------------------------------------------------------------------------
MIN_AGREEMENT = 0.75  # fp16 rounding may flip an answer or two; a broken fp16 build agrees on almost none
MIN_COSINE = 0.99  # fp16 ViT features against PyTorch fp32: ~0.9999 when right


def verdicts(report: dict) -> dict[str, str]:
    """One line per check, "passed (what it saw)" or "FAILED: why", from what the parts measured; a part that
    raised or was skipped fails its check."""
    def verdict(name: str, res, judge) -> str:
        if res is None:
            return "FAILED: " + str(report["errors"].get(name) or report["skipped"].get(name) or "did not run")
        ok, what = judge(res)
        return f"passed ({what})" if ok else f"FAILED: {what}"

    def providers(res):
        off = [c for c, r in res.items() if not r["all_nodes_on_device"]]
        return not off, f"components needing another provider: {off}" if off else f"{len(res)} components"

    def agree(res):
        return (res["agreement"] >= MIN_AGREEMENT,
                f"{res['token_identical']}/{res['questions']} answers token-identical; {MIN_AGREEMENT:.0%} wanted")

    def encoders(res):
        seen = [f"{n}: {r['skipped']}" if "skipped" in r else f"{n} cosine min {r['cosine_min']:.5f}"
                for n, r in res.items()]
        return (all("skipped" not in r and r["cosine_min"] >= MIN_COSINE for r in res.values()) and bool(res),
                ", ".join(seen) + f"; {MIN_COSINE} wanted")

    def decoder(res):
        tps = res["locpath_fused_fp16"]["tokens_per_s"]
        return tps > 0, f"{tps:.1f} tokens/s"

    def slide(res):
        ok = res["tiles"] > 0 and all(isinstance(a, str) and a for a in res["answers"])
        return ok, f"{res['tiles']} tiles, answers {res['answers']}"

    built = "build_fp16" not in report["errors"] and "build_fp16" not in report["skipped"]
    return {"build_fp16": "passed" if built else verdict("build_fp16", None, None),
            "providers": verdict("providers", report.get("providers"), providers),
            "agreement": verdict("agreement", report.get("agreement_fp16_gpu_vs_fp32_cpu"), agree),
            "encoders": verdict("encoders", report.get("encoders"), encoders),
            "decoder_0.5b": verdict("decoder_0.5b", report.get("decoder_0.5b"), decoder),
            "slide_10k": verdict("slide_10k", report.get("slide_10k"), slide)}


# -- main -------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--budget", type=float, default=280.0, help="seconds; later parts are skipped past it")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU at small sizes")
    args = ap.parse_args(argv)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return run_checks(args, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="locpath-gpu-") as tmp:  # ~0.3 GB on --cpu: removed at the end
        return run_checks(args, Path(tmp))


def run_checks(args, work: Path) -> int:
    device = "cpu" if args.cpu else "cuda"
    clock = Clock(args.budget)
    if args.cpu:  # the fp16 bundle's engine configs say CUDA; the dry run runs it on the CPU anyway
        import locpath.runtime.pipeline as pipeline_mod

        if not callable(getattr(pipeline_mod, "check_engines", None)):
            raise SystemExit("gpu_check --cpu: locpath.runtime.pipeline.check_engines is gone; the dry run bypasses "
                             "it to run the CUDA build on the CPU: update this script")
        pipeline_mod.check_engines = lambda *a, **k: None
    report: dict = {"schema": "locpath-gpu-check/1", "device": device, "skipped": {}, "errors": {}}
    n_tiles = 600 if args.cpu else 10000
    slide = work / "slides" / f"scaling_{n_tiles}.tiff"
    (work / "slides").mkdir(exist_ok=True)
    writer = mp.get_context("spawn").Process(target=_write_slide, args=(str(slide), n_tiles))
    writer.start()
    report["card"] = card(device)
    log(f"card: {json.dumps(report['card'])}")
    if device == "cuda" and "CUDAExecutionProvider" not in report["card"]["providers"]:
        log("onnxruntime has no CUDA provider: install onnxruntime-gpu")
        writer.terminate()
        return 2

    def part(name, fn):
        if clock.left() < 20:
            report["skipped"][name] = "time budget"
            return None
        t0 = time.perf_counter()
        try:
            res = fn()
            log(f"{name} done in {time.perf_counter() - t0:.1f} s")
            return res
        except Exception as exc:
            report["errors"][name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:1000]
            log(f"{name} FAILED: {report['errors'][name]}")
            return None

    from locpath.checkpoints import shipped_bundle
    from locpath.engines.build import build_bundle
    from locpath.eval import eval_slides
    from locpath.runtime.options import RuntimeOptions
    from locpath.runtime.pipeline import Pipeline

    fp32 = shipped_bundle()
    fp16 = part("build_fp16", lambda: build_bundle(fp32, work / "fp16", "fp16", log=lambda m: None, overwrite=True))
    if fp16 is not None:
        report["providers"] = part("providers", lambda: provider_checks(fp16, device))

        def agree():
            slides = [p for _, p, _ in eval_slides(1, 3 if args.cpu else 8, work / "eval")]
            return agreement(Pipeline.from_bundle(fp16, RuntimeOptions(device=device, use_cache=False)),
                             Pipeline.from_bundle(fp32, RuntimeOptions(use_cache=False)), slides)

        report["agreement_fp16_gpu_vs_fp32_cpu"] = part("agreement", agree)
    tiles = None
    try:
        from locpath.synth import make_spec
        from locpath.train.data import render_tile, tissue_tiles

        spec = make_spec(5)
        tiles = np.stack([render_tile(spec, c, r) for c, r in tissue_tiles(spec).grid[:64]])
    except Exception as exc:
        report["skipped"]["encoders"] = f"no tiles ({exc})"
    if tiles is not None:
        report["encoders"] = part("encoders", lambda: encoder_timings(work, tiles, device, 16 if args.cpu else 64, clock,
                                                                      args.cpu))
    report["decoder_0.5b"] = part("decoder_0.5b", lambda: decoder_timings(work, device, 64, 64 if not args.cpu else 8,
                                                                           args.cpu))
    writer.join(timeout=max(clock.left() - 60, 1))
    if writer.is_alive() or not slide.exists():
        writer.terminate()
        report["skipped"]["slide_10k"] = "the slide was not written within the time budget"
    elif fp16 is not None:
        report["slide_10k"] = part("slide_10k", lambda: slide_end_to_end(fp16, slide, device))
    report["checks"] = verdicts(report)
    for name, verdict in report["checks"].items():
        log(f"check {name}: {verdict}")
    failed = [n for n, v in report["checks"].items() if not v.startswith("passed")]
    report["seconds"] = round(time.perf_counter() - clock.t0, 1)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    log(f"wrote {args.out} ({report['seconds']} s; errors: {list(report['errors']) or 'none'}; failed checks: "
        f"{failed or 'none'})")
    return 0 if not report["errors"] and not failed else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
