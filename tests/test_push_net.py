"""Push rounds over real UDP sockets on loopback (net.push): workers in threads of this process,
each adding the parts on its own view. Nothing lost (fp32 wire): the in-process star's logits to
the last bit; under loss the pass completes, pulling lost critical parts again."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from halo_runtime.core.coordinator import Coordinator
from halo_runtime.core.draft import LookupDraft
from halo_runtime.core.exchange import DeviceLost
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.push import PushCoordinator, view_tensors
from halo_runtime.net.push import UdpPush, holders
from halo_runtime.net.pushtcp import TcpPush
from halo_runtime.net.shim import LossShim, PeerShims
from halo_runtime.net.worker import Worker
from test_runtime import halo_run

PROMPT = [5, 9, 14, 3, 7, 5, 9, 14]
SLOW = {"dead_after_s": 10.0, "rto_floor_ms": 300.0}
"""Deadlines no busy test machine misses: nothing lost, every view must use every part."""
FP32 = DeliveryPolicy(wire="fp32", **SLOW)


@pytest.fixture
def workers(tiny_plan, tiny_shards):
    """Start every remote device as a Worker thread; returns start(loss, plan) -> peers."""
    plan, _ = tiny_plan
    started, shims = [], []

    def start(loss: float = 0.0, plan=plan) -> dict:
        peers = {}
        for i, d in enumerate(plan.device_names):
            if d == plan.coordinator:
                continue
            shim = LossShim(loss, seed=10 + i) if loss and plan.device(d).loss > 0 else None
            shims.append(shim)
            w = Worker(plan, d, tiny_shards[d], "127.0.0.1", 0, shim=shim,
                       view_source=lambda: view_tensors(tiny_shards[plan.coordinator]))
            threading.Thread(target=w.serve_forever, daemon=True).start()
            started.append(w)
            peers[d] = w.address
        return peers

    yield start
    for w in started:
        w.close()
    for s in shims:
        if s is not None:
            s.close()


def _star(plan, shards, prompt, n, wire="fp32", **kw):
    coord = Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards, wire=wire))
    return coord.generate(prompt, n, keep_logits=True, **kw)


@pytest.mark.parametrize("wire", ["fp32", "fp16"])
def test_push_over_udp_gives_the_stars_logits_bit_for_bit(tiny_plan, tiny_shards, workers, wire):
    """fp16 too: a device computes on its input rounded as the star's request would carry it, adds
    its own part rounded as it sends it, and the coordinator's residual travels in fp32 (this plan's
    coordinator holds no group of a network round, so its rounded parts do not show)."""
    plan, _ = tiny_plan
    mesh = UdpPush(plan, workers(), DeliveryPolicy(wire=wire, **SLOW), bind_host="127.0.0.1")
    try:
        push = PushCoordinator(plan, tiny_shards[plan.coordinator], mesh)
        got = push.generate(PROMPT, 8, session=7, keep_logits=True)
        again = push.generate(PROMPT, 8, session=8, draft=LookupDraft(), draft_tokens=3)  # passes of several rows
        devices = mesh.device_stats()
    finally:
        mesh.close()
    ref = _star(plan, tiny_shards, PROMPT, 8, wire)
    assert got.tokens == ref.tokens == again.tokens
    assert all(np.array_equal(a, b) for a, b in zip(got.logits, ref.logits))
    assert mesh.stats().compensated == 0
    assert set(devices) == set(plan.device_names) - {plan.coordinator}
    assert all(s.view_compensated == 0 for s in devices.values())  # every view used every part


@pytest.mark.parametrize("wire", ["fp32", "fp16"])
def test_strict_push_over_tcp_gives_the_stars_logits_bit_for_bit(tiny_plan, tiny_shards, workers, wire):
    """Every device connects to every other; every part awaited: the star's bits, twice in a row
    (a second session connects afresh)."""
    plan, _ = tiny_plan
    mesh = TcpPush(plan, workers(), DeliveryPolicy(wire=wire, **SLOW))
    try:
        push = PushCoordinator(plan, tiny_shards[plan.coordinator], mesh)
        got = push.generate(PROMPT, 8, session=3, keep_logits=True)
        again = push.generate(PROMPT, 8, session=4, draft=LookupDraft(), draft_tokens=3)
    finally:
        mesh.close()
    ref = _star(plan, tiny_shards, PROMPT, 8, wire)
    assert got.tokens == ref.tokens == again.tokens
    assert all(np.array_equal(a, b) for a, b in zip(got.logits, ref.logits))
    assert mesh.stats().relaxed_parts > 0 and mesh.stats().compensated == 0


@pytest.mark.parametrize("pick", ["all", "every third", "the first two"])
@pytest.mark.parametrize("strict", [False, True])
def test_star_rounds_among_push_rounds_over_the_network_give_the_stars_logits(tiny_plan, tiny_shards, workers,
                                                                              strict, pick):
    """Workers send a star round's part to the coordinator alone and wait for the residual it hands
    out next (UDP and strict TCP): the star's bits, every view using every part."""
    from test_push import _starred

    plan = _starred(tiny_plan[0], pick)
    peers = workers(plan=plan)
    mesh = TcpPush(plan, peers, FP32) if strict else UdpPush(plan, peers, FP32, bind_host="127.0.0.1")
    try:
        push = PushCoordinator(plan, tiny_shards[plan.coordinator], mesh)
        got = push.generate(PROMPT, 8, session=5, keep_logits=True)
        again = push.generate(PROMPT, 8, session=6, draft=LookupDraft(), draft_tokens=3)
        devices = mesh.device_stats() if not strict else {}
    finally:
        mesh.close()
    ref = _star(plan, tiny_shards, PROMPT, 8)
    assert got.tokens == ref.tokens == again.tokens
    assert all(np.array_equal(a, b) for a, b in zip(got.logits, ref.logits))
    assert mesh.stats().compensated == 0
    assert all(s.view_compensated == 0 for s in devices.values())


def test_push_over_udp_under_loss_completes_pulling_lost_parts(tiny_plan, tiny_shards, workers):
    plan, _ = tiny_plan
    peers = workers(loss=0.3)
    lossy = [d for d in plan.device_names if plan.device(d).loss > 0]
    shim = PeerShims({peers[d]: LossShim(0.3, seed=20 + i) for i, d in enumerate(lossy)})
    mesh = UdpPush(plan, peers, FP32, bind_host="127.0.0.1", shim=shim)
    try:
        gen = PushCoordinator(plan, tiny_shards[plan.coordinator], mesh).generate(PROMPT, 10, session=9)
    finally:
        mesh.close()
        shim.close()
    assert len(gen.tokens) == 10
    stats = mesh.stats()
    assert stats.retransmissions > 0  # 30% loss: a critical part or a residual was pulled again
    assert stats.relaxed_parts > 0


def test_holders_put_the_coordinators_mlp_in_one_awaited_part(tiny_plan):
    plan, _ = tiny_plan
    h = holders(plan)
    for layer in range(plan.model.num_layers):
        assert plan.coordinator not in h["relaxed"][layer]
        assert (plan.coordinator in h["crit"][layer]) == bool(plan.groups_on(plan.coordinator, layer, "mlp"))


def test_local_push_rounds_relaxed_and_strict_give_the_reference_tokens(tiny_plan, tiny_vocab_dir):
    from test_runtime import PROMPT as TEXT
    from test_runtime import reference

    from halo_runtime.core.plandir import TOKENIZER_FILE
    from halo_runtime.core.tokenizer import Tokenizer

    plan, directory = tiny_plan
    out = halo_run("local", "--plan", str(directory), "--rounds", "push", "--compare", "--prompt", TEXT,
                   "--max-tokens", "8", "--ignore-eos", "--wire", "fp32", "--plr", "0", "--json", "--quiet")
    tokens, _ = reference(tiny_vocab_dir, Tokenizer.from_file(directory / TOKENIZER_FILE).encode(TEXT), 8)
    assert [r["sync"] for r in out["runs"]] == ["relaxed", "strict"]
    for r in out["runs"]:
        assert r["tokens"] == tokens
        assert r["compensated_share"] == 0.0


def test_a_plan_for_slow_links_runs_push_rounds_unless_told(tiny_vocab_dir, tmp_path):
    """The compiler records the rounds its cost model finds cheaper (push where every link is 2 ms
    away), `halo-run` runs them unless `--rounds` says otherwise, and eval scores them by default."""
    from conftest import compile_tiny
    from test_runtime import PROMPT as TEXT

    from halo_compile.evaluate import EvalOptions, evaluate

    plan, directory = compile_tiny(tiny_vocab_dir, tmp_path, latency_ms=2.0, coordinator_gflops=0.001)
    assert plan.network_rounds() and plan.rounds == "push"
    assert plan.star_rounds  # the last round's sum only the coordinator needs
    args = ("local", "--plan", str(directory), "--prompt", TEXT, "--max-tokens", "6", "--ignore-eos", "--wire", "fp32",
            "--plr", "0", "--json", "--quiet")
    pushed, star = halo_run(*args), halo_run(*args, "--rounds", "star")
    assert (pushed["rounds"], star["rounds"]) == ("push", "star")
    assert (pushed["star_rounds"], star["star_rounds"]) == (len(plan.star_rounds), 0)
    assert pushed["tokens"] == star["tokens"]
    report = evaluate(directory, EvalOptions(plrs=(0.0,), tokens=60, context=30, recall_windows=0, greedy_prompts=0,
                                             progress=False))
    assert report["rounds"] == "push" and report["results"][0]["views"]["differing"] == 0


@pytest.mark.parametrize("sync", ["relaxed", "strict"])
def test_sessions_sharing_push_passes_get_the_lone_logits(roomy_plan, sync):
    """Several sessions in one push pass (what `serve --rounds push` runs): each view attends with
    each session's own KV cache, and every session's logits are the ones it gets alone, bit for bit."""
    from halo_runtime.core.shards import load_shard
    from test_batch import PROMPTS, TOKENS, alone, assert_same, batched_greedy

    plan, directory = roomy_plan
    shards = {d: load_shard(directory, plan, d) for d in plan.device_names}
    started, peers, meshes = [], {}, []
    for d in plan.device_names:
        if d != plan.coordinator:
            w = Worker(plan, d, shards[d], "127.0.0.1", 0, view_source=lambda: view_tensors(shards[plan.coordinator]))
            threading.Thread(target=w.serve_forever, daemon=True).start()
            started.append(w)
            peers[d] = w.address

    def make():
        meshes.append(TcpPush(plan, peers, FP32) if sync == "strict" else
                      UdpPush(plan, peers, FP32, bind_host="127.0.0.1"))
        return PushCoordinator(plan, shards[plan.coordinator], meshes[-1])

    try:
        lone = [alone(make, p) for p in PROMPTS]
        assert_same(batched_greedy(make(), PROMPTS, TOKENS), lone)
        assert all(m.stats().compensated == 0 for m in meshes)
    finally:
        for m in meshes:
            m.close()
        for w in started:
            w.close()


def test_a_worker_without_the_view_tensors_is_named_at_the_start(tiny_plan, tiny_shards):
    """It logs why and does not answer the push HELLO, so the coordinator names it before any token."""
    plan, _ = tiny_plan
    logged, started, peers = [], [], {}
    for d in plan.device_names:
        if d == plan.coordinator:
            continue
        source = None if d == plan.device_names[-1] else (lambda: view_tensors(tiny_shards[plan.coordinator]))
        w = Worker(plan, d, tiny_shards[d], "127.0.0.1", 0, view_source=source, log=logged.append)
        threading.Thread(target=w.serve_forever, daemon=True).start()
        started.append(w)
        peers[d] = w.address
    mesh = UdpPush(plan, peers, FP32, bind_host="127.0.0.1")
    try:
        with pytest.raises(DeviceLost, match=f"{plan.device_names[-1]} .*does not start push rounds"):
            mesh.begin(5, timeout_s=3.0)
    finally:
        mesh.close()
        for w in started:
            w.close()
    assert any("cannot run push rounds" in line for line in logged)
