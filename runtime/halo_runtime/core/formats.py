"""Weight formats, defined once: how a shard stores a matrix, and which ggml type multiplies by it.

A weight W [rows, cols] (rows = outputs, cols = inputs) is stored as one 2-D array per matrix:

    fp32  float32 [rows, cols]                                  4 bytes per weight
    bf16  uint16 [rows, cols]: bfloat16 bit patterns            2 bytes (numpy has no bfloat16)
    q8_0  uint8 [rows, cols / 32 * 34]: ggml's Q8_0 blocks       1.0625 bytes
          per block of 32 inputs an fp16 scale d and 32 int8 q; w = d * q
    q4_0  uint8 [rows, cols / 32 * 18]: ggml's Q4_0 blocks       0.5625 bytes
          per block of 32 inputs an fp16 scale d and 16 bytes; byte j holds input j (low nibble)
          and input j + 16 (high nibble) as q + 8; w = d * q, q in [-8, 7]

These are ggml's own layouts, so a shard's bytes are the weights a device multiplies by, with
no conversion at load. ggml's product quantises its input to 8-bit blocks of 32 (q8_0 and q4_0)
or rounds it to bf16 (bf16); fp32 keeps it exact.

Row-sliced matrices (q/k/v/gate/up, embeddings, LM head) are cut by whole rows. Column-sliced ones
(o_proj, down_proj) are cut by neuron group; in the block formats every group is whole blocks
(`halo_compile.group` sizes MLP groups in multiples of 32; an attention group's columns, its query
heads times head_dim, must be), so a device's columns are whole blocks and the input blocks ggml
quantises never span two groups: a group's contribution is the same bits whatever else its device
holds.

Example:
    >>> import numpy as np
    >>> from halo_runtime.core.formats import FORMATS, take_columns, weight_format
    >>> q8 = FORMATS["q8_0"]
    >>> q8.row_bytes(64), q8.nbytes(rows=8192, cols=2048) / (8192 * 2048)
    (68, 1.0625)
    >>> stored = np.arange(2 * 68, dtype=np.uint8).reshape(2, 68)   # 2 rows of 2 blocks
    >>> take_columns(stored, q8, [(32, 64)]).tolist()[0][:3]         # the second block of row 0
    [34, 35, 36]
    >>> weight_format("int8")
    Traceback (most recent call last):
    ...
    ValueError: weight format 'int8' was replaced by q8_0 (ggml's blocks of 32); recompile the plan with --weights q8_0
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WeightFormat:
    """How one weight format stores a matrix, and the ggml type that reads it."""

    name: str
    """fp32, bf16, q8_0 or q4_0."""
    ggml_type: int
    """ggml's type id (enum ggml_type; stable across ggml releases)."""
    block: int
    """Inputs per block: 1 for the float formats, 32 for q8_0 and q4_0."""
    block_bytes: int
    """Stored bytes of one block."""
    dtype: str
    """numpy dtype of the stored array: float32, uint16 (bf16 bits) or uint8 (blocks)."""
    bits: float
    """Bits per weight, scales included (what `--weights` prints and the placement counts)."""

    def __post_init__(self):
        if self.block < 1 or self.block_bytes < 1:
            raise ValueError(f"weight format {self.name}: block and block_bytes must be positive")
        if self.dtype not in ("float32", "uint16", "uint8"):
            raise ValueError(f"weight format {self.name}: unknown storage dtype {self.dtype}")

    @property
    def quantised(self) -> bool:
        """Blocks with scales (the block formats); False for fp32 and bf16."""
        return self.block > 1

    @property
    def bytes_per_col(self) -> float:
        """Stored bytes per input column (fractional for blocks: a column slice is cut in whole blocks)."""
        return self.block_bytes / self.block

    def row_bytes(self, cols: int) -> int:
        """Stored bytes of one row of `cols` inputs; ValueError if they are not whole blocks."""
        if cols % self.block:
            raise ValueError(f"{self.name} stores rows in blocks of {self.block} inputs; {cols} is not a multiple")
        return cols // self.block * self.block_bytes

    def nbytes(self, rows: int, cols: int) -> int:
        """Stored bytes of a [rows, cols] matrix."""
        return rows * self.row_bytes(cols)

    def stored_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape of the stored array of a [rows, cols] matrix."""
        return rows, self.row_bytes(cols) // np.dtype(self.dtype).itemsize

    def cols_of(self, stored: np.ndarray) -> int:
        """Inputs per row of a stored array."""
        return stored.shape[1] * stored.dtype.itemsize // self.block_bytes * self.block


BLOCK = 32
"""Inputs per block of q8_0 and q4_0."""
FORMATS = {f.name: f for f in (
    WeightFormat("fp32", 0, 1, 4, "float32", 32.0),
    WeightFormat("bf16", 30, 1, 2, "uint16", 16.0),
    WeightFormat("q8_0", 8, BLOCK, 34, "uint8", 8.5),
    WeightFormat("q4_0", 2, BLOCK, 18, "uint8", 4.5),
)}
REPLACED = {"int8": "q8_0", "int4": "q4_0"}
"""Formats of earlier releases (one scale per row, our own nibble order) and what replaced them."""


def weight_format(name: str | WeightFormat) -> WeightFormat:
    """The format called `name`; ValueError naming the choices (or the replacement) otherwise."""
    if isinstance(name, WeightFormat):
        return name
    if name in REPLACED:
        new = REPLACED[name]
        raise ValueError(f"weight format {name!r} was replaced by {new} (ggml's blocks of {BLOCK}); "
                         f"recompile the plan with --weights {new}")
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r} (choose from {', '.join(FORMATS)})")
    return FORMATS[name]


def _bytes(stored: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(stored).view(np.uint8)


def take_rows(stored: np.ndarray, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """The given output rows of a stored matrix, in the given order (any format: rows are whole)."""
    return np.ascontiguousarray(stored[np.asarray(rows, dtype=np.int64)])


def take_columns(stored: np.ndarray, fmt: WeightFormat, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Columns [a, b) of each range, side by side, of a stored matrix; every bound whole blocks."""
    raw = _bytes(stored)
    per = fmt.bytes_per_col
    parts = []
    for a, b in ranges:
        if a % fmt.block or b % fmt.block or not 0 <= a < b:
            raise ValueError(f"{fmt.name}: columns {a}..{b} are not whole blocks of {fmt.block}")
        parts.append(raw[:, int(a * per):int(b * per)])
    return np.ascontiguousarray(np.concatenate(parts, axis=1)).view(fmt.dtype)


def cat_columns(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Stored matrices with the same rows, side by side (their columns concatenated)."""
    return np.ascontiguousarray(np.concatenate([_bytes(p) for p in parts], axis=1)).view(parts[0].dtype)


def quantise(w: np.ndarray, fmt: str | WeightFormat) -> np.ndarray:
    """W [rows, cols] (float32) in format `fmt`, as a shard stores it: ggml's own reference
    quantisers (plain C, the same bytes on every CPU), so the compiler's blocks are what ggml reads."""
    fmt = weight_format(fmt)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantise: expected a matrix, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("quantise: the weight has non-finite values")
    if fmt.name == "fp32":
        return w
    if fmt.name == "bf16":  # round to nearest even, as torch and ggml do
        bits = w.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    from .ggmlops import quantise_rows
    return quantise_rows(w, fmt)


def dequantise(stored: np.ndarray, fmt: str | WeightFormat) -> np.ndarray:
    """The float32 matrix [rows, cols] that a stored matrix stands for."""
    fmt = weight_format(fmt)
    if fmt.name == "fp32":
        return np.asarray(stored, dtype=np.float32)
    if fmt.name == "bf16":
        return (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    from .ggmlops import dequantise_rows
    return dequantise_rows(stored, fmt)
