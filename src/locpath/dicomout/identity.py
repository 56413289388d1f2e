"""Which model answered: the bundle's name, version and SHA256 digest, its tile encoder and precision, as the
reports record them. The digest is the sha256 of the bundle's SHA256SUMS file, which lists the sha256 of the
manifest and of every file of the bundle (and is what a bundle signature signs): one value that changes whenever
any byte of the bundle does, and that `sha256sum SHA256SUMS` reproduces."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..bundle.integrity import CHECKSUMS
from ..bundle.paths import read_bounded
from ..errors import LocpathError
from .errors import DicomOutError

MAX_SUMS_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # the bundle folder's name
    version: str  # locpath version and the bundle's creation time
    sha256: str  # of SHA256SUMS (see above)
    encoder: str  # the tile encoder's name
    precision: str  # of the tile encoder and the decoder that ran, e.g. "tile_encoder fp32, decoder_fused fp32"
    software: str  # locpath's version

    def parameters(self) -> dict[str, str]:
        return {"bundle_sha256": self.sha256, "encoder": self.encoder, "precision": self.precision}


def model_identity(bundle_dir: Path, manifest, decoder_component: str) -> ModelIdentity:
    """The identity of a verified bundle (Pipeline.bundle_dir, .manifest, .decoder_component)."""
    from .. import __version__

    try:
        data = read_bounded(Path(bundle_dir) / CHECKSUMS, MAX_SUMS_BYTES, "the bundle's checksum list")
    except LocpathError as exc:
        raise DicomOutError(str(exc)) from None
    enc = (manifest.model.get("tile_encoder") or {}) if isinstance(manifest.model, dict) else {}
    encoder = str(enc.get("name") or enc.get("family") or "unknown")
    precision = ", ".join(f"{n} {manifest.components[n].precision}" for n in ("tile_encoder", decoder_component)
                          if n in manifest.components)
    version = f"locpath {manifest.locpath_version or '?'}" + (f", built {manifest.created}" if manifest.created else "")
    return ModelIdentity(name=Path(bundle_dir).name or "bundle", version=version,
                         sha256=hashlib.sha256(data).hexdigest(), encoder=encoder, precision=precision or "unknown",
                         software=f"locpath {__version__}")


def pipeline_identity(pipe) -> ModelIdentity:
    return model_identity(pipe.bundle_dir, pipe.manifest, pipe.decoder_component)
