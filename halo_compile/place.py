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
"""
from __future__ import annotations

from halo_runtime.core.plan import SolverReport

from .placecost import (
    GroupCost,
    InfeasibleError,
    Placement,
    PlaceOptions,
    compute_ms,
    expected_lost_importance,
    importance_at_risk,
    load_ms,
    mb,
    predicted_token_ms,
    stream_share,
)
from .placesolve import LOSS_SCALE, TIME_UNITS_PER_MS, Problem, capacity, optimise

__all__ = ["GroupCost", "InfeasibleError", "PlaceOptions", "Placement", "expected_lost_importance",
           "importance_at_risk", "load_ms", "place", "place_loss_blind", "predicted_token_ms", "stream_share"]


def place(groups, devices, coordinator: str, fixed_bytes: dict[str, int], miss: dict[str, float],
          options: PlaceOptions = PlaceOptions()) -> Placement:
    """Minimise per-token time, then lost importance within `time_slack` of that time.

    fixed_bytes: bytes a device holds besides its groups (the coordinator's embeddings, norms, LM
    head, predictors). miss: post-retransmission miss probability of every other device's relaxed
    replies; the coordinator's entry, if any, is ignored (it computes locally).
    """
    return _place(groups, devices, coordinator, fixed_bytes, miss, options, aware=True)


def place_loss_blind(groups, devices, coordinator: str, fixed_bytes: dict[str, int],
                     miss: dict[str, float], options: PlaceOptions = PlaceOptions()) -> Placement:
    """Phase 1 alone with every loss treated as 0, then evaluated with the true losses."""
    return _place(groups, devices, coordinator, fixed_bytes, miss, options, aware=False)


def _place(groups, devices, coordinator, fixed_bytes, miss, options, aware: bool) -> Placement:
    groups, devices, miss = _prepare(groups, devices, coordinator, fixed_bytes, miss)
    p = Problem.build(groups, devices, coordinator, fixed_bytes, miss, options, loss_aware=aware)
    a, status, bound, runs = optimise(p, options, loss_phase=aware)
    value, scale = (p.loss_units(a), LOSS_SCALE * p.num_layers) if aware \
        else (p.time_units(a), TIME_UNITS_PER_MS)
    assignment, by_name = p.names(a), {d.name: d for d in devices}
    device_ms = {d.name: 0.0 for d in devices}
    for g in groups:
        device_ms[assignment[g.id]] += compute_ms(g, by_name[assignment[g.id]])
    share = stream_share(groups, devices, fixed_bytes)
    # what the solver charged: each group on a streaming device, its device's expected share of loads
    load = {g.id: share[assignment[g.id]] * load_ms(g, by_name[assignment[g.id]])
            for g in groups if share[assignment[g.id]]}
    return Placement(
        assignment=assignment, device_time_ms=device_ms,
        solver=SolverReport(status=status, objective=value / scale, bound=min(bound, value) / scale,
                            deterministic_time=sum(r.dtime for r in runs),
                            num_workers=options.num_workers),
        predicted_token_ms=predicted_token_ms(groups, assignment, devices, coordinator, miss, options, load),
        expected_lost_importance=expected_lost_importance(groups, assignment, miss, p.num_layers),
        solve_wall_s=sum(r.wall for r in runs))


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

