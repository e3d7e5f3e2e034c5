"""Summary statistics every measurement reports the same way (avg/min/max/p50/p95)."""

from __future__ import annotations

import numpy as np


def summarize(values: list[float]) -> dict[str, float]:
    """avg/min/max/p50/p95 of a list (linear-interpolated percentiles, as numpy does)."""
    if not values:
        return {"avg": 0.0, "min": 0.0, "max": 0.0, "p50": 0.0, "p95": 0.0, "n": 0}
    arr = np.asarray(values, dtype=float)
    return {"avg": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()),
            "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "n": int(arr.size)}
