"""The packet-loss benchmark: HALO relaxed synchronisation vs strict TCP vs gloo all-reduce, in the lab.

One device namespace per plan device (`netlab.Lab`), `halo-run worker` in each remote one and the
coordinator in its own; the plan's lossy devices (loss > 0 in plan.json) get the swept packet loss
on every link to and from them, every link gets the same one-way delay and jitter, and each
device's port gets its profile bandwidth (tbf). For every loss rate and repetition the three
modes run back to back with the same prompt and token count:

- relaxed: `halo-run generate --sync relaxed` (UDP, deadlines, compensation);
- strict:  `halo-run generate --sync strict` (TCP, cubic, every part awaited);
- gloo:    `gloo_tp.py` (torch.distributed gloo all-reduce over TCP, same partition).

Workers are restarted for every run (each run is a fresh process tree). Recorded per run: every
decode token's time, TPOT p50/p90/p99, the observed loss from the lab's nftables counters on the
lossy links, the share of relaxed contributions compensated, and the machine's CPU load during
the run; per (mode, loss) the runs are pooled. Output: a JSON file, a plot, and a console table.

Example:
    $ sudo .venv/bin/python benchmarks/plr_sweep.py                      # full sweep (make bench)
    $ sudo .venv/bin/python benchmarks/plr_sweep.py --quick --out /tmp/q.json   # < 5 min (make bench-quick)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
try:
    import importlib.util
    if importlib.util.find_spec("halo_runtime") is None:  # a bare checkout without `make install`
        sys.path.insert(0, str(ROOT / "runtime"))
except ImportError:
    pass

from netlab import Lab, LabError, PortSpec, check, star  # noqa: E402

PROMPTS = [
    "The history of the Raspberry Pi begins",
    "In mathematics, a prime number is",
    "The river flows through the old town and",
    "Photosynthesis is the process by which",
    "A computer network is a set of computers",
]
# gloo stalls 10-20 s per token at 5-10% loss on this machine; it gets fewer tokens (see docs/BENCHMARKS.md)
FULL = dict(plrs=[0.0, 0.01, 0.02, 0.05, 0.10], reps=3, tokens=64, gloo_reps=1, gloo_tokens=16)
QUICK = dict(plrs=[0.0, 0.05], reps=1, tokens=24, gloo_reps=1, gloo_tokens=6)
WORKER_PORT = 7700
GLOO_PORT = 29500
TOKEN_LINE = re.compile(r"token\s+(\d+)\s.*total\s+([\d.]+) ms\s+compute\s+([\d.]+)\s+wait\s+([\d.]+)")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    s = sorted(values)
    pick = lambda q: round(s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 3)  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "gpu": None, "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__, "hostname": platform.node()}


def cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]), idle


class CpuMeter:
    def __enter__(self):
        self.load0, self.t0 = os.getloadavg()[0], cpu_times()
        return self

    def __exit__(self, *exc):
        t1 = cpu_times()
        total, idle = t1[0] - self.t0[0], t1[1] - self.t0[1]
        self.result = {"loadavg_1m_start": round(self.load0, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
                       "busy_share": round(1 - idle / total, 3) if total else None}


def _git(*args: str, binary: bool = False):
    p = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=not binary)
    return p.stdout if p.returncode == 0 else None


def snapshot_runtime(dest: Path, rev: str | None = None) -> dict:
    """Copy halo_runtime to `dest` -- from the working tree, or from git revision `rev` -- so that a
    long sweep runs one version of the code while the working tree changes; this process then
    imports that copy too. Returns what was copied (git commit, modified files, hash)."""
    import hashlib
    import io
    import tarfile

    if rev:
        blob = _git("archive", "--format=tar", rev, "runtime/halo_runtime", binary=True)
        if not blob:
            raise LabError(f"git archive {rev} runtime/halo_runtime failed")
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(dest / "_rev", filter="data")
        shutil.move(str(dest / "_rev" / "runtime" / "halo_runtime"), str(dest / "halo_runtime"))
        shutil.rmtree(dest / "_rev")
    else:
        shutil.copytree(ROOT / "runtime" / "halo_runtime", dest / "halo_runtime",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    h = hashlib.sha256()
    for f in sorted((dest / "halo_runtime").rglob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    sys.path.insert(0, str(dest))
    for name in [m for m in sys.modules if m == "halo_runtime" or m.startswith("halo_runtime.")]:
        del sys.modules[name]
    commit = (_git("rev-parse", rev or "HEAD") or "").strip() or None
    return {"source": f"git {rev}" if rev else "working tree", "git_commit": commit,
            "modified_files": [] if rev else (_git("status", "--porcelain", "--", "runtime", "benchmarks",
                                                   "artifacts") or "").splitlines(),
            "runtime_sha256": h.hexdigest()}


class Bench:
    """The lab with one namespace per plan device, and how to run each mode in it."""

    def __init__(self, plan_dir: str, delay_ms: float, jitter_ms: float, prefix: str, burst: float | None = None,
                 extra_generate: list[str] | None = None, verbose: bool = True, bandwidth: bool = True,
                 runtime_path: str | None = None, delay_from_plan: bool = False):
        from halo_runtime.plan import load_plan

        self.plan_dir = str(plan_dir)
        self.plan = load_plan(plan_dir)
        self.devices = list(self.plan.device_names)
        self.coord = self.plan.coordinator
        self.remote = [d for d in self.devices if d != self.coord]
        self.lossy = [d.name for d in self.plan.devices if d.loss > 0]
        self.delay_ms, self.jitter_ms, self.burst = delay_ms, jitter_ms, burst
        self.extra = extra_generate or []
        self.verbose = verbose
        ports = ({d.name: PortSpec(up_mbit=d.bandwidth_mbps, down_mbit=d.bandwidth_mbps) for d in self.plan.devices}
                 if bandwidth else {})
        self.delay_from_plan = delay_from_plan
        self.lab = Lab(self.devices, prefix=prefix, ports=ports, links=self.links(0.0))
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.bin = str(Path(sys.executable).parent)
        self.env["PATH"] = f"{self.bin}:{self.env.get('PATH', '')}"
        pp = [runtime_path or str(ROOT / "runtime")]
        self.env["PYTHONPATH"] = ":".join(pp + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else []))

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def __enter__(self):
        self.lab.start()
        return self

    def __exit__(self, *exc):
        self.lab.close()

    def links(self, plr: float) -> dict:
        links = star(self.devices, self.coord, self.lossy, plr, self.delay_ms, self.jitter_ms, self.burst)
        if self.delay_from_plan:  # a -> switch -> b: both devices' access-link latency, jitters added in quadrature
            from dataclasses import replace
            dev = {d.name: d for d in self.plan.devices}
            for (a, b), spec in links.items():
                links[(a, b)] = replace(spec, delay_ms=dev[a].latency_ms + dev[b].latency_ms,
                                        jitter_ms=round((dev[a].jitter_ms ** 2 + dev[b].jitter_ms ** 2) ** 0.5, 4))
        return links

    def set_plr(self, plr: float) -> None:
        self.lab.set_links(self.links(plr))
        self.plr = plr

    def observed_loss(self) -> dict:
        c = self.lab.counters()
        lossy = [(a, b) for (a, b) in c if a in self.lossy or b in self.lossy]
        sent = sum(c[k]["sent"] for k in lossy)
        dropped = sum(c[k]["dropped"] for k in lossy)
        per_link = {f"{a}->{b}": {"sent": v["sent"], "dropped": v["dropped"]} for (a, b), v in c.items() if v["sent"]}
        return {"observed_loss": round(dropped / sent, 5) if sent else None, "frames_on_lossy_links": sent,
                "dropped": dropped, "links": per_link}

    # ---- processes ----------------------------------------------------------------------------
    def start_workers(self, timeout_s: float = 120) -> dict:
        procs = {}
        for d in self.remote:
            procs[d] = self.lab.popen(d, [sys.executable, "-m", "halo_runtime.cli", "worker", "--plan", self.plan_dir,
                                          "--device", d, "--bind", f"{self.lab.addr(d)}:{WORKER_PORT}", "--announce"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env)
        deadline = time.monotonic() + timeout_s
        for d, p in procs.items():
            import select
            r, _, _ = select.select([p.stdout], [], [], max(0.1, deadline - time.monotonic()))
            line = p.stdout.readline() if r else ""
            if not line:
                raise LabError(f"worker {d} did not start (exit {p.poll()})")
        return procs

    def stop(self, procs: dict) -> None:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run_halo(self, mode: str, prompt: str, tokens: int, timeout_s: float) -> dict:
        workers = self.start_workers()
        try:
            peers = [a for d in self.remote for a in ("--peer", f"{d}={self.lab.addr(d)}:{WORKER_PORT}")]
            argv = [sys.executable, "-m", "halo_runtime.cli", "generate", "--plan", self.plan_dir, "--prompt", prompt,
                    "--max-tokens", str(tokens), "--ignore-eos", "--json", "--sync", mode, *peers, *self.extra]
            self.lab.reset_counters()
            with CpuMeter() as cpu:
                t0 = time.monotonic()
                p = subprocess.run(self.lab.cmd(self.coord, argv), capture_output=True, text=True,
                                   timeout=timeout_s, env=self.env)
                wall = time.monotonic() - t0
            if p.returncode:
                raise LabError(f"{mode} generate failed ({p.returncode}): {p.stderr.strip()[-1500:]}")
            res = json.loads(p.stdout.strip().splitlines()[-1])
            if res.get("per_token"):  # newer halo-run: per-token records in the JSON
                steps = [(t["total_ms"], t["compute_ms"], t["wait_ms"]) for t in res.pop("per_token")]
            else:  # else the per-token lines on stderr
                steps = [(float(m.group(2)), float(m.group(3)), float(m.group(4)))
                         for m in (TOKEN_LINE.search(line) for line in p.stderr.splitlines()) if m]
            if len(steps) != len(res.get("tokens", [])):
                raise LabError(f"{mode}: {len(steps)} per-token records for {len(res.get('tokens', []))} tokens")
            res["token_ms"] = [round(t[0], 3) for t in steps[1:]]  # decode steps: the first one is the prompt
            res["compute_ms"] = [round(t[1], 3) for t in steps[1:]]
            res["wait_ms"] = [round(t[2], 3) for t in steps[1:]]
        finally:
            self.stop(workers)
        res.update(self.observed_loss(), cpu=cpu.result, wall_s=round(wall, 2))
        return res

    def run_gloo(self, prompt: str, tokens: int, timeout_s: float, extra: list[str] | None = None) -> dict:
        order = [self.coord] + self.remote
        master = f"{self.lab.addr(self.coord)}:{GLOO_PORT}"
        procs = {}
        self.lab.reset_counters()
        with CpuMeter() as cpu:
            t0 = time.monotonic()
            for rank, d in enumerate(order):
                argv = [sys.executable, str(HERE / "gloo_tp.py"), "--plan", self.plan_dir, "--rank", str(rank),
                        "--master", master, "--prompt", prompt, "--max-tokens", str(tokens), "--json",
                        "--timeout-s", str(timeout_s), *(extra or [])]
                procs[d] = self.lab.popen(d, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=self.env)
            try:
                out, err = procs[self.coord].communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.stop(procs)
                raise LabError(f"gloo run exceeded {timeout_s} s") from None
            for d, p in procs.items():
                if d != self.coord:
                    try:
                        p.communicate(timeout=30)
                    except subprocess.TimeoutExpired:
                        pass
            wall = time.monotonic() - t0
        self.stop(procs)
        if procs[self.coord].returncode:
            raise LabError(f"gloo rank 0 failed ({procs[self.coord].returncode}): {err.strip()[-1500:]}")
        res = json.loads(out.strip().splitlines()[-1])
        res.update(self.observed_loss(), cpu=cpu.result, wall_s=round(wall, 2))
        return res

    def run(self, mode: str, prompt: str, tokens: int, timeout_s: float) -> dict:
        if mode == "gloo":
            return self.run_gloo(prompt, tokens, timeout_s)
        return self.run_halo(mode, prompt, tokens, timeout_s)


def aggregate(mode: str, plr: float, reps: list[dict]) -> dict:
    tokens = [t for r in reps for t in r["token_ms"]] or [float("nan")]
    sent = sum(r["frames_on_lossy_links"] for r in reps)
    dropped = sum(r["dropped"] for r in reps)
    comp = [r.get("compensated_share", 0.0) for r in reps]
    cpu_busy = [r["cpu"]["busy_share"] for r in reps if r["cpu"]["busy_share"] is not None]
    loads = [r["cpu"][k] for r in reps for k in ("loadavg_1m_start", "loadavg_1m_end")]
    return {
        "mode": mode, "plr": plr, "tpot_ms": percentiles(tokens), "tpot_mean_ms": round(statistics.fmean(tokens), 3),
        "observed_loss": round(dropped / sent, 5) if sent else None,
        "compensated_share": round(statistics.fmean(comp), 6) if comp else None,
        "decode_tokens": len(tokens), "repetitions": len(reps),
        "tpot_p50_per_rep": [r["tpot_ms"]["p50"] for r in reps],
        "cpu": {"busy_share_mean": round(statistics.fmean(cpu_busy), 3) if cpu_busy else None,
                "loadavg_1m_min": min(loads), "loadavg_1m_max": max(loads)},
        "reps": reps,
    }


def summary(runs: list[dict]) -> dict:
    runs = [{**r, "_tokens": [t for rep in r["reps"] for t in rep["token_ms"]]} for r in runs]
    p50 = {(r["mode"], r["plr"]): r["tpot_ms"]["p50"] for r in runs}
    out = {}
    if ("relaxed", 0.05) in p50 and ("strict", 0.05) in p50:
        out["strict_over_relaxed_p50_at_5pct"] = round(p50[("strict", 0.05)] / p50[("relaxed", 0.05)], 3)
        out["target_3_41x_met"] = out["strict_over_relaxed_p50_at_5pct"] >= 3.41
    if ("relaxed", 0.05) in p50 and ("gloo", 0.05) in p50:
        out["gloo_over_relaxed_p50_at_5pct"] = round(p50[("gloo", 0.05)] / p50[("relaxed", 0.05)], 3)
    if ("relaxed", 0.05) in p50 and ("relaxed", 0.0) in p50:
        out["relaxed_5pct_over_0pct_p50"] = round(p50[("relaxed", 0.05)] / p50[("relaxed", 0.0)], 3)
        out["target_1_15x_met"] = out["relaxed_5pct_over_0pct_p50"] <= 1.15
    for mode in ("relaxed", "strict", "gloo"):
        base = p50.get((mode, 0.0))
        if base:
            out[f"{mode}_p50_vs_0pct"] = {str(plr): round(v / base, 3) for (m, plr), v in p50.items() if m == mode}
            # a token that took 150 ms more than this mode's 0%-loss median waited on a retransmission
            # timeout (TCP's is at least 200 ms; HALO's UDP RTO is a few ms)
            out[f"{mode}_stalled_token_share"] = {
                str(r["plr"]): round(sum(t > base + 150 for t in r["_tokens"]) / len(r["_tokens"]), 3)
                for r in runs if r["mode"] == mode}
            out[f"{mode}_mean_excess_ms"] = {
                str(r["plr"]): round(statistics.fmean(r["_tokens"]) - base, 1) for r in runs if r["mode"] == mode}
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"relaxed": ("tab:green", "o"), "strict": ("tab:red", "s"), "gloo": ("tab:blue", "^")}
    for mode in ("relaxed", "strict", "gloo"):
        rs = sorted((r for r in doc["runs"] if r["mode"] == mode), key=lambda r: r["plr"])
        if not rs:
            continue
        x = [100 * r["plr"] for r in rs]
        color, marker = style[mode]
        label = {"relaxed": "HALO relaxed (UDP)", "strict": "HALO strict (TCP)", "gloo": "gloo all-reduce (TCP)"}[mode]
        for ax, key in ((axes[0], "p50"), (axes[1], "p90")):
            ax.plot(x, [r["tpot_ms"][key] for r in rs], marker=marker, color=color, label=label)
    for ax, key in ((axes[0], "p50"), (axes[1], "p90")):
        ax.set_xlabel("packet loss on the lossy links (%)")
        ax.set_ylabel(f"TPOT {key} (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"time per output token, {key}")
    axes[0].legend(fontsize=8)
    m = doc["machine"]
    fig.suptitle(f"{doc['plan']} on {len(doc['lab']['devices'])} lab devices, {doc['lab']['delay_ms']}±"
                 f"{doc['lab']['jitter_ms']} ms one way; {m['cores']} cores ({m['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(doc: dict) -> str:
    rows = ["| mode | PLR | TPOT p50 ms | p90 ms | p99 ms | observed loss | compensated | tokens x runs | CPU busy | load 1m |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(doc["runs"], key=lambda r: (r["plr"], ["relaxed", "strict", "gloo"].index(r["mode"]))):
        t = r["tpot_ms"]
        ol = f"{100 * r['observed_loss']:.2f}%" if r["observed_loss"] is not None else "-"
        comp = f"{100 * r['compensated_share']:.2f}%" if r["mode"] == "relaxed" else "-"
        rows.append(f"| {r['mode']} | {100 * r['plr']:.0f}% | {t['p50']:.1f} | {t['p90']:.1f} | {t['p99']:.1f} | {ol} | "
                    f"{comp} | {r['decode_tokens'] // r['repetitions'] + 1} x {r['repetitions']} | "
                    f"{100 * r['cpu']['busy_share_mean']:.0f}% | "
                    f"{r['cpu']['loadavg_1m_min']:.1f}-{r['cpu']['loadavg_1m_max']:.1f} |")
    return "\n".join(rows)


def plan_ready(plan_dir: Path) -> str | None:
    """None if the plan's shards and tokenizer are there and match the manifest, else why not."""
    import hashlib

    if not (plan_dir / "plan.json").exists():
        return f"{plan_dir}/plan.json is missing"
    if not (plan_dir / "tokenizer.json").exists():
        return f"{plan_dir}: shards not built (run `make plans`)"
    try:
        manifest = json.loads((plan_dir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"{plan_dir}/manifest.json: {e}"
    for name, entry in manifest.get("files", {}).items():
        digest = entry.get("sha256") if isinstance(entry, dict) else entry
        p = plan_dir / name
        if not p.exists():
            return f"{p} is missing (run `make plans`)"
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if digest and h.hexdigest() != digest:
            return f"{p} does not match {plan_dir}/manifest.json (run `make plans`)"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default=str(ROOT / "artifacts" / "smollm2-135m-pi5"))
    ap.add_argument("--out", default=str(HERE / "results" / "plr_sweep.json"))
    ap.add_argument("--plot", default=None, help="PNG path [default: --out with .png]")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['plrs']} loss, {QUICK['reps']} rep, "
                                                          f"{QUICK['tokens']} tokens: under 5 minutes")
    ap.add_argument("--plrs", default=None, help="comma-separated loss rates, e.g. 0,0.01,0.05")
    ap.add_argument("--modes", default="relaxed,strict,gloo")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--gloo-reps", type=int, default=None, help="repetitions of the gloo baseline")
    ap.add_argument("--gloo-tokens", type=int, default=None, help="tokens per gloo run")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="one-way delay on every link (default 2)")
    ap.add_argument("--jitter-ms", type=float, default=0.5, help="its standard deviation (default 0.5)")
    ap.add_argument("--delay-from-plan", action="store_true",
                    help="per-link delay and jitter from the plan's device latencies instead of --delay-ms/--jitter-ms")
    ap.add_argument("--burst", type=float, default=None, help="Gilbert-Elliott mean burst length (default: independent loss)")
    ap.add_argument("--no-bandwidth", action="store_true", help="no tbf bandwidth limits from the profile")
    ap.add_argument("--run-timeout-s", type=float, default=900)
    ap.add_argument("--prefix", default="halobench")
    ap.add_argument("--generate-arg", action="append", default=[], help="extra argument for halo-run generate")
    ap.add_argument("--skip-plan-check", action="store_true")
    ap.add_argument("--code", default=None, metavar="GIT_REV",
                    help="run halo_runtime, plan.json and manifest.json of this git revision [default: the "
                         "working tree]; shards still come from --plan and must match that manifest")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="no runs: recompute the summary, plot and table of a finished sweep's JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        per = {}
        for r in doc["runs"]:
            per.setdefault((r["mode"], r["plr"]), []).extend(r["reps"])
        doc["runs"] = [aggregate(m, p, reps) for (m, p), reps in per.items()]
        doc["summary"] = summary(doc["runs"])
        out = Path(args.out) if args.out != ap.get_default("out") else Path(args.from_json)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        plot(doc, Path(args.plot) if args.plot else out.with_suffix(".png"))
        print(table(doc))
        print(json.dumps(doc["summary"], indent=1))
        return 0
    preset = QUICK if args.quick else FULL
    plrs = [float(x) for x in args.plrs.split(",")] if args.plrs else preset["plrs"]
    reps = args.reps or preset["reps"]
    tokens = args.tokens or preset["tokens"]
    gloo_reps = min(reps, args.gloo_reps or preset["gloo_reps"])
    gloo_tokens = args.gloo_tokens or preset["gloo_tokens"]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("relaxed", "strict", "gloo"):
            ap.error(f"unknown mode {m!r}")
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
        return _sweep(args, plan_dir, out, png, plrs, reps, tokens, gloo_reps, gloo_tokens, modes, snap_dir)
    finally:
        shutil.rmtree(snap_dir, ignore_errors=True)


def snapshot_plan(plan_dir: Path, dest: Path, rev: str | None = None) -> dict:
    """Copy the plan's files to `dest`, so that a recompile of `plan_dir` during the sweep does not
    change the plan under it. With `rev`, plan.json and manifest.json come from that git revision
    and the shards (never committed) from `plan_dir`, checked against that manifest."""
    import hashlib

    dest.mkdir(parents=True)
    committed = set()
    if rev:
        rel = os.path.relpath(plan_dir.resolve(), ROOT)
        for name in ("plan.json", "manifest.json"):
            text = _git("show", f"{rev}:{rel}/{name}")
            if text is None:
                raise LabError(f"{rel}/{name} is not in git revision {rev}")
            (dest / name).write_text(text)
            committed.add(name)
    manifest = json.loads((dest if rev else plan_dir).joinpath("manifest.json").read_text())
    for name in [*manifest.get("files", {}), "manifest.json"]:
        if name not in committed:
            shutil.copy2(plan_dir / name, dest / name)
    why = plan_ready(dest)
    if why:
        raise LabError(f"the plan's files do not match its manifest ({why})")
    return {"plan_sha256": hashlib.sha256((dest / "plan.json").read_bytes()).hexdigest()}


def _sweep(args, plan_dir, out, png, plrs, reps, tokens, gloo_reps, gloo_tokens, modes, snap_dir) -> int:
    code = snapshot_runtime(snap_dir, args.code)
    source_plan = plan_dir
    code.update(snapshot_plan(plan_dir, snap_dir / "plan", args.code))
    plan_dir = snap_dir / "plan"
    started = time.time()
    doc = {"machine": machine(),
           "plan": (os.path.relpath(source_plan.resolve(), ROOT) if source_plan.resolve().is_relative_to(ROOT)
                    else str(source_plan)),
           "quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": code,
           "settings": {"plrs": plrs, "modes": modes, "reps": reps, "tokens": tokens,
                        "gloo_reps": gloo_reps, "gloo_tokens": gloo_tokens,
                        "prompts": PROMPTS[:reps], "generate_args": args.generate_arg, "burst": args.burst,
                        "loss_applies_to": "every directed link to or from a lossy device"},
           "runs": [], "failed_runs": []}
    per = {(m, p): [] for p in plrs for m in modes}
    with Bench(plan_dir, args.delay_ms, args.jitter_ms, args.prefix, burst=args.burst,
               extra_generate=args.generate_arg, bandwidth=not args.no_bandwidth, runtime_path=str(snap_dir),
               delay_from_plan=args.delay_from_plan) as bench:
        doc["lab"] = {"devices": bench.devices, "coordinator": bench.coord, "lossy": bench.lossy,
                      "delay_ms": "from plan" if args.delay_from_plan else args.delay_ms,
                      "jitter_ms": "from plan" if args.delay_from_plan else args.jitter_ms,
                      "links": {f"{a}->{b}": {"delay_ms": v.delay_ms, "jitter_ms": v.jitter_ms}
                                for (a, b), v in bench.links(0.0).items()},
                      "bandwidth_mbps": {d.name: d.bandwidth_mbps for d in bench.plan.devices} if not args.no_bandwidth else None,
                      "tcp_cc_namespace_default": bench.lab.tcp_cc,
                      "tcp_cc_halo_strict": "cubic (set per socket by halo_runtime)",
                      "netns_prefix": bench.lab.tag}
        # repetition-major: every pass visits every loss rate, so a drift in the machine's load
        # (other work on it) spreads over all rates instead of biasing the late ones
        for rep in range(reps):
            prompt = PROMPTS[rep % len(PROMPTS)]
            for plr in plrs:
                bench.set_plr(plr)
                for mode in modes:
                    if mode == "gloo" and rep >= gloo_reps:
                        continue
                    n = gloo_tokens if mode == "gloo" else tokens
                    r = None
                    for attempt in range(2):  # a failed run is recorded, retried once, then skipped
                        try:
                            r = bench.run(mode, prompt, n, args.run_timeout_s)
                            break
                        except (LabError, subprocess.TimeoutExpired, ValueError) as e:
                            doc["failed_runs"].append({"mode": mode, "plr": plr, "rep": rep, "attempt": attempt,
                                                       "error": str(e)[-600:]})
                            bench.log(f"[{time.time() - started:6.0f}s] plr {100 * plr:4.1f}% rep {rep} {mode}: "
                                      f"FAILED ({str(e).strip().splitlines()[-1][:200]})")
                    if r is None:
                        continue
                    r.update(mode=mode, plr=plr, rep=rep, prompt=prompt)
                    for k in ("text", "peak_rss_mb", "compensated_by_device", "ranks"):
                        r.pop(k, None)
                    per[(mode, plr)].append(r)
                    bench.log(f"[{time.time() - started:6.0f}s] plr {100 * plr:4.1f}% rep {rep} {mode:7s}: TPOT p50 "
                              f"{r['tpot_ms']['p50']} p90 {r['tpot_ms']['p90']} ms, observed loss "
                              f"{r['observed_loss']}, compensated {r.get('compensated_share', 0):.4f}, "
                              f"load {r['cpu']['loadavg_1m_end']}, {r['wall_s']} s")
                    doc["runs"] = [aggregate(m, p, per[(m, p)]) for (m, p) in per if per[(m, p)]]
                    doc["summary"] = summary(doc["runs"])
                    out.write_text(json.dumps(doc, indent=1) + "\n")  # partial results survive an interruption
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["duration_s"] = round(time.time() - started, 1)
    # same greedy tokens as strict, prompt by prompt (at 0% loss every mode must agree)
    for other in ("relaxed", "gloo"):
        if other not in modes or "strict" not in modes:
            continue
        key = f"same_tokens_{other}_vs_strict"
        for plr in plrs:
            strict = {r["rep"]: r.get("tokens", []) for r in per[("strict", plr)]}
            pairs = [(r.get("tokens", []), strict[r["rep"]]) for r in per[(other, plr)] if r["rep"] in strict]
            same = [a == b[:len(a)] for a, b in pairs]
            doc.setdefault(key, {})[str(plr)] = round(sum(same) / len(same), 3) if same else None
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
