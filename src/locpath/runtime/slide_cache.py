"""Per-slide cache of features and latents, keyed by the slide file's content hash and the bundle.

<root>/<bundle_key>/<entry>/{features.h5, latents.npy, attention.npy, assignment.npy, meta.json}, each entry written into a temporary folder and
renamed, so a crash never leaves a half entry. <entry> is the slide's sha256 (or, with an mpp override, the
sha256 of the digest and the override): always 64 hex digits computed here, never a string read from a file.

Hashing a multi-GB slide takes seconds, so digests are memoised in <root>/hashes.json by (real path, device,
inode, size, mtime, ctime). The memo is a hint, not a trust anchor: a cache folder may be shared by several users,
so every entry records a fingerprint of its slide (size and 1 MiB sampled across the file) that must match the
file being asked about, a miss or a mismatch re-hashes the whole file, and new entries are always written under
a digest computed from the file itself. Entries are validated (meta keys, latents shape/dtype/finite values,
feature file) before use; a damaged one is dropped with one warning and recomputed. A cache that cannot be
written (read-only folder, full disk) is switched off with one warning; the answer is still given.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.paths import check_sha256, confined, is_sha256, read_bounded, sha256_file
from ..errors import FeatureFileError, LocpathError, warn
from ..fsutil import atomic_dir, atomic_file
from ..wsi.features import FeatureFile, read_features, write_features

CACHE_VERSION = 3
MEMO = "hashes.json"
MEMO_MAX_BYTES = 16 << 20
MEMO_MAX_ENTRIES = 20000
FINGERPRINT_CHUNK = 64 << 10
FINGERPRINT_CHUNKS = 16


def cache_root() -> Path:
    """$LOCPATH_CACHE, else $XDG_CACHE_HOME/locpath, else ~/.cache/locpath."""
    base = os.environ.get("LOCPATH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "locpath")
    return Path(base)


def default_cache_dir() -> Path:
    return cache_root() / "slides"


def _series(path) -> list[Path] | None:
    """The DICOM files of a series folder, or None for a plain slide file."""
    if Path(path).is_dir():
        from ..wsi.dicom import dicom_files

        return dicom_files(path)
    return None


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the size and up to 1 MiB read at evenly spaced offsets (first and last chunk included); for a
    DICOM series folder, of its files' names and fingerprints."""
    files = _series(path)
    if files is not None:
        return hashlib.sha256("".join(f.name + fingerprint(f) for f in files).encode()).hexdigest()
    size = os.stat(path).st_size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        span = max(size - FINGERPRINT_CHUNK, 0)
        offsets = sorted({round(span * i / (FINGERPRINT_CHUNKS - 1)) for i in range(FINGERPRINT_CHUNKS)})
        for off in offsets:
            f.seek(off)
            h.update(f.read(FINGERPRINT_CHUNK))
    return h.hexdigest()


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a slide file, or of a DICOM series folder's (name, sha256) list."""
    files = _series(path)
    if files is not None:
        return hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()
    return sha256_file(path)


def file_identity(path: str | os.PathLike) -> str:
    """This exact state of a file: real path, device, inode, size, mtime and ctime (any write changes ctime); for a
    DICOM series folder, the same of each of its files."""
    if _series(path) is not None:
        from ..wsi.dicom import folder_identity

        return f"{Path(path).resolve()}|{folder_identity(Path(path))}"
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def entry_name(digest: str, mpp_override: float | None) -> str:
    """The cache folder of a slide: its digest, or for an mpp override (another tile grid) a digest of both."""
    check_sha256(digest, "slide digest")
    if mpp_override is None:
        return digest
    return hashlib.sha256(f"{digest}|mpp={float(mpp_override)!r}".encode()).hexdigest()


@dataclass
class Expected:
    """What a valid entry of this bundle holds."""

    num_latents: int
    latent_dim: int
    feature_dim: int


@dataclass
class CachedSlide:
    features: FeatureFile
    latents: np.ndarray  # (1, L, D)
    attention: np.ndarray  # (L, T)
    assignment: np.ndarray  # (N,)
    meta: dict


class SlideCache:
    def __init__(self, root: str | os.PathLike, bundle_key: str, expected: Expected):
        if not re.fullmatch(r"[0-9a-f]{16,64}", bundle_key):
            raise LocpathError(f"slide cache: bad bundle key {bundle_key!r}")
        self.root = Path(root)
        self.bundle_key = bundle_key
        self.expected = expected
        self.writable = True

    @property
    def dir(self) -> Path:
        return self.root / self.bundle_key

    # -- content hashes -------------------------------------------------------------------------
    def _memo_key(self, path: Path) -> str:
        return file_identity(path)

    def _read_memo(self) -> dict[str, str]:
        p = self.root / MEMO
        if not p.exists():
            return {}
        try:
            obj = json.loads(read_bounded(p, MEMO_MAX_BYTES, "hash memo").decode("utf-8"))
        except (LocpathError, ValueError, UnicodeDecodeError):
            return {}
        entries = obj.get("entries") if isinstance(obj, dict) and obj.get("version") == CACHE_VERSION else None
        if not isinstance(entries, dict):
            return {}
        return {k: v for k, v in entries.items() if isinstance(k, str) and is_sha256(v)}

    def memo_digest(self, path: Path) -> str | None:
        """The memoised digest of this exact file state, or None (a hint: entries are verified by fingerprint)."""
        return self._read_memo().get(self._memo_key(path))

    def content_hash(self, path: Path) -> str:
        """The slide's sha256, computed from the file (or series), and memoised."""
        digest = content_digest(path)
        key = self._memo_key(path)
        if self.writable:
            memo = self._read_memo()
            prefix = key.split("|", 1)[0] + "|"
            memo = {k: v for k, v in memo.items() if not k.startswith(prefix)}
            memo[key] = digest
            if len(memo) > MEMO_MAX_ENTRIES:
                memo = dict(list(memo.items())[-MEMO_MAX_ENTRIES:])
            self._write(lambda: self._write_memo(memo))
        return digest

    def _write_memo(self, memo: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_file(confined(self.root, MEMO)) as tmp:
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": memo}))

    # -- entries ------------------------------------------------------------------------------------
    def _entry(self, name: str) -> Path:
        check_sha256(name, "slide cache entry")
        return confined(self.root, self.bundle_key, name)

    def get(self, name: str, fprint: str) -> CachedSlide | None:
        """The entry if present, valid and made from a file with this fingerprint; None otherwise."""
        d = self._entry(name)
        if not d.is_dir():
            return None
        try:
            return self._load(d, fprint)
        except _Stale:
            return None  # another file state (an edited slide, a poisoned memo): not ours, recomputed elsewhere
        except (LocpathError, OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"{d}: damaged slide-cache entry dropped and recomputed ({str(exc)[:200]})")
            self._drop(d)
            return None

    def _load(self, d: Path, fprint: str) -> CachedSlide:
        meta = json.loads(read_bounded(d / "meta.json", 1 << 20, "cache meta").decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("meta.json is not a JSON object")
        if isinstance(meta.get("version"), int) and meta["version"] != CACHE_VERSION:
            raise _Stale()  # written by another locpath version: recomputed and replaced, no warning
        for key in ("tiles", "tokens"):
            if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 1:
                raise ValueError(f"meta.json: {key} must be a positive integer")
        if not is_sha256(meta.get("fingerprint")):
            raise ValueError("meta.json: no fingerprint")
        if meta["fingerprint"] != fprint:
            raise _Stale()
        e = self.expected
        lat = np.load(d / "latents.npy", allow_pickle=False)
        if lat.dtype != np.float32 or lat.shape != (1, e.num_latents, e.latent_dim):
            raise ValueError(f"latents {lat.dtype} {lat.shape}, want float32 (1, {e.num_latents}, {e.latent_dim})")
        if not np.isfinite(lat).all():
            raise ValueError("latents hold NaN or inf")
        ff = read_features(d / "features.h5", expect_dim=e.feature_dim)
        if len(ff.features) != meta["tiles"]:
            raise ValueError(f"features.h5 holds {len(ff.features)} tiles, meta.json says {meta['tiles']}")
        att = np.load(d / "attention.npy", allow_pickle=False)
        if att.dtype != np.float32 or att.shape != (e.num_latents, meta["tokens"]) or not np.isfinite(att).all():
            raise ValueError(f"attention {att.dtype} {att.shape}, want finite float32 ({e.num_latents}, {meta['tokens']})")
        asg = np.load(d / "assignment.npy", allow_pickle=False)
        if asg.dtype.kind not in "iu" or asg.shape != (meta["tiles"],) or asg.min() < 0 or asg.max() >= meta["tokens"]:
            raise ValueError("assignment.npy does not map every tile to a token")
        return CachedSlide(ff, lat, att, asg.astype(np.int64), meta)

    def put(self, name: str, fprint: str, features: FeatureFile, comp, meta: dict) -> Path | None:
        """Store a slide's features and its `Compressed` (latents, attention, STM assignment)."""
        d = self._entry(name)
        record = dict(meta, version=CACHE_VERSION, fingerprint=check_sha256(fprint, "fingerprint"))

        def write():
            with atomic_dir(d) as tmp:
                write_features(tmp / "features.h5", features)
                np.save(tmp / "latents.npy", np.ascontiguousarray(comp.latents, np.float32))
                np.save(tmp / "attention.npy", np.ascontiguousarray(comp.attention, np.float32))
                np.save(tmp / "assignment.npy", np.ascontiguousarray(comp.assignment, np.int32))
                (tmp / "meta.json").write_text(json.dumps(record, indent=2))

        return d if self._write(write) else None

    def _write(self, fn) -> bool:
        """Run a cache write; on a filesystem error switch the cache's writes off with one warning."""
        if not self.writable:
            return False
        try:
            fn()
            return True
        except (OSError, FeatureFileError) as exc:
            self.writable = False
            why = getattr(exc, "strerror", None) or str(exc)
            warn(f"{self.root}: slide cache cannot be written ({why}); continuing without caching")
            return False

    def _drop(self, d: Path) -> None:
        try:
            shutil.rmtree(confined(self.root, self.bundle_key, d.name))
        except OSError:
            pass


class _Stale(Exception):
    """A cache entry made from another file state than the one being asked about."""
