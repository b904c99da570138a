"""The delivery policy: how the coordinator waits for partial sums, and how often that misses.

One frozen dataclass shared by the UDP exchange (which carries it out), `halo-compile eval`
(which simulates it) and placement (which prices it), so the three cannot disagree.

Links lose datagrams independently, or in bursts (Wi-Fi does): a Gilbert channel, in which every
datagram sent in the bad state is lost and none in the good one, with the link's loss rate and
mean burst length (`Device.burst`, in datagrams). A re-request follows the lost attempt closely,
so under bursts it fails far more often than the loss rate says, and consecutive rounds of a
device are missed together. `BurstyLink` draws such losses for simulation, slot by slot in the
same datagram layout that `miss_probability` prices.

Example:
    >>> from halo_runtime.core.policy import DeliveryPolicy
    >>> p = DeliveryPolicy()
    >>> round(p.miss_probability(0.05), 6)       # one re-request: both attempts must fail
    0.009506
    >>> round(DeliveryPolicy(redundancy=2).miss_probability(0.05), 6)
    2.5e-05
    >>> round(p.miss_probability(0.05, planned=2), 6)  # the plan chose 2 copies for this link
    2.5e-05
    >>> round(p.miss_probability(0.05, burst=3), 4)   # bursts of 3: the re-request is often lost too
    0.0342
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .codec import REQUEST_PREFIX, SPAN, datagrams, tensor_bytes


MAX_COPIES = 4
"""Most copies of one message that `--redundancy` or a plan may ask for."""


@dataclass(frozen=True)
class DeliveryPolicy:
    """How the coordinator waits for partial sums."""

    wire: str = "fp16"
    """Activation dtype on the wire: fp16 (default) or fp32 (bit-exact)."""
    relaxed_retries: int = 1
    """Fast re-requests of a late relaxed part before its deadline."""
    redundancy: int | None = None
    """Copies of every message to and from a lossy device (1 = none; one of several datagrams gets at
    least `multi_datagram_copies`); unset (None): as many as the plan chose for the device's link
    (`DeviceReport.copies`)."""
    multi_datagram_copies: int = 2
    """At least this many copies of a message of several datagrams to and from a lossy device (a
    prefill, a batch of sessions' rows, a wide model's row): one lost datagram of k costs the whole
    message a resend after a timeout, and at loss p that happens with 1 - (1 - p)^k (72% for a
    25-datagram prefill at 5%); both copies of a datagram are lost with p^2."""
    rto_floor_ms: float = 2.0
    """Lowest retransmission timeout."""
    dead_after_s: float = 4.0
    """A device holding critical parts, asked and silent this long, is declared lost (the plan's
    failover replaces it, else the run ends); a restarted device (strict: its connection broken)
    must rejoin within it."""
    down_after_s: float = 2.0
    """A device holding only relaxed parts, asked and silent this long, is marked down: compensated
    without waiting, probed until it answers."""
    probe_every_s: float = 0.5
    """HELLO probes of a down device."""

    def __post_init__(self):
        if self.wire not in ("fp16", "fp32", "bf16"):
            raise ValueError(f"wire must be fp16, fp32 or bf16, got {self.wire!r}")
        if (self.relaxed_retries < 0 or not 1 <= self.multi_datagram_copies <= MAX_COPIES
                or (self.redundancy is not None and not 1 <= self.redundancy <= MAX_COPIES)):
            raise ValueError(f"relaxed_retries must be >= 0, redundancy and multi_datagram_copies in 1..{MAX_COPIES}")
        if min(self.rto_floor_ms, self.dead_after_s, self.down_after_s, self.probe_every_s) <= 0:
            raise ValueError("rto_floor_ms, dead_after_s, down_after_s and probe_every_s must be positive")

    def message_datagrams(self, hidden_size: int) -> tuple[int, int]:
        """Datagrams of a one-token (decode) request and of one partial-sum reply on this wire."""
        tensor = tensor_bytes(1, hidden_size, self.wire)
        return datagrams(REQUEST_PREFIX.size + SPAN.size + tensor), datagrams(tensor)

    def copies(self, loss: float, datagrams: int, planned: int = 1) -> int:
        """Copies of a message of `datagrams` datagrams to or from a device whose link loses `loss`
        and for which the plan chose `planned` copies: none extra on a clean link, `redundancy` (if
        set, else `planned`) for one datagram, at least `multi_datagram_copies` for several. The
        exchange sends by it, and `miss_probability` prices it."""
        if loss <= 0:
            return 1
        one = self.redundancy or planned
        return one if datagrams <= 1 else max(one, self.multi_datagram_copies)

    def miss_probability(self, loss: float, hidden_size: int | None = None, burst: float = 0.0,
                         planned: int = 1) -> float:
        """Chance that a relaxed part misses its deadline on a link that drops each datagram with `loss`.

        The one model of this policy's delivery, shared by simulation (`halo-compile eval`) and
        placement. An attempt fails when every copy of the request, or every copy of the reply,
        is lost (a copy is lost when any of its datagrams is; pass `hidden_size` to count them
        for a one-token message, else one datagram each way, as for SmolLM2 in fp16); the part
        is missed when all 1 + relaxed_retries attempts before the deadline fail. Conservative
        where the device also owes a critical part that round: the critical part's own
        retransmissions can bring the relaxed reply along after the deadline. `burst` > 0: losses
        come in bursts of that mean length (module docstring), the attempts' datagrams back to back.
        `planned`: the copies the plan chose for the link (see `copies`).
        """
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss {loss} is outside [0, 1)")
        layout = self.attempt_layout(loss, hidden_size, planned)
        if burst and loss > 0:
            return _burst_miss(gilbert(loss, burst), loss, layout)
        (request_copies, request), (reply_copies, reply) = layout[:2]
        copy_lost = lambda n: 1.0 - (1.0 - loss) ** n  # noqa: E731
        attempt = 1.0 - (1.0 - copy_lost(request) ** request_copies) * (1.0 - copy_lost(reply) ** reply_copies)
        return attempt ** (1 + self.relaxed_retries)

    def attempt_layout(self, loss: float, hidden_size: int | None = None,
                       planned: int = 1) -> tuple[tuple[int, int], ...]:
        """The datagram slots of one relaxed part on its link, in order: per attempt, the request's
        copies then the reply's, as (copies, datagrams per copy) per message (see miss_probability)."""
        request, reply = self.message_datagrams(hidden_size) if hidden_size else (1, 1)
        return (((self.copies(loss, request, planned), request), (self.copies(loss, reply, planned), reply))
                * (1 + self.relaxed_retries))


def pair_link(loss_a: float, loss_b: float, copies_a: int = 1, copies_b: int = 1) -> tuple[float, int]:
    """(loss, copies) of a one-datagram message between boards whose links lose loss_a and loss_b
    and got copies_a and copies_b from the plan: it crosses both links, and gets the copies that
    bring its loss down to what the plan chose for the lossier link alone.

        >>> pair_link(0.05, 0.0, 2, 1)           # a board and the coordinator: the plan's choice
        (0.05, 2)
        >>> [round(x, 4) for x in pair_link(0.05, 0.05, 2, 2)]   # two lossy boards: 9.75%, 3 copies
        [0.0975, 3]
    """
    loss = loss_a + loss_b - loss_a * loss_b  # exact when one link is clean
    copies = max(copies_a, copies_b)
    target = max(loss_a, loss_b) ** copies
    while copies < MAX_COPIES and loss ** copies > target * (1 + 1e-9):
        copies += 1
    return loss, copies


def gilbert(loss: float, burst: float) -> tuple[float, float]:
    """(P good -> bad, P bad -> good) per datagram of the Gilbert channel with loss rate `loss` and mean
    burst length `burst` datagrams. Independent loss is the special case burst = 1 / (1 - loss)."""
    if not 0.0 < loss < 1.0 or burst < 1.0 or loss / (1.0 - loss) > burst:
        raise ValueError(f"no burst loss with rate {loss} and mean burst length {burst} "
                         "(needs 0 < rate < 1 and burst >= max(1, rate / (1 - rate)))")
    return loss / (burst * (1.0 - loss)), 1.0 / burst


def _burst_miss(chain: tuple[float, float], loss: float, layout) -> float:
    """P(every attempt fails) on the Gilbert channel, started in its stationary state: a forward
    pass over the slots of `layout`, with probabilities per state of the channel."""
    g2b, b2g = chain
    step = ((1.0 - g2b, g2b), (b2g, 1.0 - b2g))  # [from][to]; state 0 = good, 1 = bad (lost)
    failed = [1.0 - loss, loss]  # P(every attempt so far failed, and the channel is in this state)
    for request, reply in zip(layout[0::2], layout[1::2]):
        through, lost = _send(failed, *request, step)
        _, reply_lost = _send(through, *reply, step)
        skipped = _advance(lost, reply[0] * reply[1], step)  # no reply to a lost request: time passes
        failed = [skipped[s] + reply_lost[s] for s in (0, 1)]
    return failed[0] + failed[1]


def _send(start: list[float], copies: int, n: int, step) -> tuple[list[float], list[float]]:
    """(delivered, lost) by final channel state, for `copies` copies of an n-datagram message sent
    back to back from the state probabilities `start`; a copy arrives when all its datagrams do."""
    dist = {(s, False): start[s] for s in (0, 1)}  # (state, delivered by an earlier copy)
    for _ in range(copies):
        cur = {(s, done, True): p for (s, done), p in dist.items()}  # ..., this copy still intact
        for _ in range(n):
            nxt: dict = {}
            for (s, done, intact), p in cur.items():
                for s2 in (0, 1):
                    key = (s2, done, intact and s2 == 0)
                    nxt[key] = nxt.get(key, 0.0) + p * step[s][s2]
            cur = nxt
        dist = {}
        for (s, done, intact), p in cur.items():
            dist[(s, done or intact)] = dist.get((s, done or intact), 0.0) + p
    delivered, lost = [0.0, 0.0], [0.0, 0.0]
    for (s, done), p in dist.items():
        (delivered if done else lost)[s] += p
    return delivered, lost


def _advance(v: list[float], slots: int, step) -> list[float]:
    for _ in range(slots):
        v = [v[0] * step[0][0] + v[1] * step[1][0], v[0] * step[0][1] + v[1] * step[1][1]]
    return v


class BurstyLink:
    """A bursty link's losses for simulation: the Gilbert chain stepped slot by slot in decode order,
    one block of `attempt_layout` slots per (token, round), continuing across calls."""

    def __init__(self, loss: float, burst: float, policy: DeliveryPolicy, hidden_size: int | None,
                 gen: np.random.Generator, planned: int = 1):
        self.g2b, self.b2g = gilbert(loss, burst)
        self.layout = policy.attempt_layout(loss, hidden_size, planned)
        self.gen = gen
        self.bad = bool(gen.random() < loss)  # stationary start

    def misses(self, rows: int, rounds: int) -> np.ndarray:
        """bool [rows, rounds]: whether each (token, round)'s relaxed part misses its deadline."""
        block = sum(c * n for c, n in self.layout)
        u = self.gen.random(rows * rounds * block)
        lost = np.empty(u.size, dtype=bool)
        bad, g2b, stay = self.bad, self.g2b, 1.0 - self.b2g
        for i, x in enumerate(u.tolist()):
            bad = x < (stay if bad else g2b)
            lost[i] = bad
        self.bad = bad
        slots = lost.reshape(rows * rounds, block)
        missed, at = np.ones(rows * rounds, dtype=bool), 0
        for request, reply in zip(self.layout[0::2], self.layout[1::2]):
            arrived = []
            for copies, n in (request, reply):
                copy_lost = slots[:, at:at + copies * n].reshape(-1, copies, n).any(axis=2)
                arrived.append(~copy_lost.all(axis=1))
                at += copies * n
            missed &= ~(arrived[0] & arrived[1])
        return missed.reshape(rows, rounds)
