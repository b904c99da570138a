"""Parallel neuron-group loading: one device runs under an enforced memory limit and streams its groups.

The device under test (default pi5-1 of the pi5 plan, the largest remote shard) runs `halo-run
worker --memory-budget` inside a cgroup-v1 memory cgroup whose limit is its weight budget plus
the process's own overhead (Python, torch, buffers: measured on a worker with a tiny shard);
the other devices run as plain workers, the coordinator as `halo-run generate --sync strict
--wire fp32` over loopback (TCP, no loss: only loading differs between runs, and exact mode
must reproduce the unconstrained tokens). Budgets are 100%, 50% and 25% of the device's shard
size, in `exact` and `predictive` mode, at emulated storage bandwidths (this VM's disk is served
from the host's cache at ~14 GB/s even after dropping pages, so reads are throttled to the
bandwidth and the shard's pages are dropped after each read). Per run: TPOT, the share of load
time hidden by the overlap, the cache hit rate, bytes read per token, peak RSS (VmHWM) and the
cgroup's peak usage. The perplexity cost of `predictive` comes from `halo-compile eval
--predictive DEVICE` at zero loss.

Needs root (cgroup v1 at /sys/fs/cgroup/memory) and the plan's shards (`make plans`).

Example:
    $ .venv/bin/python -m benchmarks.loading --plan artifacts/smollm2-135m-pi5 --device pi5-1 \\
        --out benchmarks/results/loading.json
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.benchcommon import machine

PROMPT = "The history of the Roman Empire begins"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
MB = 1e6


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "halo_runtime.cli", *args]


# one deployment key for this benchmark's processes (datagrams are authenticated; see auth.py)
ENV = {"HALO_KEY": secrets.token_hex(32), **os.environ, "OMP_NUM_THREADS": "1"}


class Cgroup:
    """A cgroup-v1 memory cgroup; removed on exit (its processes must have ended)."""

    def __init__(self, name: str, limit: int):
        self.path = CGROUP_ROOT / name
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def read(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def start_worker(plan: str, device: str, port: int, extra=(), cgroup: Cgroup | None = None) -> subprocess.Popen:
    def enter():  # runs in the child before exec: the whole process lives under the limit
        # a background shell starts us with SIGINT ignored, and an ignored signal stays ignored
        # across exec; the worker writes its stats when SIGINT stops it
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if cgroup is not None:
            (cgroup.path / "cgroup.procs").write_text(str(os.getpid()))
    proc = subprocess.Popen(cli("worker", "--plan", plan, "--device", device, "--bind", f"127.0.0.1:{port}",
                                "--announce", *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=enter)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {device} did not start: {proc.stderr.read()[-2000:]}")
    return proc


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def run(plan_dir: str, plan, device: str, tokens: int, base_port: int, budget: int | None = None,
        mode: str = "exact", mbps: float = 0.0, limit: int | None = None) -> dict:
    """One generation with `device` streaming under `budget` (None: a plain worker, no limit)."""
    others = [d for d in plan.device_names if d not in (plan.coordinator, device)]
    ports = {d: base_port + i for i, d in enumerate([device] + others)}
    stats_file = Path(tempfile.mkdtemp()) / "stats.json"
    extra = () if budget is None else ("--memory-budget", str(budget / MB), "--load-mode", mode,
                                       "--storage-mbps", str(mbps), "--stats-file", str(stats_file))
    group = Cgroup(f"halo-loading-{os.getpid()}", limit) if limit else None
    procs = {}
    try:
        procs[device] = start_worker(plan_dir, device, ports[device], extra, group)
        for d in others:
            procs[d] = start_worker(plan_dir, d, ports[d])
        peers = [x for d in procs for x in ("--peer", f"{d}=127.0.0.1:{ports[d]}")]
        t0 = time.perf_counter()
        out = subprocess.run(cli("generate", "--plan", plan_dir, "--prompt", PROMPT, "--max-tokens", str(tokens),
                                 "--ignore-eos", "--sync", "strict", "--wire", "fp32", "--json", "--quiet", *peers),
                             capture_output=True, text=True, env=ENV, timeout=1200)
        wall = time.perf_counter() - t0
        alive = procs[device].poll() is None
        peak = vm_hwm(procs[device].pid) if alive else None
        keys = ("max_usage_in_bytes", "failcnt", "limit_in_bytes")
        cg = {k: group.read(f"memory.{k}") for k in keys} if group else {}
        errors = {d: stop(p) for d, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        if group:
            group.remove()
    if out.returncode != 0 or not alive:
        return {"budget": budget, "mode": mode, "storage_mbps": mbps, "failed": True,
                "error": (out.stderr or "")[-800:] + errors.get(device, "")[-800:]}
    r = json.loads(out.stdout)
    st = json.loads(stats_file.read_text()) if stats_file.exists() else None
    if budget is not None and st is None:
        return {"budget": budget, "mode": mode, "storage_mbps": mbps, "failed": True,
                "error": "the worker wrote no stats: " + errors.get(device, "")[-800:]}
    n = len(r["tokens"])
    res = {"budget": budget, "mode": mode, "storage_mbps": mbps, "tokens": r["tokens"], "tpot_ms": r["tpot_ms"],
           "ttft_ms": r["ttft_ms"], "wall_s": round(wall, 2), "peak_rss_bytes": peak, "cgroup": cg}
    if st:
        res.update({"hit_rate": round(st["hit_rate"], 4), "hidden_share": round(st["hidden_share"], 4),
                    "load_s": round(st["load_s"], 3), "stall_s": round(st["stall_s"], 3),
                    "mb_read_per_token": round(st["bytes_loaded"] / MB / n, 2),
                    "load_ms_per_token": round(1e3 * st["load_s"] / n, 2),
                    "stall_ms_per_token": round(1e3 * st["stall_s"] / n, 2),
                    "resident_bytes": st["resident_bytes"], "streamed_bytes": st["streamed_bytes"],
                    "cache": {k: st[k] for k in ("needed", "hits", "waited", "demand", "skipped", "loads")}})
    return res


def overhead(plan_dir: str, plan, base_port: int) -> tuple[int, int]:
    """What a worker needs besides its weights: (cgroup charge, peak RSS), each less its shard,
    measured on the device with the smallest shard, in a cgroup of its own with no binding limit."""
    small = min((d for d in plan.device_names if d != plan.coordinator),
                key=lambda d: (Path(plan_dir) / plan.shard_file(d)).stat().st_size)
    size = (Path(plan_dir) / plan.shard_file(small)).stat().st_size
    group = Cgroup(f"halo-loading-{os.getpid()}-base", 8 * 2**30)
    try:
        proc = start_worker(plan_dir, small, base_port + 9, cgroup=group)
        try:
            time.sleep(0.5)
            return group.read("memory.max_usage_in_bytes") - size, vm_hwm(proc.pid) - size
        finally:
            stop(proc)
    finally:
        group.remove()


def perplexity(plan_dir: str, device: str, tokens: int) -> dict:
    """`halo-compile eval` at zero loss, with and without `device` in predictive mode."""
    out = {}
    for label, extra in (("exact", []), ("predictive", ["--predictive", device])):
        r = subprocess.run([sys.executable, "-m", "halo_compile.cli", "eval", plan_dir, "--plr", "0",
                            "--tokens", str(tokens), "--json", "-q", *extra],
                           capture_output=True, text=True, env=ENV, check=True)
        rep = json.loads(r.stdout)
        out[label] = {"ppl": rep["results"][0]["ppl"], "full_ppl": rep["full_ppl"], "tokens": rep["tokens"]}
        if "predictive" in rep:
            out[label]["computed_share"] = rep["predictive"][device]["computed_share"]
    out["cost"] = round(out["predictive"]["ppl"] / out["exact"]["ppl"] - 1, 4)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    base = results["baseline"]["tpot_ms"]["p50"]
    for mbps in results["storage_mbps"]:
        for mode, style in (("exact", "-o"), ("predictive", "--s")):
            pts = [r for r in results["runs"] if r["mode"] == mode and not r.get("failed")
                   and (r["storage_mbps"] == mbps or r["share"] == 1.0)]
            pts.sort(key=lambda r: -r["share"])
            xs = [100 * r["share"] for r in pts]
            axes[0].plot(xs, [r["tpot_ms"]["p50"] for r in pts], style, label=f"{mode}, {mbps:g} MB/s")
            axes[1].plot(xs, [100 * r["hidden_share"] for r in pts], style, label=f"{mode}, {mbps:g} MB/s")
    axes[0].axhline(base, color="grey", lw=0.8, label="no budget")
    axes[0].set(xlabel="memory budget, % of shard", ylabel="TPOT p50 (ms)", title="time per output token")
    axes[1].set(xlabel="memory budget, % of shard", ylabel="% of load time hidden", title="overlap", ylim=(0, 105))
    for ax in axes:
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['device']}: streaming its shard under a cgroup memory limit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default="artifacts/smollm2-135m-pi5")
    ap.add_argument("--device", default="pi5-1")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--storage-mbps", type=float, nargs="+", default=[400.0, 4000.0],
                    help="emulated storage read bandwidths (Pi 5 NVMe HAT ~400; a fast one)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--base-port", type=int, default=7730)
    ap.add_argument("--out", default="benchmarks/results/loading.json")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
    from halo_runtime.core.plan import load_plan

    plan = load_plan(args.plan)
    shard = (Path(args.plan) / plan.shard_file(args.device)).stat().st_size
    extra, extra_rss = overhead(args.plan, plan, args.base_port)
    # the process's own needs, plus two copies of the device's largest layer (assembling a
    # streamed layer concatenates its groups), plus slack for allocator fragmentation
    from halo_runtime.core.residency import group_bytes

    layer = max(sum(group_bytes(plan, g) for g in plan.groups_on(args.device, i)) for i in range(plan.model.num_layers))
    slack = 2 * layer + 32 * 2**20
    print(f"{args.device}: shard {shard / MB:.1f} MB; process overhead {extra / MB:.1f} MB charged to its cgroup, "
          f"{extra_rss / MB:.1f} MB of RSS", file=sys.stderr)
    baseline = run(args.plan, plan, args.device, args.tokens, args.base_port)
    print(f"baseline: TPOT p50 {baseline['tpot_ms']['p50']} ms, peak RSS {baseline['peak_rss_bytes'] / MB:.0f} MB",
          file=sys.stderr)
    runs = []
    for mode in ("exact", "predictive"):
        for share in args.shares:
            for mbps in (args.storage_mbps if share < 1.0 else args.storage_mbps[:1]):
                budget = int(shard * share)
                limit = budget + extra + slack
                r = run(args.plan, plan, args.device, args.tokens, args.base_port, budget, mode, mbps, limit)
                r.update(share=share, limit_bytes=limit)
                if not r.get("failed"):
                    r["same_tokens_as_baseline"] = r["tokens"] == baseline["tokens"]
                    print(f"{mode:>10} {100 * share:>3.0f}% {mbps:>6g} MB/s: TPOT p50 {r['tpot_ms']['p50']} ms, "
                          f"hidden {100 * r['hidden_share']:.0f}%, hits {100 * r['hit_rate']:.0f}%, "
                          f"read {r['mb_read_per_token']} MB/token, peak RSS {r['peak_rss_bytes'] / MB:.0f} MB, "
                          f"cgroup peak {r['cgroup']['max_usage_in_bytes'] / MB:.0f} MB (limit {limit / MB:.0f}, "
                          f"hit {r['cgroup']['failcnt']}x), same tokens {r['same_tokens_as_baseline']}",
                          file=sys.stderr)
                else:
                    print(f"{mode} {share} {mbps}: FAILED {r['error'][-300:]}", file=sys.stderr)
                runs.append(r)
    ppl = perplexity(args.plan, args.device, args.eval_tokens) if args.eval_tokens else None
    results = {"machine": {**machine(), "loadavg_1m_end": round(os.getloadavg()[0], 2)},
               "plan": args.plan, "device": args.device, "shard_bytes": shard, "overhead_bytes": extra,
               "overhead_rss_bytes": extra_rss, "slack_bytes": slack,
               "tokens": args.tokens, "prompt": PROMPT, "storage_mbps": args.storage_mbps,
               "baseline": baseline, "runs": runs, "perplexity": ppl}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
