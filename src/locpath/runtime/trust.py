"""How far to trust an answer: its calibrated confidence, whether its slide resembles the training slides, and
whether the slide holds enough tissue. The numbers come from the bundle's `trust.json` (fitted by `locpath trust
fit`, checksummed like every bundle file); a bundle without one still reports the uncalibrated confidence.

- confidence: the probability of the generated answer under the model (the product of its tokens' probabilities,
  the stop token included) with the logits divided by a temperature fitted on validation slides. Computed by the
  Generator from the logits it already has (one log-softmax per generated token); decoding is unchanged.
- out-of-distribution score, two parts from the slide's tile features, each divided by its 99th percentile on
  validation slides and summed: odd tiles (a high quantile over the slide's tiles of each tile's squared distance to
  its nearest training tiles, in the training tiles' whitened principal components) and an odd mix (the slide's
  per-feature mean and spread against the training slides', as mean squared z-scores).
- too little tissue: fewer tissue tiles than the bundle's minimum (from the training slides).
Torch-free.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.manifest import BundleError

TRUST_FILE = "trust.json"
SCHEMA = "locpath-trust/1"
UNCERTAIN = "uncertain"
MAX_TRUST_BYTES = 64 << 20
MAX_REFERENCES = 65536
KEEP_LOGITS = 512  # fitting: the largest logits kept per token (the log-softmax at any temperature from them)


@dataclass
class OodModel:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D) orthonormal rows: the training tiles' leading principal directions
    variances: np.ndarray  # (k,)
    residual_variance: float  # per remaining dimension; 0 when k == D
    references: np.ndarray  # (M, k) whitened training tiles
    neighbours: int  # a tile's distance: to its this-many-th nearest reference
    quantile: float
    threshold: float
    slide_mean: np.ndarray  # (2D,) over training slides: mean of their [per-feature mean, per-feature spread]
    slide_std: np.ndarray  # (2D,) and its standard deviation
    tile_scale: float = 1.0  # the two parts' 99th percentiles on validation slides (each part divided by its own)
    slide_scale: float = 1.0

    def tile_scores(self, features: np.ndarray) -> np.ndarray:
        """Per tile: squared distance to its `neighbours`-th nearest training tile in whitened feature space (plus
        the residual outside the kept components), over D: about 1 or less for a training-like tile. A nearest-
        neighbour distance, not one from the mean: tiles that collapse toward the mean (blurred) score high too."""
        x = np.asarray(features, np.float64) - self.mean
        z = (x @ self.components.T) / np.sqrt(self.variances)
        ref = self.references
        ref2 = (ref * ref).sum(axis=1)
        out = np.empty(len(x))
        kth = min(self.neighbours, len(ref)) - 1
        step = 128  # 128 tiles x M references at a time (4 MB at M = 4096): temporaries small enough that a
        for i in range(0, len(x), step):  # long-running service's allocator does not keep them
            zc = z[i:i + step]
            d2 = (zc * zc).sum(axis=1)[:, None] - 2 * zc @ ref.T + ref2[None, :]
            out[i:i + step] = np.partition(d2, kth, axis=1)[:, kth]
        if self.residual_variance > 0:
            proj = x @ self.components.T
            out += np.maximum((x * x).sum(axis=1) - (proj * proj).sum(axis=1), 0.0) / self.residual_variance
        return np.maximum(out, 0.0) / x.shape[1]

    def parts(self, features: np.ndarray) -> tuple[float, float]:
        """(odd tiles, odd mix): the `quantile` of the tiles' scores, and the mean squared z-score of the slide's
        per-feature mean and spread against the training slides' (a slide of ordinary-looking tiles in an
        unusual mix, or all alike, e.g. out of focus)."""
        f = np.asarray(features, np.float64)
        tiles = float(np.quantile(self.tile_scores(f), self.quantile))
        z = (np.concatenate([f.mean(axis=0), f.std(axis=0)]) - self.slide_mean) / self.slide_std
        return tiles, float(np.mean(z * z))

    def slide_score(self, features: np.ndarray) -> float | None:
        """The two parts, each over its validation 99th percentile, summed (about 2 or less for a training-like
        slide)."""
        if len(features) == 0:
            return None
        tiles, mix = self.parts(features)
        return tiles / self.tile_scale + mix / self.slide_scale


@dataclass
class TrustModel:
    temperature: float  # the confidence's calibration temperature
    confidence_threshold: float  # below it an answer carries a low_confidence warning
    min_tissue_tiles: int
    ood: OodModel
    fit: dict  # how it was fitted (seeds, slide counts, measured numbers)

    def to_dict(self) -> dict:
        o = self.ood
        return {"schema": SCHEMA,
                "confidence": {"method": "sequence_probability", "temperature": self.temperature,
                               "threshold": self.confidence_threshold},
                "tissue": {"min_tissue_tiles": self.min_tissue_tiles},
                "ood": {"method": "knn_whitened", "quantile": o.quantile, "threshold": o.threshold,
                        "neighbours": o.neighbours, "mean": o.mean.tolist(), "components": o.components.tolist(),
                        "variances": o.variances.tolist(), "residual_variance": o.residual_variance,
                        "references": np.round(o.references, 3).tolist(), "slide_mean": o.slide_mean.tolist(),
                        "slide_std": o.slide_std.tolist(), "tile_scale": o.tile_scale,
                        "slide_scale": o.slide_scale},
                "fit": self.fit}


def _number(d: dict, key: str, where: str, lo: float, hi: float = math.inf) -> float:
    v = d.get(key) if isinstance(d, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise BundleError(f"{where}: {key} must be a number in [{lo:g}, {hi:g}]")
    return float(v)


def _array(d: dict, key: str, where: str, shape: tuple) -> np.ndarray:
    try:
        a = np.asarray(d.get(key), np.float64)
    except (TypeError, ValueError):
        raise BundleError(f"{where}: {key} must be an array of numbers") from None
    if a.shape != shape:
        raise BundleError(f"{where}: {key} must be an array of shape {shape}, got {a.shape}")
    if not np.isfinite(a).all():
        raise BundleError(f"{where}: {key} holds NaN or infinite values")
    return a


def parse_trust(obj: object, where: str, feature_dim: int) -> TrustModel:
    """A TrustModel from trust.json's object, every field checked (a bad one names the file and the field)."""
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
        raise BundleError(f"{where}: not a {SCHEMA} document")
    conf, tissue, ood = (obj.get(k) if isinstance(obj.get(k), dict) else {} for k in ("confidence", "tissue", "ood"))
    if conf.get("method") != "sequence_probability" or ood.get("method") != "knn_whitened":
        raise BundleError(f"{where}: unknown confidence or ood method")
    comps = ood.get("components")
    k = len(comps) if isinstance(comps, list) else -1
    if not 1 <= k <= feature_dim:
        raise BundleError(f"{where}: ood.components must hold 1 to {feature_dim} rows")
    refs = ood.get("references")
    m = len(refs) if isinstance(refs, list) else 0
    if not 1 <= m <= MAX_REFERENCES:
        raise BundleError(f"{where}: ood.references must hold 1 to {MAX_REFERENCES} rows")
    model = OodModel(_array(ood, "mean", where + ": ood", (feature_dim,)),
                     _array(ood, "components", where + ": ood", (k, feature_dim)),
                     _array(ood, "variances", where + ": ood", (k,)),
                     _number(ood, "residual_variance", where + ": ood", 0.0),
                     _array(ood, "references", where + ": ood", (m, k)),
                     int(_number(ood, "neighbours", where + ": ood", 1, m)),
                     _number(ood, "quantile", where + ": ood", 0.0, 1.0),
                     _number(ood, "threshold", where + ": ood", 0.0),
                     _array(ood, "slide_mean", where + ": ood", (2 * feature_dim,)),
                     _array(ood, "slide_std", where + ": ood", (2 * feature_dim,)),
                     _number(ood, "tile_scale", where + ": ood", 1e-12),
                     _number(ood, "slide_scale", where + ": ood", 1e-12))
    if (model.variances <= 0).any() or (model.slide_std <= 0).any():
        raise BundleError(f"{where}: ood.variances and ood.slide_std must be positive")
    tiles = _number(tissue, "min_tissue_tiles", where + ": tissue", 0, 1e9)
    fit = obj.get("fit") if isinstance(obj.get("fit"), dict) else {}
    return TrustModel(_number(conf, "temperature", where + ": confidence", 1e-3, 1e3),
                      _number(conf, "threshold", where + ": confidence", 0.0, 1.0), int(tiles), model, fit)


def load_trust(bundle_dir: Path, manifest) -> TrustModel | None:
    """The bundle's trust model when its manifest lists trust.json (verified with the bundle's other files)."""
    if TRUST_FILE not in manifest.files:
        return None
    path = Path(bundle_dir) / TRUST_FILE
    from ..bundle.paths import read_bounded

    try:
        obj = json.loads(read_bounded(path, MAX_TRUST_BYTES, "trust file").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: invalid JSON ({exc})") from None
    return parse_trust(obj, str(path), manifest.model_config.feature_dim)


# -- per token, per slide, per answer --------------------------------------------------------------------
def token_logprob(logits: np.ndarray, token: int, temperature: float) -> float:
    """log softmax(logits / T)[token]: one pass over the vocabulary."""
    z = np.asarray(logits, np.float32)
    m = float(z.max())
    lse = m / temperature + math.log(float(np.exp((z - m) / temperature, dtype=np.float32).sum(dtype=np.float64)))
    return float(z[token]) / temperature - lse


def kept_logits(logits: np.ndarray, token: int) -> tuple[float, np.ndarray]:
    """What fitting keeps of one step: the chosen token's logit and the largest KEEP_LOGITS logits."""
    z = np.asarray(logits, np.float32)
    top = z if len(z) <= KEEP_LOGITS else np.partition(z, -KEEP_LOGITS)[-KEEP_LOGITS:]
    return float(z[token]), top.copy()


def sequence_confidence(kept: list, temperature: float) -> float:
    """The answer's probability at `temperature` from `kept_logits` of each of its steps (fitting)."""
    total = 0.0
    for chosen, top in kept:
        z = top.astype(np.float64) / temperature
        m = z.max()
        total += chosen / temperature - (m + math.log(np.exp(z - m).sum()))
    return math.exp(min(total, 0.0))


def slide_trust(model: TrustModel | None, features: np.ndarray) -> dict:
    """What an answer reports of its slide (kept in the SlideContext, so a cached slide has it too)."""
    n = int(len(features))
    if model is None:
        return {"ood_score": None, "ood_threshold": None, "out_of_distribution": None, "tissue_tiles": n,
                "min_tissue_tiles": None, "too_little_tissue": None}
    score = model.ood.slide_score(features)
    return {"ood_score": None if score is None else round(score, 4), "ood_threshold": round(model.ood.threshold, 4),
            "out_of_distribution": bool(score is not None and score > model.ood.threshold), "tissue_tiles": n,
            "min_tissue_tiles": model.min_tissue_tiles, "too_little_tissue": n < model.min_tissue_tiles}


def _warnings(slide: dict, confidence: float | None, threshold: float | None) -> list[dict]:
    out = []
    if slide.get("out_of_distribution"):
        out.append({"code": "out_of_distribution", "message": (
            f"this slide does not look like the slides the model was trained on (out-of-distribution score "
            f"{slide['ood_score']:g} > threshold {slide['ood_threshold']:g}): its answers and their confidence "
            "cannot be relied on")})
    if slide.get("too_little_tissue"):
        out.append({"code": "too_little_tissue", "message": (
            f"too little tissue: {slide['tissue_tiles']} tissue tiles, fewer than the {slide['min_tissue_tiles']} "
            "the model needs as evidence; the answer rests on little evidence")})
    if confidence is not None and threshold is not None and confidence < threshold:
        out.append({"code": "low_confidence", "message": (
            f"low confidence: {confidence:.3f} is below {threshold:.3f}; treat this answer as doubtful")})
    return out


def answer_trust(model: TrustModel | None, slide: dict | None, logprobs: list[float],
                 abstain_below: float | None) -> dict:
    """The Answer's "trust" field (schema in docs/architecture.md); "abstained" says whether the caller's
    abstain_below replaced the answer with "uncertain"."""
    raw = math.exp(min(sum(logprobs), 0.0)) if logprobs else None
    confidence = round(raw, 6) if raw is not None else None
    slide = slide or {}
    threshold = abstain_below if abstain_below is not None else (model.confidence_threshold if model else None)
    abstained = abstain_below is not None and (raw is None or raw < abstain_below)
    return {"confidence": confidence, "calibrated": model is not None,
            "temperature": model.temperature if model else 1.0, "slide": slide,
            "warnings": _warnings(slide, raw, threshold), "abstained": abstained}
