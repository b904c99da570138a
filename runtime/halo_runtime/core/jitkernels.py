"""Weight-only int8 matrix-vector product compiled by numba: int8 weights, fp32 activations and sums.

Decode multiplies one token's activations by every weight once, so its speed is set by how
fast weights stream from memory; int8 reads a quarter of fp32's bytes. The library kernels
that read int8 weights either quantise the activations too (fbgemm's dynamic int8: fast, but
rounding the input turns the last-bit differences of sums added in another order into whole
quantisation steps, so a plan's tokens could depend on its placement) or are slower than fp32
on x86 (`aten._weight_int8pack_mm`, see benchmarks/results/kernels.json). This loop keeps the
activations in fp32 and widens each weight to fp32 in registers; LLVM (through numba, which
builds it for x86 and ARM alike) vectorises it. Its answer is the plan's quantised model up to
fp32 rounding, like any fp32 kernel's.

Batches of `BATCH_ROWS` tokens or more (prefill, draft verification) dequantise once and run one
fp32 GEMM instead: there the multiplications, not the bytes, are the cost.

Compiled on first use and cached on disk by numba (about a second once per machine).

Example:
    >>> import torch
    >>> from halo_runtime.core.quant import quantise, dequantise
    >>> from halo_runtime.core.jitkernels import int8_linear, prepare_int8
    >>> w = quantise(torch.randn(24, 40), "int8")
    >>> x = torch.randn(1, 40)
    >>> bool(torch.allclose(int8_linear(prepare_int8(w), x), x @ dequantise(w).T, rtol=1e-5, atol=1e-5))
    True
"""
from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F

from .kernels import BATCH_ROWS
from .quant import QuantWeight


@numba.njit(fastmath=True, nogil=True, cache=True)
def _matvec_int8(x, w, scales, y):  # pragma: no cover - compiled
    # fastmath lets LLVM split the sum over k into several vector accumulators (the reassociation
    # any vectorised fp32 GEMM does): the answer differs from a sequential sum by fp32 rounding only
    rows, cols = w.shape
    for t in range(x.shape[0]):
        for r in range(rows):
            acc = np.float32(0.0)
            for k in range(cols):
                acc += x[t, k] * np.float32(w[r, k])
            y[t, r] = acc * scales[r]


def prepare_int8(w: QuantWeight) -> tuple[np.ndarray, np.ndarray]:
    """(values int8 [rows, cols], scales fp32 [rows]) as numpy views: what `int8_linear` reads."""
    return w.values.contiguous().numpy(), w.scales.float().contiguous().numpy()


def int8_linear(prepared: tuple[np.ndarray, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """x [T, cols] fp32 @ (values * scales[:, None]).T -> [T, rows] fp32."""
    values, scales = prepared
    if x.shape[0] >= BATCH_ROWS:
        return F.linear(x, torch.from_numpy(values).float() * torch.from_numpy(scales)[:, None])
    y = np.empty((x.shape[0], values.shape[0]), np.float32)
    _matvec_int8(x.contiguous().numpy(), values, scales, y)
    return torch.from_numpy(y)
