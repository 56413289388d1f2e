"""`locpath trust fit`: a bundle's trust.json from synthetic slides run through the torch-free runtime, as users run
it (slide files -> OpenSlide -> tissue -> tiles -> encoder -> answers).

- training slides (split "train" of --train-seed: the reference model's own training slides when it is the seed it
  was trained with): the tile-feature statistics of the OOD score and the minimum tissue tiles;
- validation slides (split "eval" of --val-seed, which must differ from the seeds held out for measuring): the
  confidence temperature, the confidence threshold and the OOD threshold.
trust.json is then listed in the manifest and SHA256SUMS (a signature over the old checksums no longer holds).
"""

from __future__ import annotations

import datetime as _dt
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ..bundle.integrity import is_signed, write_manifest
from ..errors import LocpathError
from ..fsutil import atomic_file
from ..runtime.trust import TRUST_FILE, TrustModel, sequence_confidence
from ..synth.qa import normalize_answer, questions_for
from ..synth.seeds import split_seed
from ..synth.world import make_spec
from ..synth.writer import write_slide
from . import stats

TILES_PER_SLIDE = 400  # training tiles kept per slide for the feature statistics
OOD_QUANTILE = 0.9  # a slide's score: this quantile of its tiles' scores
OOD_MARGIN = 1.25  # the OOD threshold: this times the 99th percentile of the validation slides' scores
TISSUE_FRACTION = 0.5  # the minimum tissue tiles: this share of the fewest a training slide had
CONFIDENCE_TARGET = 0.995  # the confidence threshold: validation accuracy of answered questions at least this


def _log(progress, text: str) -> None:
    if progress:
        print(text, flush=True)


def training_features(pipe, seed: int, count: int, work: Path, progress=False):
    """Tile features (at most TILES_PER_SLIDE per slide), slide summaries and tissue-tile counts of `count`
    training slides."""
    rng = np.random.default_rng([seed, 4242])
    feats, summaries, tiles = [], [], []
    for i in range(count):
        path = write_slide(make_spec(split_seed(seed, "train", i)), work / f"train_{i:04d}.svs", write_truth=False)
        ctx = pipe.prepare(path, keep_features=True)
        f = np.asarray(ctx.features.features, np.float32)
        tiles.append(len(f))
        summaries.append(stats.slide_summary(f))
        if len(f) > TILES_PER_SLIDE:
            f = f[rng.choice(len(f), TILES_PER_SLIDE, replace=False)]
        feats.append(f)
        path.unlink()
        pipe.forget_slides()
        if progress and (i + 1) % 10 == 0:
            _log(progress, f"trust fit: {i + 1}/{count} training slides")
    return np.concatenate(feats), np.array(summaries), tiles


def answered_slides(pipe, seed: int, count: int, work: Path, progress=False, name: str = "validation") -> list[dict]:
    """Per held-out slide (split "eval" of `seed`): its tile features and its answers (kept logits, correctness)."""
    out = []
    for i in range(count):
        spec = make_spec(split_seed(seed, "eval", i))
        path = write_slide(spec, work / f"eval_{seed}_{i:04d}.svs", write_truth=False)
        qs = questions_for(spec)
        ctx = pipe.prepare(path, keep_features=True)
        answers = pipe.answer(ctx, [q["question"] for q in qs])
        out.append({"slide": path.name, "features": np.asarray(ctx.features.features, np.float32),
                    "answers": [{"type": q["type"], "kept": a.kept_logits, "answer": a.answer,
                                 "correct": normalize_answer(a.answer) == normalize_answer(q["answer"])}
                                for q, a in zip(qs, answers)]})
        path.unlink()
        pipe.forget_slides()
        if progress and (i + 1) % 10 == 0:
            _log(progress, f"trust fit: {i + 1}/{count} {name} slides")
    return out


def fit_trust(pipe, train_seed: int, val_seed: int, train_slides: int, val_slides: int, progress=False) -> TrustModel:
    """The trust model of `pipe`'s bundle (Pipeline with keep_logits set by the caller)."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="locpath-trust-") as tmp:
        feats, summaries, tiles = training_features(pipe, train_seed, train_slides, Path(tmp), progress)
        val = answered_slides(pipe, val_seed, val_slides, Path(tmp), progress)
    ood = stats.fit_ood(feats, summaries, OOD_QUANTILE)
    val_scores = stats.set_scales(ood, [v["features"] for v in val], OOD_MARGIN)
    kept = [a["kept"] for v in val for a in v["answers"]]
    correct = np.array([a["correct"] for v in val for a in v["answers"]])
    temperature, cal = stats.fit_temperature(kept, correct)
    conf = np.array([sequence_confidence(k, temperature) for k in kept])
    threshold = stats.choose_confidence_threshold(conf, correct, CONFIDENCE_TARGET)
    fit = {"train_seed": train_seed, "train_split": "train", "train_slides": train_slides, "train_tiles": len(feats),
           "val_seed": val_seed, "val_split": "eval", "val_slides": val_slides, "val_answers": int(len(correct)),
           "val_accuracy": round(float(correct.mean()), 5), **cal,
           "val_ood_scores": {"max": round(float(val_scores.max()), 4),
                              "q99": round(float(np.quantile(val_scores, 0.99)), 4),
                              "median": round(float(np.median(val_scores)), 4)},
           "rules": {"ood_quantile": OOD_QUANTILE, "ood_threshold": f"{OOD_MARGIN} x validation 99th percentile",
                     "min_tissue_tiles": f"{TISSUE_FRACTION} x the fewest tissue tiles of a training slide",
                     "confidence_threshold": f"lowest with validation accuracy of answered >= {CONFIDENCE_TARGET}",
                     "temperature": "least binary log loss of the answers' sequence probability vs correctness"},
           "train_tissue_tiles": {"min": int(min(tiles)), "median": float(np.median(tiles)), "max": int(max(tiles))},
           "tile_encoder_sha256": pipe.manifest.components["tile_encoder"].sha256,
           "seconds": round(time.time() - t0, 1),
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return TrustModel(temperature, threshold, max(1, int(TISSUE_FRACTION * min(tiles))), ood, fit)


def write_trust(bundle_dir: str | Path, model: TrustModel) -> Path:
    """trust.json into the bundle, listed in its manifest and SHA256SUMS (a signature is removed: re-sign)."""
    from ..bundle.integrity import verify_bundle

    b = Path(bundle_dir)
    manifest = verify_bundle(b)
    with atomic_file(b / TRUST_FILE) as tmp:
        tmp.write_text(json.dumps(model.to_dict(), separators=(",", ":")))
    manifest.record_file(b, TRUST_FILE)
    write_manifest(b, manifest)
    return b / TRUST_FILE


def fit_bundle(bundle: str | Path, train_seed: int, val_seed: int, train_slides: int, val_slides: int,
               options=None, progress=False) -> tuple[TrustModel, bool]:
    """Fit and write a bundle's trust.json; returns the model and whether a signature was removed."""
    from ..runtime.options import RuntimeOptions
    from ..runtime.pipeline import Pipeline

    if train_slides < 2 or val_slides < 2:
        raise LocpathError("trust fit needs at least 2 training and 2 validation slides")
    options = (options or RuntimeOptions()).replace(use_cache=False)
    pipe = Pipeline.from_bundle(bundle, options)
    pipe.keep_logits = True
    try:
        model = fit_trust(pipe, train_seed, val_seed, train_slides, val_slides, progress)
    finally:
        pipe.release()
    signed = is_signed(bundle)
    write_trust(bundle, model)
    return model, signed
