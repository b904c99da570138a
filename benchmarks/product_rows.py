"""What a product of T rows costs when the weights stream from memory, per format and ggml build:
whether llamafile's tiled GEMM would pay for batch-exact passes on this CPU.

Why it matters: a row's bits must not depend on its pass (`halo_runtime.core.compute`), so every
product of a pass, 1 row or 17, must sum in one order. ggml's dot products (the only kernel of a
build without llamafile, and the kernel of 1-row products in a build with it) cost about T times one
row for T rows; llamafile's tiled kernels share each weight they load among the rows, but take only
passes of 2+ rows. Padding 1-row decode onto them would make every pass exact *and* batches cheap,
if a 2-row tiled product cost what a 1-row dot product does. This measures exactly that: `--copies`
distinct [rows x cols] matrices (more than the caches hold, as a decode pass sees a model), each
times T rows, in one graph, median over `--passes`. Run it once per build and compare the JSONs
(a second build: `CMAKE_ARGS=-DGGML_LLAMAFILE=ON pip install --no-cache-dir --no-deps --target DIR
ggml-python`, then `PYTHONPATH=DIR python -m benchmarks.product_rows`). fp32 products go through
`halo_runtime.core.f32rows` where it is built (`HALO_F32_ROWS=0`: ggml's dot products, to compare).

    python -m benchmarks.product_rows -o benchmarks/results/product_rows_off.json   # ~1 min
    python -m benchmarks.product_rows --plot out.png A.json B.json

Example:
    >>> from benchmarks.product_rows import ROWS
    >>> ROWS
    (1, 2, 4, 8, 16)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.benchcommon import machine

ROWS = (1, 2, 4, 8, 16)
"""Rows per product measured (decode, a padded decode, drafts and batches)."""


def measure(fmt: str, rows: int, cols: int, copies: int, passes: int, threads: int) -> dict:
    """{T: median ms of one graph multiplying T rows by every copy} for one format."""
    import ggml.ggml as G
    from halo_runtime.core.formats import FORMATS, quantise
    from halo_runtime.core.ggmlops import Arena, Graph, mul_mat, new_input

    rng = np.random.default_rng(0)
    stored = quantise((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), fmt)
    arena = Arena(capacity=copies + 8)
    weights = [arena.matrix(stored.copy(), FORMATS[fmt], cols) for _ in range(copies)]
    out = {}
    for T in ROWS:
        def build(ctx, T=T):
            x = new_input(ctx, G.GGML_TYPE_F32, T, cols)
            return {"x": x}, {f"y{i}": mul_mat(ctx, w, x) for i, w in enumerate(weights)}

        graph = Graph(build, 2 * copies + 8)
        graph.inputs["x"][:] = rng.standard_normal(graph.inputs["x"].shape)
        graph.compute(threads)
        times = []
        for _ in range(passes):
            t = time.perf_counter()
            graph.compute(threads)
            times.append(time.perf_counter() - t)
        out[T] = round(1e3 * statistics.median(times), 3)
        graph.close()
    arena.close()
    return out


def plot(reports: list[Path], png: Path) -> None:
    """Time per pass against rows per product, one line per (report, format)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for path in reports:
        rep = json.loads(path.read_text())
        build = "llamafile" if rep["llamafile"] else "dot products"
        for fmt, by_rows in rep["ms"].items():
            kernel = "f32rows" if fmt == "fp32" and rep.get("f32_rows", "").startswith("halo") else build
            ax.plot(ROWS, [by_rows[str(t)] for t in ROWS], marker="o", label=f"{fmt}, {kernel}")
    ax.set_xlabel("rows per product")
    ax.set_ylabel(f"ms per pass over {rep['copies']} matrices")
    ax.set_xticks(ROWS)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="fp32,q8_0,q4_0")
    ap.add_argument("--rows", type=int, default=1536, help="rows of each matrix (S's gate/up: 1536)")
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--copies", type=int, default=150, help="distinct matrices (their bytes should exceed the caches)")
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", type=Path, default=None, help="JSON to write (and a plot beside it)")
    ap.add_argument("--plot", metavar="PNG", type=Path, help="plot the JSON reports given instead of measuring")
    ap.add_argument("reports", nargs="*", type=Path)
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.reports, args.plot)
        return 0
    import ggml.ggml as G
    from halo_runtime.core.f32rows import library

    report = {"llamafile": bool(G.ggml_cpu_has_llamafile()), "f32_rows": library()[1], "machine": machine(),
              "rows": args.rows,
              "cols": args.cols, "copies": args.copies, "threads": args.threads, "ms": {}}
    for fmt in args.formats.split(","):
        report["ms"][fmt] = measure(fmt, args.rows, args.cols, args.copies, args.passes, args.threads)
        print(fmt, report["ms"][fmt], flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        plot([args.out], args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
