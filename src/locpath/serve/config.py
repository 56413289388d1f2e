"""The service's settings, validated once at start (a bad setting is one clear error before anything listens)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..runtime.options import RuntimeOptions

SERVE_RUNTIME = RuntimeOptions(memory_slides=16)  # a service keeps more slides' latents in memory than one run


@dataclass
class ServeConfig:
    bundle: Path
    data_dir: Path  # the database, uploads, DICOMweb retrievals, thumbnails
    host: str = "127.0.0.1"
    port: int = 8000
    slide_roots: list[Path] = field(default_factory=list)  # where slides may be registered by path
    database: str | None = None  # SQLAlchemy URL; default sqlite:///<data_dir>/locpath.db
    dicomweb_url: str | None = None  # a DICOMweb server slides can be pulled from by study/series UID
    store_results: bool = False  # answers about DICOMweb slides go back there as DICOM SR + annotations (STOW-RS)
    store_attempts: int = 4  # STOW-RS tries per answer (waits 1, 2, 4, ... s between them)
    max_upload_bytes: int = 4 << 30
    upload_quota_bytes: int = 64 << 30  # per API key: the bytes of its stored uploads (checked while streaming)
    init_database: bool = False  # accept an empty or non-locpath database file (else refused: keys would be gone)
    max_request_bytes: int = 64 << 10  # JSON bodies
    max_question_chars: int = 2000
    question_queue: int = 16  # questions waiting for the decoder; more get 429
    ingest_queue: int = 64  # slides waiting to be ingested; more get 429
    question_timeout_s: float = 120.0
    ingest_timeout_s: float = 7200.0  # one slide's ingestion; longer is failed (a forged or hopelessly slow file)
    log_json: bool = True
    tile_cache_bytes: int = 64 << 20  # the viewer's encoded tiles, descriptors and overlays kept in memory (LRU)
    tile_renders: int = 4  # viewer tiles rendered at once (the rest wait); each holds at most one tile's read
    allowed_hosts: list[str] = field(default_factory=list)  # Host names answered besides loopback and --host
    # how the bundle runs (device, threads, slide cache, latents kept in memory, decode batch, trusted keys)
    runtime: RuntimeOptions = SERVE_RUNTIME

    def __post_init__(self):
        self.bundle = Path(self.bundle)
        self.data_dir = Path(self.data_dir)
        self.slide_roots = [Path(p) for p in self.slide_roots]
        self.allowed_hosts = list(self.allowed_hosts)

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_dir / 'locpath.db'}"

    @property
    def loopback(self) -> bool:
        if self.host in ("localhost",):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def host_names(self) -> frozenset[str]:
        """The `Host` names requests may carry (guard.py): loopback, a concrete --host, --allowed-host."""
        from .guard import allowed_names

        return allowed_names(self.host, self.allowed_hosts)

    def validate(self) -> "ServeConfig":
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1-65535, got {self.port}")
        from .guard import parse_host

        for name in self.allowed_hosts:
            parsed = parse_host(f"[{name}]" if ":" in name and not name.startswith("[") else name)
            if parsed is None or parsed[1] is not None:
                raise ConfigError(f"--allowed-host {name!r} is not a host name or IP address (no scheme, port or "
                                  "wildcard)")
        for root in self.slide_roots:
            if not root.is_dir():
                raise ConfigError(f"{root}: --slide-root is not a folder")
        if not isinstance(self.runtime, RuntimeOptions):
            raise ConfigError(f"runtime must be RuntimeOptions, got {type(self.runtime).__name__}")
        for name in ("max_upload_bytes", "max_request_bytes", "max_question_chars", "question_queue", "ingest_queue",
                     "tile_renders"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.tile_cache_bytes < 0:
            raise ConfigError("tile_cache_bytes must be at least 0 (0 keeps no tiles)")
        if self.store_results and not self.dicomweb_url:
            raise ConfigError("--store-results stores answers on the DICOMweb server slides come from: give it "
                              "with --dicomweb URL")
        if self.store_attempts < 1:
            raise ConfigError("--store-attempts must be at least 1")
        if not self.question_timeout_s > 0:
            raise ConfigError("question timeout must be positive")
        if not self.ingest_timeout_s > 0:
            raise ConfigError("--ingest-timeout must be positive")
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            for sub in ("uploads", "dicomweb", "thumbnails"):
                (self.data_dir / sub).mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{self.data_dir}: cannot create the data folder ({exc.strerror or exc})") from None
        if not os.access(self.data_dir, os.W_OK):
            raise ConfigError(f"{self.data_dir}: the data folder is not writable")
        for folder in (self.data_dir, *(self.data_dir / sub for sub in ("uploads", "dicomweb", "thumbnails"))):
            check_not_others(folder, "data folder")
        return self


def check_not_others(path: Path, what: str, mode: bool = True) -> None:
    """The data folder, its subfolders and the database must be this user's (or root's) and not writable by every
    user: whoever else controls them can swap uploads or put a database with their own admin key in place."""
    try:
        st = path.stat()
    except OSError:
        return  # missing or unreadable: said where it is used
    if st.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"{path}: the {what} belongs to another user (uid {st.st_uid}); use a data folder "
                          f"of this user's own (--data-dir)")
    if mode and st.st_mode & 0o002 and not st.st_mode & 0o1000:
        raise ConfigError(f"{path}: the {what} is writable by every user; chmod o-w it or use another "
                          f"--data-dir")
