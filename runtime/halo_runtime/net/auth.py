"""Datagram authentication for HALO: the deployment key, a truncated HMAC-SHA256 tag, sequence
numbers and a per-peer replay window.

Every UDP datagram and TCP frame ends in `TAG_LEN` bytes of HMAC-SHA256 (truncated to 16 bytes)
over its header and chunk, under one 32-byte key per deployment. `halo-compile plan` writes the
key into the plan directory as `KEY_FILE` (never committed; copy it to every device with the
plan); `halo-run` reads it from `--key-file`, `$HALO_KEY_FILE`, `$HALO_KEY` (hex) or the plan
directory, in that order.

Replay: every datagram carries a u64 sequence number from a per-process counter that starts at
the wall clock in nanoseconds, so a restarted process continues above anything it sent before
(a device whose clock steps back across a restart is refused until its peers restart; keep clocks
in NTP sync). Receivers keep, per sender, the highest number seen and a bitmap of the
`window` numbers below it: a number seen before, or older than the window, is a replay. Only
datagrams whose tag verified move a window, so forgeries cannot push it forward.
Authenticated, not encrypted: activations travel in clear (see docs/RELIABILITY.md).

Example:
    >>> from halo_runtime.core.plandir import new_key
    >>> from halo_runtime.net.auth import Authenticator, ReplayGuard
    >>> a = Authenticator(new_key())
    >>> tag = a.tag(b"header and chunk")
    >>> len(tag), a.verify(b"header and chunk", tag), a.verify(b"header and chunk!", tag)
    (16, True, False)
    >>> g = ReplayGuard(window=64)
    >>> [g.accept(sender=1, seq=s) for s in (100, 99, 100, 30, 101)]
    [True, True, False, False, True]
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import threading
import time

from ..core.codec import TAG_LEN
from ..core.plandir import KEY_BYTES

INSECURE_KEY = b"\0" * KEY_BYTES
"""Public all-zero key used when a library caller passes no key (unit tests, doctests). The
`halo-run` command never falls back to it."""
DEFAULT_WINDOW = 8192
"""Sequence numbers remembered per sender. The coordinator sends a few thousand datagrams per
second at most; a datagram delayed by more than this many of its sender's later datagrams is
refused (at 10k datagrams/s that is 0.8 s of reordering)."""


class Authenticator:
    """Tags and checks datagrams under one key, and numbers this process's outgoing datagrams."""

    __slots__ = ("key", "_seq", "_mac")

    def __init__(self, key: bytes = INSECURE_KEY, first_seq: int | None = None):
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a key has {KEY_BYTES} bytes")
        self.key = key
        # the key schedule (inner and outer padded key hashed once); every tag copies this state
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        # itertools.count's __next__ is atomic under the GIL: safe from several sending threads
        self._seq = itertools.count(time.time_ns() if first_seq is None else first_seq)

    def next_seq(self) -> int:
        """The sequence number of the next datagram (u64)."""
        return next(self._seq) & 0xFFFF_FFFF_FFFF_FFFF

    def tag(self, data: bytes) -> bytes:
        """16-byte tag of `data`: HMAC-SHA256 from the prepared key state (no key setup per datagram)."""
        mac = self._mac.copy()
        mac.update(data)
        return mac.digest()[:TAG_LEN]

    def verify(self, data: bytes, tag: bytes) -> bool:
        """Whether `tag` is `data`'s tag (constant-time comparison)."""
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
