"""`GET /metrics`: the server's counters in Prometheus' text format.

Per token: TPOT and time-to-first-token histograms, tokens generated, and per device the relaxed
parts expected and those compensated (lost or late: the device's *observed loss*). From the
exchange: retransmissions, dropped datagrams by reason, devices up. The exchange's own counters
live as long as one exchange (the server builds a new one after a lost device), so they are
absorbed as differences and the exported counters only grow, as Prometheus expects.

`exchange_counters` is the one place that reads `exchange.stats()`.

Example:
    >>> from halo_runtime.server.metrics import ExchangeCounters, Metrics
    >>> m = Metrics(["dev1", "dev2"], relaxed_layers={"dev2": 3})
    >>> m.token(0, 0.120, {}); m.token(1, 0.015, {"dev2": 1})
    >>> m.absorb(ExchangeCounters(retransmissions=4, dropped=(("forged", 2),)))
    >>> m.absorb(ExchangeCounters(retransmissions=1))          # a new exchange: counts start again
    >>> text = m.render().decode()
    >>> [l for l in text.splitlines() if l.startswith(("halo_retransmissions_total", "halo_device_observed_loss"))]
    ['halo_device_observed_loss{device="dev2"} 0.16666666666666666', 'halo_retransmissions_total 5.0']
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, fields

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
TTFT_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("completed", "cancelled", "failed", "rejected")


@dataclass(frozen=True)
class ExchangeCounters:
    """What the server reads of an exchange, as running totals since the exchange was built."""

    retransmissions: int = 0
    """Requests sent again because a reply was late."""
    dropped: tuple[tuple[str, int], ...] = ()
    """(reason, datagrams dropped on arrival), e.g. forged, replayed, stale."""
    down: tuple[str, ...] = ()
    """Relaxed-only devices currently marked down (compensated without waiting)."""
    bytes_sent: int = 0
    """Bytes the coordinator sent."""
    bytes_received: int = 0
    """Bytes the coordinator received."""

    def __post_init__(self):
        if min(self.retransmissions, self.bytes_sent, self.bytes_received, *(n for _, n in self.dropped)) < 0:
            raise ValueError("exchange counters cannot be negative")


def exchange_counters(exchange) -> ExchangeCounters:
    """Adapter from the exchange's `ExchangeStats` to the server's view (the only reader of
    `stats()`); a counter the exchange does not keep (None) reads as 0."""
    s = exchange.stats()
    dropped = {f.name: getattr(s.dropped, f.name) for f in fields(s.dropped)} if s.dropped is not None else {}
    return ExchangeCounters(retransmissions=s.retransmissions or 0,
                            dropped=tuple(sorted((k, v) for k, v in dropped.items() if v is not None)),
                            down=tuple(sorted(s.down or ())), bytes_sent=s.bytes_sent or 0,
                            bytes_received=s.bytes_received or 0)


class Metrics:
    """The server's Prometheus registry (its own, so several servers in one process do not clash)."""

    def __init__(self, devices: list[str], relaxed_layers: dict[str, int]):
        """devices: every remote device; relaxed_layers: device -> layers where it holds relaxed
        groups, i.e. the relaxed parts it owes per generated token."""
        disable_created_metrics()  # the *_created series only double the page; nothing here reads them
        self.registry = r = CollectorRegistry()
        self.relaxed_layers = dict(relaxed_layers)
        self.lock = threading.Lock()
        self.tpot = Histogram("halo_tpot_seconds", "Time per output token after the first", registry=r,
                              buckets=TPOT_BUCKETS)
        self.ttft = Histogram("halo_ttft_seconds", "Time to the first token (prefill included)", registry=r,
                              buckets=TTFT_BUCKETS)
        self.tokens = Counter("halo_tokens_generated", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("halo_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_tokens = Counter("halo_prompt_tokens_cached", "Prompt tokens the devices held from the "
                                     "conversation's earlier request: not computed again", registry=r)
        self.requests = Counter("halo_requests", "Generation requests by outcome", ["outcome"], registry=r)
        self.queue = Gauge("halo_requests_waiting", "Requests queued or running", registry=r)
        self.queued = Gauge("halo_requests_queued", "Requests waiting for a session slot", registry=r)
        self.slots_active = Gauge("halo_slots_active", "Session slots holding a request", registry=r)
        self.batch_rows = Histogram("halo_batch_rows", "Token rows per pass, all requests together", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_sessions = Histogram("halo_batch_sessions", "Requests sharing a pass", registry=r,
                                        buckets=(1, 2, 3, 4, 5, 6, 7, 8))
        self.relaxed = Counter("halo_device_relaxed_parts", "Relaxed partial sums expected from a device",
                               ["device"], registry=r)
        self.compensated = Counter("halo_device_compensated_parts",
                                   "Relaxed partial sums of a device that missed their deadline (compensated)",
                                   ["device"], registry=r)
        self.loss = Gauge("halo_device_observed_loss", "Share of a device's relaxed parts that were compensated",
                          ["device"], registry=r)
        self.share = Gauge("halo_compensated_share", "Share of all relaxed parts that were compensated", registry=r)
        self.up = Gauge("halo_device_up", "1 if the device answers, 0 if it is down or lost", ["device"], registry=r)
        self.retransmissions = Counter("halo_retransmissions", "Requests re-sent for a late reply", registry=r)
        self.dropped = Counter("halo_dropped_datagrams", "Datagrams dropped on arrival, by reason", ["reason"],
                               registry=r)
        self.bytes = Counter("halo_network_bytes", "Bytes moved by the coordinator", ["direction"], registry=r)
        self.failovers = Counter("halo_failovers", "Devices replaced by the plan's failover (their groups moved to "
                                 "the survivors)", ["device"], registry=r)
        self.failover_switch = Gauge("halo_failover_switch_seconds", "The last failover's switch: hand-over and KV "
                                     "cache rebuild, after the device was declared dead", ["device"], registry=r)
        self.failover_at = Gauge("halo_failover_time_seconds", "Unix time of the last failover", ["device"],
                                 registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for d in devices:
            self.up.labels(d).set(1)
        for d in relaxed_layers:
            self.relaxed.labels(d)
            self.compensated.labels(d)
            self.loss.labels(d).set(0)
        self._per_device = {d: [0, 0] for d in relaxed_layers}  # relaxed parts expected, compensated
        self._last = ExchangeCounters()

    def token(self, step: int, seconds: float, missing: dict[str, int]) -> None:
        """One generated token: its time, and device -> relaxed parts compensated on it."""
        (self.ttft if step == 0 else self.tpot).observe(seconds)
        self.tokens.inc()
        with self.lock:
            for d, n in self.relaxed_layers.items():
                lost = missing.get(d, 0)
                self.relaxed.labels(d).inc(n)
                self.compensated.labels(d).inc(lost)
                total = self._per_device[d]
                total[0] += n
                total[1] += lost
                self.loss.labels(d).set(total[1] / total[0] if total[0] else 0.0)
            expected = sum(t[0] for t in self._per_device.values())
            if expected:
                self.share.set(sum(t[1] for t in self._per_device.values()) / expected)

    def failover(self, device: str, at: float, switch_s: float) -> None:
        """A device replaced by the plan's failover at unix time `at`; the switch took `switch_s`."""
        self.failovers.labels(device).inc()
        self.failover_switch.labels(device).set(switch_s)
        self.failover_at.labels(device).set(at)

    def absorb(self, now: ExchangeCounters, fresh: bool = False) -> None:
        """Add what the exchange counted since the last call; `fresh`: a new exchange (or counts
        that went down, which only a new exchange does) starts from zero."""
        with self.lock:
            last = self._last
            if fresh or now.retransmissions < last.retransmissions or now.bytes_sent < last.bytes_sent:
                last = ExchangeCounters()
            self.retransmissions.inc(max(0, now.retransmissions - last.retransmissions))
            before = dict(last.dropped)
            for reason, n in now.dropped:
                self.dropped.labels(reason).inc(max(0, n - before.get(reason, 0)))
            self.bytes.labels("sent").inc(max(0, now.bytes_sent - last.bytes_sent))
            self.bytes.labels("received").inc(max(0, now.bytes_received - last.bytes_received))
            self._last = now

    def render(self) -> bytes:
        return generate_latest(self.registry)
