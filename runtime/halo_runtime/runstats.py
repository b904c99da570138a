"""What a run reports about itself: percentiles of its per-token times, a process's peak memory.

Percentiles are nearest-rank (the value at rank round(q * (n - 1)) of the sorted values): no
interpolation, so a reported p50 is a time a token really took.

Example:
    >>> from halo_runtime.runstats import peak_rss_mb, percentile, percentiles
    >>> percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9), percentiles([12.5, 10.0, 11.0])
    (5.0, {'p50': 11.0, 'p90': 12.5, 'p99': 12.5})
    >>> percentiles([])["p50"] is None, peak_rss_mb() > 0
    (True, True)
"""
from __future__ import annotations

import resource


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (0 <= q <= 1) of values already sorted ascending (not empty)."""
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def percentiles(values: list[float]) -> dict:
    """p50, p90 and p99 of `values` (any order), to 3 decimals; None each when there are none."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    s = sorted(values)
    return {f"p{round(100 * q)}": round(percentile(s, q), 3) for q in (0.5, 0.9, 0.99)}


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident set size in MiB of this process (None) or of process `pid` (its VmHWM; NaN if
    it cannot be read, e.g. the process is gone)."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
