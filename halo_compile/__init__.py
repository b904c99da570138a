"""HALO offline planning compiler.

A plan's bytes depend on float results (profiling statistics, grouping, scores, the predictor's
and the compensation's training), and torch computes them in an order, and with exp and sin
code, that the CPU's instruction set decides. `halo_compile.floats` is what makes two CPUs agree:
the compiler computes in float64 and rounds what it writes to a grid far coarser than float64's
differences (checked: a compile with torch's plain C kernels, `ATEN_CPU_CAPABILITY=default`, gives
the bytes of one with its AVX2 kernels). Importing the compiler also pins torch and MKL to AVX2
on x86-64 CPUs that have it, before torch computes anything: the float32 parts that remain (the
candidate search of grouping, whose float64 pass decides) then agree bit for bit on those CPUs
too. An environment that sets either variable wins.
"""
import os as _os
import platform as _platform

__version__ = "0.1.0"


def _pin_float_kernels() -> None:
    if _platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return
    if "avx2" in flags:
        _os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
        # MKL's conditional numerical reproducibility: the AVX2 code path on every CPU, and results
        # that do not depend on its thread count
        _os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")


_pin_float_kernels()
