"""What each delivery-policy lever costs and saves: fast re-requests and redundant copies.

Runs `halo-run local` (loopback, in-process loss shim) on a plan at one loss rate with
relaxed_retries in {0, 1} and redundancy in {1, 2}, and records per-token bytes, TPOT and the
share of relaxed parts that missed their deadline (compensated).

Example:
    $ .venv/bin/python -m benchmarks.delivery --plan artifacts/smollm2-135m-pi5 --plr 0.05 \\
        --out benchmarks/results/delivery.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.benchcommon import machine

PROMPT = "The history of the Roman Empire begins"


def run(plan: str, plr: float, retries: int, redundancy: int, tokens: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "halo_runtime.cli", "local", "--plan", plan, "--prompt", PROMPT,
           "--max-tokens", str(tokens), "--ignore-eos", "--plr", str(plr), "--relaxed-retries", str(retries),
           "--redundancy", str(redundancy), "--seed", str(seed), "--json", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(out.stdout)
    ex, n = r["exchange"], len(r["tokens"])
    return {"plr": plr, "relaxed_retries": retries, "redundancy": redundancy, "tokens": n,
            "tpot_ms": r["tpot_ms"], "compensated_share": r["compensated_share"],
            "kb_per_token": round((ex["bytes_sent"] + ex["bytes_received"]) / 1024 / n, 2),
            "retransmissions_per_token": round(ex["retransmissions"] / n, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", required=True)
    ap.add_argument("--plr", type=float, default=0.05)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    runs = []
    for retries in (0, 1):
        for redundancy in (1, 2):
            r = run(args.plan, args.plr, retries, redundancy, args.tokens, args.seed)
            print(json.dumps(r), flush=True)
            runs.append(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": {**machine(), "load_avg": os.getloadavg()}, "runs": runs}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
