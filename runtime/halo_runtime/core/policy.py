"""The delivery policy: how the coordinator waits for partial sums, and how often that misses.

One frozen dataclass shared by the UDP exchange (which carries it out), `halo-compile eval`
(which simulates it) and placement (which prices it), so the three cannot disagree.

Example:
    >>> from halo_runtime.core.policy import DeliveryPolicy
    >>> p = DeliveryPolicy()
    >>> round(p.miss_probability(0.05), 6)       # one re-request: both attempts must fail
    0.009506
    >>> round(DeliveryPolicy(redundancy=2).miss_probability(0.05), 6)
    2.5e-05
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .codec import REQUEST_PREFIX, datagrams, encode_tensor


@dataclass(frozen=True)
class DeliveryPolicy:
    """How the coordinator waits for partial sums."""

    wire: str = "fp16"
    """Activation dtype on the wire: fp16 (default) or fp32 (bit-exact)."""
    relaxed_retries: int = 1
    """Fast re-requests of a late relaxed part before its deadline."""
    redundancy: int = 1
    """Copies of every message to and from a lossy device (1 = none)."""
    rto_floor_ms: float = 2.0
    """Lowest retransmission timeout."""
    dead_after_s: float = 4.0
    """A device holding critical parts, asked and silent this long, is declared lost (the run ends);
    a restarted device must rejoin within it."""
    down_after_s: float = 2.0
    """A device holding only relaxed parts, asked and silent this long, is marked down: compensated
    without waiting, probed until it answers."""
    probe_every_s: float = 0.5
    """HELLO probes of a down device."""

    def __post_init__(self):
        if self.wire not in ("fp16", "fp32", "bf16"):
            raise ValueError(f"wire must be fp16, fp32 or bf16, got {self.wire!r}")
        if self.relaxed_retries < 0 or not 1 <= self.redundancy <= 4:
            raise ValueError("relaxed_retries must be >= 0 and redundancy in 1..4")
        if min(self.rto_floor_ms, self.dead_after_s, self.down_after_s, self.probe_every_s) <= 0:
            raise ValueError("rto_floor_ms, dead_after_s, down_after_s and probe_every_s must be positive")

    def message_datagrams(self, hidden_size: int) -> tuple[int, int]:
        """Datagrams of a one-token (decode) request and of one partial-sum reply on this wire."""
        tensor = encode_tensor(np.zeros((1, hidden_size), np.float32), self.wire)
        return datagrams(REQUEST_PREFIX.size + len(tensor)), datagrams(len(tensor))

    def miss_probability(self, loss: float, hidden_size: int | None = None) -> float:
        """Chance that a relaxed part misses its deadline on a link that drops each datagram with `loss`.

        The one model of this policy's delivery, shared by simulation (`halo-compile eval`) and
        placement. An attempt fails when every copy of the request, or every copy of the reply,
        is lost (a copy is lost when any of its datagrams is; pass `hidden_size` to count them
        for a one-token message, else one datagram each way, as for SmolLM2 in fp16); the part
        is missed when all 1 + relaxed_retries attempts before the deadline fail. Conservative
        where the device also owes a critical part that round: the critical part's own
        retransmissions can bring the relaxed reply along after the deadline.
        """
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss {loss} is outside [0, 1)")
        copies = self.redundancy if loss > 0 else 1
        request, reply = self.message_datagrams(hidden_size) if hidden_size else (1, 1)
        copy_lost = lambda n: 1.0 - (1.0 - loss) ** n  # noqa: E731
        attempt = 1.0 - (1.0 - copy_lost(request) ** copies) * (1.0 - copy_lost(reply) ** copies)
        return attempt ** (1 + self.relaxed_retries)
