"""Weight formats, defined once: fp32 | bf16 | int8 | int4, how each is stored, quantised and sliced.

A weight matrix W [rows, cols] (rows = outputs, cols = inputs) is held as a `QuantWeight`: its
values, its scales, and its column *segments*. A segment is a run of columns that always travels
together; blocks of scales never straddle two segments.

- Row-sliced matrices (q/k/v/gate/up, embeddings, LM head) are one segment: all input columns in
  model order. A device takes whole rows, and every scale belongs to one row, so nothing splits.
- Column-sliced matrices (o_proj, down_proj) have one segment per neuron group: the group's
  columns (a KV-head group's q-heads x head_dim, or an MLP group's neurons), in the group's own
  order. A device takes whole segments.

Formats (the safetensors tensor NAME holds the values, NAME.scale the scales):

    fp32  NAME float32 [rows, cols]                                          4 bytes per weight
    bf16  NAME bfloat16 [rows, cols]                                         2 bytes
    int8  NAME int8 [rows, cols] in [-127, 127]; NAME.scale float32 [rows]   1 + 4/cols bytes
          w = v * scale[row]: symmetric, one scale per output row over the *whole* row. A device
          holding some columns of a row keeps a copy of that row's scale (copied, never split).
    int4  NAME uint8 [rows, sum(ceil(n_i / 2))]; NAME.scale bfloat16 [rows, sum(ceil(n_i / 32))]
          per segment i of n_i columns: blocks of 32 columns starting at the segment's first
          column, the segment's last block possibly short; two values per byte (low nibble = even
          column of the segment, an odd segment padded with one zero value), stored as q + 8 with
          q in [-8, 7]; w = q * scale[row, block]. Symmetric like GGML's Q4_0: the value of
          largest magnitude in a block maps to -8 (scale = that value / -8, so it can be negative).
          bf16 scales are what ARM's KleidiAI 4-bit kernel takes. 0.5625 bytes per weight.

So the quantised model depends on the neuron groups but never on their placement: slicing a
plan's quantised weights by group and putting the slices back gives exactly the same values and
scales, and a device holding the same groups computes the same numbers wherever it sits.

Example:
    >>> import torch
    >>> from halo_runtime.core.quant import FORMATS, quantise, take_segments, dequantise
    >>> w = torch.linspace(-1, 1, 3 * 40).reshape(3, 40)
    >>> q = quantise(w, "int4", segments=(33, 7))       # two groups: 33 and 7 columns
    >>> tuple(q.values.shape), tuple(q.scales.shape)       # 17 + 4 bytes; 2 + 1 blocks per row
    ((3, 21), (3, 3))
    >>> alone = quantise(w[:, 33:], "int4")                # group 2 quantised on its own ...
    >>> bool(torch.equal(take_segments(q, [1]).values, alone.values))   # ... is the same slice
    True
    >>> float((dequantise(q) - w).abs().max()) < 1 / 16    # error within one step of 1/8
    True
    >>> FORMATS["int4"].nbytes(rows=8192, segments=(2048,)) / (8192 * 2048)
    0.5625
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT4_BLOCK = 32
"""Inputs per int4 scale."""


@dataclass(frozen=True)
class WeightFormat:
    """How one weight format stores a matrix: value and scale dtypes and the scale granularity."""

    name: str
    """fp32, bf16, int8 or int4."""
    value_dtype: torch.dtype
    """dtype of the stored values (int4: uint8 holding two values)."""
    bits: int
    """Bits per weight value."""
    scale_dtype: torch.dtype | None = None
    """dtype of the stored scales; None for the float formats."""
    block: int = 0
    """Inputs per scale: 0 = one scale per whole row (int8), else per block of this many (int4)."""

    def __post_init__(self):
        if self.bits not in (4, 8, 16, 32):
            raise ValueError(f"weight format {self.name}: bits must be 4, 8, 16 or 32")
        if (self.scale_dtype is None) != (self.bits >= 16):
            raise ValueError(f"weight format {self.name}: integer formats need scales, float ones none")
        if self.block < 0 or (self.block and self.scale_dtype is None):
            raise ValueError(f"weight format {self.name}: block must be >= 0 and needs scales")

    @property
    def quantised(self) -> bool:
        return self.scale_dtype is not None

    def value_bytes(self, rows: int, segments: Sequence[int]) -> int:
        if self.bits == 4:
            return rows * sum((n + 1) // 2 for n in segments)
        return rows * sum(segments) * self.bits // 8

    def scale_bytes(self, rows: int, segments: Sequence[int]) -> int:
        if self.scale_dtype is None:
            return 0
        per_row = sum(-(-n // self.block) for n in segments) if self.block else 1
        return rows * per_row * torch.empty(0, dtype=self.scale_dtype).element_size()

    def nbytes(self, rows: int, segments: Sequence[int]) -> int:
        """Stored bytes of a [rows, sum(segments)] matrix, scales included."""
        return self.value_bytes(rows, segments) + self.scale_bytes(rows, segments)

    def bytes_per_weight(self, cols: int = 2048) -> float:
        """Stored bytes per weight, scales included, for rows of `cols` inputs in one segment."""
        return self.nbytes(1, (cols,)) / cols


FORMATS = {f.name: f for f in (
    WeightFormat("fp32", torch.float32, 32),
    WeightFormat("bf16", torch.bfloat16, 16),
    WeightFormat("int8", torch.int8, 8, torch.float32, 0),
    WeightFormat("int4", torch.uint8, 4, torch.bfloat16, INT4_BLOCK),
)}
SCALE_SUFFIX = ".scale"
"""Safetensors name of a weight's scales: the weight's name plus this."""


def weight_format(name: str | WeightFormat) -> WeightFormat:
    if isinstance(name, WeightFormat):
        return name
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r} (choose from {', '.join(FORMATS)})")
    return FORMATS[name]


@dataclass(frozen=True)
class QuantWeight:
    """A weight matrix in one format: values, scales and column segments."""

    format: WeightFormat
    """Its weight format."""
    rows: int
    """Output rows."""
    segments: tuple[int, ...]
    """Columns of each segment (a group, or all inputs), in column order."""
    values: torch.Tensor
    """Stored values, laid out as the module docstring says."""
    scales: torch.Tensor | None = None
    """Stored scales (int8: [rows]; int4: [rows, blocks]); None for fp32 and bf16."""

    def __post_init__(self):
        fmt, what = self.format, f"{self.format.name} weight"
        if not self.segments or min(self.segments) <= 0:
            raise ValueError(f"{what}: segments must be positive column counts, got {self.segments}")
        if self.values.dtype != fmt.value_dtype:
            raise ValueError(f"{what}: values are {self.values.dtype}, expected {fmt.value_dtype}")
        width = sum((n + 1) // 2 for n in self.segments) if fmt.bits == 4 else sum(self.segments)
        if tuple(self.values.shape) != (self.rows, width):
            raise ValueError(f"{what}: values have shape {tuple(self.values.shape)}, expected {(self.rows, width)}")
        if fmt.scale_dtype is None:
            if self.scales is not None:
                raise ValueError(f"{what}: has scales, the format has none")
            return
        shape = (self.rows, _layout(self.segments).blocks) if fmt.block else (self.rows,)
        if self.scales is None or self.scales.dtype != fmt.scale_dtype or tuple(self.scales.shape) != shape:
            got = None if self.scales is None else (self.scales.dtype, tuple(self.scales.shape))
            raise ValueError(f"{what}: scales are {got}, expected {(fmt.scale_dtype, shape)}")

    @property
    def cols(self) -> int:
        return sum(self.segments)

    @property
    def nbytes(self) -> int:
        return self.format.nbytes(self.rows, self.segments)


@dataclass(frozen=True)
class _Layout:
    """Where each segment's columns, packed bytes and int4 blocks start (int4 bookkeeping)."""

    col_starts: tuple[int, ...]
    """First column of each segment, and the total at the end."""
    byte_starts: tuple[int, ...]
    """First packed int4 byte of each segment, and the total at the end."""
    block_starts: tuple[int, ...]
    """First int4 scale block of each segment, and the total at the end."""
    blocks: int
    """int4 scale blocks per row."""
    nibble_index: torch.Tensor
    """Per column: its position among the unpacked nibbles (skipping odd segments' padding)."""
    block_index: torch.Tensor
    """Per column: the column of its int4 scale."""


@functools.lru_cache(maxsize=64)  # cheap to rebuild; bounded so that 8B-wide index tensors do not pile up
def _layout(segments: tuple[int, ...]) -> _Layout:
    cols, byts, blks, nib, blk = [0], [0], [0], [], []
    for n in segments:
        nib.append(torch.arange(n) + 2 * byts[-1])
        blk.append(torch.arange(n) // INT4_BLOCK + blks[-1])
        cols.append(cols[-1] + n)
        byts.append(byts[-1] + (n + 1) // 2)
        blks.append(blks[-1] + -(-n // INT4_BLOCK))
    return _Layout(tuple(cols), tuple(byts), tuple(blks), blks[-1], torch.cat(nib), torch.cat(blk))


def _int4_segment(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed values and bf16 scales of one segment's columns [rows, n] (fp32)."""
    rows, n = w.shape
    nb = -(-n // INT4_BLOCK)
    blocks = F.pad(w, (0, nb * INT4_BLOCK - n)).view(rows, nb, INT4_BLOCK)
    peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)  # first max: deterministic
    scale = (peak / -8).to(torch.bfloat16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero block: any scale, q = 0
    q = torch.round(blocks / scale.float()[..., None]).clamp(-8, 7).view(rows, nb * INT4_BLOCK)[:, :n]
    return pack_int4(q.to(torch.int8)), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [rows, n] -> uint8 [rows, ceil(n/2)]: q + 8, low nibble first."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = F.pad(u, (0, 1), value=8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, m] -> int8 values in [-8, 7], [rows, 2m] (a segment's padding included)."""
    u = torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)
    return u.to(torch.int8) - 8


def quantise(w: torch.Tensor, fmt: str | WeightFormat, segments: Sequence[int] | None = None) -> QuantWeight:
    """W [rows, cols] (any float dtype) in format `fmt`; `segments` as in the module docstring."""
    fmt = weight_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"quantise: expected a matrix, got shape {tuple(w.shape)}")
    segments = tuple(int(n) for n in (segments or (w.shape[1],)))
    if sum(segments) != w.shape[1]:
        raise ValueError(f"quantise: segments cover {sum(segments)} columns, the weight has {w.shape[1]}")
    w32 = w.detach().float()
    if not bool(torch.isfinite(w32).all()):
        raise ValueError("quantise: the weight has non-finite values")
    if fmt.name == "fp32":
        return QuantWeight(fmt, w.shape[0], segments, w32.contiguous())
    if fmt.name == "bf16":
        return QuantWeight(fmt, w.shape[0], segments, w.detach().to(torch.bfloat16).contiguous())
    if fmt.name == "int8":
        peak = w32.abs().amax(dim=1)
        scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
        q = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantWeight(fmt, w.shape[0], segments, q, scale)
    lay = _layout(segments)
    parts = [_int4_segment(w32[:, a:b]) for a, b in zip(lay.col_starts, lay.col_starts[1:])]
    return QuantWeight(fmt, w.shape[0], segments, torch.cat([p for p, _ in parts], 1), torch.cat([s for _, s in parts], 1))


def dequantise(q: QuantWeight) -> torch.Tensor:
    """The fp32 matrix [rows, cols] that `q` stands for (columns in q's order)."""
    name = q.format.name
    if name in ("fp32", "bf16"):
        return q.values.float()
    if name == "int8":
        return q.values.float() * q.scales[:, None]
    lay = _layout(q.segments)
    return unpack_int4(q.values)[:, lay.nibble_index].float() * q.scales.float()[:, lay.block_index]


def take_rows(q: QuantWeight, rows: Sequence[int] | torch.Tensor) -> QuantWeight:
    """The given output rows, in the given order, with their scales."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    return QuantWeight(q.format, len(idx), q.segments, q.values.index_select(0, idx).contiguous(),
                       None if q.scales is None else q.scales.index_select(0, idx).contiguous())


def take_segments(q: QuantWeight, which: Sequence[int]) -> QuantWeight:
    """The given segments' columns, in the given order: values and scales move whole, none split."""
    which = [int(i) for i in which]
    if not which or min(which) < 0 or max(which) >= len(q.segments):
        raise ValueError(f"take_segments: segments {which} out of range 0..{len(q.segments) - 1}")
    lay = _layout(q.segments)
    starts = lay.byte_starts if q.format.bits == 4 else lay.col_starts
    cols = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in which])
    scales = q.scales
    if q.format.block:
        scales = scales.index_select(1, torch.cat([torch.arange(lay.block_starts[i], lay.block_starts[i + 1])
                                                   for i in which])).contiguous()
    return QuantWeight(q.format, q.rows, tuple(q.segments[i] for i in which),
                       q.values.index_select(1, cols).contiguous(), scales)


def cat_rows(parts: Sequence[QuantWeight]) -> QuantWeight:
    """Rows of several parts stacked (same format and segments), e.g. a layer's slices from devices."""
    first = parts[0]
    for p in parts[1:]:
        if p.format != first.format or p.segments != first.segments:
            raise ValueError("cat_rows: parts differ in format or segments")
    return QuantWeight(first.format, sum(p.rows for p in parts), first.segments,
                       torch.cat([p.values for p in parts], 0),
                       None if first.scales is None else torch.cat([p.scales for p in parts], 0))


def cat_segments(parts: Sequence[QuantWeight]) -> QuantWeight:
    """Segments of several parts side by side (same format and rows).

    int8 parts carry copies of the same per-row scales; parts whose copies differ came from
    different quantisations and are refused.
    """
    first = parts[0]
    for p in parts[1:]:
        if p.format != first.format or p.rows != first.rows:
            raise ValueError("cat_segments: parts differ in format or rows")
        if first.format.name == "int8" and not torch.equal(p.scales, first.scales):
            raise ValueError("cat_segments: int8 parts disagree on the row scales (different quantisations)")
    scales = first.scales
    if first.format.block:
        scales = torch.cat([p.scales for p in parts], 1)
    return QuantWeight(first.format, first.rows, tuple(n for p in parts for n in p.segments),
                       torch.cat([p.values for p in parts], 1), scales)


def group_columns(groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Model column of each quantised column when the columns are taken group by group."""
    return torch.tensor([c for g in groups for c in g], dtype=torch.long)


def quantise_columns(w: torch.Tensor, fmt: str | WeightFormat, groups: Sequence[Sequence[int]]) -> QuantWeight:
    """A column-sliced matrix quantised over a partition of its columns: one segment per group, the
    columns taken group by group (each in its given order). Every column must be in one group."""
    idx = group_columns(groups)
    if sorted(idx.tolist()) != list(range(w.shape[1])):
        raise ValueError(f"quantise_columns: the groups do not partition the {w.shape[1]} columns")
    return quantise(w.index_select(1, idx), fmt, tuple(len(g) for g in groups))


def dequantise_columns(q: QuantWeight, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Inverse of `quantise_columns` up to quantisation: fp32 with columns back at model positions."""
    out = torch.empty(q.rows, q.cols)
    out[:, group_columns(groups)] = dequantise(q)
    return out


def to_tensors(name: str, q: QuantWeight) -> dict[str, torch.Tensor]:
    """The safetensors entries of one weight: NAME (values) and, if quantised, NAME.scale."""
    out = {name: q.values}
    if q.scales is not None:
        out[name + SCALE_SUFFIX] = q.scales
    return out


def from_tensors(tensors: dict[str, torch.Tensor], name: str, fmt: str | WeightFormat,
                 segments: Sequence[int] | None = None) -> QuantWeight:
    """Read back what `to_tensors` wrote; ValueError naming the tensor when it does not fit.

    `segments` defaults to one segment spanning the stored columns (float and int8 formats).
    """
    fmt = weight_format(fmt)
    if name not in tensors:
        raise ValueError(f"missing tensor {name}")
    values = tensors[name]
    scales = tensors.get(name + SCALE_SUFFIX)
    if fmt.quantised and scales is None:
        raise ValueError(f"missing tensor {name}{SCALE_SUFFIX} ({fmt.name} weights need scales)")
    if values.dim() != 2:
        raise ValueError(f"tensor {name}: expected a matrix, got shape {tuple(values.shape)}")
    if segments is None:
        if fmt.bits == 4:
            raise ValueError(f"tensor {name}: int4 weights need their segments to be read")
        segments = (values.shape[1],)
    try:
        return QuantWeight(fmt, values.shape[0], tuple(segments), values, scales if fmt.quantised else None)
    except ValueError as e:
        raise ValueError(f"tensor {name}: {e}") from None
