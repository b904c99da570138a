"""The compiler's failover (halo_compile.failover): for each remote device holding a critical group,
where its groups go if it dies. The pure function on small hand-made clusters (every group moves,
to survivors only, within their free RAM; infeasible cases name the device; deterministic;
relaxed-only devices get none), then a tiny compile: the plan records it, survivors' shards hold
the adopted groups' weights, and a survivor computes from them exactly what the dead device did.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from conftest import cluster_yaml
from halo_runtime.core.device import DeviceCompute
from halo_runtime.core.plan import Device, Failover, Plan, load_plan
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.shards import FAILOVER_PREFIX, adopted_plan, adopted_shard, failover_tensor, load_shard

from halo_compile.failover import free_ram, held_bytes, plan_failover, session_slots
from halo_compile.place import GroupCost, PlacementInputs, PlaceOptions, expected_lost_importance, predicted_token_ms
from halo_compile.placecost import group_cost

MB = 10**6
GROUP_BYTES = MB // 2


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture
def make_costs():
    """Factory: make_costs(layers=2, attn=2, mlp=4, relaxed=1) -> GroupCosts, every group
    GROUP_BYTES of weights (attention also GROUP_BYTES // 4 of KV cache); the last `relaxed` MLP
    groups of each layer are relaxed."""
    def make(layers=2, attn=2, mlp=4, relaxed=1) -> tuple[GroupCost, ...]:
        out = []
        for layer in range(layers):
            out += [GroupCost(f"L{layer}.attn.{i}", layer, "attn", True, 1 / attn, GROUP_BYTES, GROUP_BYTES // 4,
                              GROUP_BYTES // 2) for i in range(attn)]
            out += [GroupCost(f"L{layer}.mlp.{i}", layer, "mlp", i < mlp - relaxed, 0.5 ** (i + 1), GROUP_BYTES, 0,
                              GROUP_BYTES // 2) for i in range(mlp)]
        return tuple(out)
    return make


@pytest.fixture
def make_inputs():
    """Factory: make_inputs(costs, n, memory_mb=100, gflops=5.0, loss=()) -> PlacementInputs on n
    devices pi-0 (the coordinator) .. pi-{n-1}; memory_mb and gflops: a number or one per device;
    loss: the first len(loss) devices' loss rates."""
    def make(costs, n, memory_mb=100, gflops=5.0, loss=(), solver_time=2.0) -> PlacementInputs:
        def nth(v, i):
            return v[i] if isinstance(v, (list, tuple)) else v
        devices = tuple(Device(f"pi-{i}", f"10.0.0.{i + 1}:7700", int(nth(memory_mb, i) * MB), nth(gflops, i),
                               latency_ms=0.1, loss=loss[i] if i < len(loss) else 0.0) for i in range(n))
        miss = {d.name: 0.0 if i == 0 else DeliveryPolicy().miss_probability(d.loss) for i, d in enumerate(devices)}
        return PlacementInputs(costs, devices, "pi-0", {"pi-0": 2 * MB}, miss,
                               PlaceOptions(seed=0, max_deterministic_time=solver_time))
    return make


def round_robin(costs, names) -> dict[str, str]:
    """Group i on device i mod n: every device holds attention and MLP groups of every layer."""
    return {c.id: names[i % len(names)] for i, c in enumerate(costs)}


def check_moves(inputs: PlacementInputs, assignment, f: Failover) -> dict[str, str]:
    """f moves every group of its device, in plan order, to survivors within their free RAM; the
    assignment after the failover."""
    held = [c.id for c in inputs.costs if assignment[c.id] == f.device]
    assert f.absorbable and not f.reason
    assert [gid for gid, _ in f.moves] == held
    free, slots = free_ram(inputs, assignment, f.device), session_slots(inputs, assignment)
    taken = Counter()
    by_id = {c.id: c for c in inputs.costs}
    for gid, survivor in f.moves:
        assert survivor in free and survivor != f.device
        taken[survivor] += held_bytes(by_id[gid], slots)
    assert all(taken[s] <= free[s] for s in taken), (taken, free)
    return {**assignment, **dict(f.moves)}


# ---- the pure function ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_every_group_of_each_critical_remote_device_moves_to_survivors(make_costs, make_inputs, n):
    costs = make_costs()
    inputs = make_inputs(costs, n)
    names = [d.name for d in inputs.devices]
    assignment = round_robin(costs, names)
    failover = plan_failover(inputs, assignment, num_layers=2)
    # one per remote device with a critical group, in device order (round robin gives each one)
    assert [f.device for f in failover] == names[1:]
    for f in failover:
        after = check_moves(inputs, assignment, f)
        survivors = [d for d in inputs.devices if d.name != f.device]
        assert f.predicted_token_ms == pytest.approx(
            predicted_token_ms(costs, after, survivors, "pi-0", inputs.miss, inputs.options))
        assert f.expected_lost_importance == pytest.approx(expected_lost_importance(costs, after, inputs.miss, 2))


@pytest.mark.parametrize("memory_mb", [[100, 3, 3, 3], [2.6, 100, 1.5, 1.5], [2.6, 2.4, 2.4, 2.4]])
def test_survivors_memory_is_respected_when_it_binds(make_costs, make_inputs, memory_mb):
    """Tight memory: the adopted groups spread over the survivors (the full-model solve when the
    rounds' own plans do not fit together), never beyond a survivor's free RAM."""
    costs = make_costs(layers=2, attn=1, mlp=3, relaxed=1)
    inputs = make_inputs(costs, 4, memory_mb=memory_mb, gflops=[5.0, 1.0, 5.0, 5.0], loss=(0, 0, 0, 0.1))
    assignment = {c.id: ("pi-1" if i % 4 == 1 else "pi-0" if i % 4 == 0 else f"pi-{i % 2 + 2}")
                  for i, c in enumerate(costs)}
    for f in plan_failover(inputs, assignment, num_layers=2):
        if f.absorbable:
            check_moves(inputs, assignment, f)
        else:
            assert f.device in f.reason


def test_memory_coupling_the_rounds_solves_both_phases_on_the_whole_model(make_costs, make_inputs, monkeypatch):
    """Each round's fastest plan wants the lossless survivor pi-2, which has room for two groups in
    all: phase 1 and the loss phase go to CP-SAT as one model over every round, within memory."""
    import halo_compile.failover as failover

    whole = []
    solve = failover._cp_sat

    def spy(q, a, dead, mine, room, rounds, *args, **kwargs):
        out = solve(q, a, dead, mine, room, rounds, *args, **kwargs)
        if len(rounds) > 1:
            whole.append(("loss" if kwargs.get("cap") is not None else "time", out[1]))
        return out
    monkeypatch.setattr(failover, "_cp_sat", spy)
    costs = make_costs(layers=2, attn=0, mlp=3, relaxed=1)
    inputs = make_inputs(costs, 4, memory_mb=[2.5, 100, 1.0, 1.5], gflops=[0.5, 5.0, 5.0, 5.0], loss=(0, 0, 0, 0.2))
    inputs = dataclasses.replace(inputs, options=dataclasses.replace(inputs.options, time_slack=0.3))
    assignment = {c.id: "pi-1" for c in costs}
    (f,) = plan_failover(inputs, assignment, num_layers=2)
    check_moves(inputs, assignment, f)
    assert whole == [("time", "OPTIMAL"), ("loss", "OPTIMAL")]
    assert plan_failover(inputs, assignment, num_layers=2) == (f,)


def test_a_faster_survivor_takes_more(make_costs, make_inputs):
    costs = make_costs(layers=3, attn=2, mlp=6, relaxed=0)
    inputs = make_inputs(costs, 4, gflops=[0.5, 5.0, 20.0, 2.0])
    assignment = {c.id: "pi-1" for c in costs}
    (f,) = plan_failover(inputs, assignment, num_layers=3)
    taken = Counter(s for _, s in f.moves)
    assert taken["pi-2"] > taken["pi-3"] and taken["pi-2"] > taken["pi-0"]


@pytest.mark.parametrize("slack", [0.0, 0.5])
def test_phase_two_trades_time_within_the_slack_for_less_lost_importance(make_costs, make_inputs, slack):
    """pi-1's critical and relaxed MLP groups, survivors pi-2 (lossless) and pi-3 (lossy), equally
    fast: the fastest plan splits them, the critical one away from the lossy link's waits; with
    room in the time slack the relaxed one joins it on the lossless survivor and loses nothing."""
    costs = make_costs(layers=2, attn=1, mlp=2, relaxed=1)
    inputs = make_inputs(costs, 4, gflops=[0.1, 5.0, 5.0, 5.0], loss=(0, 0, 0, 0.2))
    inputs = dataclasses.replace(inputs, options=dataclasses.replace(inputs.options, time_slack=slack))
    assignment = {c.id: "pi-1" if c.kind == "mlp" else "pi-0" for c in costs}
    (f,) = plan_failover(inputs, assignment, num_layers=2)
    after = check_moves(inputs, assignment, f)
    assert {after[c.id] for c in costs if c.kind == "mlp" and c.critical} == {"pi-2"}
    assert {after[c.id] for c in costs if not c.critical} == ({"pi-3"} if slack == 0 else {"pi-2"})
    assert (f.expected_lost_importance > 0) == (slack == 0)


def test_relaxed_only_and_idle_devices_and_the_coordinator_get_no_record(make_costs, make_inputs):
    costs = make_costs(layers=1, attn=1, mlp=4, relaxed=2)
    inputs = make_inputs(costs, 4)
    # pi-1 critical, pi-2 relaxed only, pi-3 nothing, pi-0 (coordinator) critical
    assignment = {"L0.attn.0": "pi-0", "L0.mlp.0": "pi-1", "L0.mlp.1": "pi-0", "L0.mlp.2": "pi-2", "L0.mlp.3": "pi-2"}
    failover = plan_failover(inputs, assignment, num_layers=1)
    assert [f.device for f in failover] == ["pi-1"]


# pi-1's 2.7 MB leave room for one session (2.5 MB of weights, 0.125 MB of KV cache each)
@pytest.mark.parametrize("memory_mb, words", [
    ([2.8, 2.7, 0.3, 0.3], "need 2.6 MB; the survivors have 0.9 MB free"),         # short in total
    ([100, 2.7, 100, 100], None),                                                     # plenty: absorbed
    ([2.9, 2.7, 1.4, 1.4], "fit on no combination of the survivors"),                # total fits, packing does not
    ([3.1, 2.7, 0.6, 0.6, 0.6, 0.6], "L0.attn.0 needs 0.6 MB; no survivor has that much free"),  # fits nowhere
])
def test_a_loss_that_cannot_be_absorbed_names_the_device_and_what_is_short(make_costs, make_inputs, memory_mb, words):
    costs = make_costs(layers=1, attn=1, mlp=5, relaxed=0)
    inputs = make_inputs(costs, len(memory_mb), memory_mb=memory_mb)
    # pi-1 holds the attention group (0.5 MB + 0.125 MB of KV cache) and four MLP groups (2.0 MB);
    # pi-0 holds the fifth MLP group (0.5 MB) besides its 2 MB of fixed buffers
    assignment = {c.id: "pi-0" if c.id == "L0.mlp.4" else "pi-1" for c in costs}
    (f,) = plan_failover(inputs, assignment, num_layers=1)
    if words is None:
        check_moves(inputs, assignment, f)
        return
    assert not f.absorbable and f.moves == () and f.predicted_token_ms == 0.0
    assert f.reason.startswith("pi-1's group") and words in f.reason, f.reason


@pytest.mark.parametrize("dead_memory_mb, slots", [(2.7, 1), (3.0, 4)])
def test_adopted_heads_bring_a_kv_cache_per_session_slot(make_costs, make_inputs, dead_memory_mb, slots):
    """Every device allocates the plan's session slots and `serve` fills them: a survivor adopting
    an attention group holds that many of its KV caches, not one."""
    costs = make_costs(layers=1, attn=1, mlp=5, relaxed=0)
    # pi-1 (2.5 MB of weights, 0.125 MB of KV cache per session) leaves room for `slots` sessions;
    # pi-0 is full; pi-2 holds nothing and has 2.8 MB: one session's 2.625 MB, not four's 3.0 MB
    inputs = make_inputs(costs, 3, memory_mb=[2.5, dead_memory_mb, 2.8])
    assignment = {c.id: "pi-0" if c.id == "L0.mlp.4" else "pi-1" for c in costs}
    assert session_slots(inputs, assignment) == slots
    assert free_ram(inputs, assignment, "pi-1") == {"pi-0": 0, "pi-2": int(2.8 * MB)}
    (f,) = plan_failover(inputs, assignment, num_layers=1)
    if slots == 1:
        assert {s for _, s in f.moves} == {"pi-2"}
        check_moves(inputs, assignment, f)
    else:
        assert not f.absorbable and "need 3.0 MB (with 4 sessions' KV caches)" in f.reason, f.reason


def test_a_streaming_survivor_counts_ram_only(make_costs, make_inputs):
    """A survivor that streams its own weights from storage has no RAM left to adopt into."""
    costs = make_costs(layers=1, attn=1, mlp=3, relaxed=0)
    inputs = make_inputs(costs, 3, memory_mb=[4.0, 100, 1.0], gflops=[1.0, 5.0, 50.0])
    devices = (inputs.devices[0], inputs.devices[1], dataclasses.replace(inputs.devices[2], storage_mbps=500.0))
    inputs = dataclasses.replace(inputs, devices=devices)
    assignment = {"L0.attn.0": "pi-1", "L0.mlp.0": "pi-1", "L0.mlp.1": "pi-2", "L0.mlp.2": "pi-2"}
    assert free_ram(inputs, assignment, "pi-1")["pi-2"] == 0
    f = plan_failover(inputs, assignment, num_layers=1)[0]
    assert f.device == "pi-1" and {s for _, s in f.moves} == {"pi-0"}


def test_same_inputs_same_failover(make_costs, make_inputs):
    costs = make_costs(layers=3, attn=2, mlp=5, relaxed=2)
    inputs = make_inputs(costs, 5, gflops=[1.0, 3.0, 5.0, 2.0, 4.0], loss=(0, 0, 0.05, 0, 0.01))
    assignment = inputs.place().assignment
    first = plan_failover(inputs, assignment, num_layers=3)
    assert first and first == plan_failover(inputs, assignment, num_layers=3)
    # and the plan records them as they are: its validation takes them, its JSON keeps them
    assert all(f.absorbable for f in first)


# ---- a tiny compile -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled(tiny_vocab_dir, tmp_path_factory):
    """compiled(fmt, failover=True) -> (plan, directory) of the tiny model on 4 devices (one lossy)."""
    from halo_compile.pipeline import CompileOptions, compile_plan

    made = {}

    def make(fmt: str = "fp32", failover: bool = True, tag: str = ""):
        key = fmt, failover, tag
        if key not in made:
            root = tmp_path_factory.mktemp(f"fo-{fmt}-{failover}{tag}")
            (root / "cluster.yaml").write_text(cluster_yaml(4, lossy=1, remote_memory_mb=0.25))
            # 96 MLP neurons in 3 groups: whole 32-neuron blocks, so block formats compile too
            opts = CompileOptions(calib_tokens=512, chunk_tokens=128, sample_tokens=256, mlp_groups=3,
                                  relaxed_share=0.3, max_context=64, solver_time=1.0, progress=False,
                                  weights=fmt, failover=failover)
            made[key] = compile_plan(str(tiny_vocab_dir), root / "cluster.yaml", root / "plan", opts)
        return made[key]
    return make


def test_the_plan_records_a_failover_per_critical_remote_device(compiled):
    plan, directory = compiled()
    critical = [d for d in plan.device_names if d != plan.coordinator
                and any(g.device == d and g.critical for g in plan.groups)]
    assert critical, "the tiny plan should put critical groups on remote devices"
    assert [f.device for f in plan.failover] == critical
    assert all(f.absorbable for f in plan.failover)  # the coordinator has memory to spare
    assert load_plan(directory) == plan and Plan.from_json(plan.to_json()) == plan
    reports = {r.name: r for r in plan.device_reports}
    for f in plan.failover:
        after = plan.without(f.device)
        assert all(g.device != f.device for g in after.groups)
        # every survivor adopts within the RAM its own groups (and the coordinator's tensors) leave
        adopted = Counter()
        for g in plan.groups:
            if g.device == f.device:
                cost = group_cost(plan.model, g, plan.max_context, weights=plan.weights)
                adopted[after.groups[plan.groups.index(g)].device] += cost.weight_bytes + cost.kv_bytes
        for survivor, n in adopted.items():
            r = reports[survivor]
            assert n <= plan.device(survivor).memory_bytes - r.weight_bytes - r.kv_cache_bytes, (f.device, survivor)


@pytest.mark.parametrize("fmt", ["fp32", "q8_0"])
def test_survivors_shards_hold_what_they_adopt_and_compute_it_as_the_dead_device_did(compiled, fmt):
    plan, directory = compiled(fmt)
    shards = {d: load_shard(directory, plan, d) for d in plan.device_names}
    cfg = plan.model
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, cfg.hidden_size)).astype(np.float32)
    checked = 0
    for f in plan.failover:
        holders = sorted({s for _, s in f.moves})
        for d, shard in shards.items():  # exactly the holders keep tensors for f.device
            assert any(k.startswith(f"{FAILOVER_PREFIX}{f.device}.") for k in shard) == (d in holders), (f.device, d)
        by_id = {g.id: g for g in plan.groups}
        for gid, h in f.moves:  # each under the name the runtime asks for
            g = by_id[gid]
            proj = "layers.{}.attn.q_proj" if g.kind == "attn" else "layers.{}.mlp.down_proj"
            assert failover_tensor(f.device, proj.format(g.layer)) in shards[h]
        dead = DeviceCompute(plan, f.device, shards[f.device])
        adopted = {h: DeviceCompute(adopted_plan(plan, f.device, h), h, adopted_shard(shards[h], f.device))
                   for h in holders}
        for layer in range(cfg.num_layers):
            if dead.has_mlp(layer):
                # per group: what the dead device computed, and what its adopter computes
                theirs = dict(zip((g.id for g in plan.groups_on(f.device, layer, "mlp")), dead.mlp_groups(layer, x)))
                for h, dev in adopted.items():
                    if not dev.has_mlp(layer):
                        continue
                    sub = adopted_plan(plan, f.device, h)
                    ids = [g.id for g in sub.groups_on(h, layer, "mlp")]
                    mine = dev.mlp_groups(layer, x)
                    for gid, part in zip(ids, mine):
                        np.testing.assert_allclose(part, theirs[gid], rtol=1e-5, atol=1e-6)
                    np.testing.assert_allclose(sum(mine), sum(theirs[g] for g in ids), rtol=1e-5, atol=1e-6)
                    checked += 1
            if dead.has_attention(layer):
                # the dead device's attention, summed over its adopters
                parts = [dev.attention(layer, x, 0) for dev in adopted.values() if dev.has_attention(layer)]
                np.testing.assert_allclose(sum(parts), dead.attention(layer, x, 0), rtol=1e-5, atol=1e-5)
                checked += 1
    assert checked


def test_failover_tensors_change_nothing_else_and_verify_ignores_them(compiled):
    from halo_compile.verify import verify_plan

    plan, directory = compiled()
    bare, bare_dir = compiled(failover=False)
    assert bare.failover == () and bare.groups == plan.groups
    for d in plan.device_names:
        mine, theirs = load_shard(directory, plan, d), load_shard(bare_dir, bare, d)
        own = {k: v for k, v in mine.items() if not k.startswith(FAILOVER_PREFIX)}
        assert sorted(own) == sorted(theirs) and not any(k.startswith(FAILOVER_PREFIX) for k in theirs)
        assert all(np.array_equal(own[k], theirs[k]) for k in own)
        # the shard keeps each adopted group's bytes as the plan's cost model counts them
        kept = sum(v.nbytes for k, v in mine.items() if k.startswith(FAILOVER_PREFIX))
        from halo_compile.report import failover_disk_bytes
        assert kept == failover_disk_bytes(plan).get(d, 0)
    assert any(failover_disk_bytes(plan).values())
    assert len(verify_plan(directory)) == 2


def test_same_inputs_byte_identical_shards(compiled):
    plan, directory = compiled()
    again, again_dir = compiled(tag="-again")
    assert again.failover == plan.failover
    for name in plan.shards + ("plan.json", "manifest.json"):
        assert (directory / name).read_bytes() == (again_dir / name).read_bytes(), name


def test_inspect_shows_the_failover(compiled):
    from halo_compile.report import inspect_text

    plan, _ = compiled()
    text = inspect_text(plan)
    assert "failover (planned by the compiler)" in text and "read into RAM only after a failover" in text
    for f in plan.failover:
        assert f"  {f.device} dies: {f.predicted_token_ms:.2f} ms/token" in text
    bare, _ = compiled(failover=False)
    assert "failover" not in inspect_text(bare)
    blocked = dataclasses.replace(plan, failover=(dataclasses.replace(
        plan.failover[0], moves=(), predicted_token_ms=0.0, expected_lost_importance=0.0,
        reason="its groups need 9.9 MB; the survivors have 1.0 MB free"),) + plan.failover[1:])
    text = inspect_text(blocked)
    assert f"{blocked.failover[0].device} dies: CANNOT BE ABSORBED" in text
    assert f"devices whose loss cannot be absorbed: {blocked.failover[0].device}" in text
