"""Merge `halo-compile eval --json` reports into benchmarks/results/accuracy.json, plot docs/accuracy.png,
and print the Markdown table of docs/ACCURACY.md.

The eval runs are split by loss rate so that they can run side by side (one torch thread each):

    $ halo-compile eval artifacts/smollm2-135m-pi5 --tokens 20480 --plr 0 --plr 0.01 --plr 0.02 --json > a.json
    $ halo-compile eval artifacts/smollm2-135m-pi5 --tokens 20480 --plr 0.05 --plr 0.1 --json > b.json
    $ halo-compile eval artifacts/smollm2-135m-pi5 --tokens 4096 --plr 0.2 --plr 0.3 --json > stress.json
    $ python benchmarks/accuracy.py a.json b.json --stress stress.json   # needs matplotlib (`make install`)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STYLE = {"predictor+lowrank": ("C0", "o", "-"), "predictor": ("C1", "s", "-"), "lowrank": ("C2", "^", "--"),
         "mean": ("C3", "v", "--"), "zero": ("C7", "x", ":"), "loss-blind": ("C4", "d", "-.")}


def merge(paths: list[str]) -> dict:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    for r in reports[1:]:
        for key in ("full_ppl", "tokens", "context", "seed", "policy", "default_method"):
            if r[key] != first[key]:
                raise SystemExit(f"reports disagree on {key}: {first[key]} vs {r[key]}")
    merged = {k: v for k, v in first.items() if k != "results"}
    merged["results"] = sorted((x for r in reports for x in r["results"]), key=lambda x: x["plr"])
    return merged


def table(report: dict) -> str:
    methods = list(dict.fromkeys(x["method"] for x in report["results"]))
    rows = ["| PLR | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    by = {(x["plr"], x["method"]): x for x in report["results"]}
    for plr in sorted({x["plr"] for x in report["results"]}):
        cells = []
        for m in methods:
            x = by.get((plr, m))
            cells.append("—" if x is None else f"{x['ppl']:.3f} ({100 * x['delta']:+.2f}%)")
        rows.append(f"| {100 * plr:g}% | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    full = report["full_ppl"]
    for method in dict.fromkeys(x["method"] for x in report["results"]):
        pts = sorted((100 * x["plr"], 100 * x["delta"]) for x in report["results"] if x["method"] == method)
        color, marker, line = STYLE.get(method, ("k", ".", "-"))
        label = method + (" (default)" if method == report["default_method"] else "")
        ax.plot(*zip(*pts), color=color, marker=marker, linestyle=line, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(3.0, color="grey", lw=0.8, ls=":")
    ax.text(0.2, 1.05, "target at 5%: +1%", color="grey", fontsize=8)
    ax.text(0.2, 3.05, "target at 10%: +3%", color="grey", fontsize=8)
    ax.set_xlabel("packet loss rate on the lossy links (%)")
    ax.set_ylabel(f"perplexity change vs full model (%)\nfull model: {full:.3f}")
    ax.set_title(f"{Path(report['plan']).name}: {report['tokens']} evaluation tokens, context {report['context']}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="halo-compile eval --json outputs")
    ap.add_argument("--stress", action="append", default=[],
                    help="reports at higher loss (other token counts), kept under 'stress', not plotted")
    ap.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "accuracy.json"))
    ap.add_argument("--plot-out", default=str(ROOT / "docs" / "accuracy.png"))
    args = ap.parse_args()
    report = merge(args.reports)
    if args.stress:
        report["stress"] = merge(args.stress)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    plot(report, Path(args.plot_out))
    print(table(report))
    if args.stress:
        print(f"\nstress ({report['stress']['tokens']} tokens):\n" + table(report["stress"]))


if __name__ == "__main__":
    main()
