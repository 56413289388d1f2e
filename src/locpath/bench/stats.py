"""Summary statistics of repeated measurements, shared by the suites (so none imports another for them)."""

from __future__ import annotations

import numpy as np


def spread(values) -> dict:
    """Median, min, max and count of repeated timings (the bench's `{median, min, max, n}`)."""
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}
