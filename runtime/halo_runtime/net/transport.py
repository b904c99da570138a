"""Sockets for HALO: a UDP endpoint (the relaxed-synchronisation path) and a TCP channel (the strict
baseline, like distributed-llama); the retransmission timer is `rtt.RttEstimator`.

Messages and their encoding live in `wire`. The UDP endpoint chunks every message to the MTU and
reassembles on receipt; garbage, forgeries and replays are dropped and counted, never raised.
Both take an `auth.Authenticator` (the deployment key; default the public test key) and an
`auth.ReplayGuard` (share one per process). The TCP channel carries the
same messages as length-prefixed frames, with Nagle off, congestion control pinned to cubic
(this host defaults to bbr, which ignores loss and would flatter the baseline) and the minimum
retransmission timeout lowered to the delivery policy's floor where the kernel allows (`lower_rto`).

Both accept a `shim.LossShim` (the demo's in-process loss emulation) for outgoing traffic.

Example:
    >>> from halo_runtime.net.transport import UdpEndpoint
    >>> from halo_runtime.net.wire import Kind, Message
    >>> with UdpEndpoint() as a, UdpEndpoint() as b:
    ...     n = a.send(Message(Kind.REQUEST_MLP, 1, 0, 5, 0, b"x" * 5000), b.address)
    ...     msg, addr = b.recv(timeout_s=1.0)
    >>> n, msg.layer, len(msg.payload), addr == a.address
    (4, 5, 5000, True)
"""
from __future__ import annotations

import errno
import select
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass

from ..core.codec import HEADER_SIZE, MAX_CHUNK, MAX_DATAGRAM, TAG_LEN
from ..core.policy import DeliveryPolicy
from .auth import Authenticator, ReplayGuard
from .shim import LINUX_RTO_MIN_MS, LossShim
from .wire import ANY, Message, Reassembler, encode

Addr = tuple  # (host, port)


class TransportError(Exception):
    """A socket that cannot be used: bind failure, bad address, or a broken TCP connection."""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(host: str, port: int, err: OSError) -> str:
    if err.errno == errno.EADDRINUSE:
        return f"cannot bind {_hostport(host, port)}: address already in use"
    return f"cannot bind {_hostport(host, port)}: {err.strerror or err}"


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# --- UDP ----------------------------------------------------------------------------------------

@dataclass(slots=True)
class EndpointCounters:
    """Traffic through one endpoint (datagrams as they hit or left the socket)."""

    datagrams_sent: int = 0
    """Datagrams the socket accepted."""
    bytes_sent: int = 0
    """UDP payload bytes the socket accepted."""
    datagrams_received: int = 0
    """Datagrams read from the socket, garbage included."""
    bytes_received: int = 0
    """UDP payload bytes read."""
    messages_sent: int = 0
    """Messages passed to `send`."""
    messages_received: int = 0
    """Complete messages returned by `recv`."""
    send_errors: int = 0
    """Datagrams the kernel refused (e.g. ENOBUFS); they count as lost."""
    recv_errors: int = 0
    """Socket errors while reading (e.g. ICMP port unreachable); ignored."""


SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # Linux values; Python's socket module lacks them


def _set_buffer(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    # The *FORCE variant bypasses net.core.rmem_max but needs CAP_NET_ADMIN; fall back quietly.
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


class UdpEndpoint:
    """One UDP socket that sends and receives whole `Message`s, chunked to `max_datagram` bytes.

    `send` is safe from several threads; `recv` belongs to one thread. `fileno()` is there for
    callers that multiplex several endpoints with `selectors`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, rcvbuf_bytes: int = 4 << 20,
                 sndbuf_bytes: int = 1 << 20, max_datagram: int = MAX_DATAGRAM,
                 shim: LossShim | None = None, reassembler: Reassembler | None = None,
                 auth: Authenticator | None = None, guard: ReplayGuard | None = None, me: int | None = None):
        self.max_datagram = max_datagram
        self.shim = shim
        self.auth = auth or Authenticator()
        self.reassembler = reassembler if reassembler is not None else Reassembler(auth=self.auth, guard=guard,
                                                                                   me=me)
        self.counters = EndpointCounters()
        self._lock = threading.Lock()
        self._resolved: dict[Addr, tuple] = {}
        self._closed = False
        self._sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        _set_buffer(self._sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf_bytes)
        _set_buffer(self._sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf_bytes)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise TransportError(_describe(host, port, e)) from None
        self.address: Addr = tuple(self._sock.getsockname()[:2])
        """(host, port) actually bound."""
        # poll(2) on the one socket, not `selectors`: its wrapper costs more than the wait's system call
        self._poll = select.poll()
        self._poll.register(self._sock.fileno(), select.POLLIN)

    @property
    def rcvbuf_bytes(self) -> int:
        """Receive buffer the kernel granted (Linux reports twice the requested size)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def fileno(self) -> int:
        return self._sock.fileno()

    def _resolve(self, addr: Addr) -> tuple:
        r = self._resolved.get(addr)
        if r is None:
            try:
                host, port = addr
                r = socket.getaddrinfo(host, port, self._sock.family, socket.SOCK_DGRAM)[0][4]
            except (OSError, TypeError, ValueError) as e:
                raise TransportError(f"cannot send to {addr!r}: {e}") from None
            if len(self._resolved) > 1024:
                self._resolved.clear()
            self._resolved[addr] = r
        return r

    def _sendto(self, data: bytes, addr: tuple) -> None:
        try:
            self._sock.sendto(data, addr)
        except OSError:
            with self._lock:
                self.counters.send_errors += 1
            return
        with self._lock:
            self.counters.datagrams_sent += 1
            self.counters.bytes_sent += len(data)

    def send(self, msg: Message, addr: Addr, flags: int | None = None, dest: int = ANY, copies: int = 1) -> int:
        """Send `msg` to `addr` (through the shim if any), `copies` times; returns the number of
        datagrams of one copy.

        `flags` (see `wire.make_flags`) overrides `msg.flags`; a retransmission must carry a higher
        attempt number than the original or the receiver drops it as a duplicate. `dest` is the
        receiving device's index (receivers that know theirs drop datagrams addressed elsewhere).
        Copies repeat the same sealed bytes: sealed once, and dropped unopened by a receiver that
        holds the original (`Reassembler`).
        """
        return self.fan_out([(msg, addr, dest, copies, flags)])[0]

    def fan_out(self, sends: list[tuple[Message, Addr, int, int, int | None]]) -> list[int]:
        """Send each (msg, addr, dest, copies, flags or None for msg's own) of `sends` (see `send`),
        every one's first copy before anyone's second, so that on a clean link no copy delays a
        message that counts. Returns the number of datagrams of one copy of each."""
        sealed, most = [], 0
        for msg, addr, dest, copies, flags in sends:  # a loop, not generators: this runs several times a round
            sealed.append((self._resolve(addr), encode(msg, self.max_datagram, flags, self.auth, dest), copies))
            most = max(most, copies)
        sent = nbytes = errors = 0
        for c in range(most):
            for target, datagrams, copies in sealed:
                if c >= copies:
                    continue
                for d in datagrams:
                    if self.shim is not None:
                        self.shim.send_datagram(self._sendto, d, target)
                        continue
                    try:
                        self._sock.sendto(d, target)
                    except OSError:
                        errors += 1
                        continue
                    sent += 1
                    nbytes += len(d)
        # count once per call (one lock, not one per datagram); the shim's sends count themselves
        with self._lock:
            c = self.counters
            c.datagrams_sent += sent
            c.bytes_sent += nbytes
            c.send_errors += errors
            c.messages_sent += sum(copies for _, _, copies in sealed)
        return [len(datagrams) for _, datagrams, _ in sealed]

    def recv(self, timeout_s: float | None = None) -> tuple[Message, Addr] | None:
        """The next complete message and its sender's address, or None after `timeout_s`.

        `timeout_s=0` only drains what has already arrived; None waits indefinitely.
        """
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        c = self.counters
        while not self._closed:
            while True:
                try:
                    data, addr = self._sock.recvfrom(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    if self._closed:
                        return None
                    c.recv_errors += 1
                    continue
                c.datagrams_received += 1
                c.bytes_received += len(data)
                msg = self.reassembler.feed(data)
                if msg is not None:
                    c.messages_received += 1
                    return msg, tuple(addr[:2])
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                self._poll.poll(None if remaining is None else remaining * 1000.0)
            except (OSError, ValueError):  # closed from another thread
                return None
        return None

    def close(self) -> None:
        """Close the socket (idempotent). A shared shim is left running; its owner closes it."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- TCP (strict baseline) ----------------------------------------------------------------------

FRAME_LEN = struct.Struct("!I")
TCP_MAX_DATAGRAM = HEADER_SIZE + MAX_CHUNK + TAG_LEN
"""Biggest frame: the header's u16 chunk length caps a chunk at 64 KiB, so big messages take several."""


TCP_RTO_MIN_US = getattr(socket, "TCP_RTO_MIN_US", 45)
"""Linux's per-socket minimum retransmission timeout, in microseconds (kernel 6.15 and later)."""


def _tune_tcp(sock: socket.socket) -> float | None:
    """Nagle off, cubic, the minimum RTO lowered; returns the granted minimum RTO (see `lower_rto`)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:  # inside a namespace the sysctl refuses cubic as default, per socket it works
        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_CONGESTION", 13), b"cubic")
    except OSError:
        pass
    return lower_rto(sock, DeliveryPolicy.rto_floor_ms)


def lower_rto(sock: socket.socket, floor_ms: float) -> float | None:
    """Lower the socket's minimum retransmission timeout to `floor_ms`, or the nearest the kernel
    takes (whole jiffies, at least two: 8 ms at HZ=250); the granted ms, None on a kernel without it.

    Why: a strict message is one segment with nothing sent behind it, so a lost one is not found by
    fast retransmit; the tail-loss probe waits two RTTs plus this minimum when one segment is in
    flight, and the RTO at least this minimum, 200 ms by default. At 5% loss that cost every lost
    request or reply 200+ ms, and made strict sync 5x slower than distributed-llama's multi-segment
    TCP in the lab (docs/BENCHMARKS.md). Older kernels: `sysctl net.ipv4.tcp_rto_min_us` (6.11+)
    or the route's `rto_min` do the same for the whole machine.
    """
    us = max(1, round(floor_ms * 1000))
    while us <= LINUX_RTO_MIN_MS * 1000:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MIN_US, us)
            return sock.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MIN_US) / 1000
        except OSError as e:
            if e.errno != errno.EINVAL:  # ENOPROTOOPT: a kernel before 6.15
                return None
            us *= 2  # below two jiffies
    return None


@dataclass(slots=True)
class ChannelCounters:
    """Traffic through one TCP channel."""

    bytes_sent: int = 0
    """Frame bytes handed to the kernel."""
    bytes_received: int = 0
    """Bytes read from the kernel."""
    messages_sent: int = 0
    """Messages passed to `send`."""
    messages_received: int = 0
    """Messages returned by `recv`."""


class TcpChannel:
    """A connected TCP socket carrying `Message`s as frames: u32 length, then one wire datagram."""

    def __init__(self, sock: socket.socket, peer: str, shim: LossShim | None = None,
                 auth: Authenticator | None = None, guard: ReplayGuard | None = None, me: int | None = None):
        self.peer = peer
        self.auth = auth or Authenticator()
        self.shim = shim
        self.counters = ChannelCounters()
        self._sock = sock
        self._sock.setblocking(True)
        self.rto_min_ms = _tune_tcp(sock)
        """The socket's minimum retransmission timeout in ms (None: the kernel's own, 200 ms)."""
        self._buf = bytearray()
        # TCP never duplicates, and a strict run may legitimately repeat a key: no dedup memory.
        self.reassembler = Reassembler(remember=0, max_datagram=TCP_MAX_DATAGRAM, auth=self.auth, guard=guard,
                                       me=me)
        self._send_lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ)
        self._closed = False

    @classmethod
    def connect(cls, addr: Addr, timeout_s: float = 5.0, shim: LossShim | None = None,
                auth: Authenticator | None = None, guard: ReplayGuard | None = None,
                me: int | None = None) -> TcpChannel:
        """Connect to a `TcpListener` at (host, port)."""
        host, port = addr
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        try:
            _tune_tcp(sock)
            sock.settimeout(timeout_s)
            sock.connect((host, port))
        except OSError as e:
            sock.close()
            raise TransportError(f"cannot connect to {_hostport(host, port)}: {e.strerror or e}") from None
        return cls(sock, _hostport(host, port), shim, auth, guard, me)

    def _sendall(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as e:
                raise TransportError(f"connection to {self.peer} failed: {e.strerror or e}") from None
            self.counters.bytes_sent += len(data)

    def send(self, msg: Message, flags: int | None = None, dest: int = ANY) -> None:
        """Send one message (blocking until the kernel has it, or the shim has scheduled it)."""
        frame = b"".join(FRAME_LEN.pack(len(d)) + d for d in encode(msg, TCP_MAX_DATAGRAM, flags, self.auth, dest))
        if self.shim is not None:
            self.shim.send_frame(self, self._sendall, frame)
        else:
            self._sendall(frame)
        self.counters.messages_sent += 1

    def _parse(self) -> Message | None:
        buf = self._buf
        while len(buf) >= FRAME_LEN.size:
            (n,) = FRAME_LEN.unpack_from(buf)
            if not HEADER_SIZE + TAG_LEN <= n <= TCP_MAX_DATAGRAM:
                # A bad length desynchronises the stream for good; nothing after it can be trusted.
                self.close()
                raise TransportError(f"{self.peer} sent a frame of invalid length {n}; connection closed")
            if len(buf) < FRAME_LEN.size + n:
                return None
            frame = bytes(buf[FRAME_LEN.size:FRAME_LEN.size + n])
            del buf[:FRAME_LEN.size + n]
            msg = self.reassembler.feed(frame)  # bad frames are dropped and counted there
            if msg is not None:
                self.counters.messages_received += 1
                return msg
        return None

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """The next message, or None after `timeout_s`; TransportError if the connection is gone."""
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        while True:
            if self._closed:
                raise TransportError(f"connection to {self.peer} is closed")
            msg = self._parse()
            if msg is not None:
                return msg
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                if not self._sel.select(remaining):
                    continue
                data = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except (OSError, ValueError) as e:
                self.close()
                raise TransportError(f"connection to {self.peer} failed: {e}") from None
            if not data:
                self.close()
                raise TransportError(f"connection to {self.peer} closed by peer")
            self.counters.bytes_received += len(data)
            self._buf += data

    def close(self) -> None:
        """Shut down and close (idempotent); the peer's next `recv` reports the closure."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sel.close()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TcpListener:
    """A listening TCP socket that hands out `TcpChannel`s."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, shim: LossShim | None = None,
                 backlog: int = 16, auth: Authenticator | None = None, guard: ReplayGuard | None = None,
                 me: int | None = None):
        self.shim = shim
        self.auth, self.guard, self.me = auth, guard, me
        self._sock = socket.socket(_family(host), socket.SOCK_STREAM)
        # Lets a restarted run reuse a port in TIME_WAIT; a live listener still yields EADDRINUSE.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune_tcp(self._sock)
        try:
            self._sock.bind((host, port))
            self._sock.listen(backlog)
            self._sock.setblocking(False)  # select may report a connection that is reset before accept
        except OSError as e:
            self._sock.close()
            raise TransportError(_describe(host, port, e)) from None
        self.address: Addr = tuple(self._sock.getsockname()[:2])
        """(host, port) actually bound."""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ)

    def accept(self, timeout_s: float | None = None) -> TcpChannel | None:
        """The next incoming connection, or None after `timeout_s`."""
        if not self._sel.select(timeout_s):
            return None
        try:
            sock, addr = self._sock.accept()
        except BlockingIOError:
            return None
        return TcpChannel(sock, _hostport(addr[0], addr[1]), self.shim, self.auth, self.guard, self.me)

    def close(self) -> None:
        """Stop listening (idempotent)."""
        if self._sock.fileno() >= 0:
            self._sel.close()
            self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
