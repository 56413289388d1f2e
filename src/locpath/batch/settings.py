"""The settings of a batch run."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LocpathError
from ..runtime.options import RuntimeOptions


@dataclass
class BatchConfig:
    bundle: Path
    slides: Path  # a folder or a list file
    questions: Path
    out: Path
    fmt: str = "jsonl"  # jsonl | parquet
    sampling: dict = field(default_factory=dict)
    ray: bool = False
    ray_address: str | None = None
    workers: int = 2  # Ray: encoder actors (the CLI's default)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    progress: bool = True
    overlap: bool = True  # in process: stage the next slides while one slide's questions are answered (runner.py)
    lanes: int = 2  # overlapped: slides staged at once, each in its own thread (measured: see threads_per_lane)
    runtime: RuntimeOptions = field(default_factory=lambda: RuntimeOptions(memory_slides=1))  # how the bundle runs

    def pipeline_threads(self) -> int | None:
        """Intra-op threads of the in-process Pipeline: `runtime.threads` when set. Overlapped with it unset: the cores shared out
        over the staging lanes, so concurrent encoder runs do not oversubscribe the cores (2 cores, reference
        bundle, 6 slides of ~1k tiles: 2 lanes x 1 thread 1324-1338 slides/hour, 1 lane x 2 threads 1217,
        2 lanes x 2 threads 1216, sequential 1150-1223)."""
        if self.runtime.threads or not self.overlap:
            return self.runtime.threads
        from ..runtime.runner import default_threads

        return max(1, default_threads() // self.lanes)

    def validate(self) -> "BatchConfig":
        if self.fmt not in ("jsonl", "parquet"):
            raise LocpathError(f"--format must be jsonl or parquet, not {self.fmt!r}")
        if self.fmt == "parquet":
            if importlib.util.find_spec("pyarrow") is None:
                raise LocpathError("--format parquet needs pyarrow (pip install pyarrow)")
        if self.workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise LocpathError("--workers must be >= 1, --cpus-per-worker > 0 and --gpus-per-worker >= 0")
        if isinstance(self.lanes, bool) or not isinstance(self.lanes, int) or self.lanes < 1:
            raise LocpathError(f"--lanes must be a positive integer, not {self.lanes!r}")
        return self
