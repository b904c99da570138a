"""Failover in the lab: how long a dead board costs, from its death to the next token.

One namespace per plan device (`labbench.Bench`: the plan's lossy boards at --plr, every link at
--delay-ms); `halo-run worker` in each remote namespace and `halo-run generate --json` in the
coordinator's. Once the coordinator has printed token k, the benchmark makes `--device` die, so
that the pass of token k + 1 runs into it with k + prompt tokens of history (the KV cache the
survivors rebuild):

- kill: SIGKILL (its process crashes; its kernel still answers: TCP sees the connection reset);
- stop: SIGSTOP (it hangs, or its power is cut: nothing answers and nothing says so, so both syncs
  wait `--dead-after`).

Recorded per run: the time from the death to the next token line (measured here), the switch the
coordinator reports (hand-over and KV rebuild, `failovers[].switch_ms`), the interrupted token's
time, TPOT before and after, and whether the tokens equal a run without the death (same plan,
same lab; meaningful at 0% loss or in strict sync: under loss, relaxed sync compensates whatever
misses its deadline, which differs run to run). The bound the issue sets: death to next token
< 2 x dead_after + the switch. Strict sync under loss needs a `--dead-after` above its TCP stalls
(5% loss stalls a prefill for seconds: 2 s declares healthy boards dead), so run it at --plr 0.

Example (as root; `make install` builds the lab's NetfilterQueue):
    $ sudo .venv/bin/python -m benchmarks.failover --syncs relaxed --plr 0.05 --out benchmarks/results/failover_relaxed.json
    $ sudo .venv/bin/python -m benchmarks.failover --syncs strict --plr 0 --out benchmarks/results/failover_strict.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.benchcommon import CpuMeter, machine, percentiles
from benchmarks.labbench import WORKER_PORT, Bench
from halo_runtime.core.policy import DeliveryPolicy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "The history of the Raspberry Pi begins"
AFTER = 8
"""Tokens generated after the failover (TPOT after it)."""


def _token_line(line: str) -> int | None:
    m = re.search(r"token\s+(\d+)\s", line)
    return int(m.group(1)) if m else None


def run_once(bench: Bench, sync: str, tokens: int, kill_after: int | None, how: str, dead: str, dead_after: float,
             timeout_s: float) -> dict:
    """One generation of `tokens`; `dead` dies once token `kill_after` is out (None: nobody dies)."""
    workers = bench.start_workers()
    peers = [a for d in bench.remote for a in ("--peer", f"{d}={bench.lab.addr(d)}:{WORKER_PORT}")]
    argv = [sys.executable, "-m", "halo_runtime.cli", "generate", "--plan", bench.plan_dir, "--prompt", PROMPT,
            "--max-tokens", str(tokens), "--ignore-eos", "--json", "--sync", sync, "--draft", "none",
            "--dead-after", str(dead_after), *peers]
    died_at = next_at = None
    try:
        with CpuMeter() as cpu:
            proc = subprocess.Popen(bench.lab.cmd(bench.coord, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=bench.env)
            deadline = time.monotonic() + timeout_s
            err = []
            while True:
                ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    proc.kill()
                    raise TimeoutError(f"{sync}: no output for {timeout_s} s")
                line = proc.stderr.readline()
                if not line:
                    break
                err.append(line)
                k = _token_line(line)
                if kill_after is not None and k == kill_after and died_at is None:
                    workers[dead].send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
                    died_at = time.monotonic()
                elif died_at is not None and k == kill_after + 1 and next_at is None:
                    next_at = time.monotonic()
            out = proc.stdout.read()
            rc = proc.wait()
        if rc:
            raise RuntimeError(f"{sync} generate failed ({rc}): {''.join(err)[-1500:]}")
    finally:
        if died_at is not None and how == "stop":
            workers[dead].send_signal(signal.SIGKILL)  # a stopped process ignores SIGTERM until continued
        bench.stop(workers)
    res = json.loads(out.strip().splitlines()[-1])
    times = [t["total_ms"] for t in res["per_token"]]
    row = {"sync": sync, "how": how if kill_after is not None else "none", "tokens": res["tokens"],
           "prompt_tokens": res["prompt_tokens"], "failovers": res["failovers"], "cpu": cpu.result}
    if kill_after is not None:
        row.update(kill_after=kill_after, history=res["prompt_tokens"] + kill_after,
                   death_to_next_token_ms=round(1e3 * (next_at - died_at), 1) if next_at else None,
                   interrupted_token_ms=times[kill_after + 1],
                   tpot_before_ms=percentiles(times[1:kill_after + 1])["p50"],
                   tpot_after_ms=percentiles(times[kill_after + 2:])["p50"])
    else:
        row["tpot_ms"] = percentiles(times[1:])["p50"]
    return row


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in doc["runs"] if r["how"] != "none"]
    labels = [f"{r['sync']}\n{r['how']}\n{r['history']} tok" for r in runs]
    detect = [r["death_to_next_token_ms"] - r["failovers"][0]["switch_ms"] if r["failovers"] else 0 for r in runs]
    switch = [r["failovers"][0]["switch_ms"] if r["failovers"] else 0 for r in runs]
    fig, ax = plt.subplots(figsize=(max(6, len(runs) * 1.1), 4))
    ax.bar(labels, detect, label="noticing it, the pass run again")
    ax.bar(labels, switch, bottom=detect, label="switch: hand-over, KV rebuild")
    ax.axhline(2e3 * doc["dead_after_s"], color="k", ls="--", lw=1, label="2 x dead_after")
    ax.set_ylabel("death to next token, ms")
    ax.set_title(f"failover of {doc['device']} ({Path(doc['plan']).name}, {doc['plr']:.0%} loss, {doc['delay_ms']} ms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default=str(ROOT / "artifacts" / "smollm2-135m-pi5"))
    ap.add_argument("--device", default="pi5-1", help="the board that dies (it must have a failover in the plan)")
    ap.add_argument("--history", default="16,128", help="comma-separated tokens of history at the death")
    ap.add_argument("--syncs", default="relaxed,strict")
    ap.add_argument("--how", default="kill,stop", help="kill (SIGKILL) and/or stop (SIGSTOP: a hang or power cut)")
    ap.add_argument("--dead-after", type=float, default=DeliveryPolicy().dead_after_s,
                    help="seconds of silence that declare a device dead (default: halo-run's, %(default)g)")
    ap.add_argument("--plr", type=float, default=0.05, help="loss on the plan's lossy boards")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--timeout-s", type=float, default=300)
    ap.add_argument("--out", default=str(HERE / "results" / "failover.json"))
    ap.add_argument("--prefix", default="halofail")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("failover: the lab needs root (sudo)", file=sys.stderr)
        return 2
    bench = Bench(args.plan, args.delay_ms, 0.0, args.prefix, verbose=False)
    if bench.plan.failover_for(args.device) is None or not bench.plan.failover_for(args.device).absorbable:
        print(f"failover: the plan has no failover for {args.device}", file=sys.stderr)
        return 2
    doc = {"plan": args.plan, "device": args.device, "dead_after_s": args.dead_after, "plr": args.plr,
           "delay_ms": args.delay_ms, "machine": machine(), "load_before": os.getloadavg(), "runs": []}
    with bench:
        bench.set_conditions(args.plr, args.delay_ms, 0.0)
        for sync in args.syncs.split(","):
            histories = [int(h) for h in args.history.split(",")]
            baseline = run_once(bench, sync, max(histories) + AFTER, None, "none", args.device, args.dead_after,
                                args.timeout_s)
            doc["runs"].append(baseline)
            print(f"{sync}: no death, TPOT p50 {baseline['tpot_ms']} ms", file=sys.stderr)
            for how in args.how.split(","):
                for history in histories:
                    k = history - baseline["prompt_tokens"]
                    row = run_once(bench, sync, k + 1 + AFTER, k, how, args.device, args.dead_after, args.timeout_s)
                    row["same_tokens"] = row["tokens"] == baseline["tokens"][:len(row["tokens"])]
                    doc["runs"].append(row)
                    f = row["failovers"][0] if row["failovers"] else {}
                    print(f"{sync} {how} at {row['history']} tokens: death to next token "
                          f"{row['death_to_next_token_ms']} ms (switch {f.get('switch_ms')} ms), TPOT "
                          f"{row['tpot_before_ms']} -> {row['tpot_after_ms']} ms, same tokens {row['same_tokens']}",
                          file=sys.stderr)
    doc["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
