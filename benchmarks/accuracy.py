"""Merge `halo-compile eval --json` reports into benchmarks/results/accuracy.json, plot docs/accuracy.png,
and print the Markdown table of docs/ACCURACY.md.

The eval runs are split by loss rate so that they can run side by side (one torch thread each):

    $ halo-compile eval artifacts/smollm2-135m-pi5 --tokens 20480 --plr 0 --plr 0.01 --plr 0.02 --json > a.json
    $ halo-compile eval artifacts/smollm2-135m-pi5 --tokens 20480 --plr 0.05 --plr 0.1 --json > b.json
    $ halo-compile eval artifacts/smollm2-135m-pi5 --tokens 4096 --plr 0.2 --plr 0.3 --json > stress.json
    $ python -m benchmarks.accuracy a.json b.json --stress stress.json   # needs matplotlib (`make install`)
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


def _panel(ax, report: dict, title: str) -> None:
    for method in dict.fromkeys(x["method"] for x in report["results"]):
        pts = sorted((100 * x["plr"], 100 * x["delta"], 100 * (x.get("delta_se") or 0.0))
                     for x in report["results"] if x["method"] == method)
        if pts[0][0] > 0:
            pts.insert(0, (0.0, 0.0, 0.0))  # nothing is missed at zero loss
        color, marker, line = STYLE.get(method, ("k", ".", "-"))
        label = method + (" (default)" if method == report["default_method"] else "")
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, color=color, marker=marker, linestyle=line, label=label, capsize=2, ms=4)
    ax.set_xlabel("packet loss rate on the lossy links (%)")
    ax.set_title(f"{title}: {report['tokens']} tokens, full-model ppl {report['full_ppl']:.2f}", fontsize=9)
    ax.grid(alpha=0.3)


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stress = report.get("stress")
    fig, axes = plt.subplots(1, 2 if stress else 1, figsize=(11 if stress else 6.5, 4.2), dpi=110, squeeze=False)
    _panel(axes[0][0], report, "targets: +1% at 5%, +3% at 10%")
    axes[0][0].set_ylabel("perplexity change vs full model (%)\n(error bars: one standard error)")
    axes[0][0].legend(fontsize=8)
    if stress:
        _panel(axes[0][1], stress, "stress")
        axes[0][1].axhline(3.0, color="grey", lw=0.8, ls=":")
    fig.suptitle("SmolLM2-135M on profiles/pi5.yaml, simulated with the runtime's delivery policy", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="halo-compile eval --json outputs")
    ap.add_argument("--stress", action="append", default=[],
                    help="reports at higher loss (other token counts), kept under 'stress', not plotted")
    ap.add_argument("--label", help="what the plan was, recorded instead of its directory")
    ap.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "accuracy.json"))
    ap.add_argument("--plot-out", default=str(ROOT / "docs" / "accuracy.png"))
    args = ap.parse_args()
    report = merge(args.reports)
    if args.stress:
        report["stress"] = merge(args.stress)
    if args.label:
        for r in (report, report.get("stress") or {}):
            r["plan"] = args.label
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    plot(report, Path(args.plot_out))
    print(table(report))
    if args.stress:
        print(f"\nstress ({report['stress']['tokens']} tokens):\n" + table(report["stress"]))


if __name__ == "__main__":
    main()
