"""What a generation returns: its tokens, per-token statistics, failovers, and a pass's stats
shared among the tokens it yielded.

Example (a pass that yielded 2 tokens in 10 ms: each is charged 5 ms, its counts on the first):
    >>> from halo_runtime.core.generation import TokenStats, share
    >>> [(s.total_ms, s.missing_rows, s.pass_tokens) for s in share(TokenStats(10.0, missing_rows=1), 2)]
    [(5.0, 1, 2), (5.0, 0, 2)]
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class TokenStats:
    """Per generated token: where the time went and what was lost."""

    total_ms: float = 0.0
    compute_ms: float = 0.0
    wait_ms: float = 0.0
    missing: dict = field(default_factory=dict)
    """device -> relaxed parts compensated on this token (rounds with any row missing)."""
    relaxed_parts: int = 0
    """Relaxed parts expected from remote devices on this token."""
    missing_rows: int = 0
    """(token, layer, device) relaxed parts compensated; equals sum(missing) in decode."""
    awaited_rows: int = 0
    """(token, layer, device) relaxed parts the predictor asked to await."""
    draft_ms: float = 0.0
    """Time the draft took to guess (part of total_ms)."""
    pass_tokens: int = 1
    """Tokens the pass that made this one yielded (drafts verified): its times are the pass's divided by
    this, its counts (missing, relaxed parts, rows) are on the pass's first token and zero on the others."""

    def add(self, other: TokenStats) -> None:
        """Add another pass's times and counts (a prompt fed in several passes: its first token's)."""
        for name in ("compute_ms", "wait_ms", "draft_ms", "relaxed_parts", "missing_rows", "awaited_rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for d, n in other.missing.items():
            self.missing[d] = self.missing.get(d, 0) + n


@dataclass
class FailoverEvent:
    """A device replaced by the plan's failover: which, when, and what the switch cost."""

    device: str
    """The device declared dead."""
    at: float
    """Unix time the switch finished."""
    position: int
    """Tokens of the session before it (prompt included): the KV cache rows rebuilt."""
    switch_ms: float
    """From declaring it dead to the survivors ready (hand-over and KV rebuild), in ms; the time to
    notice it (`dead_after_s`, or a broken TCP connection) comes before."""
    token: int = 0
    """Index of the generated token whose pass it interrupted (0: before the first, or at the start)."""

    def to_json(self) -> dict:
        return {"device": self.device, "at": round(self.at, 3), "position": self.position,
                "switch_ms": round(self.switch_ms, 3), "token": self.token}


@dataclass
class Generation:
    tokens: list[int]
    """Generated token ids (prompt excluded)."""
    token_stats: list[TokenStats]
    """One per generated token; the first also covers the prompt."""
    logits: list[np.ndarray]
    """The logits each generated token was chosen from, when asked to keep them."""
    passes: int = 0
    """Forward passes run (the prompt's included)."""
    drafted: int = 0
    """Draft guesses verified."""
    accepted: int = 0
    """Draft guesses accepted."""
    failovers: list = field(default_factory=list)
    """`FailoverEvent`s of this generation (a device replaced by the plan's failover)."""
    reused: int = 0
    """Prompt tokens not fed: the devices held them from the session's earlier requests (`reuse`)."""

    @property
    def tokens_per_pass(self) -> float | None:
        """Generated tokens per decode pass (the prompt's pass and its token left out); None before any."""
        return (len(self.tokens) - 1) / (self.passes - 1) if self.passes > 1 else None

    @property
    def acceptance(self) -> float | None:
        """Share of draft guesses accepted; None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None


def share(stats: TokenStats, n: int) -> list[TokenStats]:
    """A pass's stats as n tokens': times divided evenly (time per generated token), counts on the first."""
    if n == 1:
        return [stats]
    times = {"total_ms": stats.total_ms / n, "compute_ms": stats.compute_ms / n, "wait_ms": stats.wait_ms / n,
             "draft_ms": stats.draft_ms / n, "pass_tokens": n}
    return [replace(stats, **times)] + [TokenStats(**times) for _ in range(n - 1)]
