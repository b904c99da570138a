"""Hardening: hostile datagrams against live workers, device failure, a coordinator with
the wrong deployment key (the key files themselves: test_keys.py).

Workers are real `halo-run worker` processes on loopback (`liveworkers`: started once for the
module, a killed one started again before the next test); the coordinator runs in the test
process, or as `halo-run generate` where the exit code matters. A restarted device's rejoin, and
push rounds coming back after a loss: test_rejoin.py.
"""
from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
from halo_runtime.core.codec import HEADER_SIZE, decode_request
from halo_runtime.core.plandir import new_key
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.shards import load_shard
from halo_runtime.net.auth import Authenticator
from halo_runtime.net.exchange import UdpExchange
from halo_runtime.net.wire import Kind, Message, Reassembler, encode
from halo_runtime.net.worker import WorkerStats
from liveworkers import PROMPT, AwaitAll, env_with, only_relaxed, with_attention

pytest_plugins = ("liveworkers",)


# ---- hostile datagrams -----------------------------------------------------------------------

class Recorder:
    """Stands where a loss shim would: keeps copies of what the coordinator sends."""

    def __init__(self):
        self.kept: list[tuple[bytes, tuple]] = []
        self.lock = threading.Lock()

    def send_datagram(self, send, data, addr):
        with self.lock:
            self.kept.append((bytes(data), tuple(addr[:2])))
            del self.kept[:-500]
        send(data, addr)

    def close(self):
        pass


def _attack(targets: list, coordinator: tuple, rec: Recorder, key: bytes, stop: threading.Event, sent: dict):
    rng = random.Random(5)
    wrong = Authenticator(new_key())
    insider = Authenticator(key)  # valid tag, but a session nobody started
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        while not stop.is_set():
            with rec.lock:
                kept = list(rec.kept[-200:])
            for kind in ("garbage", "forged", "replayed", "misdirected", "truncated", "oversized", "session"):
                addr = rng.choice(targets)
                if kind == "garbage":
                    data = rng.randbytes(rng.randint(0, 1400))
                elif kind == "forged":
                    data = encode(Message(Kind.REQUEST_ATTN, rng.getrandbits(32), 0, 0, 0, rng.randbytes(300)),
                                  auth=wrong)[0]
                elif kind == "session":
                    # sender 999 is no device: a keyed sender reusing a real index would own its window
                    data = encode(Message(Kind.REQUEST_MLP, 12345, rng.randint(10 ** 6, 10 ** 7), 0, 999, rng.randbytes(100)), auth=insider,
                                  dest=1)[0]
                    addr = targets[0]
                elif not kept:
                    continue
                else:
                    data, orig = rng.choice(kept)
                    if kind == "replayed":
                        addr = orig
                    elif kind == "misdirected":
                        addr = next((t for t in targets if t != orig), orig)
                    elif kind == "truncated":
                        data = data[:rng.randint(1, len(data) - 1)]
                    else:
                        data = data + rng.randbytes(rng.randint(1, 64))
                for a in (addr, coordinator) if kind in ("garbage", "forged") else (addr,):
                    s.sendto(data, a)
                sent[kind] = sent.get(kind, 0) + 1
            time.sleep(0.002)


def _assert_no_activation_in_clear(captured: list[bytes], key: bytes, width: int) -> None:
    """What an eavesdropper recorded of a run: the requests' activations (decoded here with the
    key) appear nowhere in the recorded bytes, not even two fp32 values in a row."""
    r = Reassembler(auth=Authenticator(key))
    requests = [m for m in map(r.feed, captured) if m is not None and m.kind in (Kind.REQUEST_ATTN, Kind.REQUEST_MLP)]
    values = b"".join(decode_request(m.payload, width)[3].astype("<f4").tobytes() for m in requests)
    runs = {values[i:i + 8] for i in range(0, len(values) - 7, 4)}
    assert len(requests) > 50 and len(runs) > 5_000, (len(requests), len(runs))
    seen = [d for d in captured if any(d[i:i + 8] in runs for i in range(HEADER_SIZE, len(d) - 7))]
    assert not seen, f"{len(seen)} of {len(captured)} datagrams carry activations in clear"
    print(f"recorded {len(captured)} datagrams: {len(requests)} requests' {len(runs)} runs of two fp32 values "
          "occur in none")
    eve = Reassembler(auth=Authenticator(new_key()))
    assert not [m for m in map(eve.feed, captured) if m] and eve.counters.forged == len(captured)


def test_forged_garbage_and_replayed_datagrams_change_nothing(plan_dir, key, reference, workers):
    plan = workers.plan
    shard = load_shard(plan_dir, plan, plan.coordinator)

    def run(attacked: bool):
        rec = Recorder()
        ex = UdpExchange(plan, workers.peers, DeliveryPolicy(wire="fp32"), bind_host="127.0.0.1", shim=rec,
                         auth=Authenticator(key))
        stop, sent = threading.Event(), {}
        t = threading.Thread(target=_attack, args=(list(workers.peers.values()), ex.endpoint.address, rec, key,
                                                   stop, sent))
        try:
            if attacked:
                t.start()
            gen = AwaitAll(plan, shard, ex).generate(PROMPT, 24, session=random.getrandbits(32), keep_logits=True)
        finally:
            stop.set()
            if attacked:
                t.join()
        time.sleep(0.2)  # let the last hostile datagrams land before reading the counters
        stats, devices = ex.stats(), ex.device_stats()
        ex.close()
        return gen, stats, devices, sent, rec

    quiet, _, _, _, captured = run(False)
    _assert_no_activation_in_clear([d for d, _ in captured.kept], key, plan.model.hidden_size)
    gen, stats, devices, sent, _ = run(True)
    assert quiet.tokens == reference.tokens
    assert gen.tokens == reference.tokens
    for a, b in zip(gen.logits, reference.logits):
        assert np.allclose(a, b, atol=1e-4)
    total = {f.name: sum(getattr(d, f.name) for d in devices.values())
             for f in fields(WorkerStats) if f.name != "device"}
    print(f"hostile datagrams sent: {sent}; dropped by the workers: {total}; by the coordinator: {stats.dropped}")
    assert min(sent.values()) > 10, sent
    for reason in ("dropped_forged", "dropped_misdirected", "dropped_bad_length"):
        assert total[reason] > 0, (reason, total)
    # a replay of a datagram still held is a byte-identical copy: dropped unopened, as one
    assert total["dropped_replayed"] + total["dropped_duplicates"] >= sent["replayed"] // 2, total
    assert total["unknown_session"] >= sent["session"] // 2, total
    assert total["dropped_malformed"] + total["dropped_bad_length"] >= sent["garbage"] // 2
    assert stats.dropped.forged > 0 and stats.dropped.bad_length + stats.dropped.malformed > 0


# ---- device failure ----------------------------------------------------------------------------

def _generate_cmd(plan_dir: Path, peers: dict, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "halo_runtime.cli", "generate", "--plan", str(plan_dir), "--prompt", "Hello there",
           "--max-tokens", "200", "--ignore-eos"]
    for d, (h, p) in peers.items():
        cmd += ["--peer", f"{d}={h}:{p}"]
    return cmd + list(extra)


def _run_and_kill(cmd, key, workers, victim: str, after_token: int = 5, timeout: float = 120):
    """Start the coordinator, kill `victim` once token `after_token` is printed; (rc, stderr, seconds
    from the kill to the coordinator's exit, stdout)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with(key))
    lines, killed_at = [], None
    try:
        deadline = time.monotonic() + timeout
        for line in proc.stderr:
            lines.append(line)
            if killed_at is None and line.lstrip().startswith(f"token {after_token:>3}"):
                workers.kill(victim)
                killed_at = time.monotonic()
            assert time.monotonic() < deadline, "coordinator hangs"
        out = proc.stdout.read()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert killed_at is not None, "".join(lines[-20:])
    return proc.returncode, "".join(lines), time.monotonic() - killed_at, out


def test_relaxed_worker_killed_generation_completes_with_one_warning(plan_dir, key, workers):
    victim = only_relaxed(workers.plan)
    rc, err, _, _ = _run_and_kill(_generate_cmd(plan_dir, workers.peers), key, workers, victim)
    assert rc == 0, err[-2000:]
    warnings = [l for l in err.splitlines() if l.startswith("halo-run: warning:")]
    assert len(warnings) == 1 and f"device {victim} " in warnings[0] and "compensated" in warnings[0], warnings
    assert "token 199" in err and "Traceback" not in err


def test_critical_worker_killed_is_replaced_within_dead_after(plan_dir, key, workers):
    """The plan's failover (tests/test_failover.py has the rest): the token the death interrupted
    arrives after the policy's dead_after_s of silence plus the switch, and generation goes on."""
    victim = with_attention(workers.plan)
    assert workers.plan.failover_for(victim).absorbable
    cmd = _generate_cmd(plan_dir, workers.peers, "--max-tokens", "40", "--json", "--draft", "none")
    rc, err, _, out = _run_and_kill(cmd, key, workers, victim)
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    result = json.loads(out)
    (f,) = result["failovers"]
    assert f["device"] == victim and len(result["tokens"]) == 40
    # a multiple of the policy, not an absolute bound: the whole check scales with that setting
    dead_after_s = DeliveryPolicy().dead_after_s
    interrupted = result["per_token"][f["token"]]["total_ms"] / 1e3
    assert dead_after_s < interrupted < 2 * dead_after_s + f["switch_ms"] / 1e3, (interrupted, f)
    print(f"critical device {victim} killed: the interrupted token took {interrupted:.2f} s "
          f"(switch {f['switch_ms']:.0f} ms)")


# ---- deployment keys -----------------------------------------------------------------------------

def _halo_run(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "halo_runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_error_line(r, *parts):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("halo-run: error: "), r.stderr
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


def test_coordinator_with_the_wrong_key_is_ignored(plan_dir, key, workers):
    other = plan_dir.parent / "other.key"
    other.write_text(new_key().hex() + "\n")
    cmd = _generate_cmd(plan_dir, workers.peers, "--key-file", str(other), "--max-tokens", "2")[3:]
    before = _forged_counts(workers, key)
    r = _halo_run(*cmd)  # gives up after the handshake timeout (timed in test_bad_input.test_unreachable_peer)
    _one_error_line(r, "does not answer", "key")
    after = _forged_counts(workers, key)  # the workers saw only forgeries, and count them
    assert all(after[d] > before[d] for d in after), (before, after)


def _forged_counts(workers, key: bytes) -> dict[str, int]:
    """Each worker's count of datagrams dropped for a bad tag, asked by a coordinator with the right key."""
    ex = UdpExchange(workers.plan, workers.peers, bind_host="127.0.0.1", auth=Authenticator(key))
    try:
        ex.begin(random.getrandbits(32))
        return {d: s.dropped_forged for d, s in ex.device_stats().items()}
    finally:
        ex.close()
