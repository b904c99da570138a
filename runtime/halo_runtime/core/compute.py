"""How a process computes: its threads, and what ggml multiplies with on this CPU.

There is one engine, ggml, built for the machine it is installed on (ggml-python compiles it
with `-march=native`): its kernel for each weight format is the widest this CPU has (AVX-512
VNNI, AVX2, NEON `sdot`, ...), chosen by ggml, not by us; fp32 weights go through a kernel of
ours inside ggml's graphs where it builds (`f32rows`: each weight read once for all of a pass's
rows). `kernels()` names what it uses, for `halo-run --json` and the start-up line.

A row's result must not depend on the pass it travels in: a draft's verification pass must give
the bits of one-token decoding (so drafts never change a reply), and a row's bits must not depend
on the thread count. ggml's own products compute every output element with one dot product, whatever
the rows beside it; llamafile's tiled GEMM (used for passes of 2+ rows when ggml is built with
`-DGGML_LLAMAFILE=ON`) and ARM's 2-row int8 matmul (i8mm, even row counts) sum in another order.
`f32rows` sums every element in one order whatever the rows.
`make install` builds ggml without llamafile; `rows_differ_by_pass()` says where the exactness is lost.

Example:
    >>> from halo_runtime.core.compute import ComputeOptions, kernels
    >>> ComputeOptions(threads=2).threads, sorted(kernels())
    (2, ['engine', 'f32_rows', 'rows_exact', 'simd'])
    >>> ComputeOptions(threads=0)
    Traceback (most recent call last):
    ...
    ValueError: threads must be a whole number of at least 1, got 0
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version


@dataclass(frozen=True)
class ComputeOptions:
    """How one process runs its products."""

    threads: int = 1
    """ggml threads for this process's graphs (inside the kernels); 1 where several device
    processes share a machine, a board's core count where a device has it to itself."""
    sched: str | None = None
    """the process's CPU scheduling: batch (Linux SCHED_BATCH: a process a datagram wakes does not
    preempt the one that sent it, so a device sending its part to the others is not cut off by the
    first receiver on its core) where several device processes share a machine's cores; normal on a
    board of its own; unset: batch for `local` and `serve --local` (every device on this machine),
    else as started"""

    def __post_init__(self):
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a whole number of at least 1, got {self.threads!r}")
        if self.sched not in (None, *SCHED_POLICIES):
            raise ValueError(f"sched must be one of {', '.join(SCHED_POLICIES)}, got {self.sched!r}")

    def apply_sched(self, shared_machine: bool) -> str:
        """Set this process's scheduling policy (threads it starts later inherit it; so do the
        processes it starts); returns the policy in force: normal, batch, or what it was started
        with. `shared_machine`: every device runs on this machine (what an unset `sched` means)."""
        want = self.sched or ("batch" if shared_machine else None)
        if want is not None and hasattr(os, "SCHED_BATCH"):  # Linux; elsewhere the OS decides
            os.sched_setscheduler(0, os.SCHED_BATCH if want == "batch" else os.SCHED_OTHER, os.sched_param(0))
        if not hasattr(os, "sched_getscheduler"):
            return "normal"
        return {os.SCHED_OTHER: "normal", os.SCHED_BATCH: "batch"}.get(os.sched_getscheduler(0), "other")


SCHED_POLICIES = ("normal", "batch")
"""`ComputeOptions.sched` values."""


_FEATURES = ("avx512_vnni", "avx512", "avx_vnni", "avx2", "matmul_int8", "dotprod", "neon", "sve", "f16c", "fma")
"""CPU features ggml reports, widest first (the first present names the kernels' instruction set)."""


@cache
def rows_differ_by_pass() -> str | None:
    """None where a row's bits are the same in every pass (see the module docstring); else why not."""
    import ggml.ggml as G

    if G.ggml_cpu_has_llamafile():
        return ("ggml was built with llamafile's tiled GEMM, so passes of several rows (prefill, drafts) "
                "round differently from one-row decoding: reinstall ggml-python with "
                "CMAKE_ARGS=-DGGML_LLAMAFILE=OFF pip install --no-cache-dir --force-reinstall ggml-python")
    if G.ggml_cpu_has_matmul_int8():
        return ("this CPU's 2-row int8 matmul (i8mm) serves q8_0/q4_0 passes of an even number of rows, "
                "which may round differently from one-row decoding (fp32 and bf16 plans are exact)")
    return None


@cache
def kernels() -> dict:
    """{"engine": ggml and its binding's version, "simd": the instruction sets ggml uses here,
    "f32_rows": what multiplies fp32 weights (`f32rows`, or why ggml does),
    "rows_exact": whether a row's bits are the same in every pass}."""
    import ggml.ggml as G

    from .f32rows import library

    try:
        binding = version("ggml-python")
    except PackageNotFoundError:
        binding = "unknown"
    present = [f for f in _FEATURES if getattr(G, f"ggml_cpu_has_{f}", lambda: 0)()]
    fp32 = library()[1]
    return {"engine": f"ggml (ggml-python {binding})", "simd": present or ["scalar"],
            "f32_rows": fp32 if fp32.startswith("halo") else f"ggml: {fp32}",
            "rows_exact": rows_differ_by_pass() is None}
