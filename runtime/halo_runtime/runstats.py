"""What a run reports about itself: percentiles of its per-token times, a process's peak memory,
and the lines `halo-run generate` and `local` print after a run (their `--json` result, read back
for people: text, latency, compensation, failovers, drafts, kernels, CPU per process).

Percentiles are nearest-rank (the value at rank round(q * (n - 1)) of the sorted values): no
interpolation, so a reported p50 is a time a token really took.

Example:
    >>> from halo_runtime.runstats import peak_rss_mb, percentile, percentiles, summary_lines
    >>> percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9), percentiles([12.5, 10.0, 11.0])
    (5.0, {'p50': 11.0, 'p90': 12.5, 'p99': 12.5})
    >>> percentiles([])["p50"] is None, peak_rss_mb() > 0
    (True, True)
    >>> result = {"sync": "relaxed", "text": " Hello", "tokens": [1, 2], "ttft_ms": 80.0,
    ...           "tpot_ms": {"p50": 51.4, "p90": 63.3, "p99": 73.6}, "compensated_share": 0.0,
    ...           "failovers": [], "draft": {"source": "none"}, "weights": "q4_0",
    ...           "kernels": {"engine": "ggml", "simd": ["avx2"]}, "threads": 1, "sched": "batch",
    ...           "cpu_ms_per_token": {"pi5-0": 22.8, "pi5-1": 25.4}}
    >>> print("\\n".join(summary_lines(result)))
    [relaxed] ' Hello'
    [relaxed] 2 tokens; TPOT p50 51.4 ms, p90 63.3 ms, p99 73.6 ms; first token 80.0 ms; compensated 0.00% of relaxed parts
    [relaxed] weights q4_0; ggml, avx2; 1 thread(s), sched batch
    [relaxed] CPU per token (prefill included): pi5-0 22.8 ms, pi5-1 25.4 ms
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


def summary_lines(result: dict) -> list[str]:
    """The lines that sum up one run's `--json` result."""
    s, t = f"[{result['sync']}]", result["tpot_ms"]
    lines = [f"{s} {result['text']!r}",
             f"{s} {len(result['tokens'])} tokens; TPOT p50 {t['p50']} ms, p90 {t['p90']} ms, p99 {t['p99']} ms; "
             f"first token {result['ttft_ms']} ms; compensated {100 * result['compensated_share']:.2f}% of relaxed parts"]
    for f in result["failovers"]:
        lines.append(f"{s} device {f['device']} died at token {f['token']}: replaced by the plan's failover "
                     f"in {f['switch_ms']:.0f} ms ({f['position']} tokens of KV cache rebuilt)")
    d = result["draft"]
    if d["source"] != "none":
        acc = "n/a" if d["acceptance"] is None else f"{100 * d['acceptance']:.1f}%"
        lines.append(f"{s} draft {d['source']} ({d['tokens']} per pass): {result['tokens_per_pass']} "
                     f"tokens per pass, {acc} of guesses accepted")
    k, weights = result.get("kernels") or {}, result.get("weights", "fp32")
    lines.append(f"{s} weights {weights}; {k.get('engine', '?')}, {'/'.join(k.get('simd', []))}"
                 + (f"; fp32 products: {k['f32_rows']}" if weights == "fp32" and "f32_rows" in k else "")
                 + f"; {result.get('threads', 1)} thread(s), sched {result.get('sched', 'normal')}")
    cpu = result.get("cpu_ms_per_token")
    if cpu:  # where the distribution's CPU goes: a device's round is mostly its own Python
        lines.append(f"{s} CPU per token (prefill included): " + ", ".join(f"{d} {ms:.1f} ms" for d, ms in cpu.items()))
    return lines
