"""Place every neuron group on one device with CP-SAT: fast per token, and little importance lost.

The cost model (per-token time, lost importance, storage loads) is in placecost.py; the integer
model and the CP-SAT phases in placesolve.py. This module is the entry point:

- `place`: phase 1 minimises the per-token time T; phase 2 keeps T <= (1+time_slack)*T1 and
  minimises the expected lost importance (relaxed groups' importance times their device's miss
  probability, `DeliveryPolicy.miss_probability`), starting from phase 1's plan.
- `place_loss_blind`: phase 1 with every loss treated as 0, the baseline that shows what knowing
  the losses buys.
- Memory: the groups' weight_bytes + kv_bytes plus fixed_bytes[d] fit in d.memory_bytes, except
  that a device with storage_mbps may exceed it with weights it streams from storage.

`halo-compile plan` and `eval`'s loss-blind re-placement set the solver up the same way, with
`placement_inputs`; after placement, `device_reports` sums what each device holds (and, for
devices with `power_w`, prices its energy per token) and `mark_streaming` marks the groups that
devices with storage stream.

Example:
    >>> from halo_runtime.core.plan import Device
    >>> from halo_runtime.core.policy import DeliveryPolicy
    >>> from halo_compile.place import GroupCost, place
    >>> groups = [GroupCost(f"L0.mlp.{i}", 0, "mlp", i < 2, 0.4 / 2 ** i, 10**6, 0, 10**6)
    ...           for i in range(4)]
    >>> devices = [Device("pi-0", "10.0.0.1:9000", 10**8, 5.0),
    ...            Device("pi-1", "10.0.0.2:9000", 10**8, 5.0, loss=0.05)]
    >>> p = place(groups, devices, "pi-0", {"pi-0": 10**6}, {"pi-1": DeliveryPolicy().miss_probability(0.05)})
    >>> sorted(p.assignment.items())
    [('L0.mlp.0', 'pi-0'), ('L0.mlp.1', 'pi-0'), ('L0.mlp.2', 'pi-0'), ('L0.mlp.3', 'pi-1')]
    >>> round(p.predicted_token_ms, 3), round(p.expected_lost_importance, 6)
    (0.6, 0.000475)
    >>> import torch
    >>> from halo_runtime.core.config import ModelConfig
    >>> from halo_runtime.core.plan import Group
    >>> from halo_compile.place import placement_inputs
    >>> cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=32, num_layers=1,
    ...                   num_heads=4, num_kv_heads=2, head_dim=2)
    >>> groups = [Group(f"L0.mlp.{i}", 0, "mlp", i, tuple(range(8 * i, 8 * i + 8)), "", i < 2, 0.25)
    ...           for i in range(4)]
    >>> inputs = placement_inputs(cfg, groups, devices, "pi-0", {"embed": torch.zeros(16, 8)},
    ...                           max_context=16, seed=0, solver_time=1.0)
    >>> inputs.fixed_bytes, round(inputs.miss["pi-1"], 6), inputs.options.message_bytes
    ({'pi-0': 512}, 0.009506, 16)
    >>> sorted(set(inputs.place().assignment.values()))   # groups this small: a round trip costs more
    ['pi-0']
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from halo_runtime.core.config import ModelConfig
from halo_runtime.core.plan import Device, DeviceReport, Plan, SolverReport
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.push import view_over_memory
from halo_runtime.core.formats import weight_format
from halo_runtime.core.residency import BYTES_PER_WEIGHT, residency, weight_bytes

from .placecost import (
    GroupCost,
    InfeasibleError,
    Placement,
    PlaceOptions,
    compute_ms,
    energy_mj,
    expected_lost_importance,
    group_cost,
    importance_at_risk,
    link_copies,
    load_ms,
    mb,
    predicted_token_ms,
    rounds_per_token,
    stream_share,
)
from .roundcost import plan_network_ms
from .placesolve import LOSS_SCALE, TIME_UNITS_PER_MS, Problem, capacity, optimise

__all__ = ["GroupCost", "InfeasibleError", "PlaceOptions", "Placement", "PlacementInputs", "choose_rounds",
           "device_reports", "dominates", "energy_mj", "expected_lost_importance", "group_cost", "importance_at_risk",
           "load_ms", "mark_streaming", "place", "place_loss_blind", "placement_inputs", "predicted_token_ms",
           "rounds_per_token", "stream_share", "with_energy"]


def place(groups, devices, coordinator: str, fixed_bytes: dict[str, int], miss: dict[str, float],
          options: PlaceOptions = PlaceOptions(), baseline: Placement | None = None) -> Placement:
    """Minimise per-token time, then lost importance within `time_slack` of that time.

    fixed_bytes: bytes a device holds besides its groups (the coordinator's embeddings, norms, LM
    head, predictors). miss: post-retransmission miss probability of every other device's relaxed
    replies; the coordinator's entry, if any, is ignored (it computes locally).
    baseline: the loss-blind placement of the same inputs, if already solved; it is solved here
    when a link loses anything. The result is never dominated by it (as slow or slower and
    losing as much or more importance, one of them strictly): the solver takes it as a candidate.
    """
    if baseline is None and any(m > 0 for name, m in miss.items() if name != coordinator):
        baseline = place_loss_blind(groups, devices, coordinator, fixed_bytes, miss, options)
    return _place(groups, devices, coordinator, fixed_bytes, miss, options, aware=True, baseline=baseline)


def place_loss_blind(groups, devices, coordinator: str, fixed_bytes: dict[str, int],
                     miss: dict[str, float], options: PlaceOptions = PlaceOptions()) -> Placement:
    """Phase 1 alone with every loss treated as 0, then evaluated with the true losses."""
    return _place(groups, devices, coordinator, fixed_bytes, miss, options, aware=False)


def dominates(a: Placement, b: Placement) -> bool:
    """a is as fast as b and loses no more importance, and is strictly better in one of them."""
    return (a.predicted_token_ms <= b.predicted_token_ms and a.expected_lost_importance <= b.expected_lost_importance
            and (a.predicted_token_ms, a.expected_lost_importance) != (b.predicted_token_ms,
                                                                        b.expected_lost_importance))


def _place(groups, devices, coordinator, fixed_bytes, miss, options, aware: bool,
           baseline: Placement | None = None) -> Placement:
    groups, devices, miss = _prepare(groups, devices, coordinator, fixed_bytes, miss)
    p = Problem.build(groups, devices, coordinator, fixed_bytes, miss, options, loss_aware=aware)
    index = {name: i for i, name in enumerate(p.device_names)}
    candidates = [[index[baseline.assignment[g.id]] for g in groups]] if baseline is not None else []
    a, status, bound, runs = optimise(p, options, loss_phase=aware, candidates=candidates)
    value, scale = (p.loss_units(a), LOSS_SCALE * p.num_layers) if aware \
        else (p.time_units(a), TIME_UNITS_PER_MS)
    solver = SolverReport(status=status, objective=value / scale, bound=min(bound, value) / scale,
                          deterministic_time=sum(r.dtime for r in runs), num_workers=options.num_workers)
    placed = _evaluate(groups, devices, coordinator, fixed_bytes, miss, options, p.names(a), solver,
                       solve_wall_s=sum(r.wall for r in runs), num_layers=p.num_layers)
    if baseline is not None and dominates(baseline, placed):
        # the solver compares in integer units (0.1 us, 1e-9 importance): settle near-ties exactly
        placed = replace(placed, assignment=dict(baseline.assignment), device_time_ms=baseline.device_time_ms,
                         predicted_token_ms=baseline.predicted_token_ms,
                         expected_lost_importance=baseline.expected_lost_importance,
                         rounds_per_token=baseline.rounds_per_token)
    return placed


def _evaluate(groups, devices, coordinator, fixed_bytes, miss, options, assignment, solver, solve_wall_s,
              num_layers) -> Placement:
    """A Placement for `assignment`: the cost model's time, loss, rounds and per-device compute."""
    by_name = {d.name: d for d in devices}
    device_ms = {d.name: 0.0 for d in devices}
    for g in groups:
        device_ms[assignment[g.id]] += compute_ms(g, by_name[assignment[g.id]])
    share = stream_share(groups, devices, fixed_bytes)
    # what the solver charged: each group on a streaming device, its device's expected share of loads
    load = {g.id: share[assignment[g.id]] * load_ms(g, by_name[assignment[g.id]])
            for g in groups if share[assignment[g.id]]}
    return Placement(
        assignment=assignment, device_time_ms=device_ms, solver=solver,
        predicted_token_ms=predicted_token_ms(groups, assignment, devices, coordinator, miss, options, load),
        expected_lost_importance=expected_lost_importance(groups, assignment, miss, num_layers),
        rounds_per_token=rounds_per_token(groups, assignment, coordinator),
        solve_wall_s=solve_wall_s)


def _prepare(groups, devices, coordinator, fixed_bytes, miss):
    """Validate inputs, check memory in plain arithmetic, and zero the coordinator's miss."""
    groups, devices = tuple(groups), tuple(devices)
    names = [d.name for d in devices]
    if not groups or not devices:
        raise ValueError("need at least one group and one device")
    if len(set(names)) != len(names) or len({g.id for g in groups}) != len(groups):
        raise ValueError("device names and group ids must be unique")
    if coordinator not in names:
        raise ValueError(f"coordinator {coordinator!r} is not a device ({', '.join(names)})")
    for name in sorted(set(fixed_bytes) - set(names)):
        raise ValueError(f"fixed_bytes names {name!r}, which is not a device")
    if next(d for d in devices if d.name == coordinator).storage_mbps > 0:
        raise ValueError(f"coordinator {coordinator} cannot stream weights (storage_mbps must be 0)")
    for name in names:
        if name != coordinator and not 0.0 <= miss.get(name, -1.0) <= 1.0:
            raise ValueError(f"miss: device {name} needs a miss probability in [0, 1]")
    for d in devices:
        if fixed_bytes.get(d.name, 0) > d.memory_bytes:
            what = "coordinator {} needs {} for embeddings and norms" if d.name == coordinator \
                else "device {} needs {} for fixed buffers"
            raise InfeasibleError(what.format(d.name, mb(fixed_bytes[d.name]))
                                  + f" but has {mb(d.memory_bytes)}")
    free = [capacity(d, fixed_bytes, groups) for d in devices]
    need = sum(g.bytes for g in groups)
    if need > sum(free):
        raise InfeasibleError(f"model needs {mb(need)} of weights and KV cache; "
                              f"the cluster has {mb(sum(free))}")
    for g in groups:
        if g.bytes > max(free):
            raise InfeasibleError(f"group {g.id} ({mb(g.bytes)}) fits on no device "
                                  f"(the most free memory is {mb(max(free))})")
    return groups, devices, {n: (0.0 if n == coordinator else float(miss[n])) for n in names}


@dataclass(frozen=True)
class PlacementInputs:
    """What the solver is given: the same set-up for `halo-compile plan` and `eval`'s re-placement."""

    costs: tuple[GroupCost, ...]
    """Every group's cost, in the plan's group order."""
    devices: tuple[Device, ...]
    """The cluster, coordinator included."""
    coordinator: str
    """The device holding embeddings, norms, LM head, predictors and compensation."""
    fixed_bytes: dict[str, int]
    """Bytes a device holds besides its groups (the coordinator's tensors)."""
    miss: dict[str, float]
    """Per device, the chance a relaxed reply misses its deadline under the default delivery policy."""
    options: PlaceOptions
    """Solver and cost-model settings."""

    def __post_init__(self):
        if self.coordinator not in [d.name for d in self.devices]:
            raise ValueError(f"coordinator {self.coordinator!r} is not a device")

    def place(self, baseline: Placement | None = None) -> Placement:
        """`place` on these inputs: fast, then little importance lost; baseline: `place_loss_blind()`'s
        result, if already solved (else solved again when a link loses anything)."""
        return place(self.costs, self.devices, self.coordinator, self.fixed_bytes, self.miss, self.options,
                     baseline)

    def place_loss_blind(self) -> Placement:
        """`place_loss_blind` on these inputs: fast, as if no link lost anything."""
        return place_loss_blind(self.costs, self.devices, self.coordinator, self.fixed_bytes, self.miss, self.options)


QUANTISED_TABLES = ("model.embed_tokens.weight", "lm_head.weight", "embed_tokens", "lm_head")
"""Coordinator tensors (HF or shard names) stored in the plan's weight format."""


def coordinator_bytes(tensors: dict, weights: str = "fp32", hidden: int | None = None) -> int:
    """Bytes of the coordinator's tensors outside its groups: every tensor but the projections,
    which are cut into groups and placed; embeddings and LM head (`hidden` inputs per row, default
    their stored width) in format `weights`, scales included."""
    fmt, total = weight_format(weights), 0
    for k, v in tensors.items():
        if "proj" in k:
            continue
        if k in QUANTISED_TABLES:
            total += fmt.nbytes(v.shape[0], hidden or v.shape[1])
        else:
            total += math.prod(v.shape) * BYTES_PER_WEIGHT  # torch tensors (the compiler) or numpy (a shard)
    return total


def placement_inputs(cfg: ModelConfig, groups, devices, coordinator: str, coordinator_tensors: dict,
                     max_context: int, seed: int, solver_time: float,
                     select_rate: dict[str, float] | None = None, weights: str = "fp32") -> PlacementInputs:
    """The solver's inputs for `groups` (plan records) on `devices`.

    coordinator_tensors: every tensor the coordinator holds, by shard name (model weights with the
    projections, or a coordinator shard); select_rate: group id -> how often the predictor
    selects it (default 1). Miss probabilities are the default `DeliveryPolicy`'s, whatever the
    plan will run with, so a plan does not depend on runtime settings.
    """
    select_rate = select_rate or {}
    policy = DeliveryPolicy()
    return PlacementInputs(
        costs=tuple(group_cost(cfg, g, max_context, select_rate.get(g.id, 1.0), weights) for g in groups),
        devices=tuple(devices), coordinator=coordinator,
        fixed_bytes={coordinator: coordinator_bytes(coordinator_tensors, weights, cfg.hidden_size)},
        miss={d.name: 0.0 if d.name == coordinator else policy.miss_probability(d.loss, burst=d.burst)
              for d in devices},
        # one token's partial sum in fp16, the default wire
        options=PlaceOptions(seed=seed, max_deterministic_time=solver_time, message_bytes=2 * cfg.hidden_size))


def device_reports(inputs: PlacementInputs, placement: Placement, num_layers: int) -> tuple[DeviceReport, ...]:
    """Per device, what the placement puts on it: bytes, groups, importance and compute per token."""
    reports = []
    for dev in inputs.devices:
        mine = [c for c in inputs.costs if placement.assignment[c.id] == dev.name]
        reports.append(DeviceReport(
            name=dev.name,
            weight_bytes=sum(c.weight_bytes for c in mine) + inputs.fixed_bytes.get(dev.name, 0),
            kv_cache_bytes=sum(c.kv_bytes for c in mine),
            num_groups=len(mine),
            # attention and MLP shares each sum to 1 per layer
            importance_share=sum(c.importance for c in mine) / (2 * num_layers),
            predicted_time_ms=placement.device_time_ms[dev.name],
            copies=1 if dev.name == inputs.coordinator else link_copies(dev, inputs.options)))
    return with_energy(tuple(reports), inputs.devices, placement.predicted_token_ms)


def with_energy(reports, devices, token_ms: float) -> tuple[DeviceReport, ...]:
    """The reports with each device's predicted energy per token at `token_ms` (`energy_mj`), for
    the devices whose profile gives `power_w`; the others keep None."""
    power = {d.name: d.power_w for d in devices}
    return tuple(r if power[r.name] is None else replace(r, energy_mj=energy_mj(power[r.name], r.predicted_time_ms,
                                                                                    token_ms))
                 for r in reports)


def mark_streaming(plan: Plan, inputs: PlacementInputs) -> Plan:
    """Mark the groups that devices with storage stream (memory too small), and report them.

    The runtime's own `residency` picks them, so the plan says what `halo-run worker` will do
    with the plan's budget: weights in RAM = memory - KV cache (- fixed buffers).
    """
    streaming = [d for d in plan.devices if d.storage_mbps > 0 and d.name != plan.coordinator]
    if not streaming:
        return plan
    by_id = {c.id: c for c in inputs.costs}
    groups = [replace(g, select_rate=by_id[g.id].select_rate) if g.kind == "mlp"
              and plan.device(g.device).storage_mbps > 0 else g for g in plan.groups]
    plan = replace(plan, groups=tuple(groups))
    reports, load = {r.name: r for r in plan.device_reports}, {}
    for dev in streaming:
        rep = reports[dev.name]
        budget = dev.memory_bytes - rep.kv_cache_bytes - inputs.fixed_bytes.get(dev.name, 0)
        try:
            res = residency(plan, dev.name, budget)
        except ValueError as e:
            raise InfeasibleError(str(e)) from None
        if not res.streamed_bytes:
            continue
        if plan.weights != "fp32":  # the runtime's storage shell reads fp32 shards only (for now)
            raise InfeasibleError(f"device {dev.name} would stream {res.streamed_bytes / 1e6:.1f} MB of weights "
                                  f"from storage, which needs fp32 weights, not {plan.weights} "
                                  f"(give it more memory or compile with --weights fp32)")
        mine = [g for g in plan.groups if g.device == dev.name and g.id not in res.resident]
        dev_load = {g.id: load_ms(by_id[g.id], dev) for g in mine}
        load.update(dev_load)
        reports[dev.name] = replace(rep, resident_bytes=res.resident_bytes, streamed_bytes=res.streamed_bytes,
                                    load_ms=sum(dev_load.values()))
    if not load:
        return plan
    assignment = {g.id: g.device for g in plan.groups}
    token_ms = predicted_token_ms(inputs.costs, assignment, plan.devices, plan.coordinator, inputs.miss,
                                  inputs.options, load)
    # storage loads lengthen the token: every device idles longer, so its energy is priced again
    return replace(plan, groups=tuple(replace(g, streamed=g.id in load) for g in plan.groups),
                   device_reports=with_energy(tuple(reports[d.name] for d in plan.devices), plan.devices, token_ms),
                   predicted_token_ms=token_ms)


def choose_rounds(plan: Plan, rounds: str = "auto", view_bytes: int = 0) -> Plan:
    """`plan` with the rounds the runtime runs by default recorded (`Plan.rounds`): `rounds` itself,
    or for "auto" the kind with less network time a token (`plan_network_ms`: push mixed with the
    star rounds that cost less, against star; star on a tie, where no round leaves the coordinator,
    where the mix keeps no push round, and where a push view of `view_bytes` would not fit beside a
    device's weights: `core.push.view_over_memory`). A push plan records its star rounds
    (`Plan.star_rounds`). Placement priced star rounds; push is chosen after it."""
    net, star_rounds = plan_network_ms(plan)
    if rounds == "auto":
        pushes = len(star_rounds) < len(plan.network_rounds())
        rounds = "push" if net["mixed"] < net["star"] and pushes and not view_over_memory(plan, view_bytes) else "star"
    return replace(plan, rounds=rounds, star_rounds=star_rounds if rounds == "push" else ())


def check_capacity(cfg: ModelConfig, devices, coordinator: str, tensors: dict, max_context: int,
                   weights: str = "fp32") -> None:
    """Fail fast, before profiling: InfeasibleError naming the shortfall when the cluster cannot hold
    the model's weights in format `weights` plus its KV cache at `max_context`.

    A lower bound on what placement will need (predictor and compensation are not known yet, and
    groups may not pack), so it never refuses a model that placement could place."""
    layers = cfg.num_layers
    weight = layers * (weight_bytes(cfg, "attn", cfg.num_kv_heads, weights)
                       + weight_bytes(cfg, "mlp", cfg.intermediate_size, weights))
    kv = layers * 2 * max_context * cfg.head_dim * cfg.num_kv_heads * BYTES_PER_WEIGHT
    fixed = coordinator_bytes({k: v for k, v in tensors.items() if "proj" not in k}, weights, cfg.hidden_size)
    free = 0
    for d in devices:
        mine = fixed if d.name == coordinator else 0
        if mine > d.memory_bytes:
            raise InfeasibleError(f"coordinator {d.name} needs {mb(mine)} for embeddings, LM head and norms in "
                                  f"{weights} but has {mb(d.memory_bytes)}")
        free += d.memory_bytes - mine + (weight if d.storage_mbps > 0 else 0)
    if weight + kv > free:
        raise InfeasibleError(f"model needs {mb(weight + kv)} ({mb(weight)} of {weights} weights + {mb(kv)} of KV "
                              f"cache at max context {max_context}) besides coordinator {coordinator}'s {mb(fixed)}; "
                              f"the cluster has {mb(free)} (short by {mb(weight + kv - free)})")
