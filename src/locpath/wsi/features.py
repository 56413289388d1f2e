"""Per-slide feature files compatible with TRIDENT and CLAM: h5 with `features` and `coords`.

Attributes follow TRIDENT (on `coords`: patch_size, patch_size_level0, level0_magnification,
target_magnification, overlap, name) plus mpp values and the encoder name on `features`.
Writes go to a temporary file in the same folder and are renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FeatureFileError
from ..fsutil import atomic_file


@dataclass
class FeatureFile:
    features: np.ndarray  # float (N, D)
    coords: np.ndarray  # int (N, 2), level-0 x, y
    patch_size: int  # tile side at target resolution
    patch_size_level0: int
    level0_mpp: float
    target_mpp: float
    encoder: str
    name: str = ""
    overlap: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def level0_magnification(self) -> float:
        return round(10.0 / self.level0_mpp, 2)

    @property
    def target_magnification(self) -> float:
        return round(10.0 / self.target_mpp, 2)


def write_features(path: str | os.PathLike, ff: FeatureFile) -> Path:
    import h5py

    path = Path(path)
    feats = np.asarray(ff.features)
    coords = np.asarray(ff.coords)
    if feats.ndim != 2 or coords.shape != (len(feats), 2):
        raise FeatureFileError(
            f"{path}: features must be (N, D) and coords (N, 2); got {feats.shape} and {coords.shape}"
        )
    with atomic_file(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        d = f.create_dataset("features", data=feats)
        d.attrs["encoder"] = ff.encoder
        c = f.create_dataset("coords", data=coords.astype(np.int64))
        c.attrs["patch_size"] = int(ff.patch_size)
        c.attrs["patch_size_level0"] = int(ff.patch_size_level0)
        c.attrs["level0_magnification"] = float(ff.level0_magnification)
        c.attrs["target_magnification"] = float(ff.target_magnification)
        c.attrs["level0_mpp"] = float(ff.level0_mpp)
        c.attrs["target_mpp"] = float(ff.target_mpp)
        c.attrs["overlap"] = int(ff.overlap)
        c.attrs["name"] = ff.name
        for k, v in ff.extra.items():
            f.attrs[k] = v
    return path


def read_features(path: str | os.PathLike) -> FeatureFile:
    import h5py

    path = Path(path)
    if not path.exists():
        raise FeatureFileError(f"{path}: feature file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable HDF5 feature file ({exc})") from exc
    with f:
        for key in ("features", "coords"):
            if key not in f:
                raise FeatureFileError(f"{path}: missing dataset {key!r}")
        feats = np.asarray(f["features"])
        coords = np.asarray(f["coords"])
        # CLAM writes (1, N, D) features; accept it
        if feats.ndim == 3 and feats.shape[0] == 1:
            feats = feats[0]
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        if feats.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(feats):
            raise FeatureFileError(
                f"{path}: features {feats.shape} and coords {coords.shape} do not match (want (N, D) and (N, 2))"
            )
        ca = dict(f["coords"].attrs)
        fa = dict(f["features"].attrs)
        if "patch_size" not in ca:
            raise FeatureFileError(f"{path}: coords has no 'patch_size' attribute")
        patch = int(ca["patch_size"])
        patch0 = int(ca.get("patch_size_level0", patch))
        if "level0_mpp" in ca:
            mpp0 = float(ca["level0_mpp"])
        elif "level0_magnification" in ca:
            mpp0 = 10.0 / float(ca["level0_magnification"])
        else:
            raise FeatureFileError(f"{path}: coords has neither 'level0_mpp' nor 'level0_magnification'")
        if "target_mpp" in ca:
            tmpp = float(ca["target_mpp"])
        elif "target_magnification" in ca:
            tmpp = 10.0 / float(ca["target_magnification"])
        else:
            tmpp = mpp0 * patch0 / patch
        enc = fa.get("encoder", f.attrs.get("encoder", "unknown"))
        return FeatureFile(
            features=feats,
            coords=coords.astype(np.int64),
            patch_size=patch,
            patch_size_level0=patch0,
            level0_mpp=mpp0,
            target_mpp=tmpp,
            encoder=str(enc.decode() if isinstance(enc, bytes) else enc),
            name=str(ca.get("name", "")),
            overlap=int(ca.get("overlap", 0)),
            extra={k: v for k, v in f.attrs.items()},
        )
