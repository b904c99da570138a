"""The lab of a plan, and how to run each mode of the packet-loss benchmark in it (`Bench`).

One network namespace per plan device (`netlab.Lab`), each device's port at its profile's
bandwidth, the plan's lossy devices losing `plr` of the frames on every link to and from them
(`star`), every link delayed; `Bench.run` starts a fresh process tree for one run of a mode (`MODES`:
halo's relaxed, strict, push ... as `halo-run generate` arguments; gloo's all-reduce; another system
given as its commands) and returns its per-token times, TPOT percentiles, the observed loss and the
machine's CPU load. `benchmarks.plr_sweep` sweeps loss rates and delays over it;
`benchmarks.failover` kills a worker in it.

Example:
    >>> from benchmarks.labbench import MODES, star
    >>> MODES["push"]
    ['--sync', 'relaxed', '--draft', 'none', '--rounds', 'push']
    >>> star(["a", "b", "c"], "a", ["c"], 0.05)[("a", "c")].loss, star(["a", "b", "c"], "a", ["c"], 0.05)[("a", "b")].loss
    (0.05, 0.0)
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.benchcommon import CpuMeter, percentiles
from benchmarks.netlab import Lab, LabError, LinkSpec, PortSpec

ROOT = Path(__file__).resolve().parent.parent
_STAR = ["--rounds", "star"]  # whatever rounds the plan chose (`Plan.rounds`): a mode names its own
MODES = {"relaxed": ["--sync", "relaxed", "--draft", "none", *_STAR],
         "draft": ["--sync", "relaxed", "--draft", "lookup", *_STAR],
         "redundant": ["--sync", "relaxed", "--draft", "none", "--redundancy", "2", *_STAR],
         "single": ["--sync", "relaxed", "--draft", "none", "--redundancy", "1", *_STAR],
         "push": ["--sync", "relaxed", "--draft", "none", "--rounds", "push"],
         "strict-push": ["--sync", "strict", "--draft", "none", "--rounds", "push"],
         "strict": ["--sync", "strict", "--draft", "none", *_STAR], "gloo": None, "peer": None}
"""Sweep mode -> its `halo-run generate` arguments (None: the gloo baseline, or the peer's commands)."""
WORKER_PORT = 7700
GLOO_PORT = 29500
PEER_PORT = 9998
TOKEN_LINE = re.compile(r"token\s+(\d+)\s.*total\s+([\d.]+) ms\s+compute\s+([\d.]+)\s+wait\s+([\d.]+)")


def star(devices: list[str], hub: str, lossy: list[str], plr: float, delay_ms: float = 0.0,
         jitter_ms: float = 0.0, burst: float | None = None) -> dict[tuple[str, str], LinkSpec]:
    """Directed links of a cluster whose `lossy` devices sit on a lossy access link: every link that
    starts or ends at a lossy device loses `plr` of its frames (in bursts of mean length `burst`
    if given); every link has the delay and jitter."""
    out = {}
    for a in devices:
        for b in devices:
            if a == b:
                continue
            p = plr if (a in lossy or b in lossy) else 0.0
            if burst and p > 0:
                out[(a, b)] = LinkSpec.burst(p, burst, delay_ms=delay_ms, jitter_ms=jitter_ms)
            else:
                out[(a, b)] = LinkSpec(loss=p, delay_ms=delay_ms, jitter_ms=jitter_ms)
    return out


class Bench:
    """The lab with one namespace per plan device, and how to run each mode in it."""

    def __init__(self, plan_dir: str, delay_ms: float, jitter_ms: float, prefix: str, burst: float | None = None,
                 extra_generate: list[str] | None = None, verbose: bool = True, bandwidth: bool = True,
                 runtime_path: str | None = None, delay_from_plan: bool = False, sched: str | None = None):
        from halo_runtime.core.plan import load_plan

        self.plan_dir = str(plan_dir)
        self.plan = load_plan(plan_dir)
        self.devices = list(self.plan.device_names)
        self.coord = self.plan.coordinator
        self.remote = [d for d in self.devices if d != self.coord]
        self.lossy = [d.name for d in self.plan.devices if d.loss > 0]
        self.delay_ms, self.jitter_ms, self.burst = delay_ms, jitter_ms, burst
        # halo-run --sched of every halo process (workers and the coordinator); None: as started
        self.sched = ["--sched", sched] if sched else []
        self.extra = [*(extra_generate or []), *self.sched]
        self.verbose = verbose
        ports = ({d.name: PortSpec(up_mbit=d.bandwidth_mbps, down_mbit=d.bandwidth_mbps) for d in self.plan.devices}
                 if bandwidth else {})
        self.delay_from_plan = delay_from_plan
        self.lab = Lab(self.devices, prefix=prefix, ports=ports, links=self.links(0.0))
        # one fresh deployment key for this lab's processes (every datagram is authenticated)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "HALO_KEY": secrets.token_hex(32)}
        self.env.pop("HALO_KEY_FILE", None)
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

    def set_conditions(self, plr: float, delay_ms: float, jitter_ms: float) -> None:
        self.delay_ms, self.jitter_ms = delay_ms, jitter_ms
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
                                          "--device", d, "--bind", f"{self.lab.addr(d)}:{WORKER_PORT}", "--announce",
                                          *self.sched],
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
                    "--max-tokens", str(tokens), "--ignore-eos", "--json", *MODES[mode], *peers, *self.extra]
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
                argv = [sys.executable, "-m", "benchmarks.gloo_tp", "--plan", self.plan_dir, "--rank", str(rank),
                        "--master", master, "--prompt", prompt, "--max-tokens", str(tokens), "--json",
                        "--timeout-s", str(timeout_s), *(extra or [])]
                procs[d] = self.lab.popen(d, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=self.env, cwd=ROOT)
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

    def run_peer(self, peer: dict, prompt: str, tokens: int, timeout_s: float) -> dict:
        """Another system in the same lab: `peer["worker"]` in every remote namespace, `peer["root"]`
        in the coordinator's (placeholders {port}, {workers}, {tokens}, {prompt}). Its start-up
        (distributed-llama sends the weights to its workers) runs on clean links: the root is
        stopped when it prints `peer["ready"]`, the condition is switched on, and it goes on."""
        from benchmarks.compare import parse

        conditions = (self.plr, self.delay_ms, self.jitter_ms)
        self.set_conditions(0.0, 0.0, 0.0)
        procs = {d: self.lab.popen(d, shlex.split(peer["worker"].format(port=PEER_PORT)), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) for d in self.remote}
        try:
            time.sleep(1.0)  # the workers listen before the root connects
            workers = " ".join(f"{self.lab.addr(d)}:{PEER_PORT}" for d in self.remote)
            argv = shlex.split(peer["root"].format(workers=workers, tokens=tokens, prompt=prompt))
            root = self.lab.popen(self.coord, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs["root"] = root
            out, deadline = [], time.monotonic() + timeout_s
            for line in root.stdout:
                out.append(line)
                if peer["ready"] in line:
                    root.send_signal(signal.SIGSTOP)
                    self.set_conditions(*conditions)
                    self.lab.reset_counters()
                    root.send_signal(signal.SIGCONT)
                    break
                if time.monotonic() > deadline:
                    raise LabError("the peer did not get ready in time")
            with CpuMeter() as cpu:
                t0 = time.monotonic()
                rest, _ = root.communicate(timeout=max(1.0, deadline - time.monotonic()))
                wall = time.monotonic() - t0
            text = "".join(out) + (rest or "")
            if root.returncode:
                raise LabError(f"peer root failed ({root.returncode}): {text[-1500:]}")
        finally:
            self.stop(procs)
            self.set_conditions(*conditions)
        times = parse(peer["format"], text)
        if not times:
            raise LabError(f"no per-token times in the peer's output: {text[-600:]}")
        res = {"tpot_ms": percentiles(times), "token_ms": times, "tokens": [], "peer_root": peer["root"]}
        res.update(self.observed_loss(), cpu=cpu.result, wall_s=round(wall, 2))
        return res

    def run(self, mode: str, prompt: str, tokens: int, timeout_s: float, peer: dict | None = None) -> dict:
        if mode == "gloo":
            return self.run_gloo(prompt, tokens, timeout_s)
        if mode == "peer":
            return self.run_peer(peer, prompt, tokens, timeout_s)
        return self.run_halo(mode, prompt, tokens, timeout_s)
