"""Where a round's time goes on the coordinator: compute, waiting for the wire, and the rest.

Starts the plan's remote devices as local workers (loopback, no loss, no delay), runs the
coordinator in this process over UDP, and decodes TOKENS tokens after a short prompt, REPS times.
Per token (median): wall time split into compute (the coordinator's own groups and the LM head,
`TokenStats.compute_ms`: its ggml graph calls), wait (`TokenStats.wait_ms`, collect) and other (the rest: norms,
predictor, encoding, sending, decoding, sums), divided by the rounds per token
(`Plan.network_rounds`). On a loaded machine wall time mostly measures the scheduler, so it also
reports the coordinator thread's CPU time outside its compute, per round (`cpu_overhead_ms_per_round`),
which contention inflates far less, split into user and kernel time (`user_ms_per_round`,
`sys_ms_per_round`: getrusage of the thread over the decode steps, compute included). And how much
slower this machine runs a small operation just after its thread slept than in a hot loop
(`wake`: the coordinator's RMSNorm of one row, median µs hot and after 1 ms asleep): a round
wakes the coordinator for every reply, so where that ratio is large (a virtual machine's idle
exits) the CPU per round is more the machine's than the code's. One JSON line.

Example:
    $ .venv/bin/python -m benchmarks.round_split artifacts/smollm2-135m-pi5-with-shards 32 2
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from types import SimpleNamespace

import numpy as np
from halo_runtime.core.coordinator import Coordinator, TokenStats, rms_norm
from halo_runtime.core.plan import load_plan
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.shards import load_shard
from halo_runtime.localcluster import local_auth, start_local_workers, stop_workers
from halo_runtime.net.exchange import UdpExchange

PROMPT = [1, 504, 3458, 282, 4649, 314]


def _timed(fn, cpu: dict):
    """fn, adding the calling thread's CPU seconds in it to cpu["compute"]."""
    def wrapped(*a, **k):
        t = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            cpu["compute"] += time.thread_time() - t
    return wrapped


def wake_cost(width: int, eps: float = 1e-5) -> dict:
    """Median µs of one row's RMSNorm in a hot loop and just after sleeping 1 ms, and their ratio."""
    x, w = np.random.default_rng(0).standard_normal((2, width), dtype=np.float32)
    x = x[None]

    def once() -> float:
        t = time.perf_counter()
        rms_norm(x, w, eps)
        return 1e6 * (time.perf_counter() - t)

    hot = statistics.median(once() for _ in range(2000))
    cold = []
    for _ in range(300):
        time.sleep(1e-3)
        cold.append(once())
    return {"hot_us": round(hot, 2), "after_sleep_us": round(statistics.median(cold), 2),
            "ratio": round(statistics.median(cold) / hot, 1)}


def main(plan_dir: str, tokens: int = 32, reps: int = 1, redundancy: int | None = None) -> dict:
    plan = load_plan(plan_dir)
    shard = load_shard(plan_dir, plan, plan.coordinator)
    args = SimpleNamespace(plan=plan_dir, key_file=None, delay_ms=0.0, jitter_ms=0.0, seed=0)
    auth, workers, rows, usage = local_auth(args), {}, [], [0.0, 0.0]
    try:
        peers = start_local_workers(args, plan, {d: 0.0 for d in plan.device_names}, auth, workers)
        exchange = UdpExchange(plan, peers, DeliveryPolicy(redundancy=redundancy), bind_host="127.0.0.1", auth=auth)
        coord = Coordinator(plan, shard, exchange)
        cpu = {"compute": 0.0}
        coord.local.attention = _timed(coord.local.attention, cpu)
        coord.local.mlp = _timed(coord.local.mlp, cpu)
        coord.runner.run = _timed(coord.runner.run, cpu)  # segments: embedding, LM head, local rounds
        for rep in range(reps):
            coord.reset(rep + 1)
            coord.forward(PROMPT, 0, TokenStats())
            tok = [PROMPT[-1]]
            u0 = resource.getrusage(resource.RUSAGE_THREAD)
            for step in range(1, tokens + 1):
                st, cpu["compute"] = TokenStats(), 0.0
                c0, w0 = time.thread_time(), time.perf_counter()
                logits = coord.forward(tok, step, st)
                wall, c = 1e3 * (time.perf_counter() - w0), 1e3 * (time.thread_time() - c0)
                tok = [int(np.argmax(logits))]
                rows.append((wall, st.compute_ms, st.wait_ms, c, 1e3 * cpu["compute"]))
            u1 = resource.getrusage(resource.RUSAGE_THREAD)
            usage[0] += u1.ru_utime - u0.ru_utime
            usage[1] += u1.ru_stime - u0.ru_stime
        exchange.close()
    finally:
        stop_workers(workers)
    wall, comp, wait, c, cc = (statistics.median(r[i] for r in rows) for i in range(5))
    rounds = len(plan.network_rounds())
    return {"rounds": rounds, "tokens": len(rows), "wall_ms": round(wall, 2), "compute_ms": round(comp, 2),
            "wait_ms": round(wait, 2), "other_ms": round(wall - comp - wait, 2),
            "other_ms_per_round": round((wall - comp - wait) / max(rounds, 1), 3),
            "cpu_ms": round(c, 2), "cpu_compute_ms": round(cc, 2),
            "cpu_overhead_ms_per_round": round((c - cc) / max(rounds, 1), 3),
            "user_ms_per_round": round(1e3 * usage[0] / max(len(rows) * rounds, 1), 3),
            "sys_ms_per_round": round(1e3 * usage[1] / max(len(rows) * rounds, 1), 3),
            "wake": wake_cost(plan.model.hidden_size, plan.model.rms_norm_eps)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", help="a compiled plan directory with its shards")
    ap.add_argument("tokens", nargs="?", type=int, default=32, help="tokens decoded per repetition")
    ap.add_argument("reps", nargs="?", type=int, default=1, help="repetitions")
    ap.add_argument("--redundancy", type=int, default=None,
                    help="copies of every message to and from a lossy device (halo-run --redundancy) "
                         "[default: as many as the plan chose]")
    a = ap.parse_args()
    print(json.dumps(main(a.plan, a.tokens, a.reps, a.redundancy)))
