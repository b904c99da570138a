"""Push rounds modelled in process (core.push): every device's view of the residual, each receiver
drawing its own misses. Nothing lost: the star's logits to the last bit, whatever the prompt or
draft (an fp16 wire: the star's tokens where the coordinator's own parts are rounded); under loss: the views drift by what they decided differently, and eval scores it."""
import numpy as np
import pytest
from halo_compile.evaluate import EvalOptions, evaluate
from halo_runtime.core.coordinator import Coordinator, TokenStats
from halo_runtime.core.draft import LookupDraft
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.plan import Plan
from halo_runtime.core.push import InProcessPush, PushCoordinator, ViewStats, push_miss, requested_rounds
from halo_runtime.core.segment import schedule


def _push(plan, shards, miss=None, seed=0, wire="fp32", **kw):
    push = InProcessPush(plan, shards, miss=miss, seed=seed, wire=wire)
    return PushCoordinator(plan, shards[plan.coordinator], push, **kw), push


def _star_and_push(plan, shards, tokens, wire):
    """Every position's logits of `tokens` from the star and from push rounds (in process, nothing
    lost), and the push model (its drift)."""
    star = Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards, wire=wire))
    push, ex = _push(plan, shards, wire=wire)
    for c in (star, push):
        c.reset(1)
    return (star.forward(tokens, 0, TokenStats(), all_positions=True),
            push.forward(tokens, 0, TokenStats(), all_positions=True), ex)


def _lossy(plan):
    return [d.name for d in plan.devices if d.loss > 0]


@pytest.mark.parametrize("wire", ["fp32", "fp16"])
@pytest.mark.parametrize("tokens", [[5], [3, 14, 15, 92, 65, 35, 89, 79]])
def test_nothing_lost_push_gives_the_stars_logits_bit_for_bit(tiny_plan, tiny_shards, tokens, wire):
    a, b, ex = _star_and_push(tiny_plan[0], tiny_shards, tokens, wire)
    assert np.array_equal(a, b)
    assert ex.drift.inputs > 0 and ex.drift.differing == 0 and ex.drift.disagreements == 0


def test_nothing_lost_push_generates_the_stars_greedy_tokens_with_a_draft(tiny_plan, tiny_shards):
    plan, _ = tiny_plan
    prompt = [7, 8, 9, 7, 8, 9, 7, 8]
    star = Coordinator(plan, tiny_shards[plan.coordinator], InProcessExchange(plan, tiny_shards))
    push, _ = _push(plan, tiny_shards)
    ref = star.generate(prompt, 12).tokens
    assert push.generate(prompt, 12, draft=LookupDraft(), draft_tokens=3).tokens == ref


STAR_PICKS = {
    "all": lambda n: range(n),  # every round opens with a request, as the star's
    "every other": lambda n: range(1, n, 2),  # the MLP rounds: one hop to the coordinator, then a handoff
    "every third": lambda n: range(2, n, 3),  # an attention round among them: the handoff carries its x
    "the first two": lambda n: range(2),  # requests, then a handoff before the push rounds
}
"""Which network rounds of a plan `_starred` makes star rounds, by name: each path of core.push."""


def _starred(plan, pick: str):
    """`plan` in push rounds with the star rounds `STAR_PICKS[pick]` (`Plan.star_rounds`)."""
    from dataclasses import replace

    return replace(plan, rounds="push", star_rounds=tuple(STAR_PICKS[pick](len(plan.network_rounds()))))


@pytest.mark.parametrize("pick", list(STAR_PICKS))
@pytest.mark.parametrize("wire", ["fp32", "fp16"])
def test_star_rounds_among_push_rounds_give_the_stars_logits_bit_for_bit(tiny_plan, tiny_shards, pick, wire):
    """A star round's parts come to the coordinator alone, which hands its residual to the views
    before the next push round (or its input, as the star's request, before a star round): nothing
    lost, the star's bits, and every view's input the coordinator's."""
    plan = _starred(tiny_plan[0], pick)
    assert plan.star_rounds and len(plan.starred_rounds()) == len(plan.star_rounds)
    a, b, ex = _star_and_push(plan, tiny_shards, [3, 14, 15, 92, 65, 35, 89, 79], wire)
    assert np.array_equal(a, b)
    viewed = set(plan.network_rounds()) - ex.requested  # rounds whose devices compute from their views
    assert (ex.drift.inputs > 0) == bool(viewed) and ex.drift.differing == 0
    assert ex.requested == requested_rounds(schedule(plan), plan.starred_rounds())
    if pick == "all":
        assert ex.requested == plan.starred_rounds()


def test_a_star_round_under_loss_is_decided_by_the_coordinator_alone(tiny_plan, tiny_shards):
    """Views draw no misses of a star round's parts (they never see them): fewer disagreements
    than pure push rounds under the same loss, and the views take the coordinator's residual."""
    plan = tiny_plan[0]
    miss = dict.fromkeys(_lossy(plan), 0.3)
    drift = []
    for p in (_starred(plan, "all"), plan):
        push, ex = _push(p, tiny_shards, miss=miss, seed=1, await_predicted=False)
        push.reset(1)
        push.forward(list(range(3, 60)), 0, TokenStats(), all_positions=True)
        drift.append(ex.drift)
        assert ex.stats().compensated > 0
    assert drift[0].disagreements == drift[0].compensated == 0 < drift[1].disagreements


def test_a_plan_names_star_rounds_only_in_push_rounds_and_in_range(tiny_plan):
    from dataclasses import replace

    plan = tiny_plan[0]
    n = len(plan.network_rounds())
    with pytest.raises(ValueError, match="star_rounds: only a plan that runs push rounds"):
        replace(plan, star_rounds=(0,))
    for bad in [(n,), (1, 0), (0, 0), (-1,)]:
        with pytest.raises(ValueError, match=f"star_rounds: want increasing indexes of the plan's {n} network rounds"):
            replace(plan, rounds="push", star_rounds=bad)
    starred = _starred(plan, "every other")
    assert Plan.from_json(starred.to_json()) == starred
    assert '"star_rounds"' not in replace(starred, star_rounds=()).to_json()  # push plans without keep their bytes
    dead = next(d for d in plan.device_names if plan.replaceable(d))
    assert starred.without(dead).star_rounds == ()  # failover runs star rounds


def test_the_coordinators_own_parts_are_rounded_to_the_wire(tiny_vocab_dir, tmp_path):
    """Where the coordinator holds groups of network rounds, push sends its parts as every device
    sends its own (fp16: one datagram a row instead of two of fp32) and adds them rounded too, so
    every view still holds its bits; the star adds them unrounded: at fp16 the same greedy tokens,
    not the same bits, and at fp32 the same bits."""
    from conftest import compile_tiny
    from halo_runtime.core.shards import load_shard

    plan, directory = compile_tiny(tiny_vocab_dir, tmp_path, coordinator_gflops=1.0, remote_memory_mb=0.25)
    assert any(g.device == plan.coordinator for layer, kind in plan.network_rounds()
               for g in plan.layer_groups(layer, kind))
    shards = {d: load_shard(directory, plan, d) for d in plan.device_names}
    for wire in ("fp32", "fp16"):
        a, b, ex = _star_and_push(plan, shards, [3, 14, 15, 92, 65, 35, 89, 79], wire)
        assert ex.drift.inputs > 0 and ex.drift.differing == 0
        if wire == "fp32":
            assert np.array_equal(a, b)
        else:
            assert not np.array_equal(a, b)
            assert np.array_equal(a.argmax(-1), b.argmax(-1))
            assert np.abs(a - b).max() < 1e-2 * np.abs(a).max()


@pytest.mark.parametrize("pick", [None, "every third", "the first two"])
def test_sessions_sharing_push_passes_get_the_lone_logits_in_process(roomy_plan, pick):
    """Pure push rounds, and with star rounds (handoffs and requests carry every session's spans)."""
    from halo_runtime.core.shards import load_shard
    from test_batch import PROMPTS, TOKENS, alone, assert_same, batched_greedy

    plan, directory = roomy_plan
    plan = _starred(plan, pick) if pick else plan
    shards = {d: load_shard(directory, plan, d) for d in plan.device_names}
    assert_same(batched_greedy(_push(plan, shards)[0], PROMPTS, TOKENS),
                [alone(lambda: _push(plan, shards)[0], p) for p in PROMPTS])


def test_under_loss_views_drift_only_where_they_decided_differently(tiny_plan, tiny_shards):
    plan, _ = tiny_plan
    lossy = _lossy(plan)
    assert lossy
    push, ex = _push(plan, tiny_shards, miss=dict.fromkeys(lossy, 0.3), seed=1, await_predicted=False)
    push.reset(1)
    push.forward(list(range(3, 60)), 0, TokenStats(), all_positions=True)
    v = ex.drift
    assert v.disagreements > 0 and v.compensated > 0
    assert 0 < v.differing < v.inputs  # a view drifts within a token, and not in every round
    assert 0 < v.max_relative < 0.5
    assert sum(c.compensated for c in ex.stats().devices.values()) > 0
    # the same seed draws the same misses: the same drift, the same logits
    again, ex2 = _push(plan, tiny_shards, miss=dict.fromkeys(lossy, 0.3), seed=1, await_predicted=False)
    again.reset(1)
    again.forward(list(range(3, 60)), 0, TokenStats(), all_positions=True)
    assert ex2.drift == v


@pytest.mark.parametrize(("sender", "receiver", "expected"), [(0.0, 0.0, 0.0), (0.1, 0.0, 0.1), (0.0, 0.2, 0.2),
                                                              (0.1, 0.2, 0.28)])
def test_push_miss_crosses_both_links(sender, receiver, expected):
    assert push_miss(sender, receiver) == pytest.approx(expected)


def test_view_stats_count_rows():
    s = ViewStats()
    a = np.ones((3, 4), np.float32)
    s.add(a, a)
    b = a.copy()
    b[1] *= 1.5
    s.add(b, a)
    assert (s.inputs, s.differing) == (6, 1)
    assert s.max_relative == pytest.approx(0.5)
    assert s.to_json()["mean_relative"] == pytest.approx(0.5 / 6)


def test_eval_scores_push_rounds_and_reports_the_views(plan_dir, tiny_plan):
    report = evaluate(plan_dir, EvalOptions(plrs=(0.0, 0.2), tokens=300, context=100, methods=("predictor+lowrank",),
                                            recall_windows=0, greedy_prompts=1, greedy_tokens=4, progress=False,
                                            rounds="push"))
    assert report["rounds"] == "push"
    clean, lossy = report["results"]
    assert clean["delta"] == 0.0 and clean["top1_agreement"] == 1.0  # nothing lost: the star's plan
    assert clean["views"]["differing"] == 0
    assert lossy["views"]["inputs"] > 0 and lossy["views"]["compensated"] > 0


def test_eval_refuses_an_unknown_rounds():
    with pytest.raises(ValueError, match="rounds 'ring'"):
        EvalOptions(rounds="ring")
    assert EvalOptions().rounds == "plan"  # what halo-run runs by default


def _devices(latency_ms: float, loss: float = 0.0, coordinator_ms: float | None = None):
    from halo_runtime.core.plan import Device

    return [Device(f"d{i}", f"10.0.0.{i}:7700", 10**9, 1.0,
                   latency_ms=latency_ms if i or coordinator_ms is None else coordinator_ms,
                   loss=loss if i == 3 else 0.0) for i in range(4)]


@pytest.mark.parametrize(("latency_ms", "coordinator_ms", "cheaper"),
                         [(0.0, None, "star"), (0.5, None, "push"), (1.0, None, "push"),
                          (1.0, 0.0, "star"), (2.0, 0.0, "star")])
def test_the_cost_model_prices_a_round_trip_against_one_hop(latency_ms, coordinator_ms, cheaper):
    """Push sends more datagrams (CPU on every device) to save one hop: worth it on slow links, and
    only where the coordinator's own link is slow too (behind a wired one, board to board is two
    slow links, as a round trip is)."""
    from halo_compile.placecost import PlaceOptions
    from halo_compile.roundcost import network_ms

    rounds = [["d0", "d1", "d2", "d3"]] * 60
    devices = _devices(latency_ms, coordinator_ms=coordinator_ms)
    net = network_ms(rounds, devices, "d0", {}, PlaceOptions())
    assert min(net, key=net.get) == cheaper, net
    one_way = 2 * latency_ms  # two access links
    assert net["push"] >= 60 * one_way
    assert net["star"] >= 60 * (2 * one_way if coordinator_ms is None else one_way)


@pytest.mark.parametrize(("medium", "cheaper"), [("", "push"), ("wifi0", "star")])
def test_on_a_shared_medium_push_pays_its_airtime(medium, cheaper):
    """One Wi-Fi channel carries every datagram in turn, board to board twice (up to the access
    point and down): push sends each part to N - 1 devices, so on a slow channel its airtime
    outweighs the hop it saves; on switched links of the same speed it does not."""
    from dataclasses import replace

    from halo_compile.placecost import PlaceOptions
    from halo_compile.roundcost import busiest_link_ms, network_ms, round_network_ms

    devices = [replace(d, bandwidth_mbps=20.0, medium=medium) for d in _devices(1.0)]
    options, held = PlaceOptions(message_bytes=2304), ["d0", "d1", "d2", "d3"]
    net = network_ms([held] * 60, devices, "d0", {}, options)
    assert min(net, key=net.get) == cheaper, net
    assert sum(round_network_ms(held, devices, "d0", {}, options)) * 60 < sum(net.values())  # + the handoff
    part, pushes = 2304 * 8 / 20e3, [(s, v, 1) for s in held for v in held if s != v]
    star = [(a, b, 1) for d in held[1:] for a, b in (("d0", d), (d, "d0"))]
    # on the channel: 12 pushes up and down (24 turns) against 3 requests and 3 replies (12); switched:
    # the busiest uplink carries 3 parts either way (the coordinator's requests; a board's pushes)
    assert busiest_link_ms(pushes, devices, options) == pytest.approx((24 if medium else 3) * part)
    assert busiest_link_ms(star, devices, options) == pytest.approx((12 if medium else 3) * part)


def test_the_cost_model_counts_only_rounds_that_leave_the_coordinator():
    from halo_compile.placecost import PlaceOptions
    from halo_compile.roundcost import network_ms

    net = network_ms([["d0"]] * 10, _devices(2.0), "d0", {}, PlaceOptions())
    assert net == {"star": 0.0, "push": 0.0}
    lossy = network_ms([["d0", "d3"]], _devices(2.0, loss=0.05), "d0", {"d3": 2}, PlaceOptions())
    clean = network_ms([["d0", "d3"]], _devices(2.0), "d0", {}, PlaceOptions())
    assert lossy["star"] > clean["star"] and lossy["push"] > clean["push"]  # copies and expected waits


@pytest.mark.parametrize("part_datagrams", [1, 3])
def test_the_cost_model_counts_every_datagram_of_a_wide_models_part(part_datagrams):
    """A part of several datagrams (a wide model's row: hidden 2048 in fp16 is 4 KiB) costs the CPU
    of each of them, in star and push rounds alike; to and from a lossy board it goes as the runtime
    sends it (`DeliveryPolicy.copies`: at least two copies), and a copy is lost when any of its
    datagrams is."""
    from dataclasses import replace

    from halo_compile.placecost import PlaceOptions
    from halo_compile.roundcost import round_network_ms
    from halo_runtime.core.codec import chunk_room

    n = part_datagrams
    options = PlaceOptions(message_bytes=n * chunk_room(), datagram_ms=1.0)  # CPU counts, nothing else does
    clean = [replace(d, latency_ms=0.0, bandwidth_mbps=1e9) for d in _devices(0.0)]
    star, push = round_network_ms(ALL, clean, "d0", {}, options)
    # star: the coordinator seals three requests and opens three replies; push: every device three each way
    assert (star, push) == (pytest.approx(6 * n), pytest.approx(6 * n))
    lossy = [replace(d, latency_ms=0.0, bandwidth_mbps=1e9) for d in _devices(0.0, loss=0.05)]
    star, push = round_network_ms(ALL, lossy, "d0", {}, options)
    copies = 1 if n == 1 else 2  # the plan's one copy, or the runtime's two of a part of several datagrams
    lost = 1 - 0.95 ** n  # a copy of the part
    assert push == pytest.approx(6 * copies * n + lost ** copies * options.rto_ms)  # d3: three parts out, three in
    assert star > 6 * n + 2 * (copies - 1) * n  # d3's request and reply go `copies` times


def test_push_pays_a_handoff_after_every_round_the_coordinator_computes_alone():
    """A push pass hands the coordinator's residual to every device before each run of rounds that
    leave it (core.push's PUSH_H): once a pass where every round does, once a layer where attention
    stays on the coordinator, so there push saves no hop over the star's round trip."""
    from halo_compile.placecost import PlaceOptions
    from halo_compile.roundcost import handoff_ms, network_ms, round_network_ms
    from halo_runtime.core.codec import datagrams

    devices, held, options = _devices(1.0), ["d0", "d1", "d2", "d3"], PlaceOptions()
    star, push = round_network_ms(held, devices, "d0", {}, options)
    spread = network_ms([held] * 60, devices, "d0", {}, options)
    hop = spread["push"] - 60 * push
    # two 1 ms ends, three fp32 residuals (twice a part's bytes) on the coordinator's link, its CPU for them
    fp32 = 2 * options.message_bytes * 8 / (devices[1].bandwidth_mbps * 1e3)
    assert hop == pytest.approx(handoff_ms(devices, "d0", {}, options)) == pytest.approx(
        2.0 + 3 * fp32 + 3 * datagrams(2 * options.message_bytes) * options.datagram_ms)
    local = network_ms([["d0"], held] * 30, devices, "d0", {}, options)
    assert local == pytest.approx({"star": 30 * star, "push": 30 * (push + hop)})
    assert local["push"] > local["star"] and spread["push"] < spread["star"]


ALL = ["d0", "d1", "d2", "d3"]


@pytest.mark.parametrize(("rounds", "medium", "mbps", "expected"), [
    ([ALL] * 6, "", 1000, (5,)),  # push every round but the last: only the coordinator needs its sum
    ([ALL, ALL, ["d0"]] * 2, "", 1000, (1, 3)),  # the same before each round the coordinator computes alone
    ([["d0"], ALL] * 3, "", 1000, (0, 1, 2)),  # alone between the coordinator's rounds: a round trip either way
    ([ALL] * 6, "wifi0", 20, (0, 1, 2, 3, 4, 5)),  # one slow channel: pushing to every device costs airtime
])
def test_a_push_pass_sends_a_round_to_the_coordinator_alone_where_that_costs_less(rounds, medium, mbps, expected):
    from dataclasses import replace

    from halo_compile.placecost import PlaceOptions
    from halo_compile.roundcost import mixed_pass, network_ms

    devices = [replace(d, medium=medium, bandwidth_mbps=mbps) for d in _devices(1.0)]
    ms, star_rounds = mixed_pass(rounds, devices, "d0", {}, PlaceOptions())
    assert star_rounds == expected
    net = network_ms(rounds, devices, "d0", {}, PlaceOptions())
    assert ms <= min(net.values()) + 1e-9  # all push and all star are mixes too
    if len(expected) == sum(any(d != "d0" for d in held) for held in rounds):
        assert ms == pytest.approx(net["star"])


def test_inspect_says_which_rounds_are_cheaper(tiny_plan):
    from halo_compile.report import inspect_text

    plan, _ = tiny_plan
    line = next(x for x in inspect_text(plan).splitlines() if x.startswith("network per token"))
    assert "star rounds" in line and "push rounds" in line and "cheaper on these links" in line


@pytest.mark.parametrize(("latency_ms", "asked", "view_bytes", "expected"),
                         [(0.01, "auto", 0, "star"), (2.0, "auto", 0, "push"), (2.0, "auto", 2**40, "star"),
                          (0.01, "push", 0, "push"), (2.0, "star", 0, "star")])
def test_the_compiler_records_the_cheaper_rounds(tiny_plan, latency_ms, asked, view_bytes, expected):
    """`Plan.rounds` (what halo-run runs by default): push where every link is slow enough that its
    hop saves more than its datagrams cost, star on fast links or where a push view would not fit
    beside a device's weights; what `halo-compile plan --rounds` names, whatever the cost model says."""
    from dataclasses import replace

    from halo_compile.place import choose_rounds
    from halo_compile.report import inspect_text
    from halo_compile.roundcost import plan_network_ms

    plan, _ = tiny_plan
    slow = replace(plan, devices=tuple(replace(d, latency_ms=latency_ms) for d in plan.devices))
    chosen = choose_rounds(slow, asked, view_bytes)
    assert chosen.rounds == expected
    assert chosen.star_rounds == (plan_network_ms(slow)[1] if expected == "push" else ())
    assert Plan.from_json(chosen.to_json()) == chosen
    assert ('"rounds"' in chosen.to_json()) == (expected == "push")  # star plans keep their bytes
    line = next(x for x in inspect_text(chosen).splitlines() if x.startswith("network per token"))
    assert f"the plan runs {expected} rounds" in line


def test_a_plan_naming_unknown_rounds_is_refused(tiny_plan):
    from halo_runtime.core.plan import Plan

    plan, _ = tiny_plan
    text = plan.to_json().replace('"schema_version"', '"rounds": "ring", "schema_version"')
    with pytest.raises(ValueError, match="rounds: 'ring' is not one of star, push"):
        Plan.from_json(text, "plan.json")


def test_inspect_says_where_a_push_view_does_not_fit(tiny_plan):
    from halo_compile.report import inspect_text
    from halo_runtime.core.push import view_over_memory

    plan, _ = tiny_plan
    assert "push rounds also map" not in inspect_text(plan)  # view size unknown: nothing said
    assert view_over_memory(plan, 0) == {}
    huge = max(d.memory_bytes for d in plan.devices)
    over = view_over_memory(plan, huge)
    assert set(over) == {d.name for d in plan.devices if d.name != plan.coordinator}
    assert all(held > mb for held, mb in over.values())
    line = next(x for x in inspect_text(plan, huge).splitlines() if x.startswith("push rounds also map"))
    assert "beyond the memory the plan gave" in line and all(d in line for d in over)
    assert "within every device's memory" in inspect_text(plan, 0)


def test_the_compiler_writes_what_every_view_needs_in_one_file(plan_copy, tiny_plan, tiny_shards):
    """view.safetensors: the coordinator's norms, predictor and compensation, listed in the manifest;
    a board reads it without the coordinator's shard, and is told what is missing if it has neither."""
    from halo_runtime.core.plandir import VIEW_FILE, PlanError, read_manifest
    from halo_runtime.core.push import load_view, view_tensors

    plan, _ = tiny_plan
    assert VIEW_FILE in read_manifest(plan_copy)
    expected = view_tensors(tiny_shards[plan.coordinator])
    assert {k for k in tiny_shards[plan.coordinator] if k.startswith("predictor.")} <= set(expected)
    (plan_copy / plan.shard_file(plan.coordinator)).unlink()
    got = load_view(plan_copy, plan)
    assert set(got) == set(expected)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    (plan_copy / VIEW_FILE).unlink()
    with pytest.raises(PlanError, match="view.safetensors: missing"):
        load_view(plan_copy, plan)
