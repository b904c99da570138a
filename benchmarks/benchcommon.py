"""What every benchmark here needs: the machine's description, CPU load over a run, percentiles,
and snapshots of the runtime and plan so that a long run measures one version of the code.

Example:
    >>> from benchmarks.benchcommon import machine, percentiles
    >>> percentiles([3.0, 1.0, 2.0])["p50"]
    2.0
    >>> sorted(machine())[:3]
    ['cores', 'cpu', 'gpu']
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class SnapshotError(RuntimeError):
    """The runtime or plan to measure cannot be snapshotted; the message says why."""


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
            "python": platform.python_version(), "torch": torch.__version__, "hostname": platform.node(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


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
            raise SnapshotError(f"git archive {rev} runtime/halo_runtime failed")
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


def plan_ready(plan_dir: Path) -> str | None:
    """None if the plan's shards and tokenizer are there and match the manifest, else why not."""
    from halo_runtime.core.plandir import PLAN_FILE, TOKENIZER_FILE, PlanError, check_files, read_manifest

    if not (plan_dir / PLAN_FILE).exists():
        return f"{plan_dir}/{PLAN_FILE} is missing"
    if not (plan_dir / TOKENIZER_FILE).exists():
        return f"{plan_dir}: shards not built (run `make plans`)"
    try:
        check_files(plan_dir, sorted(read_manifest(plan_dir)))
    except PlanError as e:
        return f"{e} (run `make plans`)"
    return None


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
                raise SnapshotError(f"{rel}/{name} is not in git revision {rev}")
            (dest / name).write_text(text)
            committed.add(name)
    manifest = json.loads((dest if rev else plan_dir).joinpath("manifest.json").read_text())
    for name in [*manifest.get("files", {}), "manifest.json"]:
        if name not in committed:
            shutil.copy2(plan_dir / name, dest / name)
    why = plan_ready(dest)
    if why:
        raise SnapshotError(f"the plan's files do not match its manifest ({why})")
    return {"plan_sha256": hashlib.sha256((dest / "plan.json").read_bytes()).hexdigest()}
