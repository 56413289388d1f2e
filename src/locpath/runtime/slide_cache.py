"""Per-slide cache of features and latents, keyed by the slide file's content hash and the bundle.

<root>/<bundle_key>/<content_sha256>/{features.h5, latents.npy, meta.json}, each entry written into a
temporary folder and renamed, so a crash never leaves a half entry. Content hashes are memoised by
(path, size, mtime) in <root>/hashes.json so a multi-GB slide is hashed once.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engines.manifest import sha256_file
from ..fsutil import atomic_dir, atomic_file
from ..wsi.features import FeatureFile, read_features, write_features


def cache_root() -> Path:
    """$LOCPATH_CACHE, else $XDG_CACHE_HOME/locpath, else ~/.cache/locpath."""
    base = os.environ.get("LOCPATH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "locpath")
    return Path(base)


def default_cache_dir() -> Path:
    return cache_root() / "slides"


@dataclass
class CachedSlide:
    features: FeatureFile
    latents: np.ndarray
    meta: dict


class SlideCache:
    def __init__(self, root: str | os.PathLike, bundle_key: str):
        self.root = Path(root)
        self.bundle_key = bundle_key
        self.dir = self.root / bundle_key

    def content_hash(self, slide_path: str | os.PathLike) -> str:
        p = Path(slide_path).resolve()
        st = p.stat()
        memo_file = self.root / "hashes.json"
        key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
        memo = {}
        if memo_file.exists():
            try:
                memo = json.loads(memo_file.read_text())
            except (json.JSONDecodeError, OSError):
                memo = {}
        if key in memo:
            return memo[key]
        digest = sha256_file(p)
        memo = {k: v for k, v in memo.items() if not k.startswith(f"{p}|")}
        memo[key] = digest
        with atomic_file(memo_file) as tmp:
            tmp.write_text(json.dumps(memo))
        return digest

    def get(self, digest: str) -> CachedSlide | None:
        d = self.dir / digest
        if not (d / "latents.npy").exists() or not (d / "features.h5").exists():
            return None
        try:
            meta = json.loads((d / "meta.json").read_text())
            return CachedSlide(read_features(d / "features.h5"), np.load(d / "latents.npy"), meta)
        except Exception:
            shutil.rmtree(d, ignore_errors=True)  # a damaged entry is recomputed, not trusted
            return None

    def put(self, digest: str, features: FeatureFile, latents: np.ndarray, meta: dict) -> Path:
        final = self.dir / digest
        with atomic_dir(final) as tmp:
            write_features(tmp / "features.h5", features)
            np.save(tmp / "latents.npy", latents)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        return final
