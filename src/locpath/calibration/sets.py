"""`locpath calibrate`: calibration data from the tissue tiles of real or synthetic slides, and the downstream
inputs they produce (resampler tokens, latents, question ids, prompts), stored as one npz keyed by
"<component>.<input>[.<sample>]" and cached under <bundle>/calibration/<key>.npz.

The key covers the bundle's fp32 graphs, the slides' content hashes and the sampling parameters, so the same
request is never recomputed and a changed slide or bundle never reuses a stale set.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.integrity import verify_bundle
from ..bundle.paths import sha256_file
from ..errors import LocpathError
from ..fsutil import atomic_file
from ..synth.qa import TEMPLATES
from ..wsi.factory import check_slide_file


@dataclass
class CalibrationSet:
    path: Path
    arrays: dict[str, np.ndarray]
    cached: bool

    @classmethod
    def load(cls, path: str | os.PathLike, cached: bool = True) -> "CalibrationSet":
        p = Path(path)
        if not p.exists():
            raise LocpathError(f"{p}: calibration file not found")
        try:
            with np.load(p) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise LocpathError(f"{p}: not a calibration set ({exc})") from exc
        if "tile_encoder.tiles" not in arrays:
            raise LocpathError(f"{p}: not a calibration set (no tile_encoder.tiles)")
        return cls(p, arrays, cached=cached)

    def tiles(self) -> np.ndarray:
        return self.arrays["tile_encoder.tiles"]

    def samples(self, component: str, name: str) -> list[np.ndarray]:
        prefix = f"{component}.{name}."
        keys = sorted((k for k in self.arrays if k.startswith(prefix)), key=lambda k: int(k.rsplit(".", 1)[1]))
        return [self.arrays[k] for k in keys]


def calibration_key(bundle: Path, slides: list[Path], tiles_per_slide: int, seed: int) -> str:
    m = verify_bundle(bundle, check_files=False)
    parts = [m.components[c].sha256 for c in sorted(m.components)]
    parts += [sha256_file(s) for s in slides]
    parts += [str(tiles_per_slide), str(seed)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_calibration(bundle: str | os.PathLike, slides: list[str | os.PathLike], tiles_per_slide: int = 48,
                      seed: int = 0, out: str | os.PathLike | None = None, log=print) -> CalibrationSet:
    """Sample tissue tiles from each slide and run them through the fp32 bundle to collect every graph's inputs."""
    from ..runtime.pipeline import Pipeline
    from ..stm import merge_tokens
    from ..wsi import TileReader, open_slide
    from ..wsi.extract import extract_features

    bundle = Path(bundle)
    slides = [Path(s) for s in slides]
    if not slides:
        raise LocpathError("calibration needs at least one slide (--slides)")
    for s in slides:
        check_slide_file(s)
    key = calibration_key(bundle, slides, tiles_per_slide, seed)
    path = Path(out) if out else bundle / "calibration" / f"{key}.npz"
    if path.exists():
        cal = CalibrationSet.load(path)
        if str(cal.arrays.get("meta.key")) == key:
            return cal
    pipe = Pipeline.from_bundle(bundle, use_cache=False)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    tiles = []
    qi = 0
    for si, sp in enumerate(slides):
        with open_slide(sp) as s:
            plan = pipe.plan_tiles(s)
            reader = TileReader(s, plan.grid)
            pick = np.sort(rng.choice(len(plan.grid), min(tiles_per_slide, len(plan.grid)), replace=False))
            for i in pick:
                x, y = plan.grid.coords[i]
                tiles.append(reader.read_tile(s, int(x), int(y)))
            ff, _ = extract_features(s, pipe.encode_tiles, plan, pipe.cfg.tile_encoder.name)
        stm = pipe.manifest.preprocessing.stm
        merged = merge_tokens(ff.features, ff.grid_index, stm["window"], stm["threshold"], stm["enabled"])
        arrays[f"resampler.tokens.{si}"] = merged.features[None]
        arrays[f"resampler.positions.{si}"] = merged.positions[None]
        arrays[f"resampler.counts.{si}"] = merged.counts[None]
        lat = pipe.compress(ff).latents
        for qtype, qs in TEMPLATES.items():
            q = qs[rng.integers(len(qs))]
            ids = pipe.question_ids(q)
            arrays[f"tis.latents.{qi}"] = lat
            arrays[f"tis.question_ids.{qi}"] = np.asarray([ids], np.int64)
            arrays[f"decoder.prompt.{qi}"] = np.asarray(pipe.prompt_ids(q), np.int64)
            qi += 1
        log(f"calibrate: {sp.name}: {len(pick)} tiles of {len(plan.grid)}, {len(merged)} STM tokens")
    arrays["tile_encoder.tiles"] = np.stack(tiles)
    arrays["meta.key"] = np.asarray(key)
    arrays["meta.slides"] = np.asarray(json.dumps([str(s) for s in slides]))
    with atomic_file(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    pipe.release()
    return CalibrationSet(path, arrays, cached=False)
