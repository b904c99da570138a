"""The link to the coordinator as statistics: round trips, loss and bursts per direction, bandwidth.

Part of `halo-run probe` (`halo_runtime.probe`); the datagrams themselves are `net.probelink`'s.
Loss in bursts: `loss_statistics` reads a direction's arrivals as the simple Gilbert channel the
planner prices (`core.policy`: every datagram in the bad state lost): p = P(good -> bad) and
r = P(bad -> good) from the transitions, and the mean run of consecutive losses (~ 1 / r).
Independent loss at rate L has runs of mean 1 / (1 - L); the entry writes `burst: 0` (independent)
when the measured mean stays under 1.2 and within 3 standard errors of that (`burst_verdict`).

Example:
    >>> from halo_runtime.probe.linkstats import burst_verdict, loss_statistics
    >>> s = loss_statistics([True] * 10 + [False] * 3 + [True] * 6 + [False] + [True] * 20)
    >>> s.lost, s.loss, s.bursts, s.mean_burst, round(s.p_bad_good, 3)
    (4, 0.1, 2, 2.0, 0.5)
    >>> burst_verdict([s]).written          # 2 bursts are too few to call independent
    2.0
    >>> burst_verdict([loss_statistics(([True] * 19 + [False]) * 200)]).written
    0.0
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ..net.probeclient import RawLink
from ..runstats import percentile

BURST_FLOOR = 1.2
"""Mean bursts below this, statistically consistent with independent loss, are written as 0."""
BURST_Z = 3.0
"""Standard errors above the independent channel's mean burst that count as bursty."""


# ---- the link --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinkLoss:
    """One direction's losses, read as a simple Gilbert channel (bad state: datagram lost)."""

    sent: int
    """Datagrams of the train."""
    lost: int
    """Datagrams that did not arrive."""
    bursts: int
    """Runs of consecutive losses."""
    p_good_bad: float
    """P(a lost datagram follows one that arrived): the Gilbert p."""
    p_bad_good: float
    """P(an arriving datagram follows a lost one): the Gilbert r (1 / mean burst)."""

    def __post_init__(self):
        if self.sent < 1 or not 0 <= self.lost <= self.sent or not 0 <= self.bursts <= self.lost:
            raise ValueError(f"inconsistent loss record {self}")
        if self.lost and not self.bursts:
            raise ValueError("losses need at least one burst")
        if not (0 <= self.p_good_bad <= 1 and 0 <= self.p_bad_good <= 1):
            raise ValueError("transition probabilities must be in [0, 1]")

    @property
    def loss(self) -> float:
        """Share of the train lost."""
        return self.lost / self.sent

    @property
    def mean_burst(self) -> float:
        """Mean run of consecutive losses, in datagrams (0: none lost)."""
        return self.lost / self.bursts if self.bursts else 0.0


def loss_statistics(received) -> LinkLoss:
    """LinkLoss of a train from its arrivals in sending order (True: the datagram arrived)."""
    arrived = [bool(x) for x in received]
    if not arrived:
        raise ValueError("an empty train says nothing")
    pairs = list(zip(arrived, arrived[1:]))
    good = sum(1 for a, _ in pairs if a)
    bad = len(pairs) - good
    good_bad = sum(1 for a, b in pairs if a and not b)
    bad_good = sum(1 for a, b in pairs if not a and b)
    bursts = good_bad + (not arrived[0])  # a run starts at each good -> bad step, or at the start
    return LinkLoss(sent=len(arrived), lost=arrived.count(False), bursts=bursts,
                    p_good_bad=good_bad / good if good else 0.0,
                    p_bad_good=bad_good / bad if bad else 1.0)


@dataclass(frozen=True)
class Bursts:
    """The bursts of several directions together, and what a profile should say of them."""

    mean: float
    """Mean run of consecutive losses over every direction's runs (0: no loss)."""
    independent: float
    """The mean run independent loss at the measured rates would give (1 / (1 - loss) per direction)."""
    z: float
    """How many standard errors `mean` lies above `independent`."""
    written: float
    """The profile's `burst`: 0 when the losses look independent, else `mean` (at least what the
    Gilbert channel admits for the mean loss rate, `core.policy.gilbert`)."""

    def __post_init__(self):
        if self.mean < 0 or (self.written != 0 and self.written < 1):
            raise ValueError(f"inconsistent bursts {self}")


def burst_verdict(directions: list[LinkLoss]) -> Bursts:
    """Bursts of `directions` (e.g. upstream and downstream) together.

    Under independent loss at rate L a run of losses is geometric with mean 1 / (1 - L) and variance
    L / (1 - L)^2; the runs' mean is compared with that expectation in standard errors. Written as 0
    only when it is both small (< BURST_FLOOR) and consistent with independence (z <= BURST_Z): few
    runs, or longer ones, keep the measured mean, the conservative side for the planner."""
    runs = sum(d.bursts for d in directions)
    if not runs:
        return Bursts(0.0, 1.0, 0.0, 0.0)
    if any(d.lost == d.sent for d in directions):
        raise ValueError("every datagram of a train was lost: no burst length to measure")
    mean = sum(d.lost for d in directions) / runs
    expected = sum(d.bursts / (1 - d.loss) for d in directions) / runs
    se = math.sqrt(sum(d.bursts * d.loss / (1 - d.loss) ** 2 for d in directions)) / runs
    z = (mean - expected) / se if se > 0 else (math.inf if mean > expected else 0.0)
    written = 0.0 if mean < BURST_FLOOR and z <= BURST_Z else mean
    loss = sum(d.loss for d in directions) / len(directions)
    if written and loss > 0:
        # the Gilbert channel of rate `loss` needs bursts of at least loss / (1 - loss) (only binds
        # above 50% loss); directions measured apart can combine beyond it, so clamp
        written = max(written, loss / (1 - loss), 1.0)
    return Bursts(mean, expected, z, written)


@dataclass(frozen=True)
class RttStats:
    """Round trips of the pings that were answered, in ms."""

    sent: int
    """Pings sent."""
    answered: int
    """Pings answered in time."""
    mean_ms: float
    """Mean round trip."""
    std_ms: float
    """Its standard deviation."""
    p50_ms: float
    """Median."""
    p90_ms: float
    """90th percentile."""
    p99_ms: float
    """99th percentile."""

    def __post_init__(self):
        if not 0 < self.answered <= self.sent or self.mean_ms < 0 or self.std_ms < 0:
            raise ValueError(f"inconsistent round trips {self}")


def rtt_statistics(rtts_ms) -> RttStats:
    """RttStats of per-ping round trips (None: unanswered)."""
    got = sorted(r for r in rtts_ms if r is not None)
    if not got:
        raise ValueError("no ping was answered")
    return RttStats(len(rtts_ms), len(got), statistics.fmean(got), statistics.pstdev(got),
                    percentile(got, 0.5), percentile(got, 0.9), percentile(got, 0.99))


@dataclass(frozen=True)
class LinkReport:
    """The link to the coordinator, as the profile and the comment describe it."""

    raw: RawLink
    """What crossed the link."""
    rtt: RttStats = field(init=False)
    """Round trips."""
    up: LinkLoss = field(init=False)
    """Board -> coordinator."""
    down: LinkLoss = field(init=False)
    """Coordinator -> board."""
    bursts: Bursts = field(init=False)
    """Both directions' bursts."""

    def __post_init__(self):
        object.__setattr__(self, "rtt", rtt_statistics(self.raw.rtts_ms))
        object.__setattr__(self, "up", loss_statistics(self.raw.up))
        object.__setattr__(self, "down", loss_statistics(self.raw.down))
        for name, d in (("upstream", self.up), ("downstream", self.down)):
            if d.lost == d.sent:
                raise ValueError(f"every datagram of the {name} train to {self.raw.peer} was lost")
        object.__setattr__(self, "bursts", burst_verdict([self.up, self.down]))

    @property
    def latency_ms(self) -> float:
        """One way: half the mean round trip (the responder's turnaround, ~0.05 ms, included)."""
        return self.rtt.mean_ms / 2

    @property
    def jitter_ms(self) -> float:
        """One way: std(round trip) / sqrt(2), if both directions vary independently."""
        return self.rtt.std_ms / math.sqrt(2)

    @property
    def loss(self) -> float:
        """Mean of the two directions (the planner applies one rate to requests and replies)."""
        return (self.up.loss + self.down.loss) / 2

    @property
    def bandwidth_mbps(self) -> float | None:
        """The slower direction's goodput, Mbit/s; None if neither could be timed."""
        speeds = [b.mbps for b in (self.raw.up_bulk, self.raw.down_bulk) if b.mbps]
        return min(speeds) if speeds else None
