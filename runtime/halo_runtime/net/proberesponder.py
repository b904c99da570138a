"""`halo-run probe --serve`: the coordinator's board answers other boards' link probes
(`net.probelink` is the datagram format; `net.probeclient` the other side).

Example:
    >>> from halo_runtime.net.auth import Authenticator
    >>> from halo_runtime.net.proberesponder import Responder
    >>> with Responder(("127.0.0.1", 0), Authenticator(bytes(32))) as responder:
    ...     responder.address[0], responder.counters.received
    ('127.0.0.1', 0)
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..core.codec import MAX_DATAGRAM
from .auth import Authenticator, ReplayGuard
from .probelink import (
    ACK,
    DATA,
    INDEX,
    MAX_SENDERS,
    MAX_SESSIONS,
    MAX_TRAIN,
    MAX_TRAIN_BYTES,
    REPORT,
    REPORT_BITS,
    REPORT_REQ,
    SEND,
    SMALLEST,
    Kind,
    ProbeSocket,
    TrainRecord,
    decode,
    encode,
    send_train,
)
from .shim import LossShim


@dataclass(slots=True)
class ResponderCounters:
    """What a `Responder` received and dropped."""

    received: int = 0
    """Datagrams read from the socket."""
    answered: int = 0
    """Requests answered (pongs, reports, trains started)."""
    forged: int = 0
    """Dropped: the tag did not verify (another key, or tampered)."""
    malformed: int = 0
    """Dropped: not a probe datagram of this version, or a body of the wrong size."""
    replayed: int = 0
    """Dropped: a (session, sequence number) seen before."""
    refused: int = 0
    """SEND requests left unanswered: too many trains in flight, or a train too large."""


class Responder:
    """`halo-run probe --serve`: answers pings, records upstream trains, sends downstream trains.

    One thread receives (`serve`, or `start` for a background thread); each downstream train is
    paced by a thread of its own, so pings from other boards are answered meanwhile."""

    def __init__(self, bind: tuple[str, int], auth: Authenticator, shim: LossShim | None = None):
        self.auth = auth
        self.sock = ProbeSocket(bind, shim)
        self.address: tuple[str, int] = tuple(self.sock.sock.getsockname()[:2])
        """(host, port) actually bound."""
        self.counters = ResponderCounters()
        self._guard = ReplayGuard()
        self._sessions: OrderedDict[int, dict[int, TrainRecord]] = OrderedDict()
        self._sent: OrderedDict[tuple[int, int], bool] = OrderedDict()  # (session, train) already sent
        self._senders: list[threading.Thread] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve, name="halo-probe-responder", daemon=True)
        self._thread.start()
        return self._thread

    def serve(self, for_s: float | None = None) -> None:
        """Answer until `close` (or Ctrl-C), or for `for_s` seconds."""
        end = None if for_s is None else time.monotonic() + for_s
        while not self._stop.is_set() and (end is None or time.monotonic() < end):
            got = self.sock.recv(0.2 if end is None else min(0.2, max(end - time.monotonic(), 1e-3)))
            if got is not None:
                self._handle(*got)

    def _handle(self, data: bytes, addr: tuple, now: int) -> None:
        c = self.counters
        c.received += 1
        got = decode(self.auth, data)
        if isinstance(got, str):
            setattr(c, got, getattr(c, got) + 1)
            return
        kind, session, seq, body = got
        if not self._guard.accept(session, seq):
            c.replayed += 1
            return
        if kind == Kind.PING and len(body) >= INDEX.size:
            self.sock.send(encode(self.auth, Kind.PONG, session, body[:INDEX.size], len(data)), addr)
            c.answered += 1
        elif kind == Kind.DATA and len(body) >= DATA.size:
            train, count, index = DATA.unpack_from(body)
            trains = self._trains(session)
            if train not in trains:
                if not 0 < count <= MAX_TRAIN or len(trains) >= 64:
                    c.refused += 1
                    return
                trains[train] = TrainRecord(count)
            trains[train].add(index, len(data), now)
        elif kind == Kind.REPORT_REQ and len(body) >= REPORT_REQ.size:
            train, first = REPORT_REQ.unpack_from(body)
            rec = self._trains(session).get(train) or TrainRecord(0)
            bits = bytes(rec.bits[first // 8:(first + REPORT_BITS) // 8]) if first % 8 == 0 else b""
            head = REPORT.pack(train, rec.count, rec.received, rec.bytes, rec.last_ns - rec.first_ns,
                               self.sock.overflow & 0xFFFF_FFFF, first)
            self.sock.send(encode(self.auth, Kind.REPORT, session, head + bits), addr)
            c.answered += 1
        elif kind == Kind.SEND and len(body) >= SEND.size:
            self._send_train(session, addr, *SEND.unpack_from(body))
        else:
            c.malformed += 1

    def _trains(self, session: int) -> dict[int, TrainRecord]:
        trains = self._sessions.get(session)
        if trains is None:
            if len(self._sessions) >= MAX_SESSIONS:
                self._sessions.popitem(last=False)
            trains = self._sessions[session] = {}
        return trains

    def _send_train(self, session: int, addr: tuple, train: int, count: int, size: int, rate: int) -> None:
        ack = encode(self.auth, Kind.SEND_ACK, session, ACK.pack(train))
        if (session, train) in self._sent:
            self.sock.send(ack, addr)  # our ACK was lost: the train is already on its way
            return
        self._senders = [t for t in self._senders if t.is_alive()]
        if len(self._senders) >= MAX_SENDERS or not 0 < count <= MAX_TRAIN or not SMALLEST <= size <= MAX_DATAGRAM \
                or count * size > MAX_TRAIN_BYTES:
            self.counters.refused += 1
            return
        if len(self._sent) >= 4 * MAX_SESSIONS:
            self._sent.popitem(last=False)
        self._sent[(session, train)] = True
        self.sock.send(ack, addr)
        self.counters.answered += 1
        t = threading.Thread(target=send_train, name="halo-probe-train", daemon=True,
                             args=(self.sock, self.auth, addr, session, train, count, size, rate, self._stop))
        self._senders.append(t)
        t.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for t in self._senders:
            t.join()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
