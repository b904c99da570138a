"""Every candidate matrix-vector kernel for every weight format, measured on this machine.

One thread; `--matrices` distinct matrices (24 of 8192x2048 by default, 1.5 GB in fp32) times one
vector, cycled so that nothing stays in cache, as decode sees it; plus SmolLM2's 576x1536. Per
kernel: time per matrix (median over repeated passes), stored and resident bytes, and the error of
its output against fp32 (the format's quantisation plus the kernel) and against the dequantised
weights (the kernel alone). Then the cost of calling a dynamic-int8 kernel once per neuron group
(what keeps a group's answer independent of its neighbours) against one call, at SmolLM2 and 1B
sizes, and what `halo_runtime.core.kernels.choose` picks here. Writes JSON and prints tables.

    python -m benchmarks.matvec                        # ~5 min on a quiet 2-core machine
    python -m benchmarks.matvec --matrices 4 --rows 1024 --cols 512 --group-shapes t:256x512:4

Example:
    >>> from benchmarks.matvec import uneven_sizes
    >>> s = uneven_sizes(1536, 16, seed=0); (len(s), sum(s), min(s) > 0)
    (16, 1536, True)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.benchcommon import machine
from halo_runtime.core import kernels as K
from halo_runtime.core.quant import FORMATS, dequantise, quantise

HERE = Path(__file__).resolve().parent

DEFAULT_GROUP_SHAPES = ("smollm2-down:576x1536:16", "smollm2-o:576x576:3", "1b-down:2048x8192:16",
                        "1b-o:2048x2048:8")
"""name:ROWSxCOLS:GROUPS: down_proj with the compiler's 16 MLP groups, o_proj with one group per KV head."""


def uneven_sizes(n: int, k: int, seed: int) -> list[int]:
    """k positive sizes summing to n, uneven like the compiler's co-activation groups."""
    cuts = sorted(random.Random(seed).sample(range(1, n), k - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, n])]


def _weight(i: int, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(1000 + i)) * 0.02


def _time_passes(fns, repeats: int) -> float:
    """Median seconds per call over passes through all `fns` (the first pass warms up)."""
    t0 = time.perf_counter()
    for f in fns:
        f()
    warm = time.perf_counter() - t0
    if warm > 10:  # a kernel 50x slower than the rest: one more pass says enough
        repeats = 1
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in fns:
            f()
        passes.append((time.perf_counter() - t0) / len(fns))
    return statistics.median(passes)


def _errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = y - ref
    return float(d.abs().max() / ref.abs().max()), float(d.norm() / ref.norm())


def bench_workload(name: str, rows: int, cols: int, n: int, repeats: int, formats) -> list[dict]:
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(1))
    ref32 = [x @ _weight(i, rows, cols).T for i in range(n)]
    out = []
    for fmt in formats:
        ws = [quantise(_weight(i, rows, cols), fmt) for i in range(n)]
        refq = [x @ dequantise(w).T for w in ws]
        for kern in K.candidates(fmt):
            row = {"workload": name, "rows": rows, "cols": cols, "matrices": n, "format": fmt, "kernel": kern.name,
                   "activations": kern.activations, "stored_bytes": ws[0].nbytes}
            try:
                lins = [K.QuantLinear(w, kern) for w in ws]
                ys = [lin(x) for lin in lins]
                row["ms_per_matrix"] = round(_time_passes([lambda lin=lin: lin(x) for lin in lins], repeats) * 1e3, 4)
                row["resident_bytes"] = sum(K.resident_bytes(p) for p in lins[0].prepared[0])
                row["gb_per_s"] = round(row["resident_bytes"] / row["ms_per_matrix"] / 1e6, 2)
                e32 = [_errors(y, r) for y, r in zip(ys, ref32)]
                eq = [_errors(y, r) for y, r in zip(ys, refq)]
                row.update(err_max_vs_fp32=max(e[0] for e in e32), err_l2_vs_fp32=max(e[1] for e in e32),
                           err_max_vs_dequantised=max(e[0] for e in eq), status="ok")
                del lins, ys
            except Exception as e:  # report a kernel this machine cannot run, and go on
                row["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            out.append(row)
            print(_fmt_row(row), flush=True)
        del ws
    return out


def _group_kernels(fmt: str) -> list:
    """The kernels chosen here for both roles, and for int8 the first dynamic one (the per-group question)."""
    ks = [K.choose(fmt, "rows"), K.choose(fmt, "groups")]
    if fmt == "int8":
        ks += [k for k in K.candidates(fmt) if k.per_segment and k.token_by_token][:1]
    return list(dict.fromkeys(ks))


def bench_groups(spec: str, n: int, repeats: int, formats) -> list[dict]:
    name, shape, k = spec.split(":")
    rows, cols = (int(v) for v in shape.split("x"))
    sizes = uneven_sizes(cols, int(k), seed=0) if name.endswith("down") else [cols // int(k)] * int(k)
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(2))
    out = []
    for fmt in formats:
        for kern in _group_kernels(fmt):
            one = [K.QuantLinear(quantise(_weight(i, rows, cols), fmt), kern) for i in range(n)]
            t_one = _time_passes([lambda lin=lin: lin(x) for lin in one], repeats)
            del one
            grouped = [K.QuantLinear(quantise(_weight(i, rows, cols), fmt, sizes), kern) for i in range(n)]
            t_grp = _time_passes([lambda lin=lin: lin(x) for lin in grouped], repeats)
            del grouped
            roles = [r for r in K.ROLES if K.selections()[fmt].get(r) == kern.name]
            row = {"shape": name, "rows": rows, "cols": cols, "groups": len(sizes), "format": fmt,
                   "kernel": kern.name, "chosen_for": roles, "calls_per_matrix": len(sizes) if kern.per_segment else 1,
                   "one_call_ms": round(t_one * 1e3, 4), "per_group_ms": round(t_grp * 1e3, 4),
                   "extra_ms": round((t_grp - t_one) * 1e3, 4), "ratio": round(t_grp / t_one, 3)}
            out.append(row)
            print(f"  {name:14s} {fmt:5s} {kern.name:22s} {row['calls_per_matrix']:3d} calls  one "
                  f"{row['one_call_ms']:8.3f} ms  per group {row['per_group_ms']:8.3f} ms  x{row['ratio']:.2f}"
                  f"  (chosen for {'/'.join(roles) or '-'})", flush=True)
    return out


def _fmt_row(r: dict) -> str:
    head = f"  {r['workload']:7s} {r['format']:5s} {r['kernel']:24s}"
    if r["status"] != "ok":
        return head + f" unavailable: {r['status']}"
    return (head + f" {r['ms_per_matrix']:9.3f} ms  {r['resident_bytes'] / (r['rows'] * r['cols']):5.2f} B/w"
            f"  {r['gb_per_s']:6.2f} GB/s  err vs fp32 {r['err_max_vs_fp32']:.2e} (l2 {r['err_l2_vs_fp32']:.2e})"
            f"  vs dequantised {r['err_max_vs_dequantised']:.2e}")


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        return []
    keep = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "fma", "f16c", "neon", "asimd",
            "asimddp", "i8mm", "bf16", "sve")
    return sorted(set(flags) & set(keep))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrices", type=int, default=24)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--small-rows", type=int, default=576)
    ap.add_argument("--small-cols", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--group-shapes", default=",".join(DEFAULT_GROUP_SHAPES))
    ap.add_argument("-o", "--out", default=str(HERE / "results" / "kernels.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # torch's deprecation notes on quantised tensors, once per kernel
    formats = [f for f in args.formats.split(",") if f]
    load0, t0 = os.getloadavg(), time.time()
    print(f"kernels: 1 thread, {args.matrices} matrices per workload, loadavg {load0[0]:.2f}", flush=True)
    rows = []
    for name, r, c in (("large", args.rows, args.cols), ("small", args.small_rows, args.small_cols)):
        rows += bench_workload(name, r, c, args.matrices, args.repeats, formats)
    print("per-group calls against one call (kernels chosen here per role, and int8's dynamic one):", flush=True)
    groups = [g for spec in args.group_shapes.split(",") if spec
              for g in bench_groups(spec, args.matrices, args.repeats, formats)]
    info = machine()
    info.update(loadavg=[round(v, 2) for v in os.getloadavg()], loadavg_start=[round(v, 2) for v in load0],
                threads=1, quantized_engines=list(torch.backends.quantized.supported_engines),
                cpu_flags=cpu_flags(), arch=os.uname().machine)
    result = {"benchmark": "kernels", "machine": info, "wall_s": round(time.time() - t0, 1),
              "config": vars(args), "kernels": rows, "per_group": groups,
              "chosen": K.selections(), "selections": [asdict(s) for s in K.selection_details()]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"chosen here: {result['chosen']}; loadavg {load0[0]:.2f} -> {info['loadavg'][0]:.2f}; "
          f"{result['wall_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
