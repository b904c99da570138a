"""Datagram protection for HALO: the deployment key, authenticated encryption (ChaCha20-Poly1305)
under a key per session, sequence numbers and a per-peer replay window.

Every UDP datagram and TCP frame is `header | ciphertext of the chunk | 16-byte Poly1305 tag`
(`TAG_LEN`): the header stays in clear (receivers route and count by it) and is authenticated as
associated data; the chunk (activations, requests, counters) is encrypted. Datagram sizes are
those of the HMAC tag it replaced, so `core.codec`'s size arithmetic is unchanged.

Keys. One 32-byte deployment key per plan: `halo-compile plan` writes it into the plan directory
as `KEY_FILE` (never committed; copy it to every device with the plan); `halo-run` reads it from
`--key-file`, `$HALO_KEY_FILE`, `$HALO_KEY` (hex) or the plan directory, in that order. Datagrams
are never sealed under it directly: each session (the u32 in the header, random per run) has its
own key, HKDF-SHA256 (RFC 5869) of the deployment key with the session id in `info`, so traffic of
one run cannot be spliced into another. Derived keys are cached (`SESSION_KEYS` sessions): a
derivation costs about as much as sealing a datagram, and a run uses one session.

Nonce (12 bytes) = sender index (u16) | 0 (u16) | sequence number (u64), all from the header. It
never repeats under one session key because no (sender, seq) pair does. Sequence numbers come from
one counter per process, shared by every `Authenticator` in it, that starts at the wall clock in
nanoseconds, moves up to it (within ~1 ms) whenever an `Authenticator` is created, and otherwise
counts datagrams: numbers of one process never repeat. Processes of different devices differ in
the sender index. A restarted process starts at the clock, above every number its predecessor
used (which sent far fewer than one datagram per nanosecond), unless the clock stepped back across
the restart. Two live processes with the same sender index (a device started twice) that both
send in one session would reuse a number only if one of them had sent more datagrams than
nanoseconds passed between their starts (after an hour at a thousand datagrams per second: starts
under 4 ms apart). Both are misconfigurations (the first is also refused by the replay window);
docs/RELIABILITY.md says what a repeated nonce would leak.

Why ChaCha20-Poly1305 and not AES-GCM (benchmarks/auth_cost.py, docs/BENCHMARKS.md): on this
project's x86 machine, which has AES-NI, AES-256-GCM seals a 1,210-byte datagram in ~0.6 us and
ChaCha20-Poly1305 in ~1.8 us (the HMAC tag it replaced: ~2.1 us). With OpenSSL told to ignore
AES-NI, AES-GCM takes ~6 us and ChaCha20 still ~2 us. HALO's boards are such machines: the
Raspberry Pi 4's Cortex-A72 has no ARMv8 crypto extensions (the Pi 5's A76 has them), so AES
there runs in software, while ChaCha20 needs only the NEON unit every board has. On the fast
machine ChaCha20's extra ~1.2 us per datagram is ~0.5 ms of CPU per token over all processes
(~1% of a token); on a board without AES instructions AES-GCM would cost ~3x more than ChaCha20.
WireGuard chose the same way.

Replay: receivers keep, per sender, the highest sequence number seen and a bitmap of the `window`
numbers below it: a number seen before, or older than the window, is a replay. Only datagrams
whose tag verified move a window, so forgeries cannot push it forward. A device whose clock
steps back across a restart is refused until its peers restart; keep clocks in NTP sync.

`tag`/`verify` (truncated HMAC-SHA256 under a key derived for the purpose) authenticate the link
probe's datagrams (`probelink`), which carry no activations.

Example:
    >>> from halo_runtime.core.plandir import new_key
    >>> from halo_runtime.net.auth import Authenticator, ReplayGuard
    >>> key = new_key()
    >>> a, b = Authenticator(key), Authenticator(key)        # sender and receiver
    >>> header, seq = b"header in clear", a.next_seq()
    >>> sealed = a.seal(7, 2, seq, header, b"activations")  # session 7, sender 2
    >>> len(sealed) == len(b"activations") + 16, b"activations" in sealed
    (True, False)
    >>> b.unseal(7, 2, seq, header, sealed), b.unseal(8, 2, seq, header, sealed)
    (b'activations', None)
    >>> b.unseal(7, 2, seq, b"header altered", sealed) is None
    True
    >>> g = ReplayGuard(window=64)
    >>> [g.accept(sender=1, seq=s) for s in (100, 99, 100, 30, 101)]
    [True, True, False, False, True]
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import struct
import threading
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..core.codec import TAG_LEN
from ..core.plandir import KEY_BYTES

INSECURE_KEY = b"\0" * KEY_BYTES
"""Public all-zero key used when a library caller passes no key (unit tests, doctests). The
`halo-run` command never falls back to it."""
DEFAULT_WINDOW = 8192
"""Sequence numbers remembered per sender. The coordinator sends a few thousand datagrams per
second at most; a datagram delayed by more than this many of its sender's later datagrams is
refused (at 10k datagrams/s that is 0.8 s of reordering)."""
SESSION_KEYS = 64
"""Session keys an `Authenticator` keeps derived. A run uses one session; a worker that serves
many sessions re-derives an evicted one (~2 us), and only keys that opened a datagram enter."""
HKDF_SALT = b"halo-runtime aead v1"
"""RFC 5869 salt: public, fixed; separates HALO's derived keys from any other use of the key."""
SESSION_INFO = b"halo session key "
"""HKDF `info` prefix of a session's AEAD key; the u32 session id follows, big-endian."""
PROBE_INFO = b"halo probe hmac key"
"""HKDF `info` of the link probe's HMAC key (never the same bytes as a session key)."""
_NONCE = struct.Struct("!HHQ")  # sender index, 0, sequence number: 12 bytes
_SESSION = struct.Struct("!I")
_SEQ = itertools.count(time.time_ns())
"""This process's datagram numbers: one counter for every Authenticator, so no two of them in one
process ever number (and hence nonce) two datagrams alike. itertools.count's __next__ is atomic
under the GIL: safe from several sending threads without a lock."""
_SEQ_CATCH_UP = threading.Lock()
_SEQ_SLACK = 1 << 20
"""More numbers than sending threads can take from a counter while `_catch_up_with_clock` swaps it."""


def _catch_up_with_clock() -> None:
    """Move this process's numbering up to the wall clock (never down), as a process started now
    would number: a long-lived process that creates an Authenticator after another process with
    the same sender index ran (a `halo-run generate` between two sessions of a test process) would
    otherwise send numbers its peers' replay windows already passed."""
    global _SEQ
    with _SEQ_CATCH_UP:
        taken, now = next(_SEQ), time.time_ns()
        # A thread that fetched the old counter before the swap may still take a few numbers from
        # it, all below taken + _SEQ_SLACK < now: the new counter never repeats them.
        if now > taken + _SEQ_SLACK:
            _SEQ = itertools.count(now)


class Authenticator:
    """Seals and opens datagrams under per-session keys derived from one deployment key, and
    numbers this process's outgoing datagrams. Thread-safe."""

    __slots__ = ("key", "_prk", "_sessions", "_lock", "_probe_mac")

    def __init__(self, key: bytes = INSECURE_KEY):
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a key has {KEY_BYTES} bytes")
        self.key = key
        # HKDF-Extract once per deployment key; each session then costs one HMAC (Expand)
        self._prk = hmac.new(hmac.new(HKDF_SALT, key, hashlib.sha256).digest(), digestmod=hashlib.sha256)
        self._sessions: dict[int, ChaCha20Poly1305] = {}
        self._lock = threading.Lock()
        self._probe_mac = hmac.new(self.derive(PROBE_INFO), digestmod=hashlib.sha256)
        _catch_up_with_clock()

    def derive(self, info: bytes) -> bytes:
        """32 bytes of HKDF-SHA256 (RFC 5869) of the deployment key for `info`."""
        mac = self._prk.copy()
        mac.update(info + b"\x01")  # T(1): one block of output is all a 32-byte key needs
        return mac.digest()

    def _new_cipher(self, session: int) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(self.derive(SESSION_INFO + _SESSION.pack(session)))

    def _remember(self, session: int, cipher: ChaCha20Poly1305) -> None:
        with self._lock:
            if session not in self._sessions:
                if len(self._sessions) >= SESSION_KEYS:
                    del self._sessions[next(iter(self._sessions))]  # the oldest session first
                self._sessions[session] = cipher

    @staticmethod
    def next_seq() -> int:
        """The sequence number of the next datagram (u64), unique in this process."""
        return next(_SEQ) & 0xFFFF_FFFF_FFFF_FFFF

    def seal(self, session: int, sender: int, seq: int, header, chunk) -> bytes:
        """`chunk` encrypted under `session`'s key, then its 16-byte tag over `header` and it;
        `seq` must be a fresh `next_seq()` (the nonce is (sender, seq))."""
        cipher = self._sessions.get(session)  # lock-free: a dict read is atomic
        if cipher is None:
            cipher = self._new_cipher(session)
            self._remember(session, cipher)
        return cipher.encrypt(_NONCE.pack(sender, 0, seq), chunk, header)

    def unseal(self, session: int, sender: int, seq: int, header, sealed) -> bytes | None:
        """The chunk `seal` sealed, or None if `sealed` or `header` was not sealed so under this
        deployment key (forged, altered, another key or another session)."""
        cipher = self._sessions.get(session)
        known = cipher is not None
        if not known:
            cipher = self._new_cipher(session)
        try:
            chunk = cipher.decrypt(_NONCE.pack(sender, 0, seq), sealed, header)
        except InvalidTag:
            return None
        if not known:  # only sessions proven by a key holder take a cache slot
            self._remember(session, cipher)
        return chunk

    def tag(self, data: bytes) -> bytes:
        """16-byte truncated HMAC-SHA256 of `data` under the probe key (for `probelink`)."""
        mac = self._probe_mac.copy()
        mac.update(data)
        return mac.digest()[:TAG_LEN]

    def verify(self, data: bytes, tag: bytes) -> bool:
        """Whether `tag` is `data`'s `tag` (constant-time comparison)."""
        return hmac.compare_digest(self.tag(data), tag)


class ReplayGuard:
    """Per-sender sliding windows of sequence numbers already accepted; thread-safe.

    Share one guard between all sockets of a process (a worker's UDP endpoint and its TCP
    channels) so that traffic recorded on one connection cannot be replayed on a new one.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, max_senders: int = 4096):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self._mask = (1 << window) - 1
        self._max_senders = max_senders
        self._state: dict[int, list[int]] = {}  # sender -> [top, bits]; bit i means top - i seen
        self._lock = threading.Lock()

    def accept(self, sender: int, seq: int) -> bool:
        """Record `seq` from `sender`; False if it was seen before or is older than the window."""
        with self._lock:
            st = self._state.get(sender)
            if st is None:
                if len(self._state) >= self._max_senders:  # senders are u16 device indices; bounded anyway
                    self._state.clear()
                self._state[sender] = [seq, 1]
                return True
            top, bits = st
            if seq > top:
                shift = seq - top
                st[0] = seq
                st[1] = ((bits << shift) | 1) & self._mask if shift < self.window else 1
                return True
            age = top - seq
            if age >= self.window or (bits >> age) & 1:
                return False
            st[1] = bits | (1 << age)
            return True
