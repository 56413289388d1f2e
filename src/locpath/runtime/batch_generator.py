"""Compatibility: bench/batched.py imports these names; removed once bench/ imports runtime/generator.py, where the
one decoding loop now lives (a batch of rows; a single answer is a batch of one row)."""

from __future__ import annotations

from .generator import Generator, rows_are_exact

__all__ = ["BatchGenerator", "rows_are_exact"]


def BatchGenerator(state, rows: int, max_length: int, stop_ids: list[int]) -> Generator:  # noqa: N802
    """Rows of one shared K/V cache on a fused decoder graph (what the name always meant)."""
    return Generator(state, rows, max_length, stop_ids, shared=True)
