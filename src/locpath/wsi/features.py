"""Per-slide feature files compatible with TRIDENT and CLAM: h5 with `features` and `coords`.

Attributes follow TRIDENT (on `coords`: patch_size, patch_size_level0, level0_magnification,
target_magnification, overlap, name) plus mpp values and the encoder name on `features`.
Writes go to a temporary file in the same folder and are renamed into place.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
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
    overlap: int = 0  # pixels at the target resolution shared by neighbouring tiles (TRIDENT's attribute)

    @property
    def stride_level0(self) -> int:
        """Level-0 pixels between neighbouring tiles: what turns coordinates into tile-grid positions (STM)."""
        return max(1, round(self.patch_size_level0 * (self.patch_size - self.overlap) / self.patch_size))

    @property
    def grid_index(self) -> np.ndarray:
        return np.asarray(self.coords) // self.stride_level0

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
    # HDF5 is built in memory and written by Python: a failing disk (full, quota, read-only) then raises one
    # OSError here, where HDF5's own writes fail at close and can crash the process when its objects are freed
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
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
    with atomic_file(path, suffix=".h5") as tmp, open(tmp, "wb") as out:
        out.write(buf.getbuffer())
    return path


MAX_TILES = 4_000_000  # far above any slide at 20x; a larger dataset is refused before it is read
MAX_DIM = 65536
FLOAT_DTYPES = (np.dtype("float16"), np.dtype("float32"))


def _plain_dataset(f, key: str, path: Path):
    """A dataset stored in this file: no external link, virtual dataset or external raw storage (each would make
    h5py read another file the caller never named)."""
    import h5py

    if key not in f:
        raise FeatureFileError(f"{path}: missing dataset {key!r}")
    link = f.get(key, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise FeatureFileError(f"{path}: {key!r} is a link to another file, not a dataset of this one")
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise FeatureFileError(f"{path}: {key!r} is not a dataset")
    if ds.is_virtual or ds.external:
        raise FeatureFileError(f"{path}: {key!r} stores its data in other files")
    return ds


def _attr_int(attrs: dict, key: str, path: Path, default=None, lo: int = 1) -> int:
    v = attrs.get(key, default)
    try:
        iv = int(v)
        ok = np.ndim(v) == 0 and float(v) == iv and iv >= lo
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise FeatureFileError(f"{path}: coords attribute {key!r} must be an integer >= {lo}, got {_shown(v)!r}")
    return iv


def _attr_float(attrs: dict, key: str, path: Path) -> float:
    v = attrs[key]
    try:
        fv = float(v)
        ok = np.ndim(v) == 0 and np.isfinite(fv) and fv > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise FeatureFileError(f"{path}: coords attribute {key!r} must be a positive finite number, got {_shown(v)!r}")
    return fv


def _shown(v):
    """An attribute as a user wrote it: 0, not np.int64(0)."""
    return v.item() if isinstance(v, np.generic) else v


def _text(v, path: Path, what: str) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise FeatureFileError(f"{path}: {what} is not UTF-8 text") from None
    return str(v)


def read_features(path: str | os.PathLike, expect_dim: int | None = None) -> FeatureFile:
    """A TRIDENT/CLAM feature file, validated before anything reaches a graph: float16/float32 features of the
    expected width, finite, at least one tile; integer non-negative coords; positive patch sizes and mpp."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FeatureFileError(f"{path}: feature file not found")
    if not path.is_file():
        raise FeatureFileError(f"{path}: not a regular file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable HDF5 feature file ({str(exc).splitlines()[0][:200]})") from None
    with f:
        fds, cds = _plain_dataset(f, "features", path), _plain_dataset(f, "coords", path)
        fshape, cshape = tuple(fds.shape), tuple(cds.shape)
        # CLAM writes (1, N, D) features and (1, N, 2) coords; accept it
        if len(fshape) == 3 and fshape[0] == 1:
            fshape = fshape[1:]
        if len(cshape) == 3 and cshape[0] == 1:
            cshape = cshape[1:]
        if len(fshape) != 2 or len(cshape) != 2 or cshape[1] != 2 or cshape[0] != fshape[0]:
            raise FeatureFileError(
                f"{path}: features {tuple(fds.shape)} and coords {tuple(cds.shape)} do not match (want (N, D) and (N, 2))")
        n, dim = fshape
        if n < 1:
            raise FeatureFileError(f"{path}: holds no tiles (N = 0)")
        if n > MAX_TILES or dim > MAX_DIM:
            raise FeatureFileError(f"{path}: {n} x {dim} features exceed the {MAX_TILES} x {MAX_DIM} limit")
        if fds.dtype not in FLOAT_DTYPES:
            raise FeatureFileError(f"{path}: features are {fds.dtype}; float16 or float32 expected")
        if expect_dim is not None and dim != expect_dim:
            raise FeatureFileError(f"{path}: features are {dim} wide; this bundle's tile encoder gives {expect_dim}")
        if cds.dtype.kind not in "iu":
            raise FeatureFileError(f"{path}: coords are {cds.dtype}; integers expected")
        feats = np.asarray(fds).reshape(n, dim)
        coords = np.asarray(cds).reshape(n, 2).astype(np.int64)
        if not np.isfinite(feats).all():
            raise FeatureFileError(f"{path}: features hold NaN or inf")
        if (coords < 0).any():
            raise FeatureFileError(f"{path}: coords hold negative positions")
        ca = dict(cds.attrs)
        fa = dict(fds.attrs)
        if "patch_size" not in ca:
            raise FeatureFileError(f"{path}: coords has no 'patch_size' attribute")
        patch = _attr_int(ca, "patch_size", path)
        patch0 = _attr_int(ca, "patch_size_level0", path, default=patch)
        overlap = _attr_int(ca, "overlap", path, default=0, lo=0)
        if overlap >= patch:
            raise FeatureFileError(f"{path}: overlap {overlap} is not smaller than patch_size {patch}")
        if "level0_mpp" in ca:
            mpp0 = _attr_float(ca, "level0_mpp", path)
        elif "level0_magnification" in ca:
            mpp0 = 10.0 / _attr_float(ca, "level0_magnification", path)
        else:
            raise FeatureFileError(f"{path}: coords has neither 'level0_mpp' nor 'level0_magnification'")
        if "target_mpp" in ca:
            tmpp = _attr_float(ca, "target_mpp", path)
        elif "target_magnification" in ca:
            tmpp = 10.0 / _attr_float(ca, "target_magnification", path)
        else:
            tmpp = mpp0 * patch0 / patch
        enc = fa.get("encoder", f.attrs.get("encoder", "unknown"))
        return FeatureFile(
            features=feats.astype(np.float32, copy=False),
            coords=coords,
            patch_size=patch,
            patch_size_level0=patch0,
            level0_mpp=mpp0,
            target_mpp=tmpp,
            encoder=_text(enc, path, "the encoder name"),
            name=_text(ca.get("name", ""), path, "the slide name"),
            overlap=overlap,
        )
