"""`halo-run probe --peer`: a board measures its link to the coordinator's `probe --serve`
(`net.probelink` is the datagram format; `net.proberesponder` the other side). Only raw records
live here (which ping came back after how long, which datagram of a train arrived); the
statistics made of them are `halo_runtime.probe.linkstats`'.

Example (loopback, no loss):
    >>> from halo_runtime.net.auth import Authenticator
    >>> from halo_runtime.net.probeclient import LinkOptions, ProbeClient
    >>> from halo_runtime.net.proberesponder import Responder
    >>> key = bytes(range(32))
    >>> with Responder(("127.0.0.1", 0), Authenticator(key)) as responder:
    ...     _ = responder.start()
    ...     with ProbeClient(responder.address, Authenticator(key)) as client:
    ...         raw = client.measure(LinkOptions(pings=20, train=200, rate=10000, bulk_kb=64))
    >>> len(raw.rtts_ms), len(raw.up), len(raw.down), sum(raw.up) > 190, raw.down_bulk.received > 0
    (20, 200, 200, True, True)
    >>> responder.counters.forged
    0
"""
from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass

from ..core.codec import MAX_DATAGRAM, TAG_LEN
from .auth import Authenticator, ReplayGuard
from .probelink import (
    ACK,
    DATA,
    HEADER,
    INDEX,
    MAX_TRAIN,
    REPORT,
    REPORT_BITS,
    REPORT_REQ,
    SEND,
    SMALLEST,
    Kind,
    ProbeError,
    ProbeSocket,
    TrainRecord,
    decode,
    encode,
    send_train,
)
from .shim import LossShim


@dataclass(frozen=True)
class LinkOptions:
    """How much traffic `halo-run probe --peer` sends (defaults sized for a real board: ~15 s)."""

    pings: int = 200
    """Ping-pongs, one at a time, for the round-trip time."""
    train: int = 5000
    """Numbered datagrams in each direction for loss and bursts."""
    rate: float = 2000.0
    """Datagrams per second of those trains (capped at a quarter of the measured bandwidth)."""
    train_bytes: int = MAX_DATAGRAM
    """Size of a train's datagrams in bytes (the runtime's full datagram: most of its traffic is)."""
    bulk_kb: float = 2000.0
    """kB (1e3 bytes) sent as fast as possible in each direction for the bandwidth."""
    timeout_s: float = 3.0
    """A peer silent this long is an error."""

    def __post_init__(self):
        if self.pings < 10 or self.train < 100 or self.rate <= 0 or self.bulk_kb <= 0 or self.timeout_s <= 0:
            raise ValueError("probe link: need at least 10 pings, trains of 100+ datagrams, a positive rate, "
                             "bulk size and timeout")
        if self.train > MAX_TRAIN or not SMALLEST <= self.train_bytes <= MAX_DATAGRAM:
            raise ValueError(f"probe link: trains of at most {MAX_TRAIN} datagrams of {SMALLEST}..{MAX_DATAGRAM} bytes")


@dataclass(frozen=True)
class Bulk:
    """One direction's bulk transfer: what arrived, over how long."""

    sent: int
    """Datagrams sent."""
    received: int
    """Datagrams that arrived."""
    bytes: int
    """UDP payload bytes that arrived."""
    span_s: float
    """Time from the first arrival to the last, at the receiver."""

    def __post_init__(self):
        if not 0 <= self.received <= self.sent or self.bytes < 0 or self.span_s < 0:
            raise ValueError(f"inconsistent bulk record {self}")

    @property
    def mbps(self) -> float | None:
        """Goodput in Mbit/s (1e6 bits): payload bytes after the first arrival over the span; None
        when too little arrived to time."""
        if self.received < 10 or self.span_s <= 0:
            return None
        return (self.bytes - self.bytes / self.received) * 8 / self.span_s / 1e6


@dataclass(frozen=True)
class RawLink:
    """Everything a `ProbeClient.measure` saw, before statistics."""

    peer: str
    """HOST:PORT of the responder."""
    rtts_ms: tuple[float | None, ...]
    """Round trip of each ping in ms; None: no answer within its timeout."""
    up: tuple[bool, ...]
    """Per datagram of the upstream train (board to responder): whether it arrived."""
    down: tuple[bool, ...]
    """Per datagram of the downstream train: whether it arrived."""
    up_bulk: Bulk
    """The upstream bulk transfer, as the responder received it."""
    down_bulk: Bulk
    """The downstream bulk transfer, as this board received it."""
    rate: float
    """Datagrams per second the trains were sent at."""
    train_bytes: int
    """Size of the trains' datagrams."""
    forged: int
    """Datagrams this board dropped: tag or replay check failed."""
    overflow: int
    """Datagrams this board's socket dropped, its buffer full (not the link's loss)."""
    peer_overflow: int
    """The same, counted by the responder's socket."""

    def __post_init__(self):
        if not self.rtts_ms or not self.up or not self.down:
            raise ValueError("a raw link record needs pings and both trains")


class ProbeClient:
    """`halo-run probe --peer`: measures the link to a `Responder` (see `measure`)."""

    _ping_size = 64
    """Bytes of a ping datagram: small, as the latency is of the link, not of serialisation."""

    def __init__(self, peer: tuple[str, int], auth: Authenticator, timeout_s: float = 3.0,
                 shim: LossShim | None = None):
        self.peer_text = f"{peer[0]}:{peer[1]}"
        try:
            family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
            self.peer = socket.getaddrinfo(peer[0], peer[1], family, socket.SOCK_DGRAM)[0][4][:2]
        except (OSError, UnicodeError) as e:
            raise ProbeError(f"--peer {self.peer_text}: cannot resolve {peer[0]!r} ({e})") from None
        self.auth = auth
        self.timeout_s = timeout_s
        self.session = secrets.randbits(32)
        self.sock = ProbeSocket(("::" if ":" in self.peer[0] else "0.0.0.0", 0), shim)
        self._guard = ReplayGuard()
        self.forged = 0
        self._trains = 0
        self._rtt_s = 0.05  # until pings measure it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _silent(self) -> ProbeError:
        return ProbeError(f"no answer from {self.peer_text} within {self.timeout_s:g} s (is `halo-run probe --serve` "
                          "running there, with the same key?)")

    def _send(self, kind: int, body: bytes, size: int = 0) -> None:
        self.sock.send(encode(self.auth, kind, self.session, body, size), self.peer)

    def _recv(self, timeout_s: float) -> tuple[int, bytes, int] | None:
        """The next verified datagram of this session from the peer, as (kind, body, arrival ns)."""
        end = time.monotonic() + timeout_s
        while True:
            got = self.sock.recv(end - time.monotonic())
            if got is None:
                return None
            data, _, now = got
            d = decode(self.auth, data)
            if d == "forged" or (not isinstance(d, str) and not self._guard.accept(0, d[2])):
                self.forged += 1
            elif not isinstance(d, str) and d[1] == self.session:
                return d[0], d[3], now
            if time.monotonic() >= end:
                return None

    def hello(self) -> float:
        """One answered ping within `timeout_s` (retried every 0.25 s): the peer is there, with our key."""
        end = time.monotonic() + self.timeout_s
        index = 0
        while time.monotonic() < end:
            sent = time.perf_counter_ns()
            self._send(Kind.PING, INDEX.pack(0xFFFF_FF00 + index))
            index += 1
            while True:
                got = self._recv(min(0.25, max(end - time.monotonic(), 0.0)))
                if got is None:
                    break
                if got[0] == Kind.PONG:
                    self._rtt_s = (got[2] - sent) / 1e9
                    return self._rtt_s * 1e3
        raise self._silent()

    def pings(self, n: int) -> list[float | None]:
        """Round trips in ms of n ping-pongs, one at a time; None for a ping that got no answer.

        Each waits up to 20x the median so far (at first the hello's round trip), at least 0.1 s and
        at most 1 s: a lost ping costs little, an answer that slow counts as lost (a deadline would
        pass it by too), and a late pong (matched by index) is never taken for a later ping's."""
        out: list[float | None] = []
        answered: list[float] = []
        for i in range(n):
            typical = sorted(answered)[len(answered) // 2] / 1e3 if answered else self._rtt_s
            wait = min(1.0, max(0.1, 20 * typical))
            sent = time.perf_counter_ns()
            self._send(Kind.PING, INDEX.pack(i), self._ping_size)
            end = time.monotonic() + wait
            rtt = None
            while rtt is None and time.monotonic() < end:
                got = self._recv(end - time.monotonic())
                if got and got[0] == Kind.PONG and INDEX.unpack_from(got[1])[0] == i:
                    rtt = (got[2] - sent) / 1e6
            out.append(rtt)
            if rtt is not None:
                answered.append(rtt)
        if answered:
            self._rtt_s = sorted(answered)[len(answered) // 2] / 1e3
        return out

    def _patience(self) -> float:
        return min(self.timeout_s, max(0.3, 10 * self._rtt_s))

    def upstream(self, count: int, size: int, rate: float) -> tuple[TrainRecord, int]:
        """Send a train to the peer and fetch what arrived: (its record, the peer's overflow count)."""
        train = self._next_train()
        send_train(self.sock, self.auth, self.peer, self.session, train, count, size, rate)
        time.sleep(min(1.0, 0.2 + 4 * self._rtt_s))  # let stragglers (queued, delayed) arrive first
        rec = TrainRecord(count)
        overflow = 0
        for first in range(0, count, REPORT_BITS):
            for _ in range(max(3, int(self.timeout_s / self._patience()))):
                self._send(Kind.REPORT_REQ, REPORT_REQ.pack(train, first))
                got = self._await_report(train, first)
                if got is not None:
                    break
            else:
                raise ProbeError(f"{self.peer_text} stopped answering (no report of the upstream train)")
            _, n, received, nbytes, span_ns, overflow, _ = REPORT.unpack_from(got)
            if n not in (0, count):
                raise ProbeError(f"{self.peer_text} reports a train of {n} datagrams, {count} were sent")
            bits = got[REPORT.size:]
            rec.bits[first // 8:first // 8 + len(bits)] = bits
            # the responder's clock timed the span: kept as first 0, last span (rec.span_s is right)
            rec.received, rec.bytes, rec.first_ns, rec.last_ns = received, nbytes, 0, span_ns
        return rec, overflow

    def _await_report(self, train: int, first: int) -> bytes | None:
        end = time.monotonic() + self._patience()
        while time.monotonic() < end:
            got = self._recv(end - time.monotonic())
            if got and got[0] == Kind.REPORT and len(got[1]) >= REPORT.size \
                    and REPORT.unpack_from(got[1])[0::6] == (train, first):
                return got[1]
        return None

    def _next_train(self) -> int:
        self._trains += 1
        return self._trains

    def downstream(self, count: int, size: int, rate: float) -> TrainRecord:
        """Ask the peer for a train and record what arrives."""
        train = self._next_train()
        rec = TrainRecord(count)
        expected = count / rate if rate > 0 else 0.0  # rate 0: over when the link goes quiet
        end = time.monotonic() + self.timeout_s
        started = False
        while not started:  # ask until an ACK or the train itself shows up
            if time.monotonic() > end:
                raise ProbeError(f"{self.peer_text} stopped answering (no downstream train)")
            self._send(Kind.SEND, SEND.pack(train, count, size, int(rate)))
            wait_end = time.monotonic() + self._patience()
            while not started and time.monotonic() < wait_end:
                got = self._recv(wait_end - time.monotonic())
                if got is None:
                    continue
                kind, body, now = got
                if kind == Kind.SEND_ACK and ACK.unpack_from(body)[0] == train:
                    started = True
                elif kind == Kind.DATA and DATA.unpack_from(body)[0] == train:
                    started = True
                    rec.add(DATA.unpack_from(body)[2], len(body) + HEADER.size + TAG_LEN, now)
        # until every datagram is in, or the train should be over and the link has gone quiet
        t0 = last = time.monotonic()
        hard, quiet = t0 + 1.5 * expected + self.timeout_s, max(0.3, 4 * self._rtt_s)
        while rec.received < count:
            now = time.monotonic()
            if now > hard or (now > t0 + expected and now - last > quiet):
                break
            got = self._recv(0.05)
            if got is not None and got[0] == Kind.DATA and DATA.unpack_from(got[1])[0] == train:
                rec.add(DATA.unpack_from(got[1])[2], len(got[1]) + HEADER.size + TAG_LEN, got[2])
                last = time.monotonic()
        return rec

    def measure(self, opts: LinkOptions, progress=lambda msg: None) -> RawLink:
        """Pings, then a bulk transfer each way (bandwidth), then a paced train each way (loss)."""
        self.timeout_s = opts.timeout_s
        self.hello()
        progress(f"link to {self.peer_text}: {opts.pings} pings")
        rtts = self.pings(opts.pings)
        bulk_n = max(10, int(opts.bulk_kb * 1e3 / MAX_DATAGRAM))
        progress(f"link: bulk {bulk_n} datagrams up and down")
        up_rec, peer_overflow = self.upstream(bulk_n, MAX_DATAGRAM, 0)
        up_bulk = Bulk(bulk_n, up_rec.received, up_rec.bytes, up_rec.span_s)
        down_rec = self.downstream(bulk_n, MAX_DATAGRAM, 0)
        down_bulk = Bulk(bulk_n, down_rec.received, down_rec.bytes, down_rec.span_s)
        # the loss trains stay well below the link's capacity: congestion would pass for loss
        rate = opts.rate
        speeds = [b.mbps for b in (up_bulk, down_bulk) if b.mbps]
        if speeds:
            rate = min(rate, max(100.0, 0.25 * min(speeds) * 1e6 / 8 / opts.train_bytes))
        progress(f"link: {opts.train} datagrams up and down at {rate:.0f}/s")
        # overflow during the trains only (the bulk transfers overflow buffers by design)
        up, peer_after = self.upstream(opts.train, opts.train_bytes, rate)
        before = self.sock.overflow
        down = self.downstream(opts.train, opts.train_bytes, rate)
        return RawLink(peer=self.peer_text, rtts_ms=tuple(rtts), up=up.arrived(), down=down.arrived(),
                       up_bulk=up_bulk, down_bulk=down_bulk, rate=rate, train_bytes=opts.train_bytes,
                       forged=self.forged, overflow=self.sock.overflow - before,
                       peer_overflow=max(0, peer_after - peer_overflow))
