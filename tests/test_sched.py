"""`--sched`: a device process's CPU scheduling (`ComputeOptions.sched`): batch by default where every
device runs on this machine (`local`), as started elsewhere, and what the process reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from halo_runtime.core.compute import ComputeOptions
from test_runtime import halo_run

linux = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="sched must be one of normal, batch, got 'fast'"):
        ComputeOptions(sched="fast")


@linux
@pytest.mark.parametrize("flag, expected", [((), "batch"), (("--sched", "normal"), "normal")])
def test_local_runs_batch_unless_told(plan_dir, flag, expected):
    out = halo_run("local", "--plan", str(plan_dir), "--prompt", "the cat", "--max-tokens", "2", "--plr", "0",
                   "--draft", "none", "--json", "--quiet", *flag)
    assert out["sched"] == expected


@linux
@pytest.mark.parametrize("flag, policy", [((), "SCHED_OTHER"), (("--sched", "batch"), "SCHED_BATCH")])
def test_a_worker_keeps_its_policy_unless_told(tiny_plan, flag, policy):
    plan, directory = tiny_plan
    device = next(d for d in plan.device_names if d != plan.coordinator)
    proc = subprocess.Popen([sys.executable, "-m", "halo_runtime.cli", "worker", "--plan", str(directory),
                             "--device", device, "--bind", "127.0.0.1:0", "--announce", *flag],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        announced = json.loads(proc.stdout.readline())
        assert os.sched_getscheduler(proc.pid) == getattr(os, policy)
        assert announced["sched"] == ("batch" if flag else "normal")
    finally:
        proc.terminate()
        proc.wait(10)
