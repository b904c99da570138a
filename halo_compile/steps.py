"""Wall time, CPU time and peak memory of each compile step, for `benchmarks/scale.py`.

The compiler interleaves its steps layer by layer (profile layer i, then group, score, compensate
and predict it), so a step is entered many times: `StepTimer.step` adds up its wall and CPU time
and keeps the highest resident set size seen while it ran. Peak RSS per step comes from the
kernel's high-water mark (VmHWM), reset before each entry through /proc/self/clear_refs; where
the reset is refused the mark is the process's peak so far (`resets` says which).

Example:
    >>> from halo_compile.steps import StepTimer
    >>> timer = StepTimer()
    >>> for _ in range(2):
    ...     with timer.step("work"):
    ...         _ = sum(range(100000))
    >>> rec = timer.records["work"]
    >>> rec.calls, rec.wall_s > 0, rec.peak_rss_bytes > 0, sorted(timer.to_json()["steps"]["work"])
    (2, True, True, ['calls', 'cpu_s', 'peak_rss_mb', 'wall_s'])
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field


def rss_high_water() -> int:
    """This process's peak resident set size since the last reset, in bytes (0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_high_water() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class StepRecord:
    """One step's totals over every time it was entered."""

    wall_s: float = 0.0
    """Wall-clock seconds."""
    cpu_s: float = 0.0
    """CPU seconds of this process (all threads)."""
    peak_rss_bytes: int = 0
    """Highest resident set size while it ran."""
    calls: int = 0
    """Times it was entered."""


@dataclass
class StepTimer:
    """Per-step records, in the order steps were first entered."""

    records: dict[str, StepRecord] = field(default_factory=dict)
    """Step name -> totals."""
    resets: bool = True
    """Whether every peak was measured from a reset high-water mark (else: peak since start)."""

    @contextlib.contextmanager
    def step(self, name: str):
        rec = self.records.setdefault(name, StepRecord())
        self.resets &= reset_high_water()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield rec
        finally:
            rec.wall_s += time.perf_counter() - wall
            rec.cpu_s += time.process_time() - cpu
            rec.peak_rss_bytes = max(rec.peak_rss_bytes, rss_high_water())
            rec.calls += 1

    def to_json(self) -> dict:
        steps = {name: {"wall_s": round(r.wall_s, 3), "cpu_s": round(r.cpu_s, 3),
                        "peak_rss_mb": round(r.peak_rss_bytes / 2**20, 1), "calls": r.calls}
                 for name, r in self.records.items()}
        total = {"wall_s": round(sum(r.wall_s for r in self.records.values()), 3),
                 "cpu_s": round(sum(r.cpu_s for r in self.records.values()), 3),
                 "peak_rss_mb": round(max((r.peak_rss_bytes for r in self.records.values()), default=0) / 2**20, 1)}
        return {"steps": steps, "total": total, "peak_per_step": self.resets}
