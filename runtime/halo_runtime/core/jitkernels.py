"""Weight-only int8 matrix-vector product compiled by numba: int8 weights, fp32 activations and sums
(and the same loop on fp32 weights, which can run on several threads where torch's cannot).

Decode multiplies one token's activations by every weight once, so its speed is set by how
fast weights stream from memory; int8 reads a quarter of fp32's bytes. The library kernels
that read int8 weights either quantise the activations too (fbgemm's dynamic int8: fast, but
rounding the input turns the last-bit differences of sums added in another order into whole
quantisation steps, so a plan's tokens could depend on its placement) or are slower than fp32
on x86 (`aten._weight_int8pack_mm`, see benchmarks/results/kernels.json). This loop keeps the
activations in fp32 and widens each weight to fp32 in registers; LLVM (through numba, which
builds it for x86 and ARM alike) vectorises it. Its answer is the plan's quantised model up to
fp32 rounding, like any fp32 kernel's.

A few tokens at once (draft verification) widen each weight row once into an fp32 buffer and
reuse it for every token; `GEMM_ROWS` tokens or more (prefill) dequantise the matrix once and run
one fp32 GEMM: there the multiplications, not the bytes, are the cost. (Dequantising for a
5-token verification pass cost 5-10x the loop, measured.)

With `kernels.set_threads(n)` (`halo-run --threads`) the rows are split among n threads in
blocks of `ROW_BLOCK`; a row is summed by one thread either way, so the answer is the same bits.

Compiled on first use and cached on disk by numba (a few seconds once per machine).

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

from . import kernels
from .quant import QuantWeight

GEMM_ROWS = 16
"""From this many tokens on, dequantise the matrix once and run one fp32 GEMM."""
ROW_BLOCK = 32
"""Rows per task when the products run on several threads (`kernels.set_threads`)."""


@numba.njit(fastmath=True, nogil=True, cache=True)
def _rows(x, w, scales, y, lo, hi):  # pragma: no cover - compiled
    # rows lo..hi of y = x @ (w * scales).T, w int8 or fp32 (numba compiles each). fastmath lets
    # LLVM split the sum over k into several vector accumulators (the reassociation any vectorised
    # fp32 GEMM does): the answer differs from a sequential sum by fp32 rounding only, and is the
    # same whichever thread computes the row
    cols = w.shape[1]
    if x.shape[0] == 1:
        for r in range(lo, hi):
            acc = np.float32(0.0)
            for k in range(cols):
                acc += x[0, k] * np.float32(w[r, k])
            y[0, r] = acc * scales[r]
        return
    # a few tokens (draft verification): each weight row is widened once (it stays in L1) and read
    # by every token
    row = np.empty(cols, np.float32)
    for r in range(lo, hi):
        for k in range(cols):
            row[k] = np.float32(w[r, k])
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            for k in range(cols):
                acc += x[t, k] * row[k]
            y[t, r] = acc * scales[r]


@numba.njit(fastmath=True, nogil=True, cache=True)
def _serial(x, w, scales, y):  # pragma: no cover - compiled
    _rows(x, w, scales, y, 0, w.shape[0])


@numba.njit(fastmath=True, nogil=True, cache=True, parallel=True)
def _parallel(x, w, scales, y):  # pragma: no cover - compiled
    rows = w.shape[0]
    blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
    for b in numba.prange(blocks):
        _rows(x, w, scales, y, b * ROW_BLOCK, min(rows, (b + 1) * ROW_BLOCK))


def prepare_int8(w: QuantWeight) -> tuple[np.ndarray, np.ndarray]:
    """(values int8 [rows, cols], scales fp32 [rows]) as numpy views: what `int8_linear` reads."""
    return w.values.contiguous().numpy(), w.scales.float().contiguous().numpy()


def int8_linear(prepared: tuple[np.ndarray, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """x [T, cols] fp32 @ (values * scales[:, None]).T -> [T, rows] fp32."""
    values, scales = prepared
    if x.shape[0] >= GEMM_ROWS:
        return F.linear(x, torch.from_numpy(values).float() * torch.from_numpy(scales)[:, None])
    return _loop(values, scales, x)


def prepare_fp32(w: QuantWeight) -> tuple[np.ndarray, np.ndarray]:
    """(values fp32, ones) as numpy arrays: the int8 loop's inputs for fp32 weights (x * 1 is exact)."""
    return w.values.float().contiguous().numpy(), np.ones(w.rows, np.float32)


def fp32_linear(prepared: tuple[np.ndarray, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """x [T, cols] fp32 @ values.T -> [T, rows] fp32; prefill-size batches run torch's GEMM."""
    values, scales = prepared
    if x.shape[0] >= GEMM_ROWS:
        return F.linear(x, torch.from_numpy(values))
    return _loop(values, scales, x)


def _loop(values: np.ndarray, scales: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    y = np.empty((x.shape[0], values.shape[0]), np.float32)
    threads = min(kernels.THREADS, numba.config.NUMBA_NUM_THREADS)
    if threads > 1 and values.shape[0] >= 2 * ROW_BLOCK:
        numba.set_num_threads(threads)  # numba's count is per calling thread, so it is set here
        _parallel(x.contiguous().numpy(), values, scales, y)
    else:
        _serial(x.contiguous().numpy(), values, scales, y)
    return torch.from_numpy(y)
