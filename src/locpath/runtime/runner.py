"""One runner interface for every backend (in the manner of Polygraphy): load, run by tensor name, release.

Backends live in their own modules (`ort_runner`, `openvino_runner`, `tensorrt_runner`), all below this one;
`backends.make_runner` picks one per manifest entry.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import LocpathError


class RunnerError(LocpathError):
    """A backend cannot load or run a graph."""


class Runner(ABC):
    """Load lazily, run by tensor name, release explicitly."""

    # whether a fused decoder on this runner decodes several cache rows in one run (runtime/generator.py)
    runs_rows_together = True

    def __init__(self, path: str | os.PathLike, name: str):
        self.path = Path(path)
        self.name = name

    @abstractmethod
    def load(self) -> "Runner": ...

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def release(self) -> None: ...

    @property
    @abstractmethod
    def input_names(self) -> list[str]: ...

    @property
    @abstractmethod
    def output_names(self) -> list[str]: ...

    def new_buffer(self, shape, dtype=np.float32):
        """A tensor the graph can read and write in place (fused decoders' shared K/V buffers)."""
        raise RunnerError(f"{self.name}: the {type(self).__name__} backend has no in-place buffers "
                          "(the fused decoder graph runs on ONNX Runtime only)")

    def binder(self, state: dict, out_buffers: dict[str, np.ndarray], rows: tuple[int, int] | None = None):
        """A binding kept across calls: `state` = {input name: (buffer, output name)} bound as that input and
        that output, so the graph updates it in place; `out_buffers` are written by pointer. `rows` = (start,
        count) binds only those rows (the first axis) of each state buffer."""
        raise RunnerError(f"{self.name}: the {type(self).__name__} backend cannot run a graph in place")

    def __enter__(self):
        return self.load()

    def __exit__(self, *exc):
        self.release()


def default_threads() -> int:
    n = os.cpu_count() or 1
    return max(1, min(n, 8))


def checked_rows(name: str, rows: tuple[int, int], batch: int) -> tuple[int, int]:
    """(start, count) of a binding's rows, refused unless inside a batch of `batch` rows."""
    start, count = rows
    if start < 0 or count < 1 or start + count > batch:
        raise RunnerError(f"{name}: rows {start}..{start + count - 1} outside a batch of {batch}")
    return start, count


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a library's exception text: what a one-line error can carry."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
