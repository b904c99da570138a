"""Matrix-vector kernels per weight format, chosen once per process by measuring them here.

Every candidate computes y = x @ dequantise(W).T for a `QuantWeight` W. They differ in speed
(by 10-50x, and differently on x86 and ARM) and in what they do to the activations:

- "fp32": activations used as they are (weight-only kernels);
- "bf16": activations rounded to bf16;
- "int8": activations quantised on the fly (dynamic int8).

Only "fp32" kernels are chosen by measurement: their answer is the plan's quantised model up to
fp32 rounding, whatever the placement. A kernel that rounds or quantises its input turns the
last-bit differences of partial sums added in another order (another placement) into whole
rounding steps, and a plan's greedy tokens could then change with where its groups sit (seen on
SmolLM2 with dynamic int8). Those run only when pinned (`PIN_ENV`), for measurements.

Dynamic int8 kernels take one scale over their whole input, so a `QuantLinear` calls them once
per *segment* (neuron group, see `halo_runtime.core.quant`) and, where the kernel's scale spans
all rows, once per token: a group's contribution then never depends on which other groups share
its device, nor on which tokens share its batch.

`choose(fmt, role)` measures the available candidates on a small matrix (tens of ms, once per
process and role: "rows" for row-sliced matrices, "groups" for column-sliced ones applied group
by group), drops any that fail or disagree with the dequantised reference, and keeps the fastest;
a later candidate must beat an earlier one by `MARGIN` so that noise does not flip the choice
between runs. `selections()` names what was chosen, for the runtime's summary and `--json`.

Example:
    >>> import torch
    >>> from halo_runtime.core.quant import quantise, dequantise
    >>> from halo_runtime.core.kernels import QuantLinear, kernel
    >>> w = quantise(torch.randn(16, 64), "int8", segments=(40, 24))
    >>> lin = QuantLinear(w, kernel("int8.dequant-fp32"))
    >>> x = torch.randn(2, 64)
    >>> bool(torch.allclose(lin(x), x @ dequantise(w).T, atol=1e-4))
    True
    >>> [tuple(p.shape) for p in QuantLinear(w, kernel("int8.dequant-fp32"), parts=(1, 1)).parts(x)]
    [(2, 16), (2, 16)]
"""
from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .int4kernels import prepare_dyn4, prepare_int4pack, run_dyn4, run_int4pack
from .quant import (
    QuantWeight,
    dequantise,
    quantise,
    take_segments,
)

BATCH_ROWS = 4
"""From this many tokens on, kernels built for one token run one fp32 GEMM instead (prefill)."""
MARGIN = 0.15
"""A later candidate is chosen over an earlier one only when it is this much faster."""
MAX_RESIDENT = 1.5
"""A candidate whose prepared weights take more than this many times the stored bytes is refused:
the compiler places groups by their stored bytes, so a kernel must not inflate them in RAM."""
SLOW = 5.0
"""A candidate whose two first timed calls are this many times the best so far is not timed further."""
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "int8": 6e-2}
"""Largest accepted max|y - y_ref| / max|y_ref| against the dequantised reference, by activation kind."""


@dataclass(frozen=True)
class Kernel:
    """One way to multiply by a weight of one format."""

    name: str
    """Stable name, "<format>.<method>"; what the runtime prints."""
    format: str
    """Weight format it reads."""
    activations: str
    """What it does to its input: "fp32" (nothing), "bf16" (rounds it) or "int8" (quantises it on the fly)."""
    prepare: Callable[[QuantWeight], Any] = field(repr=False)
    """Turns a stored weight into what `run` reads (repacking; done once at load)."""
    run: Callable[[Any, torch.Tensor], torch.Tensor] = field(repr=False)
    """(prepared, x [T, in] fp32) -> y [T, out] fp32."""
    available: Callable[[], bool] = field(default=lambda: True, repr=False)
    """Whether this torch build and CPU offer it."""
    token_by_token: bool = False
    """Its activation scale spans the whole input: call it one token at a time."""
    unpack: Callable[[Any], torch.Tensor] | None = field(default=None, repr=False)
    """prepared -> the fp32 weight, for batches of a token-by-token kernel (None: loop over tokens)."""

    def __post_init__(self):
        if self.activations not in TOLERANCE:
            raise ValueError(f"kernel {self.name}: activations must be one of {sorted(TOLERANCE)}")
        if not self.name.startswith(self.format + "."):
            raise ValueError(f"kernel {self.name}: name must start with its format {self.format!r}")

    @property
    def per_segment(self) -> bool:
        """Quantises its input: called once per segment, so each group's scale is its own."""
        return self.activations == "int8"


# ---- the candidates -----------------------------------------------------------------------------

def _engines() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


def _has(ns: str, op: str) -> Callable[[], bool]:
    return lambda: hasattr(getattr(torch.ops, ns), op)


def _prepack_int8(engine: str):
    def prepare(w: QuantWeight):
        old = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            with warnings.catch_warnings():  # quantised tensors are deprecated; the kernels are not replaced yet
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    w.values, w.scales.double(), torch.zeros(w.rows, dtype=torch.long), 0)
                return torch.ops.quantized.linear_prepack(qw, None)
        finally:
            torch.backends.quantized.engine = old
    return prepare


def _dynamic_int8(engine: str) -> Kernel:
    # fbgemm's AVX2 path sums pairs of uint8*int8 products in int16: 7-bit activations keep it exact
    reduce_range = engine != "qnnpack"
    return Kernel(f"int8.dynamic-{engine}", "int8", "int8", _prepack_int8(engine),
                  lambda p, x: torch.ops.quantized.linear_dynamic(x, p, reduce_range),
                  lambda: engine in _engines(), token_by_token=True,
                  unpack=lambda p: torch.ops.quantized.linear_unpack(p)[0].dequantize())


def _int_mm(p, x: torch.Tensor) -> torch.Tensor:
    wt, scales = p
    sx = x.abs().amax(dim=1, keepdim=True) / 127
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    xq = torch.round(x / sx).clamp(-127, 127).to(torch.int8)
    return torch._int_mm(xq, wt).float() * sx * scales


def _onednn_qlinear(p, x: torch.Tensor) -> torch.Tensor:
    packed, scales, zeros = p
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    levels = 127  # 7-bit activations, as for fbgemm: AVX2 int16 pair sums stay exact
    s = (hi - lo) / levels or 1.0
    zp = round(-lo / s)
    xq = (torch.round(x / s) + zp).clamp(0, levels).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(xq, s, zp, packed, scales, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


def _jit(name: str) -> Callable:
    """A function of `jitkernels`, imported on first call: numba loads only where the kernel runs."""
    def call(*args):
        from . import jitkernels
        return getattr(jitkernels, name)(*args)
    return call


def _mkl_prepare(w: QuantWeight):
    return torch.ops.mkl._mkl_reorder_linear_weight(w.values, 1), w.values


def _mkl_run(p, x):
    return torch.ops.mkl._mkl_linear(x, p[0], p[1], None, x.shape[0])


_linear = lambda w, x: F.linear(x, w)  # noqa: E731

CANDIDATES: tuple[Kernel, ...] = (
    Kernel("fp32.linear", "fp32", "fp32", lambda w: w.values, _linear),
    Kernel("fp32.mkl", "fp32", "fp32", _mkl_prepare, _mkl_run, lambda: torch.backends.mkl.is_available()),
    Kernel("fp32.mkldnn", "fp32", "fp32", lambda w: torch.ops.mkldnn._reorder_linear_weight(w.values, 1),
           lambda p, x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
           lambda: torch.backends.mkldnn.is_available()),
    # the int8 loop on fp32 weights: on one thread about torch's speed, but it splits over threads
    Kernel("fp32.numba", "fp32", "fp32", _jit("prepare_fp32"), _jit("fp32_linear"),
           lambda: importlib.util.find_spec("numba") is not None),
    Kernel("bf16.linear", "bf16", "bf16", lambda w: w.values,
           lambda w, x: F.linear(x.to(torch.bfloat16), w).float()),
    # fbgemm's fp16 GEMM: bf16 values are exact in fp16 down to |w| 6e-5 (the tolerance check guards the rest)
    Kernel("bf16.fbgemm-fp16", "bf16", "fp32", lambda w: torch.ops.quantized.linear_prepack_fp16(w.values.float(), None),
           lambda p, x: torch.ops.quantized.linear_dynamic_fp16(x, p), lambda: "fbgemm" in _engines()),
    Kernel("bf16.dequant-fp32", "bf16", "fp32", lambda w: w.values, lambda w, x: F.linear(x, w.float())),
    *(_dynamic_int8(e) for e in ("fbgemm", "x86", "qnnpack", "onednn")),
    Kernel("int8.numba", "int8", "fp32", _jit("prepare_int8"), _jit("int8_linear"),
           lambda: importlib.util.find_spec("numba") is not None),
    Kernel("int8.weight-int8pack", "int8", "fp32", lambda w: (w.values, w.scales),
           lambda p, x: torch.ops.aten._weight_int8pack_mm(x, p[0], p[1]), _has("aten", "_weight_int8pack_mm")),
    Kernel("int8.int-mm", "int8", "int8", lambda w: (w.values.T, w.scales), _int_mm, _has("aten", "_int_mm")),
    Kernel("int8.onednn-qlinear", "int8", "int8",
           lambda w: (torch.ops.onednn.qlinear_prepack(w.values, None), w.scales,
                      torch.zeros(w.rows, dtype=torch.long)),
           _onednn_qlinear, lambda: "onednn" in _engines() and _has("onednn", "qlinear_pointwise")(),
           token_by_token=True),
    Kernel("int8.dequant-fp32", "int8", "fp32", lambda w: w,
           lambda w, x: F.linear(x, w.values.float() * w.scales[:, None])),
    Kernel("int4.int4pack", "int4", "fp32", prepare_int4pack, run_int4pack,
           _has("aten", "_weight_int4pack_mm_for_cpu")),
    Kernel("int4.dyn-quant-4bit", "int4", "int8", prepare_dyn4, run_dyn4, _has("aten", "_dyn_quant_matmul_4bit")),
    Kernel("int4.dequant-fp32", "int4", "fp32", lambda w: w, lambda w, x: F.linear(x, dequantise(w))),
)
"""Every kernel, per format in fallback order (what to prefer when timings tie)."""


def kernel(name: str) -> Kernel:
    for k in CANDIDATES:
        if k.name == name:
            return k
    raise ValueError(f"unknown kernel {name!r} (known: {', '.join(k.name for k in CANDIDATES)})")


def candidates(fmt: str) -> list[Kernel]:
    """The kernels for `fmt` that this torch build offers, in fallback order."""
    out = []
    for k in CANDIDATES:
        if k.format == fmt:
            try:
                ok = bool(k.available())
            except Exception:  # an op probe can raise on an exotic build: treat as absent
                ok = False
            if ok:
                out.append(k)
    return out


# ---- applying a kernel ---------------------------------------------------------------------------

class QuantLinear:
    """x @ W.T for a quantised W with one kernel; `parts` split its segments into separate sums.

    parts: how many consecutive segments each output sums (default: one output over all). A
    device asks for (critical groups, relaxed groups) of down_proj, or one part per group.
    Weight-only kernels make one call per part; dynamic int8 kernels one per segment, and those
    whose scale spans all rows one per token, except for batches of `BATCH_ROWS` tokens or more
    (prefill) when they can unpack: then each (token, segment) is quantised to int8 on its own
    scale in fp32 and multiplied by the unpacked weights in one GEMM per part. The batch answer
    differs from the token-by-token one by quantisation noise, identically on every device.
    """

    def __init__(self, weight: QuantWeight, kern: Kernel | None = None, parts: Sequence[int] | None = None):
        self.kernel = kern or choose(weight.format.name, role_of(weight))
        if self.kernel.format != weight.format.name:
            raise ValueError(f"kernel {self.kernel.name} does not read {weight.format.name} weights")
        parts = tuple(parts or (len(weight.segments),))
        if sum(parts) != len(weight.segments) or min(parts) < 0:
            raise ValueError(f"parts {parts} do not cover the {len(weight.segments)} segments")
        self.rows, self.segments = weight.rows, weight.segments
        self.prepared: list[list[Any]] = []   # per part: one prepared weight per kernel call
        self.widths: list[list[int]] = []     # per part: the columns each call reads
        self.part_widths: list[int] = []
        at = 0
        for n in parts:
            segs = list(range(at, at + n))
            chunks = [[s] for s in segs] if self.kernel.per_segment else ([segs] if segs else [])
            self.prepared.append([self.kernel.prepare(weight if len(c) == len(weight.segments)
                                                      else take_segments(weight, c)) for c in chunks])
            self.widths.append([sum(self.segments[s] for s in c) for c in chunks])
            self.part_widths.append(sum(self.segments[s] for s in segs))
            at += n

    def _batched(self, x: torch.Tensor, p: int) -> torch.Tensor:
        if not self.prepared[p]:
            return x.new_zeros(x.shape[0], self.rows)
        w = torch.cat([self.kernel.unpack(prepared) for prepared in self.prepared[p]], 1)
        xq = torch.cat([fake_quant_int8(xs) for xs in x.split(self.widths[p], 1)], 1)
        return xq @ w.T

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One [T, rows] output per part (zeros for an empty part)."""
        x, kern = x.float(), self.kernel
        T = x.shape[0]
        if kern.token_by_token and T > 1:
            if kern.unpack is not None and T >= BATCH_ROWS:
                return [self._batched(xp, p) for p, xp in enumerate(x.split(self.part_widths, 1))]
            per_token = [self.parts(x[t:t + 1]) for t in range(T)]
            return [torch.cat([o[p] for o in per_token]) for p in range(len(self.prepared))]
        run, out = kern.run, []
        if len(self.prepared) == 1 and len(self.prepared[0]) == 1:  # one part, one call: most matrices
            return [run(self.prepared[0][0], x.contiguous())]
        # the hot path of decode: views, no copies, one stack-and-sum per part
        for xp, preps, widths in zip(x.split(self.part_widths, 1), self.prepared, self.widths):
            if len(preps) == 1:
                out.append(run(preps[0], xp.contiguous()))
            elif preps:
                out.append(torch.stack([run(pr, xs.contiguous()) for pr, xs in zip(preps, xp.split(widths, 1))]).sum(0))
            else:
                out.append(x.new_zeros(T, self.rows))
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.parts(x)
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def fake_quant_int8(x: torch.Tensor) -> torch.Tensor:
    """x [T, n] rounded to symmetric int8 with one scale per row, back in fp32."""
    s = x.abs().amax(dim=1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / s).clamp(-127, 127) * s


# ---- choosing by measurement ---------------------------------------------------------------------

ROLES = {"rows": 1, "groups": 16}
"""Probe segments per role: "rows" for row-sliced matrices (one segment: q/k/v/gate/up, LM head);
"groups" for column-sliced ones (o_proj, down_proj) applied per neuron group, as a device holding
all 16 MLP groups of a layer does. Dynamic int8 kernels pay a fixed cost per call, so the two roles
may prefer different kernels."""


@dataclass(frozen=True)
class Selection:
    """Which kernel serves a format in one role in this process, and what the measurement saw."""

    format: str
    """Weight format."""
    role: str
    """"rows" or "groups" (see ROLES)."""
    kernel: str
    """Name of the chosen kernel."""
    times_us: dict = field(default_factory=dict)
    """Fastest of the repeats in microseconds per probe multiplication, per candidate that worked
    (empty when pinned)."""
    rejected: dict = field(default_factory=dict)
    """Why each other candidate was dropped (error, or disagreement with the reference)."""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"kernel selection: role must be one of {sorted(ROLES)}, got {self.role!r}")


PROBE_SHAPE = (1024, 2048)
"""Rows and columns of the probe matrix; in "groups", 16 groups of 128 columns, like a 1B model's
MLP. Much smaller probes mislead: in cache, dequantise-then-fp32 looks fast."""
_SELECTIONS: dict[tuple[str, str], Selection] = {}
PIN_ENV = "HALO_KERNELS"
"""Environment variable pinning kernels (read in `qcompute`)."""


def resident_bytes(prepared) -> int:
    """Bytes a prepared weight keeps in RAM (a packed library object: its unpacked weight's bytes)."""
    if isinstance(prepared, torch.Tensor):
        return prepared.numel() * prepared.element_size()
    if isinstance(prepared, QuantWeight):
        return prepared.nbytes
    if hasattr(prepared, "__array_interface__"):  # a numpy array (numba kernels)
        return prepared.nbytes
    if isinstance(prepared, (tuple, list)):
        return sum(resident_bytes(p) for p in prepared)
    if isinstance(prepared, torch.ScriptObject):
        w = torch.ops.quantized.linear_unpack(prepared)[0]
        return w.numel() * (1 if w.is_quantized else 2) + w.shape[0] * 8  # int8 or fp16, per-row scales
    return 0


def agreement(kern: Kernel, w: QuantWeight, x: torch.Tensor) -> float:
    """max|y - y_ref| / max|y_ref| of `kern` against x @ dequantise(w).T."""
    return _error(QuantLinear(w, kern)(x), x @ dequantise(w).T)


def _error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def measure(fmt: str, role: str = "rows", repeats: int = 5, weight: QuantWeight | None = None) -> Selection:
    """Time every available candidate for `fmt` on `weight` (a device's own matrix: the truest
    probe) or else a seeded PROBE_SHAPE matrix cut into the role's segments; keep the fastest that
    agrees with the reference. torch runs on one thread (its one-token products use one anyway,
    and on a busy machine a thread pool's waits swamp the calls); the numba loops on the process's
    `set_threads` count, as they will run."""
    gen = torch.Generator().manual_seed(0)
    if weight is None:
        rows, cols = PROBE_SHAPE
        k = ROLES[role]
        weight = quantise(torch.randn(rows, cols, generator=gen) * 0.02, fmt,
                          [cols // k + (i < cols % k) for i in range(k)])
    if weight.format.name != fmt:
        raise ValueError(f"measure: probe weight is {weight.format.name}, not {fmt}")
    dense = dequantise(weight)
    inputs = [(x, x @ dense.T) for x in (torch.randn(1, weight.cols, generator=gen),
                                         torch.randn(3, weight.cols, generator=gen))]
    del dense
    times, rejected = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kern in candidates(fmt):
            if kern.activations != "fp32":
                rejected[kern.name] = f"{kern.activations} activations: runs only when pinned ({PIN_ENV})"
                continue
            _probe(kern, weight, inputs, repeats, times, rejected)
    finally:
        torch.set_num_threads(threads)
    if not times:
        raise RuntimeError(f"no working kernel for {fmt} weights ({rejected})")
    best = None
    for name, t in times.items():  # in fallback order
        if best is None or t < times[best] * (1 - MARGIN):
            best = name
    return Selection(fmt, role, best, {n: round(v, 1) for n, v in times.items()}, rejected)


def _probe(k: Kernel, w: QuantWeight, inputs, repeats: int, times: dict, rejected: dict) -> None:
    """Check one candidate on (x, reference) pairs, then time it on the first x."""
    try:
        lin = QuantLinear(w, k)
        held = sum(resident_bytes(pr) for part in lin.prepared for pr in part)
        if held > MAX_RESIDENT * w.nbytes:
            rejected[k.name] = f"holds {held / w.nbytes:.1f}x the stored bytes (plans count stored bytes)"
            return
        err = max(_error(lin(x), ref) for x, ref in inputs)
        if not err <= TOLERANCE[k.activations]:
            rejected[k.name] = f"disagrees with the reference ({err:.2g})"
            return
        x = inputs[0][0]
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            lin(x)
            ts.append(time.perf_counter() - t0)
            if len(ts) >= 2 and times and min(ts) > SLOW * min(times.values()) / 1e6:  # hopeless: stop
                break
        times[k.name] = min(ts) * 1e6  # the fastest repeat: other processes only ever add time
    except Exception as e:  # a kernel this CPU or build cannot run: fall back to the next
        msg = str(e).splitlines()[0][:120] if str(e) else ""
        rejected[k.name] = f"{type(e).__name__}: {msg}"


def choose(fmt: str, role: str = "rows", name: str | None = None, probe: QuantWeight | None = None) -> Kernel:
    """The kernel for `fmt` in `role` in this process: `name` if given (pinned), else measured
    once (on `probe` if given, see `measure`) and remembered."""
    if name is not None:
        k = kernel(name)
        if k.format != fmt or k not in candidates(fmt):
            raise ValueError(f"kernel {name} is not available for {fmt} weights here")
        _SELECTIONS[fmt, role] = Selection(fmt, role, name)
        return k
    if (fmt, role) not in _SELECTIONS:
        _SELECTIONS[fmt, role] = measure(fmt, role, weight=probe)
    return kernel(_SELECTIONS[fmt, role].kernel)


@dataclass(frozen=True)
class ComputeOptions:
    """How one process runs its products."""

    threads: int = 1
    """Threads for this process's matrix products (the numba loops in decode, every format's
    prefill); 1 where several device processes share a machine, a board's core count where a device
    has it to itself."""

    def __post_init__(self):
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a whole number of at least 1, got {self.threads!r}")


THREADS = 1
"""This process's `ComputeOptions.threads` (`set_threads`); read by the numba loop on every call."""


def set_threads(threads: int) -> None:
    """Run this process's products on `threads` threads: torch's GEMMs, and the numba loop split by
    rows (each row is still summed by one thread, so the answer is the same bits for any count).
    Call it before building a `DeviceCompute`: with more than one, fp32 weights go through the
    measured kernels too."""
    global THREADS
    THREADS = ComputeOptions(threads).threads
    torch.set_num_threads(threads)


def role_of(weight: QuantWeight) -> str:
    return "groups" if len(weight.segments) > 1 else "rows"


def selections() -> dict[str, dict[str, str]]:
    """Kernels chosen so far in this process, {format: {role: kernel}} (for the summary and --json)."""
    out: dict[str, dict[str, str]] = {}
    for (fmt, role), sel in sorted(_SELECTIONS.items()):
        out.setdefault(fmt, {})[role] = sel.kernel
    return out


def selection_details() -> list[Selection]:
    """Every selection made so far, with its probe times and rejections."""
    return [_SELECTIONS[k] for k in sorted(_SELECTIONS)]
