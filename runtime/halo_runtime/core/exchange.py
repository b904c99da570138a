"""In-process exchange: every device computed in this process, with seeded simulated loss; and
what every exchange counts (`ExchangeStats`).

Used by tests (the plan's math without sockets) and by `halo-compile eval` (perplexity under
loss). Loss is drawn per token row, because in decode one message carries one token: the
relaxed part of device d for token t in a layer is missed with d's miss probability (from
`DeliveryPolicy.miss_probability`) unless the coordinator awaits that token; critical parts
always arrive, as the network exchange retransmits them until they do. A round of T tokens
(a whole evaluation window) thus sees what T decode steps would, at prefill speed. A device given
in `bursty` loses in bursts instead (`policy.BurstyLink`): its misses are drawn per pass for every
(token, layer) in decode order, so a burst takes several consecutive layers and tokens. In use:
`InProcessExchange(plan, shards, miss={"pi5-2": 0.01})` under a `Coordinator`, then
`exchange.stats().devices["pi5-2"]` holds that device's rows: expected, lost, awaited, compensated.

Example:
    >>> a = DeviceStats(rows=6, lost=6, awaited=3, compensated=3)
    >>> (a + DeviceStats(rows=2, lost=1, compensated=1)).compensated
    4
    >>> s = ExchangeStats(bytes_sent=1200, retransmissions=None, devices={"pi5-2": a})
    >>> j = s.to_json()                     # None: a counter this exchange does not keep
    >>> j["bytes_sent"], "retransmissions" in j, j["devices"]["pi5-2"]["awaited"], j["dropped"]["forged"]
    (1200, False, 3, 0)
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Protocol

import numpy as np

from .codec import as_wire
from .device import DeviceBackend, DeviceCompute
from .plan import Plan
from .policy import BurstyLink, DeliveryPolicy
from .spans import spans_of


class DeviceLost(RuntimeError):
    """A device stopped answering; the message names it, and so does `device` when it is known."""

    def __init__(self, message: str, device: str | None = None):
        super().__init__(message)
        self.device = device


@dataclass
class RoundResult:
    """What came back for one layer's round."""

    parts: list[np.ndarray]
    """Partial sums that arrived in time (critical ones always), in device order. Rows of a relaxed
    part that are missing (see `missing`) hold zeros."""
    missing: dict[str, np.ndarray] = field(default_factory=dict)
    """Device -> bool [T]: tokens whose relaxed part missed the deadline and must be compensated."""


@dataclass(frozen=True)
class DeviceStats:
    """One remote device's relaxed parts as the in-process exchange drew them, in (token, layer) rows."""

    rows: int = 0
    """Relaxed rows expected from the device."""
    lost: int = 0
    """Rows its simulated link lost (drawn for every row, awaited or not)."""
    awaited: int = 0
    """Rows the coordinator awaited: lost or not, they arrive (the network retransmits them)."""
    compensated: int = 0
    """Rows lost and not awaited: the coordinator compensated them."""

    def __add__(self, other: DeviceStats) -> DeviceStats:
        return DeviceStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class Drops:
    """Datagrams (UDP) or frames (TCP) the coordinator dropped on arrival, by reason; the reasons
    are `halo_runtime.net.wire.ReassemblyCounters`'."""

    malformed: int = 0
    """Undecodable, or inconsistent with their message."""
    bad_length: int = 0
    """Truncated, oversized, or not as long as their header says."""
    forged: int = 0
    """Their tag does not verify (wrong key, or altered in transit)."""
    misdirected: int = 0
    """Authentic, but addressed to another device."""
    replayed: int = 0
    """Authentic, but their sender's sequence number was seen before or is too old."""
    stale: int = 0
    """Their step is below the watermark."""
    unknown_session: int | None = 0
    """Authentic messages of another session (None: the TCP exchange does not count them)."""


@dataclass(frozen=True)
class ExchangeStats:
    """What an exchange counted since it was made. None marks a counter this exchange does not keep
    (TCP keeps only bytes and drops; only the in-process one counts rows per device); `to_json`
    leaves those out, so `halo-run --json` shows each exchange's own counters."""

    retransmissions: int | None = 0
    """Requests sent again after their retransmission timeout."""
    late: int | None = 0
    """Replies that came after their round ended, for another round, or from no known device."""
    malformed: int | None = 0
    """Authentic messages whose payload did not decode (a partial sum, or a device's stats)."""
    compensated: int | None = 0
    """Relaxed parts (one per device and MLP round) with rows missing: the coordinator compensated."""
    relaxed_parts: int | None = 0
    """Relaxed parts expected from remote devices (one per device and MLP round)."""
    awaited_relaxed: int | None = 0
    """Relaxed parts the coordinator awaited (the predictor flagged some token of the round)."""
    max_relaxed_overshoot_ms: float | None = 0.0
    """Longest wait for a compensated relaxed part past the later of its deadline and the round's
    last critical part."""
    unknown_session: int | None = 0
    """Authentic messages of another session (a restarted device, or an earlier run)."""
    devices_down: int | None = 0
    """Times a device holding only relaxed parts was marked down for silence."""
    rejoins: int | None = 0
    """Times a device came back (restarted, or answered a probe) and had its KV cache rebuilt."""
    bytes_sent: int | None = 0
    """Bytes sent: UDP payloads, or TCP frames."""
    bytes_received: int | None = 0
    """Bytes received: UDP payloads, or TCP frames."""
    datagrams_sent: int | None = 0
    """Datagrams sent (redundant copies and retransmissions included)."""
    datagrams_received: int | None = 0
    """Datagrams received, garbage included."""
    duplicates: int | None = 0
    """Datagrams dropped as repeats of a chunk or of a completed message (redundant copies)."""
    dropped: Drops | None = Drops()
    """Arrivals dropped, by reason."""
    down: tuple[str, ...] | None = ()
    """Devices marked down now, sorted."""
    rto_ms: dict[str, float] | None = field(default_factory=dict)
    """Retransmission timeout now, per "device/phase" (phase: attn or mlp), in ms."""
    devices: dict[str, DeviceStats] | None = None
    """Per remote device: its relaxed rows (on the network a device's own counters are
    `device_stats()`)."""

    def to_json(self) -> dict:
        """The counters this exchange keeps as plain JSON values, in field order."""
        return _plain(self)


def _plain(value):
    """A stats value as JSON values: dataclasses become objects without their None fields."""
    if is_dataclass(value):
        return {f.name: _plain(v) for f in fields(value) if (v := getattr(value, f.name)) is not None}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


class Exchange(Protocol):
    """Moves requests to devices and partial sums back; the coordinator does not care how."""

    def begin(self, session: int) -> None: ...

    def post(self, phase: str, step: int, layer: int, x: np.ndarray, at) -> None:
        """Send round (phase, step, layer)'s input x; `at` says where its rows sit: a start position
        in session slot 0, or `spans.Span`s (the rows of several sessions)."""

    def collect(self, phase: str, step: int, layer: int, awaited: dict[str, np.ndarray]) -> RoundResult:
        """`awaited`: device -> bool [T], tokens whose relaxed part must be awaited; only devices
        flagged on some token are keys, so `device in awaited` means "await it this round"."""

    def stats(self) -> ExchangeStats:
        """A snapshot of the counters so far."""

    def close(self) -> None: ...


class FailingOver(Exchange, Protocol):
    """A network exchange that can replace a dead device by the plan's failover (`core.failover`)."""

    failed: str | None
    """The device replaced this session and the next ones (None: every device is in)."""

    def fail_over(self, dead: str, start) -> dict[int, dict[int, np.ndarray]]:
        """Send the survivors that adopt `dead`'s groups a FAILOVER and rebuild their KV caches from
        the attention inputs of positions < `start` (an int: session slot 0; or slot -> start);
        from now on ask them instead of `dead`. Returns those inputs, slot -> layer that `dead` held
        attention in -> rows (for the coordinator's own adopted heads). DeviceLost if a survivor
        does not finish."""


class InProcessExchange:
    def __init__(self, plan: Plan, shards: dict[str, dict[str, np.ndarray]],
                 miss: dict[str, float] | None = None, seed: int = 0, wire: str = "fp32",
                 computes: dict[str, DeviceBackend] | None = None,
                 bursty: dict[str, tuple[float, float]] | None = None, policy: DeliveryPolicy = DeliveryPolicy()):
        """computes: prebuilt devices by name (e.g. a StreamingCompute); their shards are not read.
        bursty: device -> (loss rate, mean burst length) of a link losing in bursts under `policy`
        (its entry in `miss` is then unused)."""
        self.plan, self.wire = plan, wire
        self.order = [d for d in plan.device_names if d != plan.coordinator]
        computes = computes or {}
        self.devices = {d: computes.get(d) or DeviceCompute(plan, d, shards[d]) for d in self.order}
        self.miss = miss or {}
        self.gen = np.random.default_rng(seed)
        self.bursty = {d: BurstyLink(loss, burst, policy, plan.model.hidden_size,
                                     np.random.default_rng((seed, self.order.index(d))), plan.link_copies(d))
                       for d, (loss, burst) in (bursty or {}).items()}
        self._pattern: dict[str, tuple[int, np.ndarray]] = {}  # bursty device -> (last layer, misses of the pass)
        self.pending: tuple | None = None
        self.relaxed_parts = self.compensated = self.awaited_relaxed = 0
        self.per_device = {d: DeviceStats() for d in self.order}

    def begin(self, session: int) -> None:
        self._pattern.clear()
        for dev in self.devices.values():
            dev.reset()

    def _wire(self, t: np.ndarray | None) -> np.ndarray | None:
        return as_wire(t, self.wire)

    def post(self, phase: str, step: int, layer: int, x: np.ndarray, at) -> None:
        self.pending = (phase, layer, self._wire(x), spans_of(at, x.shape[0]))

    def collect(self, phase: str, step: int, layer: int, awaited: dict[str, np.ndarray]) -> RoundResult:
        _, _, x, spans = self.pending
        result = RoundResult(parts=[])
        for name in self.order:
            dev = self.devices[name]
            if phase == "attn":
                if dev.has_attention(layer):
                    result.parts.append(self._wire(dev.attention_spans(layer, x, spans)))
                continue
            if not dev.has_mlp(layer):
                continue
            critical, relaxed = map(self._wire, dev.mlp(layer, x))
            result.parts.append(critical)
            if relaxed is None:
                continue
            T = relaxed.shape[0]
            # draw for every token, awaited or not, so the random stream does not depend on the
            # predictor or the compensation and runs stay comparable across methods
            lost = self._bursty_lost(name, layer, T) if name in self.bursty else \
                self.gen.random(T) < self.miss.get(name, 0.0)
            wait = _rows(awaited, name, T)
            missing = lost & ~wait
            self.per_device[name] += DeviceStats(T, int(lost.sum()), int(wait.sum()), int(missing.sum()))
            self.relaxed_parts += 1
            self.awaited_relaxed += bool(wait.any())
            if missing.any():
                self.compensated += 1
                result.missing[name] = missing
                if missing.all():
                    continue
                relaxed = np.where(missing[:, None], np.float32(0), relaxed)
            result.parts.append(relaxed)
        return result

    def _bursty_lost(self, name: str, layer: int, T: int) -> np.ndarray:
        """A bursty device's misses in this layer: a pass (the layers coming round again, or another
        row count) draws every (token, layer) of its T rows at once, in decode order."""
        last = self._pattern.get(name)
        if last is None or layer <= last[0] or last[1].shape[0] != T:
            last = (layer, self.bursty[name].misses(T, self.plan.model.num_layers))
        self._pattern[name] = (layer, last[1])
        return last[1][:, layer]

    def stats(self) -> ExchangeStats:
        # nothing travels, so the network's counters are truly zero here
        return ExchangeStats(compensated=self.compensated, relaxed_parts=self.relaxed_parts,
                             awaited_relaxed=self.awaited_relaxed, devices=dict(self.per_device))

    def close(self) -> None:
        pass


def _rows(awaited: dict[str, np.ndarray], name: str, T: int) -> np.ndarray:
    """Tokens of `name` the coordinator awaits."""
    rows = awaited.get(name)
    return rows if rows is not None else np.zeros(T, dtype=bool)
