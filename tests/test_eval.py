"""`halo-compile eval` and the per-token loss simulation it rests on.

The tiny compiled plan (4 devices, one lossy) checks the mechanics fast: at zero loss the plan's
perplexity is the full model's; per-token loss drops exactly the rows it should; the CLI prints
one JSON object. One short real-model check shows the runtime's compensation beating zero-fill
at 5% loss.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import cluster_yaml
from halo_runtime.core.coordinator import Coordinator, TokenStats
from halo_runtime.core.exchange import DeviceStats, InProcessExchange
from halo_runtime.core.policy import BurstyLink, DeliveryPolicy
from halo_runtime.core.shards import device_indices, load_shard

from halo_compile.cli import main
from halo_compile.evaluate import EvalOptions, evaluate, evaluation_windows, matched_prefix, miss_rates
from halo_compile.reference import FullModel
from halo_compile.slicing import assemble

TINY = dict(tokens=640, context=128)


@pytest.fixture(scope="module")
def shards(tiny_plan):
    plan, directory = tiny_plan
    return {d: load_shard(directory, plan, d) for d in plan.device_names}


def relaxed_remote(plan) -> tuple[str, int]:
    """A remote device holding relaxed groups, and one such layer (placement decides which)."""
    for layer in range(plan.model.num_layers):
        for d in plan.device_names:
            s = device_indices(plan, d, layer)
            if d != plan.coordinator and s.n_critical < len(s.neurons):
                return d, layer
    raise AssertionError("the tiny plan has no relaxed groups on a remote device")


def all_remote_lossy(directory, loss: float) -> None:
    """Put every remote link of a compiled plan on `loss`, so the test does not hang on placement."""
    from dataclasses import replace

    from halo_runtime.core.plan import load_plan

    plan = load_plan(directory)
    devices = tuple(d if d.name == plan.coordinator else replace(d, loss=loss) for d in plan.devices)
    (directory / "plan.json").write_text(replace(plan, devices=devices).to_json())


def test_miss_probability_follows_the_delivery_policy():
    p = 0.05
    attempt = 1 - (1 - p) ** 2  # request or reply lost
    assert DeliveryPolicy().miss_probability(p) == pytest.approx(attempt ** 2)  # one fast re-request
    assert DeliveryPolicy(relaxed_retries=0).miss_probability(p) == pytest.approx(attempt)
    assert DeliveryPolicy(redundancy=2).miss_probability(p) == pytest.approx((1 - (1 - p * p) ** 2) ** 2)
    assert DeliveryPolicy().miss_probability(0.0) == 0.0
    # SmolLM2's one-token message is one datagram in fp16, two in fp32
    assert DeliveryPolicy(wire="fp16").message_datagrams(576) == (1, 1)
    # ... and a message of several datagrams goes twice: an attempt fails when both copies of the
    # request or both of the reply lose a datagram
    copy_lost = 1 - (1 - p) ** 2
    assert DeliveryPolicy(wire="fp32").miss_probability(p, 576) == pytest.approx((1 - (1 - copy_lost ** 2) ** 2) ** 2)
    assert DeliveryPolicy(wire="fp32", multi_datagram_copies=1).miss_probability(p, 576) == \
        pytest.approx((1 - (1 - p) ** 4) ** 2)


@pytest.mark.parametrize("loss, datagrams, redundancy, expected", [
    (0.0, 25, 1, 1),    # a clean link: one copy, whatever the size
    (0.05, 1, 1, 1),    # a one-datagram decode row: as --redundancy says
    (0.05, 1, 3, 3),
    (0.05, 2, 1, 2),    # several datagrams: at least multi_datagram_copies
    (0.05, 25, 3, 3),
])
def test_copies_per_message(loss, datagrams, redundancy, expected):
    assert DeliveryPolicy(redundancy=redundancy).copies(loss, datagrams) == expected
    with pytest.raises(ValueError):
        DeliveryPolicy(multi_datagram_copies=0)
    with pytest.raises(ValueError):
        DeliveryPolicy().miss_probability(1.0)


def test_loss_is_drawn_per_token_and_awaited_tokens_always_arrive(tiny_plan, shards):
    plan, _ = tiny_plan
    lossy, layer = relaxed_remote(plan)
    ex = InProcessExchange(plan, shards, miss={lossy: 1.0})
    x = np.random.default_rng(0).standard_normal((6, plan.model.hidden_size)).astype(np.float32)
    wait = np.array([True, False, True, False, False, True])
    ex.post("mlp", 0, layer, x, 0)
    result = ex.collect("mlp", 0, layer, {lossy: wait})
    assert np.array_equal(result.missing[lossy], ~wait)
    _, relaxed = ex.devices[lossy].mlp(layer, x)
    part = next(p for p in result.parts if p is not None and np.array_equal(p[wait], relaxed[wait]))
    assert float(np.abs(part[~wait]).max()) == 0.0
    assert ex.stats().devices[lossy] == DeviceStats(rows=6, lost=6, awaited=3, compensated=3)


def test_missing_rows_with_zero_fill_equal_the_model_without_those_neurons(tiny_plan, shards):
    plan, _ = tiny_plan
    lossy, _ = relaxed_remote(plan)
    coord = Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards, miss={lossy: 1.0}),
                        compensation="zero", await_predicted=False)
    tokens = [5, 17, 300, 42, 500, 7, 99]
    coord.reset(1)
    ours = coord.forward(tokens, 0, TokenStats(), all_positions=True)
    weights = assemble(plan, shards)
    for layer in range(plan.model.num_layers):
        s = device_indices(plan, lossy, layer)
        dropped = list(s.neurons[s.n_critical:])
        weights[f"model.layers.{layer}.mlp.down_proj.weight"][:, dropped] = 0.0
    ref = FullModel(plan.model, weights).logits(torch.tensor(tokens)).numpy()
    assert ours.shape == ref.shape
    assert np.allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_lowrank_compensation_is_closer_than_mean_and_zero(tiny_plan, shards):
    """Every relaxed part of one device lost on every token: how far the logits move per method."""
    plan, _ = tiny_plan
    lossy, _ = relaxed_remote(plan)
    tokens = [5, 17, 300, 42, 500, 7, 99, 404, 8, 64]

    def logits(compensation, miss):
        ex = InProcessExchange(plan, shards, miss={lossy: miss})
        coord = Coordinator(plan, shards[plan.coordinator], ex, compensation=compensation, await_predicted=False)
        coord.reset(1)
        return coord.forward(tokens, 0, TokenStats(), all_positions=True)

    exact = logits("zero", 0.0)
    err = {c: float(np.linalg.norm(logits(c, 1.0) - exact)) for c in ("zero", "mean", "lowrank")}
    assert err["lowrank"] < err["mean"] and err["lowrank"] < err["zero"], err
    # rows: estimating only the missing rows gives the same as estimating all and picking them
    coord = Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards), compensation="lowrank")
    layer = next(i for i in range(plan.model.num_layers) if lossy in coord.relaxed[i])
    m = np.random.default_rng(1).standard_normal((5, plan.model.hidden_size)).astype(np.float32)
    rows = np.array([False, True, True, False, True])
    every = coord._compensate(layer, lossy, m, np.ones(5, dtype=bool))
    some = coord._compensate(layer, lossy, m, rows)
    assert np.allclose(some[rows], every[rows], atol=1e-6) and float(np.abs(some[~rows]).max()) == 0.0


def test_zero_loss_plan_perplexity_equals_full_model(tiny_plan, shards):
    plan, directory = tiny_plan
    report = evaluate(directory, EvalOptions(plrs=(0.0,), progress=False, **TINY))
    assert report["tokens"] == TINY["tokens"]
    assert report["results"][0]["method"] == report["default_method"]
    for r in report["results"]:
        assert r["ppl"] == pytest.approx(report["full_ppl"], rel=1e-4), r["method"]
        # nothing lost: the same most likely token everywhere, the same greedy replies
        assert r["top1_agreement"] == 1.0 and r["greedy_matched"] == 32.0, r["method"]
    assert report["greedy"] == {"prompts": 5, "prompt_tokens": 32, "tokens": 32}
    assert {r["method"] for r in report["results"]} >= {"zero", "mean", "predictor", "loss-blind"}
    # the reference ("full") perplexity is the plan's own at zero loss; for this fp32 plan it is the
    # reassembled single-device model's (torch) up to fp32 rounding
    full = FullModel(plan.model, assemble(plan, shards))
    nll = count = 0
    for w in evaluation_windows(directory, None, TINY["tokens"], TINY["context"]):
        full.reset()
        w = torch.tensor(w)
        nll += float(torch.nn.functional.cross_entropy(full.logits(w)[:-1].double(), w[1:], reduction="sum"))
        count += len(w) - 1
    assert plan.weights == "fp32" and report["full_ppl"] == pytest.approx(float(np.exp(nll / count)), rel=1e-4)


@pytest.mark.parametrize("redundancy, retries, hidden", [(1, 1, None), (1, 0, None), (2, 1, None), (1, 2, 576),
                                                       (2, 1, 2048), (1, 1, 2048)])
def test_burst_loss_prices_like_independent_loss_at_its_limit(redundancy, retries, hidden):
    """A Gilbert channel with mean burst 1 / (1 - p) forgets its state: the closed form of independent
    loss. Very long bursts take a part's every attempt or none: the miss tends to the loss rate. For
    one-datagram messages, longer bursts make the re-request (or the redundant copy) fail with the
    first attempt, and a lone attempt fail less (its request and reply are lost together or not at all)."""
    policy, p = DeliveryPolicy(redundancy=redundancy, relaxed_retries=retries), 0.05
    independent = policy.miss_probability(p, hidden)
    assert policy.miss_probability(p, hidden, burst=1 / (1 - p)) == pytest.approx(independent, rel=1e-9)
    by_burst = [policy.miss_probability(p, hidden, burst=b) for b in (1.5, 3, 10, 1000)]
    assert by_burst[-1] == pytest.approx(p, rel=0.01)
    if policy.message_datagrams(hidden or 576) == (1, 1):
        if retries == 0 and redundancy == 1:
            assert by_burst == sorted(by_burst, reverse=True) and by_burst[0] < independent
        else:
            assert independent < by_burst[0] and by_burst == sorted(by_burst)


@pytest.mark.parametrize("burst", [1.5, 3.0, 8.0])
def test_bursty_link_draws_what_the_policy_prices_in_runs(burst):
    policy, p = DeliveryPolicy(), 0.05
    link = BurstyLink(p, burst, policy, None, np.random.default_rng(0))
    missed = link.misses(20_000, 30)
    assert missed.mean() == pytest.approx(policy.miss_probability(p, burst=burst), rel=0.08)
    # a burst takes the next round too: far likelier after a miss than the rate says
    flat = missed.ravel()
    after_miss = flat[1:][flat[:-1]].mean()
    assert after_miss > (1.5 if burst < 2 else 3) * flat.mean()
    with pytest.raises(ValueError, match="mean burst length"):
        BurstyLink(p, 0.5, policy, None, np.random.default_rng(0))


def test_eval_burst_runs_each_rate_both_ways(tiny_plan):
    _, directory = tiny_plan
    report = evaluate(directory, EvalOptions(plrs=(0.1,), burst=4.0, methods=("zero",), recall_windows=0,
                                             greedy_prompts=2, greedy_tokens=8, progress=False, **TINY))
    rows = {(r["burst"], r["method"]): r for r in report["results"]}
    assert set(rows) == {(0.0, "zero"), (4.0, "zero"), (0.0, report["default_method"]),
                         (4.0, report["default_method"])}
    lost = {b: sum(c["lost"] * c["parts"] for c in rows[b, "zero"]["relaxed"].values()) for b in (0.0, 4.0)}
    assert lost[4.0] > lost[0.0] > 0  # the re-request rarely saves a part inside a burst
    assert all(r["plr"] == 0.1 for r in report["results"])
    res = CliRunner().invoke(main, ["eval", str(directory), "--quiet", "--tokens", "256", "--context", "128",
                                    "--plr", "0.1", "--burst", "0.5", "--method", "zero"])
    assert res.exit_code == 2 and "burst 0.5" in res.output


def test_matched_prefix_stops_at_the_first_difference():
    assert matched_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert matched_prefix([5, 6], [5, 6]) == 2 and matched_prefix([7], [8]) == 0


def test_heavy_loss_lowers_top1_and_greedy_agreement(plan_copy):
    all_remote_lossy(plan_copy, 0.5)
    report = evaluate(plan_copy, EvalOptions(plrs=(0.5,), methods=("zero",), recall_windows=0, progress=False,
                                             greedy_prompts=3, greedy_tokens=24, **TINY))
    zero = next(r for r in report["results"] if r["method"] == "zero")
    assert zero["relaxed"] and 0.0 < zero["top1_agreement"] < 1.0
    assert 0.0 <= zero["greedy_matched"] < 24.0 and report["greedy"]["prompts"] == 3


def test_miss_rates_override_only_lossy_links(tiny_plan):
    plan, _ = tiny_plan
    rates = miss_rates(plan, 0.1, DeliveryPolicy())
    lossy = {d.name for d in plan.devices if d.loss > 0}
    assert set(rates) == set(plan.device_names) - {plan.coordinator}
    assert all((q > 0) == (d in lossy) for d, q in rates.items())
    (name,) = lossy  # the plan's copies for the link, whatever loss is simulated on it (so does the runtime)
    assert rates[name] == pytest.approx(DeliveryPolicy().miss_probability(0.1, planned=plan.link_copies(name)))
    assert plan.link_copies(name) == 2 and rates[name] < DeliveryPolicy().miss_probability(0.1) / 10
    once = miss_rates(plan, 0.1, DeliveryPolicy(redundancy=1))  # --redundancy 1 overrides the plan
    assert once[name] == pytest.approx(DeliveryPolicy().miss_probability(0.1))


def test_cli_prints_one_json_object(tiny_plan):
    _, directory = tiny_plan
    res = CliRunner().invoke(main, ["eval", str(directory), "--json", "--quiet", "--tokens", "256", "--context",
                                    "128", "--plr", "0.05", "--method", "zero", "--method", "predictor"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"full_ppl", "tokens", "results"} <= set(out)
    assert out["tokens"] == 256
    # the default method comes first even when not asked for
    assert [r["method"] for r in out["results"]] == [out["default_method"], "zero", "predictor"]
    assert all(set(r) >= {"plr", "method", "ppl", "top1_agreement", "greedy_matched"} and r["plr"] == 0.05
               for r in out["results"])
    assert 0.0 <= out["predictor"]["recall"] <= 1.0
    table = CliRunner().invoke(main, ["eval", str(directory), "--quiet", "--tokens", "256", "--context", "128",
                                      "--method", "zero"])
    assert table.exit_code == 0 and table.stdout.startswith("full model: perplexity"), table.output


@pytest.mark.parametrize("rounds", ["star", "push"])
def test_cli_scores_the_fp16_wire_the_runtime_sends(tiny_plan, rounds):
    """`--wire fp16`: every part rounded as halo-run sends it (push: the coordinator's own parts too);
    nothing lost, the full model's perplexity up to that rounding."""
    _, directory = tiny_plan
    res = CliRunner().invoke(main, ["eval", str(directory), "--json", "--quiet", "--tokens", "256", "--context",
                                    "128", "--plr", "0", "--method", "zero", "--wire", "fp16", "--rounds", rounds])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["wire"], out["rounds"]) == ("fp16", rounds)
    assert all(abs(r["delta"]) < 1e-2 for r in out["results"]), out["results"]
    bad = CliRunner().invoke(main, ["eval", str(directory), "--wire", "bf16"])
    assert bad.exit_code == 2 and "bf16" in bad.output


def test_cli_bad_directory_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "nope"), "--json"])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "no plan here" in res.stderr


@pytest.mark.slow
def test_real_model_compensation_beats_zero_fill_at_5_percent(tmp_path):
    """SmolLM2 on 4 devices, every remote link at 5% loss; 1k tokens, seeded."""
    from halo_compile.pipeline import CompileOptions, compile_plan

    (tmp_path / "cluster.yaml").write_text(cluster_yaml(4, coordinator_gflops=1.0, base_port=7950))
    opts = CompileOptions(calib_tokens=512, chunk_tokens=256, sample_tokens=256, mlp_groups=8, relaxed_share=0.3,
                          max_context=512, solver_time=1.0, progress=False)
    _, directory = compile_plan("smollm2-135m", tmp_path / "cluster.yaml", tmp_path / "plan", opts)
    all_remote_lossy(directory, 0.05)
    report = evaluate(directory, EvalOptions(plrs=(0.05,), tokens=1024, context=256, progress=False,
                                             methods=("zero", "lowrank"), recall_windows=0))
    ppl = {r["method"]: r["ppl"] for r in report["results"]}
    print("\nreal model, 5% loss:", report["full_ppl"], ppl)
    # what the runtime does by default (predictor-driven waiting plus low-rank compensation) beats
    # zero-fill. Low-rank compensation alone beat it too with networkx's Louvain groups (11.20 vs
    # 11.35); with igraph's groups it does on 2,048 tokens (12.935 vs 12.944) but not on these
    # 1,024 (11.39 vs 11.37), within this short text's noise, so it is printed, not asserted. The
    # calibration mean is within noise of zero-fill (docs/ACCURACY.md) and not used by the runtime.
    assert ppl[report["default_method"]] < ppl["zero"]
    assert ppl[report["default_method"]] < ppl["lowrank"]
