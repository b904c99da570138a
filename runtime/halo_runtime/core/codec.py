"""What a message's payload holds, and how many datagrams it takes: socket-free, shared by the
in-process exchange (which simulates the wire's rounding), the delivery policy (which prices
messages) and the network shell (`halo_runtime.net.wire`, which frames and encrypts them).

Tensors travel as a 9-byte little-endian prefix (wire code u8, rows u32, cols u32) and then the
values, little-endian, row-major. A request is a `REQUEST_PREFIX` (reply copies u8, spans u8),
one `SPAN` per span (session slot u8, start position u32, rows u16, prefix source slot u8 or 255
for none: `core.spans`) and then a tensor of all the spans' rows. A datagram adds `HEADER_SIZE`
bytes of header in front of its chunk (encrypted: as long as the plaintext) and `TAG_LEN` bytes
of authentication tag behind it, and stays within `MAX_DATAGRAM`.

Example:
    >>> import numpy as np
    >>> from halo_runtime.core.codec import decode_request, encode_request, datagrams
    >>> x = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
    >>> spans, copies, wire, y = decode_request(encode_request(x, 5, "fp16"), width=576)
    >>> spans, copies, wire, bool(np.abs(y - x).max() < 1e-2)
    ((Span(slot=0, start=5, rows=1, source=None),), 1, 'fp16', True)
    >>> datagrams(len(encode_request(x, 5, "fp16"))), datagrams(len(encode_request(x, 5, "fp32")))
    (1, 2)
"""
from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np

from .spans import Span, spans_of

HEADER_SIZE = 33
"""Bytes of a datagram's fixed header (layout in `halo_runtime.net.wire`)."""
TAG_LEN = 16
"""Bytes of Poly1305 tag at the end of every datagram (ChaCha20-Poly1305, `halo_runtime.net.auth`;
a forgery passes with odds under 8 * ceil(bytes / 16) / 2^106 per try: ~2^-97 for a full datagram)."""
MAX_DATAGRAM = 1400
"""Default datagram budget: a 1500-byte MTU minus IPv4 (20) and UDP (8) headers, with headroom."""
MAX_CHUNK = 0xFFFF
"""Largest chunk one datagram can carry (its length field is u16)."""


class WireError(ValueError):
    """A payload that cannot be decoded (tensor codec); the receive loop catches and counts it."""


@lru_cache(maxsize=64)  # a handful of datagram budgets, asked several times a round
def chunk_room(max_datagram: int = MAX_DATAGRAM) -> int:
    """Payload bytes one datagram of at most `max_datagram` bytes carries."""
    return min(max_datagram, HEADER_SIZE + MAX_CHUNK + TAG_LEN) - HEADER_SIZE - TAG_LEN


def datagrams(payload_bytes: int, max_datagram: int = MAX_DATAGRAM) -> int:
    """Datagrams a message with `payload_bytes` of payload is cut into."""
    return max(1, -(-payload_bytes // chunk_room(max_datagram)))


# --- tensors ---------------------------------------------------------------------------------------

TENSOR_HEADER = struct.Struct("<BII")  # wire code, rows, cols
_WIRES = {"fp32": (0, "<f4"), "fp16": (1, "<f2"), "bf16": (2, "<u2")}
_WIRE_BY_CODE = {code: (name, np.dtype(dt), np.dtype(dt).itemsize) for name, (code, dt) in _WIRES.items()}
FP16_MAX = 65504.0
_FP16_LIMIT = np.float32(FP16_MAX)


def saturate_fp16(x: np.ndarray) -> np.ndarray:
    """x clipped to fp16's range (what the fp16 wire does to outliers): np.clip's bits (NaN stays NaN) without its Python wrapper, which
    costs more than the 512 values it clips (this runs several times a round)."""
    return np.minimum(np.maximum(x, -_FP16_LIMIT), _FP16_LIMIT)


def tensor_bytes(rows: int, cols: int, wire: str = "fp16") -> int:
    """Length of `encode_tensor` of a [rows, cols] array on `wire`."""
    return TENSOR_HEADER.size + rows * cols * np.dtype(_WIRES[wire][1]).itemsize


def encode_tensor(t: np.ndarray, wire: str = "fp16") -> bytes:
    """A [T, hidden] float array (1-D counts as one row) as bytes; fp32 round-trips bit for bit.

    fp16 saturates at +-65504 instead of overflowing to inf (outlier activations exist); bf16 keeps
    fp32's range at 8 bits of mantissa (rounded to nearest even).
    """
    if wire not in _WIRES:
        raise ValueError(f"unknown wire dtype {wire!r}; expected one of {sorted(_WIRES)}")
    x = np.asarray(t, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D [T, hidden] array, got shape {x.shape}")
    code, dt = _WIRES[wire]
    if wire == "fp32":
        arr = x.astype(dt, copy=False)
    elif wire == "fp16":
        arr = saturate_fp16(x).astype(dt)
    else:
        bits = np.ascontiguousarray(x).view(np.uint32)
        arr = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(dt)
    return TENSOR_HEADER.pack(code, x.shape[0], x.shape[1]) + arr.tobytes()


def decode_tensor(data: bytes, wire: str | None = None, width: int | None = None) -> np.ndarray:
    """The float32 [rows, cols] array in `data`; raises WireError if it disagrees with `wire`/`width`."""
    if len(data) < TENSOR_HEADER.size:
        raise WireError(f"tensor payload of {len(data)} bytes is shorter than its header")
    code, rows, cols = TENSOR_HEADER.unpack_from(data)
    if code not in _WIRE_BY_CODE:
        raise WireError(f"unknown tensor wire code {code}")
    name, dt, itemsize = _WIRE_BY_CODE[code]
    if wire is not None and wire != name:
        raise WireError(f"tensor is {name}, expected {wire}")
    if width is not None and cols != width:
        raise WireError(f"tensor has width {cols}, expected {width}")
    n = rows * cols
    if len(data) != TENSOR_HEADER.size + n * itemsize:
        raise WireError(f"tensor payload of {len(data)} bytes does not hold {rows}x{cols} {name}")
    arr = np.frombuffer(data, dtype=dt, count=n, offset=TENSOR_HEADER.size)
    if name == "bf16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    else:
        arr = arr.astype(np.float32)  # copies: the array must not alias the (read-only) bytes
    return arr.reshape(rows, cols)


def as_wire(t: np.ndarray | None, wire: str) -> np.ndarray | None:
    """What the tensor becomes on the wire (fp16 rounding included), as the receiver decodes it:
    `decode_tensor(encode_tensor(t, wire))`, without the bytes (a device does this every round)."""
    if t is None or wire == "fp32":
        return t
    x = np.asarray(t, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if wire == "fp16":
        return saturate_fp16(x).astype(np.float16).astype(np.float32)
    if wire != "bf16":
        raise ValueError(f"unknown wire dtype {wire!r}; expected one of {sorted(_WIRES)}")
    bits = np.ascontiguousarray(x).view(np.uint32)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).astype(np.uint32) << 16).view(np.float32)


def row_chunks(payload: bytes, room: int) -> list[int] | None:
    """Chunk sizes that cut a tensor payload of several rows at row boundaries (the first chunk also
    holds the tensor header), as many whole rows per chunk as `room` bytes take: a receiver can use
    the rows of the chunks that arrived (`rows_of_chunks`). None: not such a tensor, or a row does
    not fit in one chunk (then chunks are cut evenly).

    >>> import numpy as np
    >>> blob = encode_tensor(np.zeros((5, 100), np.float32), "fp16")   # rows of 200 bytes
    >>> row_chunks(blob, room=450)
    [409, 400, 200]
    """
    if len(payload) < TENSOR_HEADER.size:
        return None
    code, rows, cols = TENSOR_HEADER.unpack_from(payload)
    if code not in _WIRE_BY_CODE or rows < 2:
        return None
    row = cols * _WIRE_BY_CODE[code][2]
    per = (room - TENSOR_HEADER.size) // row if row else 0
    if per < 1 or len(payload) != TENSOR_HEADER.size + rows * row:
        return None
    sizes = [TENSOR_HEADER.size + min(per, rows) * row]
    left = rows - min(per, rows)
    while left > 0:
        sizes.append(min(per, left) * row)
        left -= min(per, left)
    return sizes


def rows_of_chunks(chunks: dict[int, bytes], count: int, rows: int, width: int, wire: str
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """From some chunks (index -> bytes) of a `count`-chunk tensor message of `rows` x `width` cut by
    `row_chunks`: (float32 [rows, width] with zeros where a row is missing, bool [rows]: rows present).
    None when the chunks do not fit that cut (another sender's layout)."""
    code, dt = _WIRES[wire]
    row = width * np.dtype(dt).itemsize
    out, present = np.zeros((rows, width), dtype=np.float32), np.zeros(rows, dtype=bool)
    per = None  # rows per chunk: any chunk but the last tells
    for i, data in chunks.items():
        body = len(data) - (TENSOR_HEADER.size if i == 0 else 0)
        if body <= 0 or body % row:
            return None
        if i < count - 1:
            if per not in (None, body // row):
                return None
            per = body // row
    for i, data in chunks.items():
        skip = TENSOR_HEADER.size if i == 0 else 0
        n = (len(data) - skip) // row
        first = rows - n if i == count - 1 else (i * per if per else None)
        if first is None or first < 0 or first + n > rows:
            return None
        out[first:first + n] = decode_tensor(TENSOR_HEADER.pack(code, n, width) + bytes(data[skip:]), wire, width)
        present[first:first + n] = True
    return out, present


# --- requests --------------------------------------------------------------------------------------

REQUEST_PREFIX = struct.Struct("<BB")  # reply copies, spans
SPAN = struct.Struct("<BIHB")  # session slot, start position, rows, prefix source slot
NO_SOURCE = 255
"""A span's source byte when it copies no prefix."""
WIRE_NAMES = {code: name for name, (code, _) in _WIRES.items()}


def encode_request(x: np.ndarray, at, wire: str, copies: int = 1) -> bytes:
    """A request's payload: where `x`'s rows sit (`at`: a start position in slot 0, or `Span`s),
    how many copies of the reply to send (redundancy), and `x` in `wire`'s dtype."""
    x = np.asarray(x)
    spans = spans_of(at, x.shape[0] if x.ndim == 2 else 1)
    if len(spans) > 255:
        raise ValueError(f"a request carries at most 255 spans, got {len(spans)}")
    return (REQUEST_PREFIX.pack(copies, len(spans)) + b"".join(
        SPAN.pack(s.slot, s.start, s.rows, NO_SOURCE if s.source is None else s.source) for s in spans)
            + encode_tensor(x, wire))


def _span(slot: int, start: int, rows: int, source: int) -> Span:
    return Span(slot, start, rows, None if source == NO_SOURCE else source)


def decode_request(payload: bytes, width: int) -> tuple[tuple[Span, ...], int, str, np.ndarray]:
    """(spans, copies, wire, x); raises WireError on a malformed payload."""
    if len(payload) < REQUEST_PREFIX.size:
        raise WireError("request too short")
    copies, n = REQUEST_PREFIX.unpack_from(payload)
    at = REQUEST_PREFIX.size + n * SPAN.size
    if n == 0 or len(payload) < at + TENSOR_HEADER.size:
        raise WireError("request too short" if n else "request with no span")
    spans = tuple(_span(*SPAN.unpack_from(payload, REQUEST_PREFIX.size + i * SPAN.size)) for i in range(n))
    body = payload[at:]
    wire = WIRE_NAMES.get(body[0])
    if wire is None:
        raise WireError(f"unknown wire code {body[0]}")
    x = decode_tensor(body, wire, width)
    if sum(s.rows for s in spans) != x.shape[0]:
        raise WireError(f"request spans hold {sum(s.rows for s in spans)} rows, its tensor {x.shape[0]}")
    return spans, max(1, min(copies, 4)), wire, x
