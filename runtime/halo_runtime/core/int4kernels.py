"""int4 weights for torch's 4-bit kernels: segments padded to whole blocks of 32, then packed.

The stored int4 format (`halo_runtime.core.quant`) starts a block of 32 inputs at every group
segment, so a segment whose width is not a multiple of 32 ends in a short block. torch's kernels
want whole blocks: each segment is padded with zero columns (zero values, any scale) and the
input gets zeros in the same places, which changes no product.

Example:
    >>> import torch
    >>> from halo_runtime.core.int4kernels import padded
    >>> width, idx = padded((33, 7))            # 33 -> 64 columns, 7 -> 32
    >>> width, idx[:2].tolist(), idx[33:35].tolist()
    (96, [0, 1], [64, 65])
    >>> padded((32, 64))[1] is None             # whole blocks already: nothing to move
    True
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .quant import INT4_BLOCK, QuantWeight, _layout, pack_int4, unpack_int4


def padded(segments: Sequence[int]) -> tuple[int, torch.Tensor | None]:
    """Width once each segment is padded to whole int4 blocks, and where the real columns go (None: no padding)."""
    starts, pos = 0, []
    for n in segments:
        pos.append(torch.arange(n) + starts)
        starts += -(-n // INT4_BLOCK) * INT4_BLOCK
    idx = torch.cat(pos)
    return starts, None if starts == idx.numel() else idx


def pad_x(x: torch.Tensor, width: int, idx: torch.Tensor | None) -> torch.Tensor:
    if idx is None:
        return x
    out = x.new_zeros(x.shape[0], width)
    out[:, idx] = x
    return out


def int4_blocks(w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """int4 values [rows, padded] (q in [-8, 7], 0 in the padding), scales [rows, padded/32], width, index."""
    width, idx = padded(w.segments)
    lay = _layout(w.segments)
    q = unpack_int4(w.values)[:, lay.nibble_index]
    if idx is not None:
        full = torch.zeros(w.rows, width, dtype=torch.int8)
        full[:, idx] = q
        q = full
    return q, w.scales, width, idx


def prepare_int4pack(w: QuantWeight):
    q, scales, width, idx = int4_blocks(w)
    extra = -w.rows % 16  # the packing wants whole tiles of 16 rows: pad with zero rows, drop their outputs
    q, s = F.pad(q, (0, 0, 0, extra)), F.pad(scales.float(), (0, 0, 0, extra), value=1.0).T.contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    return packed, torch.stack((s, torch.zeros_like(s)), -1).contiguous(), width, idx, w.rows


def run_int4pack(p, x):
    packed, sz, width, idx, rows = p
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(pad_x(x, width, idx), packed, INT4_BLOCK, sz)
    return y if y.shape[1] == rows else y[:, :rows]


def prepare_dyn4(w: QuantWeight):
    q, scales, width, idx = int4_blocks(w)
    packed = torch.ops.aten._dyn_quant_pack_4bit_weight(pack_int4(q), scales.contiguous(), None, INT4_BLOCK,
                                                        width, w.rows)
    return packed, width, idx, w.rows


def run_dyn4(p, x):
    packed, width, idx, rows = p
    return torch.ops.aten._dyn_quant_matmul_4bit(pad_x(x, width, idx), packed, INT4_BLOCK, width, rows)
