"""Star against push rounds on compiled plans: what the cost model predicts, what a run measures.

For each plan: the compiler's choice (`Plan.rounds`, `Plan.star_rounds`) and its cost model's
network time a token in star, push and mixed rounds (`halo_compile.roundcost.plan_network_ms`),
then `halo-run local` in each kind, alternating: star (`--rounds star`), push (every round pushes:
a copy of the plan without star rounds, `--rounds push`) and, for a plan with star rounds among its
push rounds, mixed (the plan's own, `--rounds push`); every datagram delayed `--delay-ms` one way by
the in-process shim (device to device as coordinator to device: one hop is one delay, as the
cost model's links of `--delay-ms`), at each `--plr`. Recorded per run: TPOT p50, time to first
token, the tokens, the coordinator's compensated share and each worker view's own estimates; the
JSON says whether every kind gave the same tokens.

    python -m benchmarks.rounds_choice --plan out/pi5-2ms --plan out/pi5-tight-2ms [--reps 2]

Example:
    >>> from benchmarks.rounds_choice import KINDS
    >>> KINDS
    ('star', 'push', 'mixed')
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks.benchcommon import machine

HERE = Path(__file__).resolve().parent
KINDS = ("star", "push", "mixed")
PROMPT = "The history of the Roman Empire"


def pushing_every_round(plan_dir: str, into: Path) -> str:
    """A copy of the plan directory whose plan pushes every round (no star rounds): links to its
    files, its own plan.json and manifest."""
    from halo_runtime.core.plan import load_plan
    from halo_runtime.core.plandir import MANIFEST_FILE, PLAN_FILE, manifest_text

    src = Path(plan_dir).resolve()
    for f in src.iterdir():
        if f.name not in (PLAN_FILE, MANIFEST_FILE):
            (into / f.name).symlink_to(f)
    (into / PLAN_FILE).write_text(replace(load_plan(src), rounds="push", star_rounds=()).to_json())
    listed = [name for name in json.loads((src / MANIFEST_FILE).read_text())["files"]]
    (into / MANIFEST_FILE).write_text(manifest_text(into, listed))
    return str(into)


def run(plan: str, kind: str, plr: float, delay_ms: float, jitter_ms: float, tokens: int,
        pure_push: str | None = None) -> dict:
    """One `halo-run local` run of `kind` (relaxed, no drafts, fp16 wire): its JSON, abridged."""
    plan, rounds = (pure_push or plan, "push") if kind == "push" else (plan, "push" if kind == "mixed" else "star")
    cmd = [sys.executable, "-m", "halo_runtime.cli", "local", "--plan", plan, "--rounds", rounds, "--plr", str(plr),
           "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms), "--max-tokens", str(tokens), "--ignore-eos",
           "--draft", "none", "--json", "--quiet", "--prompt", PROMPT]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"rounds": kind, "plr": plr, "tpot_p50_ms": out["tpot_ms"]["p50"], "ttft_ms": out["ttft_ms"],
            "tokens": out["tokens"], "compensated_share": out["compensated_share"],
            # parts a worker's own view estimated (push rounds): where its residual left the coordinator's
            "view_compensated": {d: s.get("view_compensated", 0) for d, s in out.get("devices", {}).items()},
            "load": os.getloadavg()[0]}


def measure(plan: str, plrs: list[float], reps: int, delay_ms: float, jitter_ms: float, tokens: int) -> dict:
    from halo_compile.roundcost import plan_network_ms
    from halo_runtime.core.plan import load_plan

    p = load_plan(plan)
    net, _ = plan_network_ms(p)
    kinds = KINDS if p.star_rounds else KINDS[:2]
    with tempfile.TemporaryDirectory() as tmp:
        pure = pushing_every_round(plan, Path(tmp)) if p.star_rounds else None
        runs = [run(plan, kind, plr, delay_ms, jitter_ms, tokens, pure)
                for _ in range(reps) for plr in plrs for kind in kinds]
    summary = {}
    for plr in plrs:
        by_kind = {k: sorted(r["tpot_p50_ms"] for r in runs if r["plr"] == plr and r["rounds"] == k) for k in kinds}
        summary[str(plr)] = {f"{k}_tpot_p50_ms": v for k, v in by_kind.items()}
        summary[str(plr)]["same_tokens"] = len({tuple(r["tokens"]) for r in runs if r["plr"] == plr}) == 1
    return {"plan": plan, "profile": p.profile_name, "chosen": p.rounds, "star_rounds": list(p.star_rounds),
            "network_rounds": len(p.network_rounds()),
            "model_network_ms": {k: round(v, 2) for k, v in net.items()}, "summary": summary, "runs": runs}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels, x, seen = [], 0, set()
    for entry in doc["plans"]:
        for plr, s in entry["summary"].items():
            for i, kind in enumerate(KINDS):
                ys = s.get(f"{kind}_tpot_p50_ms", [])
                ax.scatter([x + (i - 1) * 0.25] * len(ys), ys, color=("tab:blue", "tab:orange", "tab:green")[i],
                           label=kind if kind not in seen else None)
                seen.update([kind] if ys else [])
            labels.append(f"{entry['profile']}\nplr {plr}\n(plan: {entry['chosen']}"
                          + (f", {len(entry['star_rounds'])} star)" if entry["star_rounds"] else ")"))
            x += 1
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("TPOT p50, ms")
    ax.set_ylim(bottom=0)
    ax.set_title(f"star, push and mixed rounds, {doc['delay_ms']} ms one way (local shim)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", action="append", required=True, help="compiled plan directory (repeatable)")
    p.add_argument("--plr", type=float, action="append", help="loss on the plan's lossy links (default 0 and 0.05)")
    p.add_argument("--delay-ms", type=float, default=2.0)
    p.add_argument("--jitter-ms", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "rounds_choice.json"))
    a = p.parse_args(argv)
    doc = {"machine": machine(), "delay_ms": a.delay_ms, "jitter_ms": a.jitter_ms, "tokens": a.tokens,
           "load_before": os.getloadavg(), "plans": []}
    for plan in a.plan:
        doc["plans"].append(measure(plan, a.plr or [0.0, 0.05], a.reps, a.delay_ms, a.jitter_ms, a.tokens))
        entry = doc["plans"][-1]
        print(f"{entry['profile']}: plan {entry['chosen']}, model {entry['model_network_ms']}, "
              f"measured {entry['summary']}", file=sys.stderr)
    doc["load_after"] = os.getloadavg()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
