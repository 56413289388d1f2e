"""The statistics behind the trust numbers: Mahalanobis statistics of tile features, temperature scaling of the
answers' sequence probabilities, expected calibration error, accuracy against coverage and AUROC."""

from __future__ import annotations

import math

import numpy as np

from ..runtime.trust import OodModel, sequence_confidence

MAX_COMPONENTS = 128  # a wide encoder (1024+ features) keeps its leading components and one residual variance
SHRINK = 0.01  # covariance shrinkage toward the mean variance (a few thousand tiles against up to 1024 dims)
TEMPERATURES = np.exp(np.linspace(math.log(0.1), math.log(20.0), 161))


def fit_ood(features: np.ndarray, slides: np.ndarray, quantile: float, references: int = 4096, neighbours: int = 5,
            seed: int = 0) -> OodModel:
    """Mean, principal components and whitened reference tiles of the training tiles' features, and the mean and
    spread of the training slides' summaries `slides` (N, 2D); scales and threshold are set later, on validation."""
    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    d = cov.shape[0]
    cov = (1 - SHRINK) * cov + SHRINK * np.trace(cov) / d * np.eye(d)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    k = min(d, MAX_COMPONENTS)
    resid = float(vals[k:].mean()) if k < d else 0.0
    comps, var = vecs[:, :k].T.copy(), vals[:k].copy()
    pick = np.random.default_rng(seed).choice(len(x), min(references, len(x)), replace=False)
    refs = ((x[pick] - mean) @ comps.T) / np.sqrt(var)
    return OodModel(mean, comps, var, resid, refs, neighbours, quantile, 0.0, slides.mean(axis=0),
                    slides.std(axis=0) + 1e-6 * (np.abs(slides).mean() + 1e-12))


def slide_summary(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, np.float64)
    return np.concatenate([f.mean(axis=0), f.std(axis=0)])


def set_scales(ood: OodModel, val_features: list, margin: float) -> np.ndarray:
    """Each part's scale and the threshold from validation slides; returns their scores."""
    parts = np.array([ood.parts(f) for f in val_features])
    ood.tile_scale = float(max(np.quantile(parts[:, 0], 0.99), 1e-12))
    ood.slide_scale = float(max(np.quantile(parts[:, 1], 0.99), 1e-12))
    scores = parts[:, 0] / ood.tile_scale + parts[:, 1] / ood.slide_scale
    ood.threshold = float(margin * np.quantile(scores, 0.99))
    return scores


def nll(conf: np.ndarray, correct: np.ndarray) -> float:
    p = np.clip(conf, 1e-9, 1 - 1e-9)
    return float(-np.mean(np.where(correct, np.log(p), np.log(1 - p))))


def fit_temperature(kept: list, correct: np.ndarray) -> tuple[float, dict]:
    """The temperature whose sequence probabilities best predict correctness (binary log loss on validation
    answers, a proper scoring rule), searched on a log grid; with its validation loss and ECE. Without a single
    wrong validation answer the loss falls with the temperature without end: the temperature stays 1."""
    correct = np.asarray(correct, bool)
    if correct.all():
        conf = np.array([sequence_confidence(k, 1.0) for k in kept])
        return 1.0, {"val_log_loss": round(nll(conf, correct), 5), "val_ece": round(ece(conf, correct), 5),
                     "note": "no wrong validation answer: temperature left at 1"}
    best = None
    for t in TEMPERATURES:
        conf = np.array([sequence_confidence(k, float(t)) for k in kept])
        loss = nll(conf, correct)
        if best is None or loss < best[1]:
            best = (float(t), loss, conf)
    t, loss, conf = best
    return t, {"val_log_loss": round(loss, 5), "val_ece": round(ece(conf, correct), 5)}


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - mean confidence| per equal-width confidence bin, weighted by the
    bin's share of answers."""
    conf, correct = np.asarray(conf, float), np.asarray(correct, float)
    if len(conf) == 0:
        return 0.0
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def coverage_table(conf: np.ndarray, correct: np.ndarray, thresholds) -> list[dict]:
    """Per threshold: the share of answers at or above it (coverage) and their accuracy."""
    conf, correct = np.asarray(conf, float), np.asarray(correct, bool)
    rows = []
    for t in thresholds:
        m = conf >= t
        rows.append({"threshold": round(float(t), 4), "coverage": round(float(m.mean()), 4) if len(m) else 0.0,
                     "accuracy": round(float(correct[m].mean()), 4) if m.any() else None, "answered": int(m.sum())})
    return rows


def choose_confidence_threshold(conf: np.ndarray, correct: np.ndarray, target: float = 0.995) -> float:
    """The lowest confidence threshold whose answered validation answers are at least `target` accurate (most
    coverage at that accuracy); 0 when every answer already is."""
    conf, correct = np.asarray(conf, float), np.asarray(correct, bool)
    for t in np.unique(conf):
        m = conf >= t
        if correct[m].mean() >= target:
            return float(t)
    return float(conf.max()) if len(conf) else 0.0


def auroc(negatives, positives) -> float:
    """Probability that a positive (OOD) slide scores above a negative one (ties count half)."""
    neg, pos = np.asarray(negatives, float), np.asarray(positives, float)
    if not len(neg) or not len(pos):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
