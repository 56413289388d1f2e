"""The settings of a batch run."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LocpathError


@dataclass
class BatchConfig:
    bundle: Path
    slides: Path  # a folder or a list file
    questions: Path
    out: Path
    fmt: str = "jsonl"  # jsonl | parquet
    cache_dir: Path | None = None
    threads: int | None = None
    device: str = "cpu"
    sampling: dict = field(default_factory=dict)
    ray: bool = False
    ray_address: str | None = None
    workers: int = 2  # Ray: encoder actors (the CLI's default)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    progress: bool = True
    trusted_keys: str | None = None

    def validate(self) -> "BatchConfig":
        if self.fmt not in ("jsonl", "parquet"):
            raise LocpathError(f"--format must be jsonl or parquet, not {self.fmt!r}")
        if self.fmt == "parquet":
            if importlib.util.find_spec("pyarrow") is None:
                raise LocpathError("--format parquet needs pyarrow (pip install pyarrow)")
        if self.workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise LocpathError("--workers must be >= 1, --cpus-per-worker > 0 and --gpus-per-worker >= 0")
        return self
