"""`locpath eval --trust`: how far the trust numbers of a bundle hold on held-out synthetic slides and on the
out-of-distribution set (oodset.py), through the torch-free runtime as users run it.

- calibration: expected calibration error of the answers' confidence, and accuracy against coverage (answering only
  at or above a confidence threshold);
- OOD detector: AUROC of the slides' OOD score, OOD set (positives) against the held-out synthetic slides
  (negatives); the share of held-out slides flagged (false flags) and of each OOD kind flagged."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import LocpathError
from ..synth.qa import normalize_answer, questions_for
from ..synth.seeds import split_seed
from ..synth.world import make_spec
from ..synth.writer import write_slide
from . import stats
from .oodset import ood_set

THRESHOLDS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)


def held_out(pipe, seed: int, count: int, work: Path, progress=False) -> tuple[list[dict], list[dict]]:
    """(answer records, slide records) of `count` held-out slides of `seed` (split "eval", as `locpath eval`)."""
    answers, slides = [], []
    for i in range(count):
        spec = make_spec(split_seed(seed, "eval", i))
        path = write_slide(spec, work / f"eval_{seed}_{i:04d}.{('svs', 'tiff')[i % 2]}", fmt=("svs", "tiff")[i % 2],
                           write_truth=False)
        qs = questions_for(spec)
        ctx = pipe.prepare(path)
        for q, a in zip(qs, pipe.answer(ctx, [q["question"] for q in qs])):
            answers.append({"slide": path.name, "type": q["type"], "answer": a.answer, "truth": q["answer"],
                            "correct": normalize_answer(a.answer) == normalize_answer(q["answer"]),
                            "confidence": a.trust["confidence"]})
        slides.append({"slide": path.name, "kind": "in_distribution", **ctx.trust})
        path.unlink()
        pipe.forget_slides()
        if progress and (i + 1) % 10 == 0:
            print(f"eval --trust: {i + 1}/{count} held-out slides", flush=True)
    return answers, slides


def calibration(answers: list[dict], threshold: float) -> dict:
    conf = np.array([a["confidence"] for a in answers], float)
    correct = np.array([a["correct"] for a in answers], bool)
    at = stats.coverage_table(conf, correct, [threshold])[0]
    return {"answers": len(answers), "accuracy": round(float(correct.mean()), 4) if len(correct) else None,
            "mean_confidence": round(float(conf.mean()), 4) if len(conf) else None,
            "ece": round(stats.ece(conf, correct), 4), "bundle_threshold": at,
            "coverage_table": stats.coverage_table(conf, correct, sorted(set(THRESHOLDS) | {threshold}))}


def ood_report(in_dist: list[dict], ood: list[dict]) -> dict:
    neg = [s["ood_score"] for s in in_dist if s["ood_score"] is not None]
    kinds = sorted({s["kind"] for s in ood})
    per_kind = {}
    for k in kinds:
        sel = [s for s in ood if s["kind"] == k]
        scores = [s["ood_score"] if s["ood_score"] is not None else float("inf") for s in sel]
        per_kind[k] = {"slides": len(sel), "flagged": round(float(np.mean([bool(s["out_of_distribution"]) or
                                                                             s["ood_score"] is None for s in sel])), 4),
                       "auroc": round(stats.auroc(neg, scores), 4)}
    pos = [s["ood_score"] if s["ood_score"] is not None else float("inf") for s in ood]
    return {"auroc": round(stats.auroc(neg, pos), 4) if ood else None,
            "false_flag_rate": round(float(np.mean([bool(s["out_of_distribution"]) for s in in_dist])), 4),
            "ood_flagged": round(float(np.mean([bool(s["out_of_distribution"]) or s["ood_score"] is None
                                                for s in ood])), 4) if ood else None,
            "in_distribution_slides": len(in_dist), "ood_slides": len(ood), "per_kind": per_kind}


def evaluate_trust(bundle, seed: int, count: int, ood_per_kind: int, real_slides=(), options=None,
                   progress=False, with_records=False) -> dict:
    """The trust report of a bundle (its trust.json) on `count` held-out slides of `seed` and the OOD set."""
    from ..runtime.options import RuntimeOptions
    from ..runtime.pipeline import Pipeline

    t0 = time.time()
    pipe = Pipeline.from_bundle(bundle, (options or RuntimeOptions()).replace(use_cache=False))
    if pipe.trust is None:
        raise LocpathError(f"{bundle}: this bundle has no trust.json; fit one with `locpath trust fit {bundle}`")
    try:
        with tempfile.TemporaryDirectory(prefix="locpath-trust-eval-") as tmp:
            answers, in_dist = held_out(pipe, seed, count, Path(tmp), progress)
            ood = []
            for kind, path in _ood_paths(seed, ood_per_kind, Path(tmp), real_slides):
                ood.append({"slide": path.name, "kind": kind, **pipe.prepare(path).trust})
                pipe.forget_slides()
    finally:
        pipe.release()
    out = {"bundle": str(bundle), "seed": seed, "count": count, "temperature": pipe.trust.temperature,
           "calibration": calibration(answers, pipe.trust.confidence_threshold),
           "ood": dict(ood_report(in_dist, ood), threshold=pipe.trust.ood.threshold),
           "too_little_tissue": {"min_tissue_tiles": pipe.trust.min_tissue_tiles,
                                 "held_out_flagged": sum(bool(s["too_little_tissue"]) for s in in_dist)},
           "seconds": round(time.time() - t0, 1)}
    if with_records:
        out["records"] = {"answers": answers, "slides": in_dist + ood}
    return out


def _ood_paths(seed: int, per_kind: int, work: Path, real_slides) -> list:
    out = []
    for i, real in enumerate(real_slides):
        d = work / f"real{i}"
        d.mkdir()
        out += ood_set(seed, 0, d, Path(real))
    return out + ood_set(seed, per_kind, work, None)
