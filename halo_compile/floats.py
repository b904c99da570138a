"""The same plan on every CPU: the compiler computes in float64 and settles what it writes.

torch sums, and computes exp and sin, in an order and with code that the CPU decides: AVX-512,
AVX2 or plain C kernels on x86, NEON or SVE on ARM, MKL's or OpenBLAS's blocking for products.
In float32 the results of one compile differ between two CPUs in their last bits (~1e-7 relative);
every step after profiling inherits that, and the predictor's training and the compensation's fit
turn it into different weights, so plan.json's predictor figures and the coordinator's shard
differed between two machines. Rounding float32 results cannot hide a 1e-7 difference.

So every number the compiler derives from the model (the calibration forward pass, its statistics,
grouping's correlations, the compensation's least squares and the predictor's training) is computed
in `DTYPE`, float64, and every float32 tensor a shard stores is `settle`d: rounded to a grid of
`SETTLED_BITS` bits below the tensor's largest magnitude. Two CPUs then write other bytes only
where a value lies closer to a grid midpoint than their float64 results differ. Measured on
SmolLM2 (2026-12-06), AVX2 against torch's plain C kernels: the unsettled float64 results differed
by at most 1.7e-13 of their tensor's largest value (predictor weights; compensation 9e-15,
statistics 7e-16), while the grid is 8e-6 to 1.5e-5 of it; summed over the 2.0 M fitted values,
the expected number of values that settle differently is 2.3e-5 per compile (one compile in
~40,000), and none did. ARM's kernels (NEON, OpenBLAS, FMA everywhere) differ from these by the same
float64 rounding, unmeasured here. The plan's own floats keep 6 significant digits: the same
argument, with a wider margin. tests/test_real_model.py compiles with `ATEN_CPU_CAPABILITY=default`
and checks the checked-in plan's bytes.

Example:
    >>> import torch
    >>> from halo_compile.floats import SETTLED_BITS, settle
    >>> x = torch.tensor([0.3, -0.1, 1e-9], dtype=torch.float64)
    >>> torch.equal(settle(x), settle(x + 1e-14)), settle(x).dtype
    (True, torch.float32)
    >>> float((settle(x) - x).abs().max()) <= 2.0 ** -SETTLED_BITS
    True
"""
from __future__ import annotations

import math

import torch

DTYPE = torch.float64
"""The compiler's float type for everything it derives from the model's numbers."""

SETTLED_BITS = 16
"""Bits a settled tensor keeps below its largest magnitude's power of two: a step of 1.5e-5 of that
power, far below what a predictor or a compensation estimate needs (their own errors are
percents), ~1e8 times the 1.7e-13 by which two CPUs' float64 results were seen to differ."""


def settle(t: torch.Tensor, bits: int = SETTLED_BITS) -> torch.Tensor:
    """t rounded to multiples of 2**(e - bits), where 2**e is the power of two just above max|t|,
    as float32 (exact: each value has at most bits + 1 significant bits)."""
    t = t.to(DTYPE)
    top = float(t.abs().max()) if t.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return t.float()
    step = 2.0 ** (math.frexp(top)[1] - bits)  # division and product by a power of two are exact
    return (torch.round(t / step) * step).float()
