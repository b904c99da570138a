"""HALO wire format: messages, MTU-sized datagrams, their reassembly, and the tensor codec.

Pure encoding, no sockets (those live in `transport`). A `Message` is cut into datagrams that each
fit one Ethernet frame, because IP fragments multiply loss (at 5% frame loss a 16 KB datagram was
lost 94% of the time). Every datagram carries a fixed 33-byte header, packed big-endian:

    offset size field
    0      2    magic b"HL"
    2      1    version (4: a request's spans name a prefix source slot; 3 had none; 2 was the
                clear chunk with an HMAC tag)
    3      1    kind (see `Kind`)
    4      4    session (u32)
    8      4    step (u32; prefill is step 0)
    12     2    layer (u16)
    14     2    sender (u16 device index)
    16     2    chunk index (u16)
    18     2    chunk count (u16, >= 1)
    20     2    chunk length (u16, bytes of payload in this datagram)
    22     1    flags (bit 0 retransmission, bits 4-7 attempt number; a copy repeats its original's bytes)
    23     8    sequence number (u64, per sending process, see `auth`)
    31     2    destination (u16 device index; 0xFFFF = any)
    33     n    chunk, encrypted (ChaCha20-Poly1305 under the session's key, nonce (sender, sequence
                number); see `auth`), then its TAG_LEN (16) bytes of Poly1305 tag, which also
                covers the header (associated data)

A relaxed part (REPLY_MLP_RELAXED, or PART_RLX in push rounds) of several rows is cut at row
boundaries (`codec.row_chunks`), so that its receiver can use the rows of the datagrams that
arrived (`Reassembler.chunks_of`) and compensate only the others; every other message is cut into
equal chunks.

The header travels in clear (it routes, deduplicates and counts); the chunk does not. A datagram
is checked in order of cost: first whether its header names a chunk already held or delivered
(copies are byte-identical, and dropped unopened), then length and fields, then the tag (and
decryption), then its destination
(a request recorded on its way to one device and replayed to another is refused), then the
sender's replay window (`auth.ReplayGuard`); each kind of rejection has its own counter.

Payloads (tensors, requests) and the sizes above are defined in `halo_runtime.core.codec`.

Example:
    >>> import numpy as np
    >>> from halo_runtime.core.codec import decode_tensor, encode_tensor
    >>> from halo_runtime.net.wire import Kind, Message, Reassembler, encode
    >>> x = np.random.default_rng(0).standard_normal((2, 576)).astype(np.float32)
    >>> msg = Message(Kind.REPLY_MLP_RELAXED, session=7, step=3, layer=12, sender=2,
    ...               payload=encode_tensor(x, "fp32"))
    >>> datagrams = encode(msg)          # sealed under auth.INSECURE_KEY; pass auth= for a real key
    >>> len(datagrams), max(len(d) for d in datagrams) <= 1400
    (4, True)
    >>> r = Reassembler()
    >>> [r.feed(d) for d in reversed(datagrams)][-1] == msg
    True
    >>> bool(np.array_equal(decode_tensor(msg.payload, "fp32", width=576), x))
    True
"""
from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from ..core.codec import HEADER_SIZE, MAX_DATAGRAM, TAG_LEN, chunk_room, datagrams, row_chunks
from .auth import Authenticator, ReplayGuard

MAGIC = b"HL"
VERSION = 4
HEADER = struct.Struct("!2sBBIIHHHHHBQH")
assert HEADER.size == HEADER_SIZE
ANY = 0xFFFF
"""Destination of a datagram not addressed to one device (tests, tools)."""
_DEFAULT_AUTH = Authenticator()  # the public test key: callers that pass no `auth`
MAX_UDP_PAYLOAD = 65507

FLAG_RETRANSMIT = 0x01
ATTEMPT_SHIFT = 4
MAX_ATTEMPT = 15
"""Attempts 0..14 are deduplicated per attempt; attempt 15 means '15 or later' and is never deduplicated."""


class Kind(enum.IntEnum):
    """Message kinds. 1-15 are per-layer data (subject to the step watermark), 16+ are control."""

    REQUEST_ATTN = 1
    REQUEST_MLP = 2
    REPLY_ATTN = 3
    REPLY_MLP_CRITICAL = 4
    REPLY_MLP_RELAXED = 5
    REBUILD_ATTN = 6
    """Rejoin: attention inputs of earlier tokens, to rebuild a restarted device's KV cache."""
    REBUILT = 7
    """Acknowledges a REBUILD_ATTN (empty payload)."""
    PUSH_H = 8
    """Push rounds (`net.push`), coordinator -> device: the residual after the coordinator's own
    rounds (layer field: the schedule step it precedes), as a request payload."""
    PART_ATTN = 9
    """Push rounds, device -> every other device: its attention part of a layer."""
    PART_CRIT = 10
    """Push rounds: its critical MLP part."""
    PART_RLX = 11
    """Push rounds: its relaxed MLP part."""
    PULL = 12
    """Push rounds: send me again your parts of this (step, layer); payload: the kinds wanted."""
    HELLO = 16
    """Coordinator -> device: start (or confirm) a session; the device echoes it."""
    BYE = 17
    RESET = 18
    """Device -> coordinator: a request for a session this device does not know (it restarted)."""
    STATS = 19
    """Coordinator -> device: send your counters; the reply carries them as JSON."""
    FAILOVER = 20
    """Coordinator -> device: take over the groups the plan's failover gives you of the device named
    in the payload (this session); REBUILD_ATTN then fills their KV cache. The device echoes it."""


FIRST_CONTROL_KIND = 16
_KIND_OF = {int(k): k for k in Kind}
"""Kind member of each known value (a dict lookup is far cheaper than calling Kind)."""
_ROW_CUT = (Kind.REPLY_MLP_RELAXED, Kind.PART_RLX)
"""Relaxed parts, star and push: cut at row boundaries (the rows of the datagrams that came are used)."""


def is_control(kind: int) -> bool:
    """Control messages (HELLO, BYE, RESET, ...) are never dropped as stale."""
    return kind >= FIRST_CONTROL_KIND


def make_flags(attempt: int = 0) -> int:
    """Flags for the `attempt`-th transmission (0 = first); attempts above 15 saturate."""
    attempt = min(max(attempt, 0), MAX_ATTEMPT)
    return (attempt << ATTEMPT_SHIFT) | (FLAG_RETRANSMIT if attempt else 0)


def attempt_of(flags: int) -> int:
    """The attempt number a flags byte carries."""
    return (flags >> ATTEMPT_SHIFT) & 0x0F


def _check_range(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"message {name}={value!r} does not fit in u{bits}")


@dataclass(frozen=True, slots=True)
class Message:
    """One logical message: a request to a device or a device's partial sum, or a control message."""

    kind: int
    """A `Kind` (unknown kinds in 0..255 pass through as plain ints)."""
    session: int
    """u32 session id; a new session restarts steps at 0."""
    step: int
    """u32 token step; prefill is step 0."""
    layer: int
    """u16 decoder layer."""
    sender: int
    """u16 index of the sending device."""
    payload: bytes = b""
    """Message body, usually an `encode_tensor` blob."""
    flags: int = 0
    """Flags byte as sent (FLAG_*, attempt in bits 4-7); on receipt, those of the completing chunk."""

    def __post_init__(self):
        # one chained test for the common case (every message sent or received passes here, several
        # per round); the per-field loop only runs to name what is wrong
        k, se, st, la, sd, fl = self.kind, self.session, self.step, self.layer, self.sender, self.flags
        if not (isinstance(k, int) and type(se) is type(st) is type(la) is type(sd) is type(fl) is int
                and 0 <= k < 256 and 0 <= se < 4294967296 and 0 <= st < 4294967296 and 0 <= la < 65536
                and 0 <= sd < 65536 and 0 <= fl < 256):
            for name, bits in (("kind", 8), ("session", 32), ("step", 32), ("layer", 16), ("sender", 16),
                               ("flags", 8)):
                _check_range(name, getattr(self, name), bits)
        if type(self.payload) is not bytes:
            object.__setattr__(self, "payload", bytes(self.payload))


class Header(NamedTuple):
    """The fixed header of one datagram (a tuple: one is built for every datagram received)."""

    kind: int
    """Message kind."""
    session: int
    """Session id."""
    step: int
    """Token step."""
    layer: int
    """Decoder layer."""
    sender: int
    """Sending device index."""
    index: int
    """Position of this chunk in the message."""
    count: int
    """Number of chunks in the message."""
    flags: int
    """Flags byte."""
    seq: int = 0
    """Sender's sequence number (replay protection)."""
    dest: int = ANY
    """Device index the datagram is addressed to."""


def encode(msg: Message, max_datagram: int = MAX_DATAGRAM, flags: int | None = None,
           auth: Authenticator | None = None, dest: int = ANY) -> list[bytes]:
    """Cut `msg` into sealed datagrams (header in clear, chunk encrypted, tag) of at most
    `max_datagram` bytes each, addressed to device index `dest`; `flags` overrides `msg.flags`.
    Each datagram takes the next sequence number of `auth` (default: the public test key)."""
    auth = auth or _DEFAULT_AUTH
    room = chunk_room(max_datagram)
    if room < 1:
        raise ValueError(f"max_datagram={max_datagram} leaves no room for payload")
    fl = msg.flags if flags is None else flags
    _check_range("flags", fl, 8)
    _check_range("dest", dest, 16)
    payload = msg.payload
    if len(payload) <= room:  # one datagram: every part of a decode round (the loop below, unrolled)
        seq = auth.next_seq()
        header = HEADER.pack(MAGIC, VERSION, msg.kind, msg.session, msg.step, msg.layer, msg.sender,
                             0, 1, len(payload), fl, seq, dest)
        return [header + auth.seal(msg.session, msg.sender, seq, header, payload)]
    # a relaxed part is cut at row boundaries: the rows of the datagrams that arrive are used
    sizes = row_chunks(payload, room) if msg.kind in _ROW_CUT else None
    count = len(sizes) if sizes else datagrams(len(payload), max_datagram)
    if count > 0xFFFF:
        raise ValueError(f"payload of {len(payload)} bytes needs {count} chunks; at most 65535")
    out = []
    view = memoryview(payload)  # chunks are sealed from the payload in place, not copied first
    at = 0
    for i in range(count):
        chunk = view[at:at + (sizes[i] if sizes else room)]
        at += len(chunk)
        seq = auth.next_seq()
        header = HEADER.pack(MAGIC, VERSION, msg.kind, msg.session, msg.step, msg.layer, msg.sender,
                             i, count, len(chunk), fl, seq, dest)
        out.append(header + auth.seal(msg.session, msg.sender, seq, header, chunk))
    return out


BAD_LENGTH, MALFORMED, FORGED = "bad_length", "malformed", "forged"
"""Why `check_datagram` refused a datagram (each has a counter in `ReassemblyCounters`)."""


def check_datagram(data: bytes, max_datagram: int = MAX_UDP_PAYLOAD, auth: Authenticator | None = None
                   ) -> tuple[Header | None, bytes | str]:
    """(header, decrypted chunk) of an authentic, well-formed datagram, else (None, reason).
    Never raises.

    Reasons: BAD_LENGTH (truncated, oversized, or disagreeing with its chunk length), MALFORMED
    (magic, version, chunk index or count), FORGED (the tag does not verify under the key of the
    header's session: another key, another session, or altered in transit).
    The replay window is the caller's business: only a verified header's seq may move it.
    """
    try:
        n = len(data)
    except TypeError:
        return None, MALFORMED
    if n < HEADER_SIZE + TAG_LEN or n > max_datagram:
        return None, BAD_LENGTH
    try:
        fields = HEADER.unpack_from(data)
    except (TypeError, struct.error):
        return None, MALFORMED
    chunk = _unseal(data, fields, max_datagram, auth or _DEFAULT_AUTH)
    if type(chunk) is str:
        return None, chunk
    _, _, kind, session, step, layer, sender, index, count, _, flags, seq, dest = fields
    return Header(kind, session, step, layer, sender, index, count, flags, seq, dest), chunk


def _unseal(data: bytes, fields: tuple, max_datagram: int, auth: Authenticator) -> bytes | str:
    """The decrypted chunk of a datagram whose header fields are read, else why it is refused."""
    n = len(data)
    if n < HEADER_SIZE + TAG_LEN or n > max_datagram:
        return BAD_LENGTH
    magic, version, _, session, _, _, sender, index, count, clen, _, seq, _ = fields
    if magic != MAGIC or version != VERSION or count == 0 or index >= count:
        return MALFORMED
    if n != HEADER_SIZE + clen + TAG_LEN:
        return BAD_LENGTH
    view = memoryview(data)
    chunk = auth.unseal(session, sender, seq, view[:HEADER_SIZE], view[HEADER_SIZE:])
    return FORGED if chunk is None else chunk


@dataclass(slots=True)
class ReassemblyCounters:
    """What a `Reassembler` has seen (mutable; copy with `dataclasses.replace` for a snapshot)."""

    datagrams: int = 0
    """Datagrams fed."""
    malformed: int = 0
    """Datagrams dropped as undecodable (magic, version, fields) or inconsistent with their message."""
    bad_length: int = 0
    """Datagrams dropped as truncated, oversized, or not as long as their header says."""
    forged: int = 0
    """Datagrams dropped because their tag does not verify (wrong key or session, or altered in transit)."""
    misdirected: int = 0
    """Authentic datagrams addressed to another device (a replay of someone else's traffic)."""
    replayed: int = 0
    """Authentic datagrams dropped because their sender's sequence number was seen before or is
    older than the replay window."""
    duplicates: int = 0
    """Datagrams dropped as repeats of a chunk or of a completed message (copies, and replays of them)."""
    stale: int = 0
    """Datagrams dropped because their step is below the watermark."""
    evicted: int = 0
    """Partial messages discarded (watermark passed, or memory caps hit)."""
    completed: int = 0
    """Messages delivered."""


class _Partial:
    __slots__ = ("count", "chunks", "nbytes")

    def __init__(self, count: int):
        self.count = count
        self.chunks: dict[int, bytes] = {}
        self.nbytes = 0


class Reassembler:
    """Turns datagrams, in any order and with repeats, back into messages; bounded memory.

    Chunks are collected per (session, step, layer, kind, sender), across attempts.
    Deduplication is per (session, step, layer, kind, sender, attempt): a redundant copy of the same
    transmission is dropped, but a retransmission (attempt >= 1, see `make_flags`) is delivered again,
    so that a device whose reply was lost sees the repeated request and can resend its reply.
    Every datagram must open under `auth` (a valid tag under its session's key), be addressed to
    `me` (if set), and carry a sequence number its sender has not used before (`guard`, shared by
    all the sockets of a process; default its own).
    Not thread-safe: one receiving thread feeds it.
    """

    def __init__(self, remember: int = 4096, max_partials: int = 256,
                 max_message_bytes: int = 64 << 20, max_buffered_bytes: int = 256 << 20,
                 max_datagram: int = MAX_UDP_PAYLOAD, auth: Authenticator | None = None,
                 guard: ReplayGuard | None = None, me: int | None = None):
        self.counters = ReassemblyCounters()
        self.me = me  # this device's index: datagrams addressed elsewhere are dropped (None: accept any)
        self.auth = auth or _DEFAULT_AUTH
        self.guard = guard if guard is not None else ReplayGuard()
        self.min_step = 0
        self._remember = remember  # 0 disables deduplication (TCP never duplicates)
        self._max_partials = max_partials
        self._max_message_bytes = max_message_bytes
        self._max_buffered = max_buffered_bytes
        self._max_datagram = max_datagram
        self._partials: OrderedDict[tuple, _Partial] = OrderedDict()
        self._done: OrderedDict[tuple, None] = OrderedDict()
        self._buffered = 0

    def set_watermark(self, step: int) -> None:
        """Data chunks of steps below `step` are stale from now on; their partial messages are freed."""
        self.min_step = step
        for key in [k for k in self._partials if k[1] < step and not is_control(k[3])]:
            self._drop(key)

    @property
    def pending(self) -> int:
        """Partial messages held."""
        return len(self._partials)

    def feed(self, datagram: bytes) -> Message | None:
        """The message this datagram completes, else None (incomplete, duplicate, stale or malformed)."""
        c = self.counters
        c.datagrams += 1
        try:  # the header is read once: to drop a known copy unopened, then to open the rest
            fields = HEADER.unpack_from(datagram)
        except (TypeError, struct.error):
            reason = check_datagram(datagram, self._max_datagram, self.auth)[1]
            setattr(c, reason, getattr(c, reason) + 1)
            return None
        _, _, kind, session, step, layer, sender, index, count, _, flags, seq, dest = fields
        attempt = (flags >> ATTEMPT_SHIFT) & 0x0F
        key = (session, step, layer, kind, sender, attempt)
        dedup = self._remember > 0 and attempt < MAX_ATTEMPT
        if (self.me is None or dest == self.me) and self._known(key, dedup, index, count):
            c.duplicates += 1  # (one addressed elsewhere is opened, and counted as misdirected)
            return None
        chunk = _unseal(datagram, fields, self._max_datagram, self.auth)
        if type(chunk) is str:
            setattr(c, chunk, getattr(c, chunk) + 1)  # chunk holds the reason
            return None
        if self.me is not None and dest != self.me:
            c.misdirected += 1
            return None
        if not self.guard.accept(sender, seq):
            c.replayed += 1
            return None
        if step < self.min_step and not is_control(kind):
            c.stale += 1
            return None
        if count == 1:
            return self._complete(key, kind, session, step, layer, sender, flags, chunk, dedup)
        # Chunks of every attempt go into one partial: a retransmission repeats the same bytes, so
        # under loss a long (prefill) message completes from the chunks of several attempts
        # instead of needing one attempt with no chunk lost.
        pkey = key[:5]
        part = self._partials.get(pkey)
        if part is None:
            part = self._partials[pkey] = _Partial(count)
        elif part.count != count:
            c.malformed += 1
            return None
        if part.nbytes + len(chunk) > self._max_message_bytes:
            self._drop(pkey)
            c.malformed += 1
            return None
        part.chunks[index] = chunk
        part.nbytes += len(chunk)
        self._buffered += len(chunk)
        if len(part.chunks) == part.count:
            self._partials.pop(pkey)
            self._buffered -= part.nbytes
            payload = b"".join(part.chunks[i] for i in range(part.count))
            return self._complete(key, kind, session, step, layer, sender, flags, payload, dedup)
        # Oldest partials go first: under loss they are the ones least likely to complete.
        while len(self._partials) > self._max_partials or self._buffered > self._max_buffered:
            self._drop(next(iter(self._partials)))
        return None

    def _known(self, key: tuple, dedup: bool, index: int, count: int) -> bool:
        """Whether the header in clear names a chunk already delivered or held: such a datagram
        is dropped before it is decrypted. Copies on lossy links are byte-identical repeats (and
        under loss a third or more of what a device receives), so this is most of their cost
        saved. Safe unauthenticated: at worst a forgery of something already held is dropped,
        which opening it would have done too. A replay of such a datagram is one of these copies
        byte for byte, and is counted with them."""
        if dedup and key in self._done:
            return True
        part = self._partials.get(key[:5]) if count > 1 else None
        return part is not None and index in part.chunks

    def chunks_of(self, session: int, step: int, layer: int, kind: int, sender: int) -> tuple[int, dict] | None:
        """(chunk count, index -> chunk) of a message still incomplete, or None."""
        part = self._partials.get((session, step, layer, kind, sender))
        return None if part is None else (part.count, dict(part.chunks))

    def _drop(self, key: tuple) -> None:
        part = self._partials.pop(key)
        self._buffered -= part.nbytes
        self.counters.evicted += 1

    def _complete(self, key: tuple, kind: int, session: int, step: int, layer: int, sender: int, flags: int,
                  payload: bytes, dedup: bool) -> Message:
        if dedup:
            self._done[key] = None
            if len(self._done) > self._remember:
                self._done.popitem(last=False)
        self.counters.completed += 1
        return Message(_KIND_OF.get(kind, kind), session, step, layer, sender, payload, flags)
