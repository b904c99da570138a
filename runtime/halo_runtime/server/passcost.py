"""When a draft's guess is worth its row: the engine's cost model of a pass.

A guess rides in the pass as one more row and, if accepted, gives its request one more token. Alone
on a board a pass is bound by the weights it reads or by the round trips, and a row costs little:
guesses pay at almost any acceptance. With eight sessions sharing it a pass is bound by compute, a
row costs about as much as a token, and guesses that mostly fail (chat) slow every request down
(measured in docs/BENCHMARKS.md, "Several clients at once"). So the engine fits a pass's time as
a + b * rows from the passes it ran, and sends a guess only where it raises the pass's tokens per
millisecond: with t the pass's time, T its tokens without the guess and p the chance the guess is
accepted, (T + p) / (t + b) > T / t, i.e. p * t > T * b (guess j of a chain is accepted only with
the ones before it: p ** j). vLLM turns speculation off above a batch size for the same reason;
this asks the measured costs instead of a fixed size, so links with delay keep their guesses.

Only greedy requests are thinned: their tokens are the same with or without guesses, whereas a
sampled reply's draws depend on how many guesses it verified, and must not depend on the batch.

Example:
    >>> cost = PassCost()
    >>> for rows, ms in [(1, 50.0), (5, 54.0), (9, 58.0), (30, 79.0)]:
    ...     cost.observe(rows, ms)
    >>> a, b = cost.fit()
    >>> round(a, 3), round(b, 3)
    (49.0, 1.0)
    >>> worth_guessing(0.5, 4, row_ms=1.0, pass_ms=50.0, tokens=1)    # one request, cheap rows
    4
    >>> worth_guessing(0.5, 4, row_ms=11.0, pass_ms=110.0, tokens=8)  # eight sessions, dear rows
    0
"""
from __future__ import annotations

from collections import deque

import numpy as np

FIT_PASSES = 64
"""Recent passes the fit reads: enough to hold a few prompt passes beside the decode passes."""


class PassCost:
    """Least-squares fit of a pass's milliseconds against its rows over the last `passes` passes."""

    def __init__(self, passes: int = FIT_PASSES):
        self.seen: deque[tuple[int, float]] = deque(maxlen=passes)
        self._fit: tuple[float, float] | None = None

    def observe(self, rows: int, ms: float) -> None:
        self.seen.append((rows, ms))
        rows_ms = np.array(self.seen, dtype=np.float64)
        if len(np.unique(rows_ms[:, 0])) >= 2:  # else keep the last fit: passes of one size say nothing of b
            b, a = np.polyfit(rows_ms[:, 0], rows_ms[:, 1], 1)
            self._fit = (float(a), max(float(b), 0.0))

    def fit(self) -> tuple[float, float] | None:
        """(a, b): ms of a pass = a + b * rows; None until passes of two sizes were seen."""
        return self._fit


def acceptance(accepted: int, proposed: int) -> float:
    """A request's chance that its next guess is accepted, from its guesses so far (Laplace's rule:
    one half before any).

    >>> acceptance(0, 0), acceptance(3, 4), acceptance(0, 30)
    (0.5, 0.6666666666666666, 0.03125)
    """
    return (accepted + 1) / (proposed + 2)


def worth_guessing(p: float, k: int, row_ms: float, pass_ms: float, tokens: float) -> int:
    """How many of up to k chained guesses, each accepted with chance p given the ones before it,
    raise tokens per ms of a pass of `pass_ms` ms giving `tokens` tokens without them, a row
    costing `row_ms`."""
    n = 0
    while n < k and p ** (n + 1) * pass_ms > tokens * row_ms:
        n += 1
    return n
