"""How a process computes: its threads, and what ggml multiplies with on this CPU.

There is one engine, ggml, built for the machine it is installed on (ggml-python compiles it
with `-march=native`): its kernel for each weight format is the widest this CPU has (AVX-512
VNNI, AVX2, NEON `sdot`, ...), chosen by ggml, not by us. `kernels()` names what it uses, for
`halo-run --json` and the start-up line.

Example:
    >>> from halo_runtime.core.compute import ComputeOptions, kernels
    >>> ComputeOptions(threads=2).threads, sorted(kernels())[:2]
    (2, ['engine', 'simd'])
    >>> ComputeOptions(threads=0)
    Traceback (most recent call last):
    ...
    ValueError: threads must be a whole number of at least 1, got 0
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version


@dataclass(frozen=True)
class ComputeOptions:
    """How one process runs its products."""

    threads: int = 1
    """ggml threads for this process's graphs (inside the kernels); 1 where several device
    processes share a machine, a board's core count where a device has it to itself."""

    def __post_init__(self):
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a whole number of at least 1, got {self.threads!r}")


_FEATURES = ("avx512_vnni", "avx512", "avx_vnni", "avx2", "matmul_int8", "dotprod", "neon", "sve", "f16c", "fma",
             "llamafile")
"""CPU features ggml reports, widest first (the first present names the kernels' instruction set),
and whether it was built with llamafile's batched GEMM (`make install` builds it so; prefill runs
about twice as fast with it)."""


@cache
def kernels() -> dict:
    """{"engine": ggml and its binding's version, "simd": the instruction sets ggml uses here}."""
    import ggml.ggml as G

    try:
        binding = version("ggml-python")
    except PackageNotFoundError:
        binding = "unknown"
    present = [f for f in _FEATURES if getattr(G, f"ggml_cpu_has_{f}", lambda: 0)()]
    return {"engine": f"ggml (ggml-python {binding})", "simd": present or ["scalar"]}
