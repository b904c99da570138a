"""HALO offline planning compiler.

A plan's bytes depend on float sums (profiling statistics, grouping, scores, the predictor's and
the compensation's training), and torch sums in an order that depends on the instruction set its
kernels use (ATen picks AVX-512 where the CPU has it, MKL picks its own path per CPU). Before torch
computes anything, importing the compiler fixes both to AVX2 on x86-64 CPUs that have it (every
x86 board host and workstation of the last decade): the same inputs and seed then give the same
plan and shards on any of them (measured: an AVX-512 Xeon reproduced a Zen 1 machine's groups,
scores and placement only with these pinned), except the predictor's trained weights, which still
differ in their last bits between those two (issue 25). An environment that sets either variable wins.
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
