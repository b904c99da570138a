"""Live `halo-run worker` processes for the tests that attack, kill and restart them
(tests/test_hardening.py, tests/test_rejoin.py): a pool started once per test module, the
fixtures that hand it out, and the plan's devices those tests pick.

Workers are real processes on loopback (one ggml thread each); a worker a test kills starts again
before the next test; every process is stopped when the module ends. A test module registers
the fixtures with `pytest_plugins = ("liveworkers",)`.

Example:
    >>> from liveworkers import PROMPT
    >>> len(PROMPT)
    7
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from halo_runtime.core.coordinator import Coordinator
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.plan import load_plan
from halo_runtime.core.plandir import KEY_FILE, read_key
from halo_runtime.core.shards import load_shard

PROMPT = [1, 17, 300, 400, 12, 99, 7]


def env_with(key: bytes) -> dict:
    """The environment of a worker or coordinator process: one thread, the deployment key `key`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HALO_KEY": key.hex()}
    env.pop("HALO_KEY_FILE", None)
    return env


class Workers:
    """`halo-run worker` processes for every remote device of a plan, on loopback."""

    def __init__(self, plan_dir: Path, key: bytes):
        self.plan_dir, self.key = plan_dir, key
        self.plan = load_plan(plan_dir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.peers: dict[str, tuple[str, int]] = {}
        try:
            for d in self.plan.device_names:
                if d != self.plan.coordinator:
                    self.start(d, 0)
            for d in list(self.procs):
                self.wait_ready(d)
        except BaseException:
            self.close()  # the ones that did start must not outlive the failed fixture
            raise

    def start(self, device: str, port: int) -> None:
        cmd = [sys.executable, "-m", "halo_runtime.cli", "worker", "--plan", str(self.plan_dir), "--device", device,
               "--bind", f"127.0.0.1:{port}", "--announce"]
        self.procs[device] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=env_with(self.key))

    def wait_ready(self, device: str) -> None:
        line = self.procs[device].stdout.readline()
        assert line, f"worker {device} did not start: {self.procs[device].stderr.read()}"
        info = json.loads(line)
        self.peers[device] = (info["host"], info["port"])

    def kill(self, device: str) -> None:
        p = self.procs[device]
        p.kill()
        p.wait()

    def revive(self) -> None:
        """Start again every worker a test killed (on a new port; `peers` follows)."""
        dead = [d for d, p in self.procs.items() if p.poll() is not None]
        for d in dead:
            for f in (self.procs[d].stdout, self.procs[d].stderr):
                f.close()
            self.start(d, 0)
        for d in dead:
            self.wait_ready(d)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()


class AwaitAll(Coordinator):
    """Awaits every relaxed part, so the output does not depend on timing, only on what arrives."""

    def _awaited(self, layer, x):
        return {d: np.ones(x.shape[0], dtype=bool) for d in self.relaxed[layer]}


@pytest.fixture(scope="module")
def key(plan_dir):
    return read_key(plan_dir / KEY_FILE)


@pytest.fixture(scope="module")
def reference(plan_dir):
    plan = load_plan(plan_dir)
    shards = {d: load_shard(plan_dir, plan, d) for d in plan.device_names}
    ex = InProcessExchange(plan, {d: s for d, s in shards.items() if d != plan.coordinator})
    return Coordinator(plan, shards[plan.coordinator], ex).generate(PROMPT, 24, keep_logits=True)


@pytest.fixture(scope="module")
def worker_pool(plan_dir, key):
    # started once for the module (each start loads the runtime and maps a shard), as long-running
    # workers serve one coordinator session after another in a deployment
    w = Workers(plan_dir, key)
    yield w
    w.close()


@pytest.fixture
def workers(worker_pool):
    """The module's worker processes, all alive: the ones an earlier test killed start again."""
    worker_pool.revive()
    return worker_pool


def only_relaxed(plan) -> str:
    name = [d for d in plan.device_names if d != plan.coordinator
            and all(not g.critical for g in plan.groups if g.device == d)]
    assert name, "the tiny plan should put only relaxed groups on its lossy device"
    return name[0]


def with_attention(plan) -> str:
    return next(d for d in plan.device_names if d != plan.coordinator
                and any(g.kind == "attn" for g in plan.groups if g.device == d))
