"""Per-slide feature files: TRIDENT/CLAM h5 (`features` and `coords`) and SlideChat CSVs.

h5, as TRIDENT writes it (mahmoodlab/TRIDENT `trident/IO.py` save_h5/coords_to_h5, `trident/wsi_objects/WSI.py`
extract_patch_features): `features` (N, D) float32/float16 with attributes name (the slide), savetodir and, in current
TRIDENT, encoder (the patch encoder's enc_name, e.g. conch_v1, uni_v2; the string 'None' when it had none); `coords`
(N, 2) int64 level-0 x, y with patch_size, patch_size_level0, level0_magnification, target_magnification, overlap,
name, savetodir (and level0_width/height). Older TRIDENT names the encoder only in its folder, features_<enc_name>.
CLAM's extract_features_fp writes no attributes at all. locpath writes TRIDENT's layout plus mpp values and the
encoder on `features`. Writes go to a temporary file in the same folder and are renamed into place.

SlideChat (uni-medical/SlideChat) feeds CONCH v1 features as one CSV per slide, read with pandas' defaults: a header
row, no index column, the first 512 columns the features, one row per 224 px patch, no coordinates.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..encoders import same_encoder
from ..errors import FeatureFileError
from ..fsutil import atomic_file

FEATURE_SUFFIXES = (".h5", ".hdf5", ".csv")  # what `ask`, `chat` and `batch` read as a feature file, not a slide


@dataclass
class FeatureFile:
    features: np.ndarray  # float (N, D)
    coords: np.ndarray  # int (N, 2), level-0 x, y (zeros when spatial is False)
    patch_size: int  # tile side at target resolution
    patch_size_level0: int
    level0_mpp: float
    target_mpp: float
    encoder: str  # "" when the file names none
    name: str = ""
    overlap: int = 0  # pixels at the target resolution shared by neighbouring tiles (TRIDENT's attribute)
    spatial: bool = True  # False: the tiles' positions are unknown (a SlideChat CSV), coords mean nothing
    encoder_from: str = ""  # where the encoder name was found (attribute, folder, format)

    @property
    def stride_level0(self) -> int:
        """Level-0 pixels between neighbouring tiles, (patch_size - overlap) at the target resolution, rounded as
        TRIDENT's patcher rounds it (patch and overlap scaled to level 0 separately)."""
        return max(1, self.patch_size_level0 - round(self.overlap * self.patch_size_level0 / self.patch_size))

    @property
    def grid_index(self) -> np.ndarray:
        """(N, 2) column/row of each tile on its grid: what STM uses for adjacency (all zeros when not spatial).

        Without overlap, coords // stride. With overlap, TRIDENT's patcher places column k >= 1 at
        k * patch - (k - 1) * overlap (level 0): the first step is a whole patch, later ones patch - overlap; its own
        inverse is 0 below one patch, else (x - patch) // stride + 1, used when every coordinate sits on that grid.
        Other grids with overlap (k * stride) are coords // stride."""
        n = len(self.features)
        if not self.spatial:
            return np.zeros((n, 2), np.int64)
        c = np.asarray(self.coords, np.int64).reshape(-1, 2)
        s, p0 = self.stride_level0, self.patch_size_level0
        if self.overlap > 0 and s < p0 and _on_trident_grid(c, p0, s):
            return np.where(c < p0, 0, (c - p0) // s + 1)
        return c // s

    @property
    def level0_magnification(self) -> float:
        return round(10.0 / self.level0_mpp, 2)

    @property
    def target_magnification(self) -> float:
        return round(10.0 / self.target_mpp, 2)


def _on_trident_grid(c: np.ndarray, p0: int, stride: int) -> bool:
    """Every coordinate is 0 or patch + k * stride, and none lies strictly between 0 and one patch (a grid of
    k * stride puts its second column there)."""
    v = c.ravel()
    return not ((v > 0) & (v < p0)).any() and bool(((v == 0) | ((v - p0) % stride == 0)).all())


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
        if not ff.spatial:
            c.attrs["spatial"] = 0  # coords are placeholders (the source carried no positions)
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


ENCODER_KEYS = ("encoder", "encoder_name", "patch_encoder", "model_name")  # attribute names that hold it
NO_NAME = ("", "none", "null", "unknown")  # TRIDENT stores a missing enc_name as the string 'None'


def _encoder_name(f, fds, cds, path: Path) -> tuple[str, str]:
    """(name, where it was found), or ("", "") when the file names no encoder. Looked for as an attribute of
    `features` (TRIDENT, locpath), of the file, of `coords`, then in TRIDENT's folder name features_<enc_name>.
    Never `name`: TRIDENT's `name` is the slide's."""
    for obj, label in ((fds, "'features'"), (f, "the file"), (cds, "'coords'")):
        for key in ENCODER_KEYS:
            v = obj.attrs.get(key)
            if isinstance(v, (bytes, str)):
                text = _text(v, path, f"attribute {key!r} of {label}").strip()
                if text.lower() not in NO_NAME:
                    return text, f"attribute {key!r} of {label}"
    folder = path.parent.name
    if folder.startswith("features_") and folder[len("features_"):].strip():
        return folder[len("features_"):], f"TRIDENT folder {folder}"
    return "", ""


def check_encoder(path, file_encoder: str, bundle_encoder: str, where: str = "", named: bool = True) -> None:
    """Refuse, in one line naming the file and both encoders, features from another encoder than the bundle's. Any
    alias of a registered encoder is the same encoder (encoders.same_encoder). A file naming no encoder is refused
    when `named` (an h5 can carry the name; TRIDENT writes it); with named=False (a CSV, which cannot) only its
    width is checked, by the caller."""
    if not file_encoder:
        if named:
            raise FeatureFileError(
                f"{path}: the file names no tile encoder (TRIDENT records it as attribute 'encoder' of 'features', "
                f"or in a features_<encoder> folder); this bundle needs {bundle_encoder!r} features")
        return
    if not same_encoder(file_encoder, bundle_encoder):
        src = f" ({where})" if where else ""
        raise FeatureFileError(f"{path}: features come from encoder {file_encoder!r}{src}; this bundle's tile "
                               f"encoder is {bundle_encoder!r}")


def read_features(path: str | os.PathLike, expect_dim: int | None = None,
                  expect_encoder: str | None = None) -> FeatureFile:
    """A TRIDENT/CLAM h5 or a SlideChat CSV (by suffix .csv), validated before anything reaches a graph: float16/
    float32 features of the expected width, finite, at least one tile; integer non-negative coords; positive patch
    sizes and mpp. `expect_encoder`: the bundle's encoder name, checked (check_encoder) before the data is read."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FeatureFileError(f"{path}: feature file not found")
    if not path.is_file():
        raise FeatureFileError(f"{path}: not a regular file")
    if path.suffix.lower() == ".csv":
        return read_slidechat_csv(path, expect_dim, expect_encoder)
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
        enc, enc_from = _encoder_name(f, fds, cds, path)
        if expect_encoder is not None and enc:  # another encoder's name says the most
            check_encoder(path, enc, expect_encoder, enc_from)
        if expect_dim is not None and dim != expect_dim:
            raise FeatureFileError(f"{path}: features are {dim} wide; this bundle's tile encoder gives {expect_dim}")
        if expect_encoder is not None and not enc:
            check_encoder(path, enc, expect_encoder)
        if cds.dtype.kind not in "iu":
            raise FeatureFileError(f"{path}: coords are {cds.dtype}; integers expected")
        feats = np.asarray(fds).reshape(n, dim)
        coords = np.asarray(cds).reshape(n, 2).astype(np.int64)
        if not np.isfinite(feats).all():
            raise FeatureFileError(f"{path}: features hold NaN or inf")
        if (coords < 0).any():
            raise FeatureFileError(f"{path}: coords hold negative positions")
        ca = dict(cds.attrs)
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
        spatial = _attr_int(ca, "spatial", path, default=1, lo=0) != 0
        name = ca.get("name", fds.attrs.get("name", ""))
        return FeatureFile(
            features=feats.astype(np.float32, copy=False),
            coords=coords,
            patch_size=patch,
            patch_size_level0=patch0,
            level0_mpp=mpp0,
            target_mpp=tmpp,
            encoder=enc,
            name=_text(name, path, "the slide name") if isinstance(name, (bytes, str)) else "",
            overlap=overlap,
            spatial=spatial,
            encoder_from=enc_from,
        )


# -- SlideChat CSVs ---------------------------------------------------------------------------------------------
SLIDECHAT_DIM = 512  # SlideChat reads the first 512 columns (CONCH v1's width); any further ones are ignored
SLIDECHAT_ENCODER = "conch_v1"
SLIDECHAT_PATCH = 224  # SlideChat's patches: 224 px at 20x; the CSV records no geometry
MAX_CSV_BYTES = 4 << 30  # refused before reading: about 1.5 million 512-wide rows
MAX_CSV_LINE = 4 << 20  # bytes in one row (65536 columns of long numbers fit)
_CSV_BLOCK = 1024  # rows converted at once


def _csv_cells(line: str) -> list[str]:
    return next(csv.reader([line])) if '"' in line else line.split(",")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_slidechat_csv(path: str | os.PathLike, expect_dim: int | None = None,
                       expect_encoder: str | None = None) -> FeatureFile:
    """One slide's features as SlideChat stores them: a CSV with a header row (pandas' column names, e.g. 0..511;
    skipped), one row per patch, the first 512 columns CONCH v1 features. A leading index column (pandas writes an
    empty or 'Unnamed: 0' header cell for it) is dropped; a first line that is numbers, not the column names
    0..W-1, is taken as a data row (a file without a header). A CSV narrower than 512 columns is read whole, as the
    features of an unnamed encoder (only its width can be checked). No coordinates: the result is not spatial.
    Read line by line within MAX_CSV_BYTES / MAX_CSV_LINE; every problem is one FeatureFileError naming the file
    and the line (lines count from 1, the header included)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FeatureFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size > MAX_CSV_BYTES:
        raise FeatureFileError(f"{path}: the CSV is {size} bytes; feature CSVs above {MAX_CSV_BYTES} bytes are refused")
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise FeatureFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with fh:
        return _read_csv(fh, path, expect_dim, expect_encoder)


def _read_csv(fh, path: Path, expect_dim, expect_encoder) -> FeatureFile:
    total = 0
    line_no = 0

    def lines():
        nonlocal total, line_no
        while True:
            raw = fh.readline(MAX_CSV_LINE + 1)
            if not raw:
                return
            line_no += 1
            total += len(raw)
            if total > MAX_CSV_BYTES:
                raise FeatureFileError(f"{path}: the CSV grew past {MAX_CSV_BYTES} bytes while being read")
            if len(raw) > MAX_CSV_LINE:
                raise FeatureFileError(f"{path}: line {line_no} is longer than {MAX_CSV_LINE} bytes")
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError:
                raise FeatureFileError(f"{path}: line {line_no} is not UTF-8 text") from None
            text = text.rstrip("\r\n")
            if text.strip():
                yield line_no, text

    rows = lines()
    first = next(rows, None)
    if first is None:
        raise FeatureFileError(f"{path}: the CSV is empty (no header, no tiles)")
    head = [c.strip() for c in _csv_cells(first[1])]
    skip = 1 if head[0] in ("", "Unnamed: 0") and len(head) > 1 else 0
    ncols = len(head)
    width = ncols - skip
    numeric = all(_is_number(c) for c in head[skip:])
    names = head[skip:] in ([str(i) for i in range(width)], [str(i) for i in range(1, width + 1)])
    header = not numeric or names
    dim = min(width, SLIDECHAT_DIM)
    enc = SLIDECHAT_ENCODER if width >= SLIDECHAT_DIM else ""
    enc_from = "a SlideChat CSV: its first 512 columns" if enc else ""
    if dim > MAX_DIM:
        raise FeatureFileError(f"{path}: {dim} columns exceed the {MAX_DIM} limit")
    if expect_encoder is not None:
        check_encoder(path, enc, expect_encoder, enc_from, named=False)
    if expect_dim is not None and dim != expect_dim:
        raise FeatureFileError(f"{path}: features are {dim} wide; this bundle's tile encoder gives {expect_dim}")

    blocks: list[np.ndarray] = []
    pending: list[tuple[int, list[str]]] = [] if header else [(first[0], head)]
    n = 0

    def flush():
        nonlocal n
        if not pending:
            return
        try:
            block = np.array([c[skip:skip + dim] for _, c in pending], dtype=np.float32)
        except ValueError:
            for no, cells in pending:  # find the first bad cell, for its line and column
                for j, cell in enumerate(cells[skip:skip + dim]):
                    if not _is_number(cell):
                        raise FeatureFileError(f"{path}: line {no}, column {skip + j + 1}: {cell.strip()[:40]!r} "
                                               "is not a number") from None
            raise FeatureFileError(f"{path}: lines {pending[0][0]}-{pending[-1][0]} hold cells that are not numbers") \
                from None
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise FeatureFileError(f"{path}: line {pending[int(np.argmax(bad))][0]} holds NaN or inf")
        blocks.append(block)
        n += len(block)
        if n > MAX_TILES:
            raise FeatureFileError(f"{path}: more than {MAX_TILES} rows (tiles); refused")
        pending.clear()

    for no, text in rows:
        cells = _csv_cells(text)
        if len(cells) != ncols:
            first_line = "header" if header else "first line"
            raise FeatureFileError(f"{path}: line {no} has {len(cells)} columns; the {first_line} has {ncols}")
        pending.append((no, cells))
        if len(pending) >= _CSV_BLOCK:
            flush()
    if header and not blocks and not pending:
        raise FeatureFileError(f"{path}: holds no tiles (a header and no rows)")
    flush()
    feats = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    return FeatureFile(
        features=feats,
        coords=np.zeros((len(feats), 2), np.int64),
        patch_size=SLIDECHAT_PATCH,
        patch_size_level0=SLIDECHAT_PATCH,
        level0_mpp=0.5,
        target_mpp=0.5,
        encoder=enc,
        name=path.stem,
        spatial=False,
        encoder_from=enc_from,
    )
