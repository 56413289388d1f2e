"""`locpath build --precision auto`: the CPU bundle whose backend and precision are chosen per stage by
measurement on this machine, not by rule.

Candidates: tile encoder + resampler on ORT fp32, ORT dynamic INT8 (encoder), OpenVINO bf16 or OpenVINO NNCF INT8
(encoder; resampler bf16) when OpenVINO/NNCF are installed; decoder on ORT fp32 or ORT INT4 (the fused graph
when the bundle has one, as the runtime would run it). An encoder candidate qualifies when its *minimum*
per-tile feature cosine against fp32 is >= 0.995 over every calibration tile, those the INT8 recipe calibrated on
and those it held out (a mean hides the tiles INT8 breaks; OpenVINO INT8 is built by the int8-safe recipe,
engines/encoder_int8.py), or when its decoder's greedy answers to the calibration questions are token for
token those of fp32; among qualifying candidates the fastest (tiles/s, decode tokens/s, measured back to back)
wins. The prefill is chosen on its own (per phase): when the decoder is the fused INT4 graph, the INT8 prefill
graph (engines/prefill.py, decoder_fused_prefill) is a candidate beside the decode graph itself; the fastest
prompt (ms) whose greedy answers equal fp32's wins. The decision and every measurement are recorded in the manifest
under export.build.auto.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LocpathError

MIN_COSINE = 0.995


def _answers(pipe, cal) -> list[list[int]]:
    """Greedy answers (8 tokens at most) to the calibration set's questions about its slides' latents."""
    params = pipe.sampling(max_new_tokens=8, do_sample=False)
    out = []
    lats, qids = cal.samples("tis", "latents"), cal.samples("tis", "question_ids")
    for lat, ids in zip(lats, qids):
        q = pipe.tokenizer.decode([int(i) for i in ids[0]])
        gen = pipe.generator(pipe.question_kv(lat.astype(np.float32), q), q, params)
        out.append(list(gen.tokens()))
    return out


def _prefill_ms(pipe, question: str = "What is the diagnosis?") -> float:
    """The prompt's prefill through the Pipeline's own generator (cross K/V fixed), median of 3 after a warm-up."""
    import time

    lat = np.random.default_rng(0).normal(size=(1, pipe.cfg.resampler.num_latents, pipe.cfg.resampler.dim)).astype(np.float32)
    qkv = pipe.question_kv(lat, question)
    params = pipe.sampling(max_new_tokens=1, do_sample=False)

    def run():
        t0 = time.perf_counter()
        pipe.generator(qkv, question, params)
        return time.perf_counter() - t0

    run()
    return 1000 * float(np.median([run() for _ in range(3)]))


def choose_prefill(cands: dict) -> str:
    """The fastest prefill whose greedy answers equal fp32's; the decode graph itself always qualifies."""
    ok = {k: v for k, v in cands.items() if v["agreement"] == 1.0 or k == "decode-graph"}
    return min(ok, key=lambda k: ok[k]["prefill_ms"])


def choose(src: Path, cal, log=print, int4_block_size: int = 32, prefill: str = "auto") -> dict:
    """Measure every candidate; return {'encoder': name, 'decoder': name, 'recipe': (backend, precision), ...}."""
    from ..engines.build import build_bundle
    from ..runtime.machine import openvino_version
    from ..runtime.pipeline import Pipeline
    from .report import decode_speed, encoder_speed

    tiles = cal.tiles()
    refused: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="locpath-auto-") as tmp:
        cands = {"ort-fp32": Pipeline.from_bundle(src, use_cache=False)}
        b = build_bundle(src, Path(tmp) / "int8", "int8", log=lambda m: None, int4_block_size=int4_block_size)
        cands["ort-int8"] = Pipeline.from_bundle(b, use_cache=False)
        pre = None
        if prefill == "auto" and cands["ort-int8"].decoder_component == "decoder_fused":
            b = build_bundle(src, Path(tmp) / "int8pre", "int8", log=lambda m: None, int4_block_size=int4_block_size,
                             prefill="int8")
            pre = Pipeline.from_bundle(b, use_cache=False)
        if openvino_version() is not None:
            b = build_bundle(src, Path(tmp) / "ov", "bf16", backend="openvino", log=lambda m: None)
            cands["openvino-bf16"] = Pipeline.from_bundle(b, use_cache=False)
            try:
                import nncf  # noqa: F401
            except ImportError:
                log("auto: NNCF is not installed, OpenVINO INT8 not measured")
            else:
                try:
                    b = build_bundle(src, Path(tmp) / "ovint8", "int8-safe", backend="openvino", calibration=cal,
                                     log=lambda m: None)
                    cands["openvino-int8"] = Pipeline.from_bundle(b, use_cache=False)
                except LocpathError as exc:  # no float set kept every tile at the bound: not a candidate
                    refused["openvino-int8"] = str(exc)
                    log(f"auto: OpenVINO INT8 refused ({exc})")
        ref_feats = cands["ort-fp32"].encode_tiles(tiles)
        ref_answers = _answers(cands["ort-fp32"], cal)
        enc, dec = {}, {}
        for _ in range(2):  # two rounds, alternating, so machine noise spreads over every candidate
            for name, p in cands.items():
                enc.setdefault(name, {"tiles_per_s": []})["tiles_per_s"].append(encoder_speed(p, tiles))
            for name in ("ort-fp32", "ort-int8"):
                key = "ort-fp32" if name == "ort-fp32" else "ort-int4"
                dec.setdefault(key, {"tokens_per_s": []})["tokens_per_s"].append(decode_speed(cands[name]))
        for name, p in cands.items():
            enc[name]["tiles_per_s"] = float(np.median(enc[name]["tiles_per_s"]))
            enc[name].update(tile_cosine_summary(p.encode_tiles(tiles), ref_feats))
        for key in dec:
            dec[key]["tokens_per_s"] = float(np.median(dec[key]["tokens_per_s"]))
        dec["ort-fp32"]["agreement"] = 1.0
        dec["ort-fp32"]["graph"] = cands["ort-fp32"].decoder_component
        dec["ort-int4"]["graph"] = cands["ort-int8"].decoder_component
        int4 = _answers(cands["ort-int8"], cal)
        dec["ort-int4"]["agreement"] = float(np.mean([a == b for a, b in zip(int4, ref_answers)]))
        pref: dict = {}
        if pre is not None:
            pairs = {"decode-graph": cands["ort-int8"], "prefill-int8": pre}
            for _ in range(2):
                for name, p in pairs.items():
                    pref.setdefault(name, {"prefill_ms": []})["prefill_ms"].append(_prefill_ms(p))
            for name, p in pairs.items():
                pref[name]["prefill_ms"] = float(np.median(pref[name]["prefill_ms"]))
            pref["decode-graph"]["agreement"] = dec["ort-int4"]["agreement"]
            pref["prefill-int8"]["agreement"] = float(np.mean([a == b for a, b in zip(_answers(pre, cal), ref_answers)]))
            pre.release()
        for p in cands.values():
            p.release()
    best_enc, best_dec, recipe = decide(enc, dec)
    best_pre = choose_prefill(pref) if pref and best_dec == "ort-int4" else None
    log(f"auto: encoder {best_enc} ({enc[best_enc]['tiles_per_s']:.0f} tiles/s), decoder {best_dec} "
        f"({dec[best_dec]['tokens_per_s']:.0f} tok/s) -> {recipe[0]} {recipe[1]}")
    if best_pre:
        log(f"auto: prefill {best_pre} ({pref[best_pre]['prefill_ms']:.1f} ms)")
    return {"encoder": best_enc, "decoder": best_dec, "recipe": list(recipe), "encoder_candidates": enc,
            "encoder_refused": refused,
            "decoder_candidates": dec, "min_cosine": MIN_COSINE, "prefill": best_pre or "decode-graph",
            "prefill_candidates": pref}


RECIPES = {("ort-fp32", "ort-fp32"): ("ort", "fp32"), ("ort-fp32", "ort-int4"): ("ort", "int4"),
           ("ort-int8", "ort-int4"): ("ort", "int8"), ("ort-int8", "ort-fp32"): ("ort", "int8-encoder"),
           ("openvino-bf16", "ort-fp32"): ("openvino", "bf16"), ("openvino-bf16", "ort-int4"): ("openvino", "bf16+int4"),
           ("openvino-int8", "ort-fp32"): ("openvino", "int8-safe"),
           ("openvino-int8", "ort-int4"): ("openvino", "int8-safe+int4")}


def tile_cosine_summary(feats: np.ndarray, ref: np.ndarray) -> dict:
    """Per-tile cosine against fp32: min and mean over all calibration tiles, and over the part the INT8 recipe
    calibrated on and the part it held out (the same split as engines/encoder_int8.py)."""
    from ..engines.encoder_int8 import held_out_mask
    from .report import row_cosines

    c = row_cosines(feats, ref)
    held = held_out_mask(len(c))
    return {"cosine_min": float(c.min()), "cosine_mean": float(c.mean()),
            "calibration_cosine_min": float(c[~held].min()), "held_out_cosine_min": float(c[held].min())
            if held.any() else None, "tiles": int(len(c))}


def decide(enc: dict, dec: dict) -> tuple[str, str, tuple[str, str]]:
    """The fastest encoder whose every tile keeps feature cosine >= MIN_COSINE against fp32 (`cosine_min`, not the
    mean) and the fastest decoder whose greedy answers equal fp32's, and the build recipe that pairs them. fp32
    always qualifies."""
    ok_enc = {k: v for k, v in enc.items() if v["cosine_min"] >= MIN_COSINE}
    ok_dec = {k: v for k, v in dec.items() if v["agreement"] == 1.0}
    best_enc = max(ok_enc, key=lambda k: ok_enc[k]["tiles_per_s"])
    best_dec = max(ok_dec, key=lambda k: ok_dec[k]["tokens_per_s"])
    return best_enc, best_dec, RECIPES[(best_enc, best_dec)]


def build_auto(src: Path, out: Path, cal, overwrite: bool = False, log=print, int4_block_size: int = 32,
               prefill: str = "auto") -> Path:
    """Measure, then build the winning recipe; the decision and every measurement go into the manifest."""
    from ..engines.build import build_bundle

    if cal is None:
        raise LocpathError("--precision auto measures candidates on a calibration set: pass --calibration or --slides")
    if Path(out).exists() and not overwrite:
        raise LocpathError(f"{out}: already exists (pass --overwrite to replace it)")
    decision = choose(src, cal, log, int4_block_size, prefill)
    backend, precision = decision["recipe"]
    pre = "int8" if decision["prefill"] == "prefill-int8" else "none" if prefill == "auto" else prefill
    return build_bundle(src, out, precision, backend=backend, calibration=cal, overwrite=overwrite, log=log,
                        int4_block_size=int4_block_size, record={"auto": json.loads(json.dumps(decision))},
                        prefill=pre if backend == "ort" else "none")
