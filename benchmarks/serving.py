"""What the HTTP server costs, and whether batching requests into shared rounds would pay.

1. TPOT of `halo-run local` (the CLI) and of the same plan through `halo-run serve --local`,
   measured by the server (each chunk's `halo.token_ms`) and by the client (time between chunks).
2. Several clients at once: requests run one after another, so aggregate tokens/s stays about
   that of one client while each client waits its turn.
3. Batching's ceiling: one round carrying T token rows (what a batch of T decode requests would
   send) against one round of one row, on live workers. When a T-row round costs about what a
   1-row round does, serving T requests per round multiplies throughput; results and what it
   would take in docs/BENCHMARKS.md ("Serving").

    python -m benchmarks.serving --plan DIR [--sync strict] [--tokens 32] [--reps 3] [--out FILE.json]

Example:
    >>> from benchmarks.serving import gaps_ms
    >>> gaps_ms([0.0, 0.010, 0.030])
    [10.0, 20.0]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "runtime"))

PROMPT = "Tell me about the sea."


def gaps_ms(times: list[float]) -> list[float]:
    return [round(1e3 * (b - a), 3) for a, b in zip(times, times[1:])]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("HALO_KEY", None)
    env.pop("HALO_KEY_FILE", None)
    return env


def cli_tpot(plan: str, sync: str, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "halo_runtime.cli", "local", "--plan", plan, "--prompt", PROMPT,
                          "--max-tokens", str(tokens), "--ignore-eos", "--sync", sync, "--plr", "0", "--json",
                          "--quiet"], capture_output=True, text=True, env=_env(), timeout=600, check=True)
    return json.loads(out.stdout)["tpot_ms"]


class Serve:
    """`halo-run serve --local` on a free port (no loss unless `extra` sets --plr), and an openai client."""

    def __init__(self, plan: str, sync: str, *extra: str):
        import openai

        self.proc = subprocess.Popen([sys.executable, "-m", "halo_runtime.cli", "serve", "--plan", plan, "--local",
                                      "--port", "0", "--plr", "0", "--sync", sync, *extra], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=_env())
        line = self.proc.stdout.readline()
        m = re.search(r"http://([0-9.]+):(\d+)/ serving (\S+)", line)
        if not m:
            self.close()
            raise RuntimeError(f"halo-run serve did not start: {line!r}")
        self.base, self.model = f"http://{m.group(1)}:{m.group(2)}", m.group(3)
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="-", max_retries=0, timeout=900)

    def stream(self, tokens: int) -> tuple[list[float], list[float]]:
        """(server-side ms per token, client-side arrival times) of one streamed reply."""
        server_ms, arrivals = [], []
        for chunk in self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens, temperature=0,
                stream=True, extra_body={"ignore_eos": True}):
            halo = (chunk.model_extra or {}).get("halo") or {}
            if "token_ms" in halo:
                server_ms.append(halo["token_ms"])
                arrivals.append(time.perf_counter())
        return server_ms, arrivals

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def rounds(plan_dir: str, sync: str, rows: list[int], reps: int) -> dict:
    """ms per round carrying T token rows, on live workers (the cost a T-request batch would see)."""
    import torch
    from benchmarks.benchcommon import percentiles
    from halo_runtime.cli import _load_coordinator
    from halo_runtime.core.coordinator import Coordinator, TokenStats
    from halo_runtime.localcluster import local_auth, start_local_workers, stop_workers
    from halo_runtime.net.exchange import UdpExchange
    from halo_runtime.net.tcpexchange import TcpExchange

    torch.set_num_threads(1)
    args = argparse.Namespace(plan=plan_dir, wire="fp16", relaxed_retries=1, redundancy=None, dead_after=4.0,
                              key_file=None, delay_ms=0.0, jitter_ms=0.0, seed=0)
    plan, shard, _, policy = _load_coordinator(args)
    workers: dict = {}
    try:
        auth = local_auth(args)
        peers = start_local_workers(args, plan, dict.fromkeys(plan.device_names, 0.0), auth, workers)
        ex = (TcpExchange(plan, peers, policy, auth=auth) if sync == "strict"
              else UdpExchange(plan, peers, policy, bind_host="127.0.0.1", auth=auth))
        coord = Coordinator(plan, shard, ex)
        out = {}
        with torch.no_grad():
            for t in rows:
                times, step = [], 0
                for _ in range(reps):
                    coord.reset(secrets.randbits(32))
                    coord.forward(torch.arange(8), 0, TokenStats())  # a prompt of 8 tokens first
                    for step in range(1, 9):
                        t0 = time.perf_counter()
                        coord.forward(torch.arange(t) + 100, step, TokenStats())
                        times.append(1e3 * (time.perf_counter() - t0))
                out[t] = {"round_ms": percentiles(times), "per_row_ms": round(percentiles(times)["p50"] / t, 3)}
        ex.close()
        return out
    finally:
        stop_workers(workers)


def main() -> None:
    from benchmarks.benchcommon import cpu_times, machine, percentiles

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True)
    p.add_argument("--sync", choices=["relaxed", "strict"], default="strict")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    busy0, idle0 = cpu_times()
    result = {"machine": machine(), "plan": a.plan, "sync": a.sync, "tokens": a.tokens}
    cli = [cli_tpot(a.plan, a.sync, a.tokens)["p50"] for _ in range(a.reps)]
    result["cli_tpot_ms_p50"] = sorted(cli)[len(cli) // 2]
    server = Serve(a.plan, a.sync)
    try:
        server.stream(4)  # warm-up
        ms, gaps = [], []
        for _ in range(a.reps):
            s, arrivals = server.stream(a.tokens)
            ms += s[1:]
            gaps += gaps_ms(arrivals)
        result["server_tpot_ms"] = percentiles(ms)
        result["client_gap_ms"] = percentiles(gaps)
        t0 = time.perf_counter()
        server.stream(a.tokens)
        one = a.tokens / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            list(pool.map(lambda _: server.stream(a.tokens), range(a.clients)))
        result["tokens_per_s"] = {"one_client": round(one, 2),
                                  f"{a.clients}_clients": round(a.clients * a.tokens / (time.perf_counter() - t0), 2)}
    finally:
        server.close()
    result["rounds"] = rounds(a.plan, a.sync, [1, 2, 4, 8], a.reps)
    busy1, idle1 = cpu_times()
    result["cpu_busy_share"] = round(1 - (idle1 - idle0) / max(1, busy1 - busy0), 3)
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
