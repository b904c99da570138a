"""Long runs of the runtime (benchmark mode, not CI): 1,000 tokens at 10% loss, then a soak.

1. `long`: one `halo-run local` generation of `--long-tokens` tokens (default 1000) at `--plr`
   (default 10%) on the plan's lossy links; TPOT, compensated share and drop counters.
2. `soak`: the workers start once and live for `--minutes` (default 30); the coordinator (this
   process) generates `--tokens` tokens per session, a new session each time, at the same loss,
   while an attacker thread sends garbage, forged (wrong key) and replayed datagrams to every
   worker at `--attack-rate` per second. RSS of every process is sampled every `--sample-s`;
   the result says whether it grew (late mean vs early mean, warm-up excluded) and whether any
   process died or any session failed.

Writes one JSON object (default benchmarks/results/soak.json). Processes run at nice 10 with one
torch thread each, so a soak shares a machine politely.

Example:
    $ .venv/bin/python -m benchmarks.soak --plan artifacts/smollm2-135m-pi5 --minutes 30
    $ .venv/bin/python -m benchmarks.soak --plan /tmp/tiny-plan --minutes 1 --long-tokens 50 --out /tmp/soak.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is a Raspberry Pi?", "Tell me about the history of Paris.", "Why is the sky blue?",
           "Write a short poem about packet loss.", "Explain how a transformer model works.",
           "What should I cook for dinner tonight?", "Summarise the rules of chess."]


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def long_run(plan: str, tokens: int, plr: float, seed: int) -> dict:
    cmd = [sys.executable, "-m", "halo_runtime.cli", "local", "--plan", plan, "--prompt", PROMPTS[0], "--chat",
           "--max-tokens", str(tokens), "--ignore-eos", "--plr", str(plr), "--json", "--quiet", "--seed", str(seed)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        return {"ok": False, "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    r = json.loads(proc.stdout)
    return {"ok": True, "tokens": len(r["tokens"]), "plr": plr, "wall_s": round(wall, 1),
            "tpot_ms": r["tpot_ms"], "tokens_per_s": r["tokens_per_s"], "compensated_share": r["compensated_share"],
            "retransmissions": r["exchange"]["retransmissions"], "dropped": r["exchange"]["dropped"],
            "devices": r["devices"], "peak_rss_mb": r["peak_rss_mb"], "text_head": r["text"][:200]}


class Recorder:
    """Wraps the coordinator's shim: keeps a few sent datagrams for the attacker to replay."""

    def __init__(self, inner):
        self.inner, self.kept = inner, collections.deque(maxlen=64)
        self.n = 0

    def send_datagram(self, send, data, addr):
        self.n += 1
        if self.n % 37 == 0:
            self.kept.append((bytes(data), tuple(addr[:2])))
        self.inner.send_datagram(send, data, addr)

    def close(self):
        self.inner.close()


def attacker(targets: list, recorder: Recorder, rate: float, stop: threading.Event, sent: collections.Counter):
    from halo_runtime.core.plandir import new_key
    from halo_runtime.net.auth import Authenticator
    from halo_runtime.net.wire import Kind, Message, encode

    wrong = Authenticator(new_key())
    rng = random.Random(7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        while not stop.wait(1.0 / rate):
            addr = rng.choice(targets)
            kind = rng.choice(["garbage", "forged", "replayed", "misdirected", "truncated"])
            if kind == "garbage":
                data = rng.randbytes(rng.randint(0, 1400))
            elif kind == "forged":
                data = encode(Message(Kind.REQUEST_MLP, rng.getrandbits(32), rng.randint(0, 99), rng.randint(0, 29),
                                      0, rng.randbytes(200)), auth=wrong)[0]
            elif recorder.kept:
                data, orig = rng.choice(list(recorder.kept))
                # a replay goes where the original went; a misdirected one to another device
                addr = orig if kind == "replayed" else rng.choice([t for t in targets if t != orig] or targets)
                if kind == "truncated":
                    data = data[:rng.randint(0, len(data) - 1)]
            else:
                continue
            try:
                s.sendto(data, addr)
                sent[kind] += 1
            except OSError:
                pass


def soak(plan_dir: str, minutes: float, tokens: int, plr: float, sample_s: float, attack_rate: float) -> dict:
    import torch
    from halo_runtime.cli import generate_once
    from halo_runtime.core.plan import load_plan
    from halo_runtime.core.plandir import TOKENIZER_FILE, new_key
    from halo_runtime.core.policy import DeliveryPolicy
    from halo_runtime.core.shards import load_shard
    from halo_runtime.core.tokenizer import Tokenizer
    from halo_runtime.localcluster import stop_workers
    from halo_runtime.net.auth import Authenticator
    from halo_runtime.net.exchange import UdpExchange
    from halo_runtime.net.shim import PeerShims
    from halo_runtime.net.shim import LossShim

    torch.set_num_threads(1)
    plan = load_plan(plan_dir)
    shard = load_shard(plan_dir, plan, plan.coordinator)
    tok = Tokenizer.from_file(os.path.join(plan_dir, TOKENIZER_FILE))
    auth = Authenticator(new_key())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HALO_KEY": auth.key.hex()}
    env.pop("HALO_KEY_FILE", None)
    loss = {d.name: (plr if d.loss > 0 else 0.0) for d in plan.devices}
    workers, peers = {}, {}
    samples, sessions, failures = [], 0, []
    sent = collections.Counter()
    stop = threading.Event()
    try:
        for i, d in enumerate(plan.device_names):
            if d != plan.coordinator:
                workers[d] = subprocess.Popen(
                    [sys.executable, "-m", "halo_runtime.cli", "worker", "--plan", plan_dir, "--device", d,
                     "--bind", "127.0.0.1:0", "--announce", "--shim-loss", str(loss[d]), "--shim-seed", str(i)],
                    stdout=subprocess.PIPE, env=env, text=True)
        for d, p in workers.items():
            info = json.loads(p.stdout.readline())
            peers[d] = (info["host"], info["port"])
        shims = {d: LossShim(loss[d], seed=900 + i) for i, d in enumerate(peers) if loss[d] > 0}
        recorder = Recorder(PeerShims({peers[d]: s for d, s in shims.items()}))
        ex = UdpExchange(plan, peers, DeliveryPolicy(), bind_host="127.0.0.1", shim=recorder, auth=auth)
        atk = threading.Thread(target=attacker, args=(list(peers.values()), recorder, attack_rate, stop, sent),
                               daemon=True)
        if attack_rate > 0:
            atk.start()
        pids = {plan.coordinator: os.getpid(), **{d: p.pid for d, p in workers.items()}}
        t0 = time.monotonic()
        next_sample, generated, tpots = t0, 0, []
        args = argparse.Namespace(prompt="", chat=True, max_tokens=tokens, ignore_eos=True, quiet=True, wire="fp16",
                                  plan=plan_dir)  # --chat renders the plan's own chat template
        while time.monotonic() - t0 < minutes * 60:
            args.prompt = PROMPTS[sessions % len(PROMPTS)]
            try:
                r = generate_once(args, plan, shard, tok, ex, "relaxed")
                generated += len(r["tokens"])
                tpots.append(r["tpot_ms"]["p50"])
            except Exception as e:  # a failed session is recorded, not fatal: the soak goes on
                failures.append(f"{type(e).__name__}: {e}")
            sessions += 1
            dead = [d for d, p in workers.items() if p.poll() is not None]
            if dead:
                failures.append(f"worker(s) died: {dead}")
                break
            if time.monotonic() >= next_sample:
                next_sample += sample_s
                samples.append({"t_s": round(time.monotonic() - t0, 1), "tokens": generated,
                                "rss_mb": {d: rss_mb(pid) for d, pid in pids.items()}})
        stop.set()
        final = {"exchange": ex.stats().to_json(),
                 "devices": {d: s.to_json() for d, s in ex.device_stats().items()}}
        ex.close()
        recorder.close()
    finally:
        stop.set()
        stop_workers(workers)
    return {"minutes": minutes, "plr": plr, "tokens_per_session": tokens, "sessions": sessions,
            "tokens": generated, "failures": failures[:20], "failed_sessions": len(failures),
            "attack_sent": dict(sent), "tpot_p50_ms_median": sorted(tpots)[len(tpots) // 2] if tpots else None,
            "rss": rss_summary(samples), "samples": samples, **final}


def rss_summary(samples: list) -> dict:
    """Per process: RSS at start (after a warm-up tenth), at the end, and the growth between the
    means of the first and last fifths of the samples."""
    if len(samples) < 10:
        return {}
    warm = samples[len(samples) // 10:]
    k = max(1, len(warm) // 5)
    out = {}
    for d in warm[0]["rss_mb"]:
        vals = [s["rss_mb"][d] for s in warm if s["rss_mb"].get(d) is not None]
        early, late = sum(vals[:k]) / k, sum(vals[-k:]) / k
        out[d] = {"start_mb": round(vals[0], 1), "end_mb": round(vals[-1], 1), "max_mb": round(max(vals), 1),
                  "growth_mb": round(late - early, 1), "growth_pct": round(100 * (late - early) / early, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default=str(ROOT / "artifacts/smollm2-135m-pi5"))
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per soak session")
    ap.add_argument("--long-tokens", type=int, default=1000)
    ap.add_argument("--plr", type=float, default=0.10)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--attack-rate", type=float, default=20.0, help="hostile datagrams per second (0: none)")
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/soak.json"))
    a = ap.parse_args()
    os.nice(10)
    started = time.time()
    result = {"plan": a.plan, "started_unix": round(started)}
    if not a.skip_long:
        result["long"] = long_run(a.plan, a.long_tokens, a.plr, seed=1)
        print(json.dumps({k: v for k, v in result["long"].items() if k != "devices"}), file=sys.stderr, flush=True)
    result["soak"] = soak(a.plan, a.minutes, a.tokens, a.plr, a.sample_s, a.attack_rate)
    result["wall_s"] = round(time.time() - started, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    s = result["soak"]
    print(f"soak: {s['sessions']} sessions, {s['tokens']} tokens, {s['failed_sessions']} failures; RSS "
          + ", ".join(f"{d} {v['start_mb']}->{v['end_mb']} MB" for d, v in s["rss"].items()), file=sys.stderr)


if __name__ == "__main__":
    import importlib.util
    if importlib.util.find_spec("halo_runtime") is None:  # a bare checkout
        sys.path.insert(0, str(ROOT / "runtime"))
    main()
