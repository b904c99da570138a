"""The link of `halo-run probe`: authenticated probe datagrams between a board (`--peer`, the
`ProbeClient`) and the coordinator's board (`--serve`, the `Responder`): their datagrams.

Only transport and raw records live here (which ping came back after how long, which datagram of a
train arrived); the statistics made of them (loss, bursts, latency) are `halo_runtime.probe`'s.

Every probe datagram, packed big-endian, ends in a 16-byte tag under a key derived from the
deployment key (`auth.Authenticator.tag`); probe datagrams carry no activations, so they are authenticated, not
encrypted. A datagram whose tag, header or size is wrong, or whose (session, sequence number) was
seen before (`auth.ReplayGuard`), is dropped and counted:

    offset size field
    0      4    magic b"HPRB" (not the runtime's b"HL": neither side takes the other's traffic)
    4      1    version (1)
    5      1    kind (`Kind`)
    6      4    session (u32, random per client run; replies carry the client's)
    10     8    sequence number (u64, per sending process, `Authenticator.next_seq`)
    18     n    body (per kind, below), zero padding up to the datagram's size
    18+n   16   tag over everything before

Bodies: PING/PONG `index u32`; DATA `train u16, count u32, index u32` (one datagram of a numbered
train, either direction); SEND `train u16, count u32, size u16, rate u32` (the client asks for a
downstream train; rate 0 = as fast as the socket takes them), answered by SEND_ACK `train u16` and
the train; REPORT_REQ `train u16, first bit u32`, answered by REPORT `train u16, count u32,
received u32, bytes u64, span_ns u64, overflow u32, first bit u32` and up to `REPORT_BITS` bits of
the train's arrival bitmap (bit i: datagram i arrived). A train the responder never heard of
reports count 0. A SEND repeated (its ACK was lost) is acknowledged again, never sent twice; the
responder sends at most `MAX_SENDERS` trains at once, at most `MAX_TRAIN` datagrams and
`MAX_TRAIN_BYTES` per train, always to the address the authenticated request came from (a recorded
SEND replayed is refused by the replay window while the responder runs; after a restart it could
start one train again, as for the runtime's own datagrams: see docs/RELIABILITY.md).

The responder is `net.proberesponder`, the client `net.probeclient`; this module is what both speak.

Example:
    >>> from halo_runtime.net.auth import Authenticator
    >>> from halo_runtime.net.probelink import Kind, decode, encode
    >>> a = Authenticator(bytes(range(32)))
    >>> kind, session, seq, body = decode(a, encode(a, Kind.PING, 7, b"ping", size=64))
    >>> (Kind(kind).name, session, body[:4]), decode(Authenticator(bytes(32)), encode(a, Kind.PING, 7, b""))
    (('PING', 7, b'ping'), 'forged')
"""
from __future__ import annotations

import enum
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from ..core.codec import TAG_LEN
from .auth import Authenticator
from .shim import LossShim
from .transport import TransportError

MAGIC = b"HPRB"
VERSION = 1
HEADER = struct.Struct("!4sBBIQ")
INDEX = struct.Struct("!I")
DATA = struct.Struct("!HII")
SEND = struct.Struct("!HIHI")
ACK = struct.Struct("!H")
REPORT_REQ = struct.Struct("!HI")
REPORT = struct.Struct("!HIIQQII")
REPORT_BITS = 8000
"""Bitmap bits per REPORT datagram (1,000 bytes: one datagram on any MTU-1500 link)."""
MAX_TRAIN = 1_000_000
"""Most datagrams of one train the responder records or sends."""
MAX_TRAIN_BYTES = 256_000_000
"""Most bytes of one train the responder sends (an authenticated client could ask for more)."""
MAX_SENDERS = 4
"""Downstream trains the responder sends at once; a SEND beyond them is left unanswered (retried)."""
MAX_SESSIONS = 256
"""Client sessions whose trains the responder remembers (the oldest is forgotten first)."""
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)  # Linux: datagrams the socket dropped, buffer full
SMALLEST = HEADER.size + DATA.size + TAG_LEN


class Kind(enum.IntEnum):
    PING = 1
    PONG = 2
    DATA = 3
    SEND = 4
    SEND_ACK = 5
    REPORT_REQ = 6
    REPORT = 7


class ProbeError(TransportError):
    """The probe cannot go on (a silent peer, a refused bind); the message says what to check (the
    CLI prints it as one error line, as any TransportError)."""


def encode(auth: Authenticator, kind: int, session: int, body: bytes, size: int = 0) -> bytes:
    """One tagged probe datagram of at least `size` bytes (zero padding before the tag)."""
    head = HEADER.pack(MAGIC, VERSION, kind, session, auth.next_seq()) + body
    head += bytes(max(0, size - len(head) - TAG_LEN))
    return head + auth.tag(head)


def decode(auth: Authenticator, data: bytes) -> tuple[int, int, int, bytes] | str:
    """(kind, session, seq, body) of a datagram whose tag verifies, else why not ("malformed", "forged")."""
    if len(data) < HEADER.size + TAG_LEN or data[:4] != MAGIC:
        return "malformed"
    magic, version, kind, session, seq = HEADER.unpack_from(data)
    if version != VERSION or kind not in Kind._value2member_map_:
        return "malformed"
    if not auth.verify(data[:-TAG_LEN], data[-TAG_LEN:]):
        return "forged"
    return kind, session, seq, data[HEADER.size:-TAG_LEN]


def _socket(bind: tuple[str, int], rcvbuf: int = 4 << 20) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in bind[0] else socket.AF_INET, socket.SOCK_DGRAM)
    for opt, size in ((socket.SO_RCVBUF, rcvbuf), (socket.SO_SNDBUF, 1 << 20)):
        try:  # the kernel caps it at net.core.rmem_max; a smaller buffer only costs overflow (counted)
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass
    if sys.platform.startswith("linux"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        except OSError:
            pass
    try:
        sock.bind(bind)
    except OSError as e:
        sock.close()
        raise ProbeError(f"cannot bind {bind[0]}:{bind[1]}: {e.strerror or e}") from None
    return sock


class ProbeSocket:
    """A UDP socket that receives with the kernel's count of datagrams it dropped for want of buffer
    (SO_RXQ_OVFL): such drops are this machine's, not the link's, and must not pass for link loss."""

    def __init__(self, bind: tuple[str, int], shim: LossShim | None = None):
        self.sock = _socket(bind)
        self.shim = shim
        self.overflow = 0
        self._cmsg = socket.CMSG_SPACE(4)

    def send(self, data: bytes, addr: tuple) -> None:
        try:
            if self.shim is not None:
                self.shim.send_datagram(self.sock.sendto, data, addr)
            else:
                self.sock.sendto(data, addr)
        except OSError:
            pass  # a full send buffer or an unreachable network: the datagram is lost, as on a link

    def recv(self, timeout_s: float) -> tuple[bytes, tuple, int] | None:
        """(datagram, sender, arrival in perf_counter_ns) or None after `timeout_s`."""
        self.sock.settimeout(max(timeout_s, 1e-4))
        try:
            data, anc, _, addr = self.sock.recvmsg(2048, self._cmsg)
        except (socket.timeout, BlockingIOError, InterruptedError):
            return None
        except OSError:  # an ICMP error surfacing, or the socket closed under us
            return None
        now = time.perf_counter_ns()
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) >= 4:
                self.overflow = int.from_bytes(value[:4], sys.byteorder)
        return data, tuple(addr[:2]), now

    def close(self) -> None:
        self.sock.close()


@dataclass
class TrainRecord:
    """What arrived of one train (responder side for upstream trains, client side for downstream)."""

    count: int
    bits: bytearray = field(init=False)
    received: int = 0
    bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0

    def __post_init__(self):
        self.bits = bytearray((self.count + 7) // 8)

    def add(self, index: int, size: int, now: int) -> None:
        if not 0 <= index < self.count or self.bits[index >> 3] >> (index & 7) & 1:
            return  # out of range or a duplicate
        self.bits[index >> 3] |= 1 << (index & 7)
        self.received += 1
        self.bytes += size
        self.first_ns = self.first_ns or now
        self.last_ns = now

    @property
    def span_s(self) -> float:
        return (self.last_ns - self.first_ns) / 1e9

    def arrived(self) -> tuple[bool, ...]:
        return tuple(bool(self.bits[i >> 3] >> (i & 7) & 1) for i in range(self.count))


def send_train(sock: ProbeSocket, auth: Authenticator, addr: tuple, session: int, train: int, count: int,
               size: int, rate: float, stop: threading.Event | None = None) -> None:
    """Send datagrams 0..count-1 of `train`, `rate` a second (0: as fast as the socket takes them).

    Paced by the clock, not by sleeping a fixed gap: a late wake-up sends the datagrams due meanwhile
    back to back, so the mean rate holds (time.sleep's granularity is ~0.1 ms)."""
    start = time.perf_counter()
    for i in range(count):
        if rate > 0:
            ahead = start + i / rate - time.perf_counter()
            if ahead > 0.0005:
                time.sleep(ahead)
        if stop is not None and i % 256 == 0 and stop.is_set():
            return
        sock.send(encode(auth, Kind.DATA, session, DATA.pack(train, count, i), size), addr)
