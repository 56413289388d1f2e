"""Bundle integrity and authenticity.

- `SHA256SUMS` (the coreutils format, so `sha256sum -c SHA256SUMS` works too) covers manifest.json and every
  file the manifest lists. Loading checks it first, then the manifest against it, then every file (path policy,
  regular file, recorded size, sha256): a hand-edited manifest is refused like a modified graph.
- Optional Ed25519 signatures (the `cryptography` package): `SHA256SUMS.sig` signs the exact bytes of
  SHA256SUMS. With trusted keys configured (`--trusted-keys` or $LOCPATH_TRUSTED_KEYS: a PEM file holding one or
  more public keys, or a folder of them), an unsigned bundle or one signed by any other key is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import LocpathError
from .manifest import MANIFEST, MAX_MANIFEST_BYTES, SCHEMA_VERSION, BundleError, Manifest, parse_manifest_bytes
from .paths import check_member_name, is_sha256, member_path, read_bounded, sha256_file

CHECKSUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.sig"
TRUSTED_KEYS_ENV = "LOCPATH_TRUSTED_KEYS"
MAX_SUMS_BYTES = 1 << 20
MAX_SIG_BYTES = 64 << 10
SIG_FORMAT = "locpath-signature/1"
_LINE = re.compile(r"([0-9a-f]{64})  (.+)")


class SignatureError(BundleError):
    """A bundle is unsigned where a signature is required, or its signature does not verify."""


# -- checksums ----------------------------------------------------------------------------------------
def checksum_text(bundle_dir: str | os.PathLike, manifest: Manifest) -> str:
    lines = [f"{sha256_file(Path(bundle_dir) / MANIFEST)}  {MANIFEST}"]
    lines += [f"{e.sha256}  {name}" for name, e in sorted(manifest.files.items())]
    return "\n".join(lines) + "\n"


def write_manifest(bundle_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """manifest.json and SHA256SUMS over it and every listed file, for a bundle being assembled."""
    from ..fsutil import atomic_file

    manifest.check_references()
    out = Path(bundle_dir) / MANIFEST
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2))
    write_checksums(bundle_dir, manifest)
    return out


def write_checksums(bundle_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """SHA256SUMS for a bundle being assembled; a signature over older checksums no longer holds and is removed."""
    from ..fsutil import atomic_file

    b = Path(bundle_dir)
    with atomic_file(b / CHECKSUMS) as tmp:
        tmp.write_text(checksum_text(b, manifest))
    (b / SIGNATURE).unlink(missing_ok=True)
    return b / CHECKSUMS


def parse_checksums(data: bytes, where: str) -> dict[str, str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{where}: not UTF-8 text") from None
    out: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        m = _LINE.fullmatch(line)
        if not m:
            raise BundleError(f"{where}: line {i} is not '<sha256>  <file>'")
        digest, name = m.groups()
        try:
            check_member_name(name, f"{where}: line {i}")
        except LocpathError as exc:
            raise BundleError(str(exc)) from None
        if name in out:
            raise BundleError(f"{where}: {name} is listed twice")
        out[name] = digest
    if MANIFEST not in out:
        raise BundleError(f"{where}: does not cover {MANIFEST}")
    return out


# -- verification ---------------------------------------------------------------------------------------
def verify_bundle(bundle_dir: str | os.PathLike, trusted_keys: "TrustedKeys | None" = None,
                  check_files: bool = True) -> Manifest:
    """The bundle's manifest after checking SHA256SUMS, the signature (when keys are trusted), the manifest and
    every file. Raises BundleError (or SignatureError) naming the file and the problem."""
    b = Path(bundle_dir)
    try:
        if not b.is_dir():
            raise BundleError(f"{b}: bundle folder not found")
        listing = {p.name for p in b.iterdir()}
    except PermissionError:
        raise BundleError(f"{b}: bundle folder cannot be read (permission denied)") from None
    except OSError as exc:
        raise BundleError(f"{b}: bundle folder cannot be read ({exc.strerror or exc})") from None
    if MANIFEST not in listing:
        raise BundleError(f"{b}: not a locpath bundle (no {MANIFEST})")
    if CHECKSUMS not in listing:
        raise BundleError(f"{b / CHECKSUMS}: missing (exported by a locpath older than manifest schema {SCHEMA_VERSION}?); "
                          "re-export it with this version")
    sums_bytes = _read(b / CHECKSUMS, MAX_SUMS_BYTES, "checksum list")
    sums = parse_checksums(sums_bytes, str(b / CHECKSUMS))
    if trusted_keys is not None:
        trusted_keys.verify(b, sums_bytes)
    mf_path = b / MANIFEST
    _member(b, MANIFEST)
    mf_bytes = _read(mf_path, MAX_MANIFEST_BYTES, "manifest")
    if hashlib.sha256(mf_bytes).hexdigest() != sums[MANIFEST]:
        raise BundleError(f"{mf_path}: checksum mismatch with {CHECKSUMS}: the manifest was edited or corrupted; "
                          "re-export the bundle")
    m = parse_manifest_bytes(mf_bytes, str(mf_path))
    listed = {n: e.sha256 for n, e in m.files.items()}
    extra = sorted(set(sums) - set(listed) - {MANIFEST})
    if extra:
        raise BundleError(f"{b / CHECKSUMS}: lists {', '.join(extra[:3])} which the manifest does not")
    for name, digest in listed.items():
        if sums.get(name) != digest:
            raise BundleError(f"{b / name}: {CHECKSUMS} and the manifest disagree on its checksum")
    if check_files:
        for name, entry in m.files.items():
            verify_file(b, name, entry.sha256, entry.bytes)
    return m


def _member(bundle_dir: Path, name: str, size: int | None = None) -> Path:
    try:
        return member_path(bundle_dir, name, "the manifest", expect_bytes=size)
    except LocpathError as exc:
        raise exc if isinstance(exc, BundleError) else BundleError(str(exc)) from None


def verify_file(bundle_dir: Path, name: str, digest: str, size: int) -> None:
    path = _member(bundle_dir, name, size)
    try:
        got = sha256_file(path, limit=size)
    except LocpathError as exc:
        raise BundleError(str(exc)) from None
    except OSError as exc:
        raise BundleError(f"{bundle_dir / name}: cannot be read ({exc.strerror or exc})") from None
    if got != digest:
        raise BundleError(f"{bundle_dir / name}: checksum mismatch (manifest {digest[:12]}..., file {got[:12]}...): "
                          "the file was modified or corrupted; re-export the bundle")


def _read(path: Path, limit: int, what: str) -> bytes:
    try:
        return read_bounded(path, limit, what)
    except BundleError:
        raise
    except LocpathError as exc:
        raise BundleError(str(exc)) from None


# -- signatures ---------------------------------------------------------------------------------------------
def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - cryptography is a runtime dependency
        raise LocpathError("bundle signatures need the 'cryptography' package (pip install cryptography)") from exc
    return ed25519, serialization, InvalidSignature


def key_id(public_key) -> str:
    """A short stable name of a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    _, serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass
class TrustedKeys:
    """Ed25519 public keys a runtime accepts bundles from, by key id."""

    keys: dict  # key id -> Ed25519PublicKey
    source: str

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrustedKeys":
        """A PEM file with one or more public keys, or a folder of *.pem / *.pub files."""
        ed25519, serialization, _ = _crypto()
        p = Path(path)
        files = sorted(q for q in p.iterdir() if q.suffix in (".pem", ".pub")) if p.is_dir() else [p]
        keys = {}
        for f in files:
            data = read_bounded(f, 1 << 20, "trusted key file")
            blocks = re.findall(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", data, re.S)
            if not blocks:
                raise LocpathError(f"{f}: no PEM public key (-----BEGIN PUBLIC KEY-----) in it")
            for blk in blocks:
                try:
                    k = serialization.load_pem_public_key(blk)
                except ValueError as exc:
                    raise LocpathError(f"{f}: unreadable public key ({exc})") from None
                if not isinstance(k, ed25519.Ed25519PublicKey):
                    raise LocpathError(f"{f}: not an Ed25519 public key")
                keys[key_id(k)] = k
        if not keys:
            raise LocpathError(f"{p}: no trusted keys found")
        return cls(keys, str(p))

    @classmethod
    def from_setting(cls, path: str | os.PathLike | None) -> "TrustedKeys | None":
        """The given path, else $LOCPATH_TRUSTED_KEYS, else None (signatures not required)."""
        chosen = path or os.environ.get(TRUSTED_KEYS_ENV) or None
        return cls.load(chosen) if chosen else None

    def verify(self, bundle_dir: Path, sums_bytes: bytes) -> str:
        """The key id that signed the bundle; SignatureError when unsigned or not signed by a trusted key."""
        _, _, InvalidSignature = _crypto()
        sig_path = bundle_dir / SIGNATURE
        if not sig_path.exists():
            raise SignatureError(f"{bundle_dir}: the bundle is not signed, and this runtime only runs bundles signed "
                                 f"by a trusted key ({self.source}); sign it with `locpath sign`")
        sig = read_signature(sig_path)
        key = self.keys.get(sig["key_id"])
        if key is None:
            raise SignatureError(f"{sig_path}: signed by key {sig['key_id']}, which is not among the trusted keys "
                                 f"({self.source})")
        try:
            key.verify(sig["signature"], sums_bytes)
        except InvalidSignature:
            raise SignatureError(f"{sig_path}: the signature does not match {CHECKSUMS} (the bundle was changed after "
                                 "signing, or the signature was forged)") from None
        return sig["key_id"]


def read_signature(path: Path) -> dict:
    data = _read(path, MAX_SIG_BYTES, "signature")
    try:
        obj = json.loads(data.decode("utf-8"))
        if not isinstance(obj, dict) or obj.get("format") != SIG_FORMAT or obj.get("algorithm") != "ed25519":
            raise ValueError("not a locpath Ed25519 signature")
        kid, sig = obj["key_id"], base64.b64decode(obj["signature"], validate=True)
        if not (isinstance(kid, str) and re.fullmatch(r"[0-9a-f]{16}", kid)) or len(sig) != 64:
            raise ValueError("bad key id or signature length")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{path}: malformed signature file ({exc})") from None
    return {"key_id": kid, "signature": sig}


def load_private_key(path: str | os.PathLike):
    ed25519, serialization, _ = _crypto()
    p = Path(path)
    data = read_bounded(p, 1 << 20, "private key")
    password = os.environ.get("LOCPATH_KEY_PASSWORD")
    try:
        key = serialization.load_pem_private_key(data, password=password.encode() if password else None)
    except (ValueError, TypeError) as exc:
        raise LocpathError(f"{p}: unreadable private key ({exc}; an encrypted key needs $LOCPATH_KEY_PASSWORD)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise LocpathError(f"{p}: not an Ed25519 private key (make one with `locpath keygen`)")
    return key


def sign_bundle(bundle_dir: str | os.PathLike, private_key_path: str | os.PathLike) -> str:
    """Verify the bundle, then sign its SHA256SUMS; returns the key id. The signature file is written atomically."""
    from ..fsutil import atomic_file

    b = Path(bundle_dir)
    verify_bundle(b)
    key = load_private_key(private_key_path)
    sums = _read(b / CHECKSUMS, MAX_SUMS_BYTES, "checksum list")
    kid = key_id(key.public_key())
    body = {"format": SIG_FORMAT, "algorithm": "ed25519", "key_id": kid,
            "signature": base64.b64encode(key.sign(sums)).decode("ascii"), "signs": CHECKSUMS}
    with atomic_file(b / SIGNATURE) as tmp:
        tmp.write_text(json.dumps(body, indent=2) + "\n")
    return kid


def generate_keypair(prefix: str | os.PathLike) -> tuple[Path, Path, str]:
    """PREFIX.key (PKCS#8 PEM, mode 0600) and PREFIX.pub (SubjectPublicKeyInfo PEM); refuses to overwrite."""
    ed25519, serialization, _ = _crypto()
    priv_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise LocpathError(f"{p}: already exists; not overwriting a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path, key_id(key.public_key())


def is_signed(bundle_dir: str | os.PathLike) -> bool:
    return (Path(bundle_dir) / SIGNATURE).exists()


__all__ = ["CHECKSUMS", "SIGNATURE", "SignatureError", "TrustedKeys", "generate_keypair", "is_sha256", "is_signed",
           "sign_bundle", "verify_bundle", "write_checksums", "write_manifest"]
