"""`locpath build --precision auto`: the CPU bundle whose backend and precision are chosen per stage by
measurement on this machine, not by rule.

Candidates: tile encoder + resampler on ORT fp32, ORT dynamic INT8 (encoder), OpenVINO bf16 or OpenVINO NNCF INT8
(encoder; resampler bf16) when OpenVINO/NNCF are installed; decoder on ORT fp32 or ORT INT4 (the fused graph
when the bundle has one, as the runtime would run it). A candidate qualifies when its encoder features keep cosine >= 0.995 against
fp32 on the calibration tiles, or when its decoder's greedy answers to the calibration questions are token for
token those of fp32; among qualifying candidates the fastest (tiles/s, decode tokens/s, measured back to back)
wins. The decision and every measurement are recorded in the manifest under export.build.auto.
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


def choose(src: Path, cal, log=print, int4_block_size: int = 32) -> dict:
    """Measure every candidate; return {'encoder': name, 'decoder': name, 'recipe': (backend, precision), ...}."""
    from ..engines.build import build_bundle
    from ..runtime.machine import openvino_version
    from ..runtime.pipeline import Pipeline
    from .report import decode_speed, encoder_speed, mean_cosine

    tiles = cal.tiles()
    with tempfile.TemporaryDirectory(prefix="locpath-auto-") as tmp:
        cands = {"ort-fp32": Pipeline.from_bundle(src, use_cache=False)}
        b = build_bundle(src, Path(tmp) / "int8", "int8", log=lambda m: None, int4_block_size=int4_block_size)
        cands["ort-int8"] = Pipeline.from_bundle(b, use_cache=False)
        if openvino_version() is not None:
            b = build_bundle(src, Path(tmp) / "ov", "bf16", backend="openvino", log=lambda m: None)
            cands["openvino-bf16"] = Pipeline.from_bundle(b, use_cache=False)
            try:
                import nncf  # noqa: F401
            except ImportError:
                log("auto: NNCF is not installed, OpenVINO INT8 not measured")
            else:
                b = build_bundle(src, Path(tmp) / "ovint8", "int8", backend="openvino", calibration=cal,
                                 log=lambda m: None)
                cands["openvino-int8"] = Pipeline.from_bundle(b, use_cache=False)
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
            enc[name]["cosine"] = mean_cosine(p.encode_tiles(tiles), ref_feats)
        for key in dec:
            dec[key]["tokens_per_s"] = float(np.median(dec[key]["tokens_per_s"]))
        dec["ort-fp32"]["agreement"] = 1.0
        dec["ort-fp32"]["graph"] = cands["ort-fp32"].decoder_component
        dec["ort-int4"]["graph"] = cands["ort-int8"].decoder_component
        int4 = _answers(cands["ort-int8"], cal)
        dec["ort-int4"]["agreement"] = float(np.mean([a == b for a, b in zip(int4, ref_answers)]))
        for p in cands.values():
            p.release()
    best_enc, best_dec, recipe = decide(enc, dec)
    log(f"auto: encoder {best_enc} ({enc[best_enc]['tiles_per_s']:.0f} tiles/s), decoder {best_dec} "
        f"({dec[best_dec]['tokens_per_s']:.0f} tok/s) -> {recipe[0]} {recipe[1]}")
    return {"encoder": best_enc, "decoder": best_dec, "recipe": list(recipe), "encoder_candidates": enc,
            "decoder_candidates": dec, "min_cosine": MIN_COSINE}


RECIPES = {("ort-fp32", "ort-fp32"): ("ort", "fp32"), ("ort-fp32", "ort-int4"): ("ort", "int4"),
           ("ort-int8", "ort-int4"): ("ort", "int8"), ("ort-int8", "ort-fp32"): ("ort", "int8-encoder"),
           ("openvino-bf16", "ort-fp32"): ("openvino", "bf16"), ("openvino-bf16", "ort-int4"): ("openvino", "bf16+int4"),
           ("openvino-int8", "ort-fp32"): ("openvino", "int8"), ("openvino-int8", "ort-int4"): ("openvino", "int8+int4")}


def decide(enc: dict, dec: dict) -> tuple[str, str, tuple[str, str]]:
    """The fastest encoder whose features keep cosine >= MIN_COSINE against fp32 and the fastest decoder whose
    greedy answers equal fp32's, and the build recipe that pairs them. fp32 always qualifies."""
    ok_enc = {k: v for k, v in enc.items() if v["cosine"] >= MIN_COSINE}
    ok_dec = {k: v for k, v in dec.items() if v["agreement"] == 1.0}
    best_enc = max(ok_enc, key=lambda k: ok_enc[k]["tiles_per_s"])
    best_dec = max(ok_dec, key=lambda k: ok_dec[k]["tokens_per_s"])
    return best_enc, best_dec, RECIPES[(best_enc, best_dec)]


def build_auto(src: Path, out: Path, cal, overwrite: bool = False, log=print, int4_block_size: int = 32) -> Path:
    """Measure, then build the winning recipe; the decision and every measurement go into the manifest."""
    from ..engines.build import build_bundle

    if cal is None:
        raise LocpathError("--precision auto measures candidates on a calibration set: pass --calibration or --slides")
    if Path(out).exists() and not overwrite:
        raise LocpathError(f"{out}: already exists (pass --overwrite to replace it)")
    decision = choose(src, cal, log, int4_block_size)
    backend, precision = decision["recipe"]
    return build_bundle(src, out, precision, backend=backend, calibration=cal, overwrite=overwrite, log=log,
                        int4_block_size=int4_block_size, record={"auto": json.loads(json.dumps(decision))})
