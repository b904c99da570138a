"""What a pass of T rows costs on one device, and whether a row's bits depend on its pass.

A random-weight model (S shape by default: hidden 512, 30 layers, 8/4 heads, FFN 1536, vocab
49152, untied; 145M) in one `LocalModel`, as a one-device plan runs it: prefill of 32, 128 and 512
tokens, one-token decoding, and 5-row passes (a draft of 4 being verified), per thread count.
It also feeds 80 tokens once token by token and once as passes of 70 + 5 + 5 rows and reports
whether the logits are the same bits (`rows_exact`). Run it once per ggml build to see what
llamafile's tiled GEMM buys and costs (a build with it: `CMAKE_ARGS=-DGGML_LLAMAFILE=ON pip install
--no-cache-dir --no-deps --target DIR ggml-python`, then `PYTHONPATH=DIR python -m benchmarks.passes`).

    python -m benchmarks.passes -o benchmarks/results/passes_S.json       # ~2 min on 2 cores
    python -m benchmarks.passes --plot out.png A.json B.json              # runs side by side

Example:
    >>> from benchmarks.passes import SHAPES
    >>> SHAPES["S"].hidden_size, SHAPES["S"].num_layers
    (512, 30)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from halo_runtime.core.config import ModelConfig
from halo_runtime.core.formats import quantise
from halo_runtime.core.segment import LocalModel
from halo_runtime.core.shards import shard_name

from benchmarks.benchcommon import machine

SHAPES = {"S": ModelConfig(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_layers=30,
                           num_heads=8, num_kv_heads=4, head_dim=64, tie_word_embeddings=False)}
"""Model shapes measured (issue 22's S)."""
PREFILLS = (32, 128, 512)


def random_shard(cfg: ModelConfig, fmt: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A random LLaMA under shard names, its matrices stored in `fmt`."""
    rng = np.random.default_rng(seed)
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def matrix(rows: int, cols: int, scale: float) -> np.ndarray:
        return quantise((rng.standard_normal((rows, cols)) * scale).astype(np.float32), fmt)

    shard = {"embed_tokens": matrix(cfg.vocab_size, h, 1.0), "lm_head": matrix(cfg.vocab_size, h, 0.05),
             "norm": np.ones(h, np.float32)}
    for layer in range(cfg.num_layers):
        for proj, (rows, cols) in shapes.items():
            shard[shard_name(layer, proj)] = matrix(rows, cols, 0.05)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shard[f"layers.{layer}.{norm}"] = np.ones(h, np.float32)
    return shard


def _time(fn, repeat: int) -> float:
    """Median seconds of fn() over `repeat` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(cfg: ModelConfig, fmt: str, threads: int, repeat: int) -> dict:
    shard = random_shard(cfg, fmt)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 600).tolist()
    model = LocalModel(cfg, shard, fmt, capacity=1024, threads=threads)
    out = {f"prefill_{n}_ms": round(1e3 * _time(lambda n=n: model.logits(tokens[:n], 0), repeat), 2)
           for n in PREFILLS}
    model.logits(tokens[:100], 0)
    out["decode_ms"] = round(1e3 * _time(lambda: model.logits([tokens[100]], 100), 5 * repeat), 2)
    out["verify_5_rows_ms"] = round(1e3 * _time(lambda: model.logits(tokens[100:105], 100, True), 5 * repeat), 2)
    by_token = np.stack([model.logits([t], p) for p, t in enumerate(tokens[:80])])
    by_pass = np.concatenate([model.logits(tokens[a:b], a, all_positions=True) for a, b in ((0, 70), (70, 75), (75, 80))])
    out["rows_exact"] = bool(np.array_equal(by_token, by_pass))
    out["max_abs_diff"] = float(np.abs(by_token - by_pass).max())
    model.dev.close()
    return out


PHASES = ("prefill_32_ms", "prefill_128_ms", "prefill_512_ms", "decode_ms", "verify_5_rows_ms")


def plot(reports: list[Path], png: Path) -> None:
    """Each phase's time per (format, threads), one bar per report (labelled by its ggml build)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [json.loads(p.read_text()) for p in reports]
    fig, axes = plt.subplots(1, len(PHASES), figsize=(4 * len(PHASES), 3.6))
    for ax, phase in zip(axes, PHASES):
        for k, rep in enumerate(data):
            label = f"{reports[k].stem} ({'llamafile' if rep['llamafile'] else 'ggml only'})"
            xs = [i + k * 0.8 / len(data) for i in range(len(rep["runs"]))]
            ax.bar(xs, [r[phase] for r in rep["runs"]], width=0.8 / len(data), label=label)
        ax.set_xticks(range(len(data[0]["runs"])), [f"{r['format']}\n{r['threads']} thr" for r in data[0]["runs"]])
        ax.set_title(phase.removesuffix("_ms").replace("_", " ") + " (ms)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> None:
    import ggml.ggml as G

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="S")
    ap.add_argument("--formats", default="q8_0,q4_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("-o", "--out", default=None, help="JSON file to write (default: print only)")
    ap.add_argument("--plot", metavar="PNG", help="plot the JSON reports given as arguments instead of measuring")
    ap.add_argument("reports", nargs="*", type=Path)
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.reports, Path(args.plot))
        return
    cfg = SHAPES[args.shape]
    runs = []
    for fmt in args.formats.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            r = {"format": fmt, "threads": threads, **measure(cfg, fmt, threads, args.repeat)}
            print(json.dumps(r), flush=True)
            runs.append(r)
    report = {"shape": args.shape, "llamafile": bool(G.ggml_cpu_has_llamafile()), "machine": machine(), "runs": runs}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
