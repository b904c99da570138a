"""Matrix times vector, per weight format, through ggml (what devices run) and through torch (the
old runtime's products, for comparison), measured on this machine.

`--matrices` distinct matrices (8 of 8192x2048 by default) times one vector, cycled so that nothing
stays in cache, as decode sees it. Per (engine, format, threads): time per matrix (median over
passes) and the relative error of the output against fp32 (the format's rounding, and ggml's
8-bit rounding of the input for the block formats). torch runs fp32 `F.linear` and, for
reference, fbgemm's dynamic int8 (which quantises its input too). Writes JSON and prints a table.

    python -m benchmarks.matvec                              # ~2 min on a quiet 2-core machine
    python -m benchmarks.matvec --matrices 2 --rows 256 --cols 512 --threads 1 -o /tmp/m.json

Example:
    >>> from benchmarks.matvec import ENGINES
    >>> [e for e, _ in ENGINES][:3]
    ['ggml', 'ggml', 'ggml']
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.benchcommon import machine

HERE = Path(__file__).resolve().parent
ENGINES = [("ggml", "fp32"), ("ggml", "bf16"), ("ggml", "q8_0"), ("ggml", "q4_0"),
           ("torch", "fp32"), ("torch", "dynamic-int8")]
"""(engine, format) measured."""


def _ggml(weights: list[np.ndarray], fmt: str, x: np.ndarray, threads: int):
    """(time per matrix in seconds over passes, outputs) through one ggml graph per matrix."""
    import ggml.ggml as G
    from halo_runtime.core.formats import FORMATS, quantise
    from halo_runtime.core.ggmlops import Arena, Graph, new_input

    arena = Arena()
    stored = [quantise(w, fmt) for w in weights]
    tensors = [arena.matrix(s, FORMATS[fmt], w.shape[1]) for s, w in zip(stored, weights)]
    graphs = []
    for t in tensors:
        def build(ctx, t=t):
            xin = new_input(ctx, G.GGML_TYPE_F32, 1, x.shape[1])
            return {"x": xin}, {"y": G.ggml_mul_mat(ctx, t, xin)}
        g = Graph(build)
        g.inputs["x"][:] = x
        graphs.append(g)
    outs = []
    for g in graphs:
        g.compute(threads)
        outs.append(g.outputs["y"].copy())

    def one_pass():
        for g in graphs:
            g.compute(threads)
    return one_pass, outs, (arena, graphs, stored)


def _torch(weights: list[np.ndarray], fmt: str, x: np.ndarray, threads: int):
    import torch

    torch.set_num_threads(threads)
    xt = torch.from_numpy(x)
    if fmt == "fp32":
        ws = [torch.from_numpy(w) for w in weights]
        run = lambda w: torch.nn.functional.linear(xt, w)  # noqa: E731
    else:
        ws = []
        for w in weights:
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = torch.from_numpy(w)
            ws.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                             dtype=torch.qint8))
        run = lambda m: m(xt)  # noqa: E731
    outs = [run(w).detach().numpy() for w in ws]

    def one_pass():
        with torch.no_grad():
            for w in ws:
                run(w)
    return one_pass, outs, ws


def measure(args) -> list[dict]:
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32) for _ in range(args.matrices)]
    x = rng.standard_normal((1, args.cols)).astype(np.float32)
    ref = [x @ w.T for w in weights]
    rows = []
    for engine, fmt in ENGINES:
        for threads in args.threads:
            make = _ggml if engine == "ggml" else _torch
            one_pass, outs, keep = make(weights, fmt, x, threads)
            one_pass()  # warm
            times = []
            for _ in range(args.passes):
                t0 = time.perf_counter()
                one_pass()
                times.append((time.perf_counter() - t0) / len(weights))
            err = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outs, ref))
            rows.append({"engine": engine, "format": fmt, "threads": threads,
                         "ms_per_matrix": round(1e3 * statistics.median(times), 4), "rel_error": float(f"{err:.3g}")})
            print(f"{engine:6} {fmt:13} {threads} thread(s): {rows[-1]['ms_per_matrix']:8.3f} ms per matrix, "
                  f"error {rows[-1]['rel_error']:.2g}", file=sys.stderr, flush=True)
            del keep
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrices", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2])
    ap.add_argument("-o", "--out", default=str(HERE / "results" / "matvec.json"))
    args = ap.parse_args(argv)
    rows = measure(args)
    Path(args.out).write_text(json.dumps({"machine": machine(), "shape": [args.rows, args.cols],
                                          "matrices": args.matrices, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
