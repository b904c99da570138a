"""The UDP exchange's retransmission timer: smoothed RTT and RTO per device and round kind (RFC 6298).

Example:
    >>> from halo_runtime.net.rtt import RttEstimator
    >>> e = RttEstimator()
    >>> e.rto_s                      # no sample yet: the initial timeout
    0.02
    >>> e.sample(0.004); round(e.rto_s, 4)   # srtt 4 ms + 4 x rttvar 2 ms
    0.012
"""
from __future__ import annotations

import math


class RttEstimator:
    """Smoothed RTT and retransmission timeout, RFC 6298 (alpha 1/8, beta 1/4, K = 4).

    Karn's rule is the caller's job: call `sample` only for exchanges whose request went out exactly
    once, since a reply to a retransmitted request cannot be matched to one transmission. Backing
    off after a timer expiry is the caller's job too (the UDP exchange caps it).
    """

    def __init__(self, floor_s: float = 0.002, ceiling_s: float = 0.2, initial_s: float = 0.02,
                 alpha: float = 0.125, beta: float = 0.25):
        self.floor_s, self.ceiling_s, self.initial_s = floor_s, ceiling_s, initial_s
        self.alpha, self.beta = alpha, beta
        self.srtt_s: float | None = None
        self.rttvar_s = 0.0

    def sample(self, rtt_s: float) -> None:
        """Fold in one measured round trip (seconds); negative or non-finite values are ignored."""
        if not math.isfinite(rtt_s) or rtt_s < 0:
            return
        if self.srtt_s is None:
            self.srtt_s, self.rttvar_s = rtt_s, rtt_s / 2
        else:  # rttvar first: it uses the old srtt (RFC 6298 2.3)
            self.rttvar_s = (1 - self.beta) * self.rttvar_s + self.beta * abs(self.srtt_s - rtt_s)
            self.srtt_s = (1 - self.alpha) * self.srtt_s + self.alpha * rtt_s

    @property
    def rto_s(self) -> float:
        """Current retransmission timeout, in [floor_s, ceiling_s]."""
        base = self.initial_s if self.srtt_s is None else self.srtt_s + 4 * self.rttvar_s
        return min(self.ceiling_s, max(self.floor_s, base))
