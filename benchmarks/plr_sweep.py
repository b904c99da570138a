"""The packet-loss benchmark: HALO relaxed synchronisation vs strict TCP vs gloo all-reduce, in the lab.

One device namespace per plan device (`netlab.Lab`), `halo-run worker` in each remote one and the
coordinator in its own; the plan's lossy devices (loss > 0 in plan.json) get the swept packet loss
on every link to and from them, every link gets the swept one-way delay (with jitter when the delay
is not 0), and each device's port gets its profile bandwidth (tbf). For every delay, loss rate and
repetition the modes run back to back with the same prompt and token count:

- relaxed: `halo-run generate --sync relaxed --draft none --rounds star` (UDP, deadlines,
  compensation, the copies the plan chose for each link; every star mode names `--rounds star`);
- draft:   the same with `--draft lookup` (several tokens verified per pass);
- redundant: relaxed with `--redundancy 2` (every message to and from a lossy device sent twice;
  opt-in: `--modes relaxed,redundant,strict`);
- single:  relaxed with `--redundancy 1` (one copy of each one-datagram message, whatever the plan
  chose; opt-in);
- push:    relaxed with `--rounds push` (each device sends its part to every other: one hop a
  round; opt-in); strict-push: strict with `--rounds push` (TCP between every pair, every part
  awaited; opt-in);
- strict:  `halo-run generate --sync strict --draft none --rounds star` (TCP, cubic, minimum RTO lowered, every
  part awaited);
- gloo:    `gloo_tp.py` (torch.distributed gloo all-reduce over TCP, same partition).

Workers are restarted for every run (each run is a fresh process tree). Recorded per run: every
decode token's time, TPOT p50/p90/p99, the observed loss from the lab's nftables counters on the
lossy links, the share of relaxed contributions compensated, and the machine's CPU load during
the run; per (mode, loss) the runs are pooled. Output: a JSON file, a plot, and a console table.

Example:
    $ sudo .venv/bin/python -m benchmarks.plr_sweep                      # full sweep (make bench)
    $ sudo .venv/bin/python -m benchmarks.plr_sweep --quick --out /tmp/q.json   # make bench-quick
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
try:
    import importlib.util
    if importlib.util.find_spec("halo_runtime") is None:  # a bare checkout without `make install`
        sys.path.insert(0, str(ROOT / "runtime"))
except ImportError:
    pass

from benchmarks.benchcommon import (  # noqa: E402
    SnapshotError,
    machine,
    plan_ready,
    snapshot_plan,
    snapshot_runtime,
)
from benchmarks.labbench import MODES, Bench  # noqa: E402
from benchmarks.netlab import LabError, check  # noqa: E402
from benchmarks.sweep_report import aggregate, plot, summary, table  # noqa: E402

PROMPTS = [
    "The history of the Raspberry Pi begins",
    "In mathematics, a prime number is",
    "The river flows through the old town and",
    "Photosynthesis is the process by which",
    "A computer network is a set of computers",
]
# gloo stalls 10-20 s per token at 5-10% loss on this machine; it gets fewer tokens (see docs/BENCHMARKS.md)
FULL = dict(plrs=[0.0, 0.01, 0.02, 0.05, 0.10], delays=[0.0, 2.0], reps=3, tokens=64, gloo_reps=1, gloo_tokens=16)
QUICK = dict(plrs=[0.0, 0.05], delays=[0.0, 2.0], reps=1, tokens=24, gloo_reps=1, gloo_tokens=6)
DEFAULT_MODES = ("relaxed", "draft", "strict", "gloo")
"""The modes a sweep runs unless `--modes` says otherwise (`labbench.MODES`; the others are opt-in)."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default=str(ROOT / "artifacts" / "smollm2-135m-pi5"))
    ap.add_argument("--out", default=str(HERE / "results" / "plr_sweep.json"))
    ap.add_argument("--plot", default=None, help="PNG path [default: --out with .png]")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['plrs']} loss at {QUICK['delays']} ms, "
                                                          f"{QUICK['reps']} rep, {QUICK['tokens']} tokens")
    ap.add_argument("--plrs", default=None, help="comma-separated loss rates, e.g. 0,0.01,0.05")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--gloo-reps", type=int, default=None, help="repetitions of the gloo baseline")
    ap.add_argument("--gloo-tokens", type=int, default=None, help="tokens per gloo run")
    ap.add_argument("--delays", default=None, help="comma-separated one-way delays on every link in ms [default: 0,2]")
    ap.add_argument("--jitter-ms", type=float, default=0.5,
                    help="standard deviation of a non-zero delay (default 0.5; a 0 ms delay has none)")
    ap.add_argument("--delay-from-plan", action="store_true",
                    help="per-link delay and jitter from the plan's device latencies instead of --delays/--jitter-ms")
    ap.add_argument("--burst", type=float, default=None, help="Gilbert-Elliott mean burst length (default: independent loss)")
    ap.add_argument("--no-bandwidth", action="store_true", help="no tbf bandwidth limits from the profile")
    ap.add_argument("--run-timeout-s", type=float, default=900)
    ap.add_argument("--prefix", default="halobench")
    ap.add_argument("--generate-arg", action="append", default=[], help="extra argument for halo-run generate")
    from halo_runtime.core.compute import SCHED_POLICIES

    ap.add_argument("--sched", choices=SCHED_POLICIES, default=None,
                    help="halo-run --sched of every halo process: every device of the lab shares this machine's "
                         "cores [default: as started, i.e. normal]")
    ap.add_argument("--skip-plan-check", action="store_true")
    ap.add_argument("--code", default=None, metavar="GIT_REV",
                    help="run halo_runtime, plan.json and manifest.json of this git revision [default: the "
                         "working tree]; shards still come from --plan and must match that manifest")
    ap.add_argument("--peer-worker", default=None, metavar="CMD",
                    help="mode peer: another system's worker, run in every remote namespace ({port})")
    ap.add_argument("--peer-root", default=None, metavar="CMD",
                    help="mode peer: its root, in the coordinator's namespace ({workers}, {tokens}, {prompt})")
    ap.add_argument("--peer-ready", default="Weights loaded",
                    help="mode peer: the root's line after which the condition is switched on")
    ap.add_argument("--peer-format", default="dllama", help="mode peer: its per-token lines (benchmarks.compare)")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="no runs: recompute the summary, plot and table of a finished sweep's JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        per = {}
        for r in doc["runs"]:  # sweeps from before the delay dimension ran at the lab's one delay
            per.setdefault((r["mode"], r["plr"], r.get("delay_ms", doc["lab"]["delay_ms"])), []).extend(r["reps"])
        doc["runs"] = [aggregate(m, p, d, reps) for (m, p, d), reps in per.items()]
        doc["summary"] = summary(doc["runs"])
        out = Path(args.out) if args.out != ap.get_default("out") else Path(args.from_json)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        plot(doc, Path(args.plot) if args.plot else out.with_suffix(".png"))
        print(table(doc))
        print(json.dumps(doc["summary"], indent=1))
        return 0
    preset = QUICK if args.quick else FULL
    plrs = [float(x) for x in args.plrs.split(",")] if args.plrs else preset["plrs"]
    delays = [float(x) for x in args.delays.split(",")] if args.delays else preset["delays"]
    if args.delay_from_plan:
        delays = [None]
    reps = args.reps or preset["reps"]
    tokens = args.tokens or preset["tokens"]
    gloo_reps = min(reps, args.gloo_reps or preset["gloo_reps"])
    gloo_tokens = args.gloo_tokens or preset["gloo_tokens"]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")
    if "peer" in modes and not (args.peer_worker and args.peer_root):
        ap.error("mode peer needs --peer-worker and --peer-root")
    info = check()
    if not info["ok"] or not info.get("netfilterqueue"):
        print(f"plr_sweep: the lab cannot run here: {info['reason']}", file=sys.stderr)
        return 2
    plan_dir = Path(args.plan)
    why = None if args.skip_plan_check or args.code else plan_ready(plan_dir)
    if why:
        print(f"plr_sweep: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")

    # a signal must still tear the lab down (background jobs ignore SIGINT unless told otherwise)
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    snap_dir = Path(tempfile.mkdtemp(prefix="halo-bench-runtime-"))
    try:
        return _sweep(args, plan_dir, out, png, plrs, delays, reps, tokens, gloo_reps, gloo_tokens, modes, snap_dir)
    except (LabError, SnapshotError) as e:
        print(f"plr_sweep: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(snap_dir, ignore_errors=True)


def _sweep(args, plan_dir, out, png, plrs, delays, reps, tokens, gloo_reps, gloo_tokens, modes, snap_dir) -> int:
    code = snapshot_runtime(snap_dir, args.code)
    source_plan = plan_dir
    code.update(snapshot_plan(plan_dir, snap_dir / "plan", args.code))
    plan_dir = snap_dir / "plan"
    started = time.time()
    doc = {"machine": machine(),
           "plan": (os.path.relpath(source_plan.resolve(), ROOT) if source_plan.resolve().is_relative_to(ROOT)
                    else str(source_plan)),
           "quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": code,
           "settings": {"plrs": plrs, "delays_ms": delays, "modes": modes, "reps": reps, "tokens": tokens,
                        "gloo_reps": gloo_reps, "gloo_tokens": gloo_tokens,
                        "peer_worker": args.peer_worker, "peer_root": args.peer_root,
                        "prompts": PROMPTS[:reps], "generate_args": args.generate_arg, "sched": args.sched,
                        "burst": args.burst,
                        "loss_applies_to": "every directed link to or from a lossy device"},
           "runs": [], "failed_runs": [], "summary": {}}
    per = {(m, p, d): [] for d in delays for p in plrs for m in modes}
    with Bench(plan_dir, 0.0, 0.0, args.prefix, burst=args.burst,
               extra_generate=args.generate_arg, sched=args.sched, bandwidth=not args.no_bandwidth,
               runtime_path=str(snap_dir), delay_from_plan=args.delay_from_plan) as bench:
        doc["lab"] = {"devices": bench.devices, "coordinator": bench.coord, "lossy": bench.lossy,
                      "delay_ms": "from plan" if args.delay_from_plan else "swept",
                      "jitter_ms": "from plan" if args.delay_from_plan else args.jitter_ms,
                      "bandwidth_mbps": {d.name: d.bandwidth_mbps for d in bench.plan.devices} if not args.no_bandwidth else None,
                      "tcp_cc_namespace_default": bench.lab.tcp_cc,
                      "tcp_cc_halo_strict": "cubic (set per socket by halo_runtime)",
                      "netns_prefix": bench.lab.tag}
        # repetition-major: every pass visits every delay and loss rate, so a drift in the machine's
        # load (other work on it) spreads over all of them instead of biasing the late ones
        for rep, delay, plr in ((r, d, p) for r in range(reps) for d in delays for p in plrs):
            prompt = PROMPTS[rep % len(PROMPTS)]
            bench.set_conditions(plr, delay or 0.0, args.jitter_ms if delay else 0.0)
            for mode in modes:
                if mode == "gloo" and rep >= gloo_reps:
                    continue
                n = gloo_tokens if mode == "gloo" else tokens
                r = None
                for attempt in range(2):  # a failed run is recorded, retried once, then skipped
                    try:
                        r = bench.run(mode, prompt, n, args.run_timeout_s,
                                      peer={"worker": args.peer_worker, "root": args.peer_root,
                                            "ready": args.peer_ready, "format": args.peer_format})
                        break
                    except (LabError, subprocess.TimeoutExpired, ValueError) as e:
                        doc["failed_runs"].append({"mode": mode, "plr": plr, "delay_ms": delay, "rep": rep,
                                                   "attempt": attempt, "error": str(e)[-600:]})
                        bench.log(f"[{time.time() - started:6.0f}s] {delay} ms plr {100 * plr:4.1f}% rep {rep} "
                                  f"{mode}: FAILED ({str(e).strip().splitlines()[-1][:200]})")
                if r is None:
                    continue
                r.update(mode=mode, plr=plr, delay_ms=delay, rep=rep, prompt=prompt)
                for k in ("text", "peak_rss_mb", "compensated_by_device", "ranks"):
                    r.pop(k, None)
                per[(mode, plr, delay)].append(r)
                bench.log(f"[{time.time() - started:6.0f}s] {delay} ms plr {100 * plr:4.1f}% rep {rep} {mode:7s}: "
                          f"TPOT p50 {r['tpot_ms']['p50']} p90 {r['tpot_ms']['p90']} ms, "
                          f"{r.get('tokens_per_pass', 1)} tokens/pass, observed loss {r['observed_loss']}, "
                          f"compensated {r.get('compensated_share', 0):.4f}, load {r['cpu']['loadavg_1m_end']}, {r['wall_s']} s")
                doc["runs"] = [aggregate(*key, done) for key, done in per.items() if done]
                doc["summary"] = summary(doc["runs"])
                out.write_text(json.dumps(doc, indent=1) + "\n")  # partial results survive an interruption
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["duration_s"] = round(time.time() - started, 1)
    # same greedy tokens as strict, prompt by prompt (at 0% loss every mode must agree)
    for other in ("relaxed", "push", "strict-push", "draft", "redundant", "single", "gloo"):
        if other not in modes or "strict" not in modes:
            continue
        key = f"same_tokens_{other}_vs_strict"
        for delay, plr in ((d, p) for d in delays for p in plrs):
            strict = {r["rep"]: r.get("tokens", []) for r in per[("strict", plr, delay)]}
            pairs = [(r.get("tokens", []), strict[r["rep"]]) for r in per[(other, plr, delay)] if r["rep"] in strict]
            same = [a == b[:len(a)] for a, b in pairs]
            doc.setdefault(key, {})[f"{delay} ms, {plr}"] = round(sum(same) / len(same), 3) if same else None
    out.write_text(json.dumps(doc, indent=1) + "\n")
    try:
        plot(doc, png)
    except Exception as e:  # the JSON is the result; a missing matplotlib must not lose it
        print(f"plr_sweep: no plot ({e})", file=sys.stderr)
    print(table(doc))
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {out} and {png} in {doc['duration_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
