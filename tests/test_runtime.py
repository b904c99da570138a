"""The runtime executes a plan exactly: in process, over UDP (relaxed) and over TCP (strict).

Uses the tiny compiled plan (4 devices, one lossy, uneven groups); worker processes run on
loopback and are always stopped by `halo-run local` itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from halo_compile.reference import FullModel
from halo_runtime.core.coordinator import Coordinator
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.plandir import TOKENIZER_FILE
from halo_runtime.core.shards import load_shard
from halo_runtime.core.tokenizer import Tokenizer

PROMPT = "The capital of France is"


def reference(model_dir, prompt_ids, n):
    from halo_compile.load import load_model

    m = load_model(str(model_dir), progress=False)
    full = FullModel(m.config, m.weights)
    logits = [full.logits(torch.tensor(prompt_ids))[-1]]
    tokens = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        logits.append(full.logits(torch.tensor([tokens[-1]]))[-1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def halo_run(*args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "halo_runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def shards(tiny_plan):
    plan, directory = tiny_plan
    return {d: load_shard(directory, plan, d) for d in plan.device_names}


def test_plan_uses_every_device_and_has_relaxed_groups_on_the_lossy_one(tiny_plan):
    plan, _ = tiny_plan
    # the slow coordinator (conftest.cluster_yaml) may keep nothing; every other device holds groups
    assert len(plan.devices) == 4 and {g.device for g in plan.groups} >= set(plan.device_names[1:])
    lossy = [d.name for d in plan.devices if d.loss > 0]
    assert lossy and all(any(g.device == name and not g.critical for g in plan.groups) for name in lossy)
    sizes = {len(g.members) for g in plan.groups if g.kind == "mlp"}
    assert len(sizes) > 1, "groups should have uneven sizes"


def test_in_process_matches_single_device_model(tiny_plan, shards, tiny_vocab_dir):
    plan, _ = tiny_plan
    prompt = [5, 17, 300, 42, 500]
    coord = Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards))
    gen = coord.generate(prompt, 16, keep_logits=True)
    tokens, logits = reference(tiny_vocab_dir, prompt, 16)
    assert gen.tokens == tokens
    for ours, ref in zip(gen.logits, logits):
        ref = ref.numpy()
        assert np.allclose(ours, ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))


def test_compensation_replaces_missing_relaxed_parts(tiny_plan, shards):
    plan, _ = tiny_plan
    lossy = {d.name: 1.0 for d in plan.devices if d.loss > 0}  # every relaxed part lost
    ex = InProcessExchange(plan, shards, miss=lossy)
    coord = Coordinator(plan, shards[plan.coordinator], ex)
    coord.predictors = [{**p, "bias": p["bias"] - 1e6} for p in coord.predictors]  # never await
    gen = coord.generate([5, 17, 300], 4)
    expected = 4 * sum(bool(coord.relaxed[layer].get(d)) for layer in range(plan.model.num_layers) for d in lossy)
    assert ex.stats().compensated == expected > 0
    missing = {d for s in gen.token_stats for d in s.missing}
    assert missing == set(lossy)
    assert sum(sum(s.missing.values()) for s in gen.token_stats) == expected


JSON_EXCHANGE_KEYS = {
    "relaxed": ["retransmissions", "late", "malformed", "compensated", "relaxed_parts", "awaited_relaxed",
                "max_relaxed_overshoot_ms", "unknown_session", "devices_down", "rejoins", "bytes_sent",
                "bytes_received", "datagrams_sent", "datagrams_received", "duplicates", "dropped", "down", "rto_ms"],
    "strict": ["rejoins", "bytes_sent", "bytes_received", "dropped"]}
JSON_DROP_KEYS = {
    "relaxed": ["malformed", "bad_length", "forged", "misdirected", "replayed", "stale", "unknown_session"],
    "strict": ["malformed", "bad_length", "forged", "misdirected", "replayed", "stale"]}


def test_local_network_fp32_matches_single_device_model(tiny_plan, tiny_vocab_dir):
    """Relaxed (UDP), then strict (TCP), on one set of worker processes (`--compare`)."""
    plan, directory = tiny_plan
    out = halo_run("local", "--plan", str(directory), "--prompt", PROMPT, "--max-tokens", "12", "--ignore-eos",
                   "--wire", "fp32", "--plr", "0", "--compare", "--json", "--quiet")
    prompt = Tokenizer.from_file(directory / TOKENIZER_FILE).encode(PROMPT)
    tokens, _ = reference(tiny_vocab_dir, prompt, 12)
    assert [r["sync"] for r in out["runs"]] == ["relaxed", "strict"]
    for r in out["runs"]:
        assert r["tokens"] == tokens
        assert r["compensated_share"] == 0.0
        assert set(r["tpot_ms"]) == {"p50", "p90", "p99"}
        assert set(r["peak_rss_mb"]) == set(plan.device_names)
        # other tools read these keys: each exchange reports its own counters, and each worker its own
        assert list(r["exchange"]) == JSON_EXCHANGE_KEYS[r["sync"]]
        assert list(r["exchange"]["dropped"]) == JSON_DROP_KEYS[r["sync"]]
        assert {s["device"] for s in r["devices"].values()} == set(plan.device_names) - {plan.coordinator}
        # every process's CPU of this run (each worker counts from its session's HELLO), per token
        cpu = r["cpu_ms_per_token"]
        assert set(cpu) == set(plan.device_names) and min(cpu.values()) >= 0 and cpu[plan.coordinator] > 0, cpu
        assert sum(cpu.values()) - cpu[plan.coordinator] > 0, cpu


def test_under_loss_relaxed_completes_and_strict_stays_exact(tiny_plan, tiny_vocab_dir):
    plan, directory = tiny_plan
    out = halo_run("local", "--plan", str(directory), "--prompt", PROMPT, "--max-tokens", "10", "--ignore-eos",
                   "--wire", "fp32", "--plr", "0.3", "--json", "--quiet", "--seed", "3", "--compare")
    relaxed, strict = out["runs"]
    prompt = Tokenizer.from_file(directory / TOKENIZER_FILE).encode(PROMPT)
    tokens, _ = reference(tiny_vocab_dir, prompt, 10)
    assert (relaxed["sync"], strict["sync"]) == ("relaxed", "strict")
    assert strict["tokens"] == tokens
    assert len(relaxed["tokens"]) == 10
    ex = relaxed["exchange"]
    assert ex["retransmissions"] > 0  # 30% loss: critical parts were re-requested
    # A relaxed part is compensated at its deadline, never awaited for a retransmission cycle: its
    # worst overshoot stays below a typical strict token, which waits for TCP's retransmissions.
    # (Relative to a run on the same machine at the same time, not in absolute ms: a busy machine
    # stretches both.)
    assert ex["max_relaxed_overshoot_ms"] < strict["tpot_ms"]["p50"], (ex, strict["tpot_ms"])
    assert relaxed["tpot_ms"]["p50"] < strict["tpot_ms"]["p50"]
