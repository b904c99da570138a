"""In-process lossy/delaying link emulation for `halo-run local` (no root needed).

`LossShim` is an *emulation for the demo*: it drops or delays datagrams and delays TCP frames as
the connection's minimum retransmission timeout would (the floor `transport.lower_rto` granted,
or Linux's 200 ms where the kernel keeps its own). The published measurements use the namespace
lab (veth, nftables loss, NFQUEUE delay), not this shim.

Example:
    >>> from halo_runtime.net.shim import LossShim
    >>> sent = []
    >>> with LossShim(loss=0.5, seed=1) as shim:
    ...     for i in range(1000):
    ...         shim.send_datagram(lambda d, a: sent.append(d), b"x", ("127.0.0.1", 9))
    >>> 400 < len(sent) < 600
    True
"""
from __future__ import annotations

import heapq
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

Addr = tuple  # (host, port)
LINUX_RTO_MIN_MS = 200.0
"""A Linux socket's minimum retransmission timeout unless lowered (as `transport` does)."""


@dataclass(slots=True)
class ShimCounters:
    """What a `LossShim` did."""

    passed: int = 0
    """Datagrams and frames handed on (now or later)."""
    dropped: int = 0
    """UDP datagrams dropped."""
    delayed: int = 0
    """Datagrams and frames held back before sending."""
    tcp_losses: int = 0
    """Emulated TCP losses, each costing one (doubling) RTO."""
    errors: int = 0
    """Delayed sends that failed (socket closed meanwhile)."""


class LossShim:
    """Emulated lossy link for in-process demos; not a measurement tool (that is the namespace lab).

    UDP: each datagram is dropped with probability `loss`; survivors wait `delay_ms` plus Gaussian
    jitter (std `jitter_ms`, clipped at 0), so jitter may reorder them as a network would.
    TCP: a frame of n segments is "lost" with probability 1-(1-loss)^n and then arrives one RTO
    later (`tcp_rto_ms`, default the channel's `rto_min_ms`); the retransmitted segment is lost
    again with probability `loss`, and each such loss doubles the wait (exponential backoff).
    Frames of one connection stay in order. One timer thread with a heap does all delayed sends.
    """

    def __init__(self, loss: float, delay_ms: float = 0.0, jitter_ms: float = 0.0, seed: int = 0,
                 tcp_rto_ms: float | None = None, segment_bytes: int = 1448):
        if not 0.0 <= loss <= 1.0 or delay_ms < 0 or jitter_ms < 0:
            raise ValueError(f"bad shim settings loss={loss} delay_ms={delay_ms} jitter_ms={jitter_ms}")
        self.loss, self.delay_ms, self.jitter_ms = loss, delay_ms, jitter_ms
        self.tcp_rto_ms, self.segment_bytes = tcp_rto_ms, segment_bytes
        self.counters = ShimCounters()
        self._rng = random.Random(seed)
        self._cv = threading.Condition()
        self._heap: list = []
        self._seq = 0
        self._pending: dict[int, int] = {}   # stream id -> frames scheduled, not yet sent
        self._last: dict[int, float] = {}    # stream id -> due time of its last scheduled frame
        self._thread: threading.Thread | None = None
        self._closed = False

    def _delay_s(self) -> float:
        if self.jitter_ms:
            return max(0.0, self._rng.gauss(self.delay_ms, self.jitter_ms)) / 1000
        return self.delay_ms / 1000

    def send_datagram(self, send: Callable[[bytes, Addr], object], data: bytes, addr: Addr) -> None:
        """Drop, send now, or schedule `send(data, addr)`."""
        with self._cv:
            if self._rng.random() < self.loss:
                self.counters.dropped += 1
                return
            self.counters.passed += 1
            delay = self._delay_s()
            if delay > 0:
                self.counters.delayed += 1
                self._push(time.monotonic() + delay, lambda: send(data, addr), None)
                return
        send(data, addr)

    def send_frame(self, stream: object, send: Callable[[bytes], object], frame: bytes) -> None:
        """Send or schedule `send(frame)`, never overtaking an earlier frame of the same `stream`."""
        sid = id(stream)
        with self._cv:
            p = 1 - (1 - self.loss) ** max(1, -(-len(frame) // self.segment_bytes))
            rto_ms = self.tcp_rto_ms or getattr(stream, "rto_min_ms", None) or LINUX_RTO_MIN_MS
            wait, rto, tries = 0.0, rto_ms / 1000, 0
            # the first send risks every segment; a retransmission resends only the lost one
            while tries < 15 and self._rng.random() < (p if tries == 0 else self.loss):  # TCP gives up ~15
                wait, rto, tries = wait + rto, rto * 2, tries + 1
            self.counters.tcp_losses += tries
            self.counters.passed += 1
            now = time.monotonic()
            due = max(now + wait + self._delay_s(), self._last.get(sid, 0.0))
            if due > now or self._pending.get(sid):
                self.counters.delayed += 1
                self._pending[sid] = self._pending.get(sid, 0) + 1
                self._last[sid] = due
                self._push(due, lambda: send(frame), sid)
                return
        send(frame)

    def _push(self, due: float, fn: Callable[[], object], sid: int | None) -> None:
        # caller holds self._cv
        if self._closed:
            return
        heapq.heappush(self._heap, (due, self._seq, fn, sid))
        self._seq += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="halo-loss-shim", daemon=True)
            self._thread.start()
        self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                _, _, fn, sid = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # a peer closed meanwhile; the timer thread must survive it
                self.counters.errors += 1
            if sid is not None:
                with self._cv:
                    self._pending[sid] -= 1
                    if not self._pending[sid]:
                        del self._pending[sid], self._last[sid]

    def close(self) -> None:
        """Stop the timer thread; sends still scheduled are discarded."""
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PeerShims:
    """Per-destination LossShim, for `halo-run local`: only the lossy links lose packets."""

    def __init__(self, shims: dict[tuple, LossShim]):
        self.shims = shims

    def send_datagram(self, send, data: bytes, addr) -> None:
        shim = self.shims.get(tuple(addr[:2]))
        if shim is None:
            send(data, addr)
        else:
            shim.send_datagram(send, data, addr)

    def close(self) -> None:
        for s in self.shims.values():
            s.close()
