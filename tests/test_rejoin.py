"""A device that restarts rejoins the session with its KV caches rebuilt, and push rounds that a
loss moved to the star come back at the next session that finds every device, against live
`halo-run worker` processes on loopback (`liveworkers`)."""
from __future__ import annotations

import random
import threading
import time

import numpy as np
from halo_runtime.core.coordinator import Coordinator
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.shards import load_shard
from halo_runtime.net.auth import Authenticator
from halo_runtime.net.exchange import UdpExchange
from liveworkers import PROMPT, AwaitAll, only_relaxed, with_attention

pytest_plugins = ("liveworkers",)


def _kill_at(workers, victim: str, step: int):
    """An on_token callback that kills `victim` at token `step`."""

    def on_token(at, token, stats):
        if at == step:
            workers.kill(victim)

    return on_token


def _restart_at(workers, victim: str, step: int):
    """(set once done, an on_token callback) that kills `victim` at token `step` and starts it again
    on the same port; the coordinator carries on at once, into a dead device."""
    restarted = threading.Event()

    def restart():
        workers.kill(victim)
        workers.start(victim, workers.peers[victim][1])
        workers.wait_ready(victim)
        restarted.set()

    def on_token(at, token, stats):
        if at == step:
            threading.Thread(target=restart, daemon=True).start()

    return restarted, on_token


def test_restarted_worker_rejoins_and_output_matches(plan_dir, key, reference, workers):
    """Kill a device holding attention (KV state) mid-generation and start it again on the same port:
    the coordinator rebuilds its KV cache from the attention inputs it sent, and the tokens are those
    of an undisturbed run."""
    plan = workers.plan
    victim = with_attention(plan)
    shard = load_shard(plan_dir, plan, plan.coordinator)
    warned = []
    ex = UdpExchange(plan, workers.peers, DeliveryPolicy(wire="fp32", dead_after_s=60), bind_host="127.0.0.1",
                     auth=Authenticator(key), warn=warned.append)
    restarted, on_token = _restart_at(workers, victim, 8)
    try:
        gen = AwaitAll(plan, shard, ex).generate(PROMPT, 24, session=random.getrandbits(32), keep_logits=True,
                                                 on_token=on_token)
        stats = ex.stats()
        rebuilt = ex.device_stats()[victim].rebuilt_tokens
    finally:
        ex.close()
    assert restarted.is_set()
    assert stats.rejoins == 1 and any(f"device {victim} rejoined" in w for w in warned), warned
    assert rebuilt > len(PROMPT)
    print(f"{victim} restarted mid-generation; KV cache rebuilt from {rebuilt} token-layer rows; {warned}")
    assert gen.tokens == reference.tokens
    for a, b in zip(gen.logits, reference.logits):
        assert np.allclose(a, b, atol=1e-3)


def test_a_worker_restarted_in_strict_rounds_rejoins_and_output_matches(plan_dir, key, reference, workers):
    """The same restart in strict rounds: its TCP connection breaks, the coordinator connects again
    as soon as it listens, it answers the RESUME HELLO with RESET, its KV caches are rebuilt and the
    round in flight is sent to it again: no failover, the undisturbed run's tokens."""
    from halo_runtime.net.tcpexchange import TcpExchange

    plan = workers.plan
    victim = with_attention(plan)
    shard = load_shard(plan_dir, plan, plan.coordinator)
    warned = []
    ex = TcpExchange(plan, workers.peers, DeliveryPolicy(wire="fp32", dead_after_s=60), auth=Authenticator(key),
                     warn=warned.append)
    restarted, on_token = _restart_at(workers, victim, 8)
    try:
        gen = Coordinator(plan, shard, ex).generate(PROMPT, 24, session=random.getrandbits(32), keep_logits=True,
                                                    on_token=on_token)
        stats = ex.stats()
    finally:
        ex.close()
    assert restarted.is_set()
    assert gen.failovers == [] and stats.rejoins == 1, (gen.failovers, warned)
    assert any(f"device {victim} restarted and rejoined" in w for w in warned), warned
    assert gen.tokens == reference.tokens
    for a, b in zip(gen.logits, reference.logits):
        assert np.allclose(a, b, atol=1e-3)


def test_a_worker_restarted_in_push_rounds_rejoins_and_output_matches(plan_dir, key, reference, workers, capfd):
    """The same restart in push rounds: the views wait for its part until `dead_after_s`, the star's
    HELLO finds it restarted (RESET), its KV caches are rebuilt up to the interrupted pass, and the
    session goes on in star rounds with it: no failover, the undisturbed run's tokens. The next
    session runs in push rounds again."""
    from halo_runtime.core.push import PushCoordinator
    from halo_runtime.net.push import UdpPush

    plan = workers.plan
    victim = with_attention(plan)
    shard = load_shard(plan_dir, plan, plan.coordinator)
    # deadlines no busy machine misses (no view estimates a part), a restart detected in 2 s
    policy = DeliveryPolicy(wire="fp32", dead_after_s=2.0, rto_floor_ms=300.0)
    mesh = UdpPush(plan, workers.peers, policy, bind_host="127.0.0.1", auth=Authenticator(key))
    restarted, on_token = _restart_at(workers, victim, 8)
    try:
        coord = PushCoordinator(plan, shard, mesh)
        gen = coord.generate(PROMPT, 24, session=random.getrandbits(32), keep_logits=True, on_token=on_token)
        stats = mesh.stats()
        assert mesh.star is not None and not coord.pushing
        # the next session finds every device: push rounds again
        again = coord.generate(PROMPT, 24, session=random.getrandbits(32))
        assert mesh.star is None and coord.pushing and again.tokens == reference.tokens
    finally:
        mesh.close()
    err = capfd.readouterr().err
    assert restarted.is_set()
    assert gen.failovers == [] and stats.rejoins == 1, (gen.failovers, stats)
    assert f"device {victim} restarted and rejoined the session" in err, err[-2000:]
    print(f"{victim} restarted in push rounds: the interrupted token took "
          f"{max(t.total_ms for t in gen.token_stats) / 1e3:.2f} s (dead_after_s {policy.dead_after_s:g})")
    assert gen.tokens == reference.tokens
    for a, b in zip(gen.logits, reference.logits):
        assert np.allclose(a, b, atol=1e-3)


def test_a_replaced_device_takes_its_groups_back_at_the_first_session_after_it_answers(plan_dir, key, reference,
                                                                                        workers):
    """A critical device killed mid-generation is replaced by the plan's failover; the next session
    replaces it again at once (no dead_after wait); restarted, it takes its groups back at the next."""
    plan = workers.plan
    victim = with_attention(plan)
    shard = load_shard(plan_dir, plan, plan.coordinator)
    warned = []
    ex = UdpExchange(plan, workers.peers, DeliveryPolicy(wire="fp32", dead_after_s=1), bind_host="127.0.0.1",
                     auth=Authenticator(key), warn=warned.append)
    coord = AwaitAll(plan, shard, ex)
    on_token = _kill_at(workers, victim, 5)
    try:
        gen = coord.generate(PROMPT, 24, session=random.getrandbits(32), on_token=on_token)
        assert [f.device for f in gen.failovers] == [victim] and coord.failed == ex.failed == victim
        t0 = time.monotonic()
        again = coord.generate(PROMPT, 24, session=random.getrandbits(32))
        assert time.monotonic() - t0 < 1.0 and coord.failed == victim and again.failovers == []  # still replaced
        workers.start(victim, workers.peers[victim][1])
        workers.wait_ready(victim)
        back = coord.generate(PROMPT, 24, session=random.getrandbits(32))
        assert coord.failed is None and ex.failed is None and back.failovers == []
    finally:
        ex.close()
    assert any(f"device {victim} answers again" in w for w in warned), warned
    # the same tokens before, during and after: greedy, nothing lost, every part awaited
    assert gen.tokens == again.tokens == back.tokens == reference.tokens


def test_push_rounds_start_again_at_the_first_session_that_finds_every_device(plan_dir, key, reference, workers):
    """Push rounds that lost a critical device go on in star rounds with its failover, and stay there
    while it is dead; restarted, it takes its groups back at the next session, which runs in push
    rounds again."""
    from halo_runtime.core.push import PushCoordinator
    from halo_runtime.net.push import UdpPush

    plan = workers.plan
    victim = with_attention(plan)
    shard = load_shard(plan_dir, plan, plan.coordinator)
    mesh = UdpPush(plan, workers.peers, DeliveryPolicy(wire="fp32", dead_after_s=1.0, rto_floor_ms=300.0),
                   bind_host="127.0.0.1", auth=Authenticator(key))
    coord = PushCoordinator(plan, shard, mesh)
    on_token = _kill_at(workers, victim, 5)
    try:
        gen = coord.generate(PROMPT, 24, session=random.getrandbits(32), on_token=on_token)
        assert [f.device for f in gen.failovers] == [victim] and not coord.pushing
        again = coord.generate(PROMPT, 24, session=random.getrandbits(32))
        assert coord.failed == victim and not coord.pushing  # still replaced: star rounds
        workers.start(victim, workers.peers[victim][1])
        workers.wait_ready(victim)
        back = coord.generate(PROMPT, 24, session=random.getrandbits(32))
        assert coord.failed is None and coord.pushing and mesh.star is None and back.failovers == []
    finally:
        mesh.close()
    assert gen.tokens == again.tokens == back.tokens == reference.tokens


def test_relaxed_device_marked_down_is_used_again_when_it_returns(plan_dir, key, workers):
    plan = workers.plan
    victim = only_relaxed(plan)
    shard = load_shard(plan_dir, plan, plan.coordinator)
    warned = []
    ex = UdpExchange(plan, workers.peers, DeliveryPolicy(wire="fp32", down_after_s=0.5, probe_every_s=0.2),
                     bind_host="127.0.0.1", auth=Authenticator(key), warn=warned.append)
    seen_down = []

    def on_token(step, token, stats):
        if step == 3:
            workers.kill(victim)
        if victim in ex.down and not seen_down:
            seen_down.append(step)
            workers.start(victim, workers.peers[victim][1])
            workers.wait_ready(victim)

    try:
        gen = Coordinator(plan, shard, ex).generate(PROMPT, 200, session=random.getrandbits(32), on_token=on_token)
        stats = ex.stats()
    finally:
        ex.close()
    assert len(gen.tokens) == 200 and seen_down, (seen_down, warned)
    assert stats.devices_down == 1 and stats.rejoins == 1 and not stats.down, stats
    assert [w.split(" (")[0] for w in warned] == [f"device {victim}", f"device {victim} rejoined the session"]
