"""Failover, planned by the compiler: where a remote device's groups go if it dies.

A device holding a critical group stalls every token when it dies (critical replies are always
awaited), so for each such remote device d the compiler places d's groups on the survivors, every
other group pinned where the placement put it, in the placement's own cost units
(`placesolve.Problem`: compute, round trips, retransmission waits, lost importance):

- phase 1: the least per-token time; phase 2: the least lost importance within `time_slack` of it
  (as `place` does, loss-aware);
- memory: a survivor takes adopted groups (weights and KV cache) into RAM only, never onto
  storage: its memory less its fixed buffers and its own groups must hold them, KV caches counted
  for every session slot the plan gives each device (`session_slots`: `serve` fills them all).
  Their weights wait in the survivor's shard (`shards.failover_tensor`), mapped from disk and read
  only once used;
- a device whose groups the survivors cannot hold gets a record with no moves and the reason;
- solved round by round (rounds share only memory), as one model only when memory couples them.

A device with relaxed groups only gets no record: its replies are never awaited, so the
coordinator compensates its death as it compensates a late reply. The coordinator gets none: it
holds the residual stream.

Example (pi-1 holds a critical group; pi-2, relaxed groups only, needs no failover):
    >>> from halo_runtime.core.plan import Device
    >>> from halo_compile.failover import plan_failover
    >>> from halo_compile.place import GroupCost, PlacementInputs, PlaceOptions
    >>> costs = tuple(GroupCost(f"L0.mlp.{i}", 0, "mlp", i < 2, 0.4 / 2 ** i, 10**6, 0, 10**6)
    ...               for i in range(4))
    >>> devices = tuple(Device(f"pi-{i}", f"10.0.0.{i + 1}:9000", 4 * 10**6, 5.0) for i in range(3))
    >>> inputs = PlacementInputs(costs, devices, "pi-0", {}, {"pi-0": 0.0, "pi-1": 0.0, "pi-2": 0.0},
    ...                          PlaceOptions())
    >>> where = {"L0.mlp.0": "pi-0", "L0.mlp.1": "pi-1", "L0.mlp.2": "pi-2", "L0.mlp.3": "pi-2"}
    >>> [(f.device, f.moves) for f in plan_failover(inputs, where, num_layers=1)]
    [('pi-1', (('L0.mlp.1', 'pi-0'),))]
    >>> small = tuple(Device(d.name, d.address, 10**6 if d.name != "pi-1" else 4 * 10**6, 5.0) for d in devices)
    >>> print(plan_failover(PlacementInputs(costs, small, "pi-0", {}, inputs.miss, PlaceOptions()), where, 1)[0].reason)
    pi-1's groups need 1.0 MB; the survivors have 0.0 MB free (pi-0 0.0 MB, pi-2 0.0 MB)
"""
from __future__ import annotations

import math
from dataclasses import replace

from halo_runtime.core.plan import Failover, slots_that_fit
from ortools.sat.python import cp_model

from .place import PlacementInputs
from .placecost import compute_ms, expected_lost_importance, load_ms, mb, predicted_token_ms, stream_share
from .placesolve import TIME_UNITS_PER_MS, Problem, _solver


def plan_failover(inputs: PlacementInputs, assignment: dict[str, str], num_layers: int) -> tuple[Failover, ...]:
    """One Failover per remote device of `inputs` that holds a critical group under `assignment`
    (group id -> device), in device order: its groups on the survivors, or why they do not fit."""
    # one sequential search with the seed and a deterministic budget: same inputs, same failover
    options = replace(inputs.options, num_workers=1)
    # the placement's own units: pinned groups cost exactly what the placement charged them
    p = Problem.build(inputs.costs, inputs.devices, inputs.coordinator, inputs.fixed_bytes, inputs.miss, options,
                      loss_aware=True)
    index = {name: i for i, name in enumerate(p.device_names)}
    a = [index[assignment[c.id]] for c in inputs.costs]
    out = []
    for d, dev in enumerate(inputs.devices):
        held = [g for g, c in enumerate(inputs.costs) if a[g] == d]
        if dev.name != inputs.coordinator and any(p.critical[g] for g in held):
            out.append(_fail_over(inputs, p, a, d, held, num_layers, options))
    return tuple(out)


def session_slots(inputs: PlacementInputs, assignment: dict[str, str]) -> int:
    """The session slots every device allocates under `assignment`: `Plan.session_slots`'s rule
    (`slots_that_fit`) on the placement's bytes; a device whose groups overflow its memory streams."""
    weights = {d.name: inputs.fixed_bytes.get(d.name, 0) for d in inputs.devices}
    kv = dict.fromkeys(weights, 0)
    for c in inputs.costs:
        weights[assignment[c.id]] += c.weight_bytes
        kv[assignment[c.id]] += c.kv_bytes
    return min(slots_that_fit(d.memory_bytes, weights[d.name], kv[d.name],
                              streams=weights[d.name] + kv[d.name] > d.memory_bytes) for d in inputs.devices)


def held_bytes(c, slots: int) -> int:
    """RAM a group takes on a device serving `slots` sessions: its weights and a KV cache per slot."""
    return c.weight_bytes + slots * c.kv_bytes


def free_ram(inputs: PlacementInputs, assignment: dict[str, str], dead: str) -> dict[str, int]:
    """Per survivor, the RAM left for adopted groups: memory less fixed buffers less its own groups
    (weights and every session slot's KV cache; a device that streams from storage has none left)."""
    slots = session_slots(inputs, assignment)
    used = {d.name: inputs.fixed_bytes.get(d.name, 0) for d in inputs.devices}
    for c in inputs.costs:
        used[assignment[c.id]] += held_bytes(c, slots)
    return {d.name: max(0, d.memory_bytes - used[d.name]) for d in inputs.devices if d.name != dead}


def _fail_over(inputs, p: Problem, a: list[int], dead: int, held: list[int], num_layers: int, options) -> Failover:
    name = p.device_names[dead]
    free = free_ram(inputs, p.names(a), name)
    room = [free[n] if i != dead else 0 for i, n in enumerate(p.device_names)]
    # adopted groups are always in RAM, with a KV cache per session slot: they cost their compute
    # alone, never a share of storage loads
    slots = session_slots(inputs, p.names(a))
    comp, size = list(p.comp), list(p.size)
    for g in held:
        comp[g] = tuple(round(compute_ms(inputs.costs[g], dev) * TIME_UNITS_PER_MS) for dev in inputs.devices)
        size[g] = held_bytes(inputs.costs[g], slots)
    q = replace(p, comp=tuple(comp), size=tuple(size))
    with_caches = slots > 1 and any(inputs.costs[g].kv_bytes for g in held)
    caches = f" (with {slots} sessions' KV caches)" if with_caches else ""
    need, listing = sum(q.size[g] for g in held), ", ".join(f"{n} {mb(b)}" for n, b in free.items())
    if need > sum(room):
        return Failover(name, (), reason=f"{name}'s groups need {mb(need)}{caches}; the survivors have "
                                         f"{mb(sum(room))} free ({listing})")
    biggest = max(held, key=lambda g: (q.size[g], -g))
    if q.size[biggest] > max(room):
        return Failover(name, (), reason=f"{name}'s group {q.group_ids[biggest]} needs {mb(q.size[biggest])}"
                                         f"{caches}; no survivor has that much free ({listing})")
    moved, status = _solve(q, a, dead, held, room, options)
    if moved is None:
        return Failover(name, (), reason=f"{name}'s groups ({mb(need)}) fit on no combination of the survivors "
                                         f"({listing} free; CP-SAT: {status})")
    after = q.names(moved)
    survivors = tuple(d for d in inputs.devices if d.name != name)
    share = stream_share(inputs.costs, inputs.devices, inputs.fixed_bytes)
    by_name, pinned_out = {d.name: d for d in inputs.devices}, set(held)
    # pinned groups on a streaming survivor keep the share of loads the placement charged them
    load = {c.id: share[after[c.id]] * load_ms(c, by_name[after[c.id]])
            for g, c in enumerate(inputs.costs) if g not in pinned_out and share[after[c.id]]}
    return Failover(
        name, tuple((p.group_ids[g], after[p.group_ids[g]]) for g in held),
        predicted_token_ms=predicted_token_ms(inputs.costs, after, survivors, inputs.coordinator, inputs.miss,
                                              inputs.options, load),
        expected_lost_importance=expected_lost_importance(inputs.costs, after, inputs.miss, num_layers))


def _solve(q: Problem, a: list[int], dead: int, held: list[int], room: list[int], options):
    """(assignment with `held` moved to survivors, CP-SAT status); (None, status) when none was found.

    Rounds share only memory (and, in phase 2, the token's time cap), so each round touched by
    `held` is solved alone first, each with its share of the budget, as `placesolve.optimise`
    does: when the rounds' plans fit in memory together they are the answer. Only when memory
    couples them does the whole model go to CP-SAT (one model of every touched round: the pi5
    plan's 225 groups ran out a 10 s budget there, 56 s wall, 2% from its bound)."""
    mine = set(held)
    rounds = [members for members in q.rounds if mine.intersection(members)]
    share = options.max_deterministic_time / len(rounds)
    # phase 1: the least per-token time
    a1, status, lower = list(a), "OPTIMAL", []
    for members in rounds:
        point, st, bound = _cp_sat(q, a, dead, mine, room, [members], options, share)
        if point is None:
            return None, st
        status = status if st == "OPTIMAL" else st
        lower.append(bound)
        for g in members:
            a1[g] = point[g]
    if not _fits(q, a1, dead, held, room):
        a1, status, _ = _cp_sat(q, a, dead, mine, room, rounds, options, options.max_deterministic_time,
                                hint=_greedy(q, a, dead, held, room), lower=lower)
        if a1 is None:
            return None, status
    relaxed = [g for g in held if any(q.loss[g][s] for s in range(len(q.device_names)) if s != dead)]
    if not relaxed:
        return a1, status
    # phase 2: the least lost importance, each round within the slack of its phase-1 time (so the
    # token within the slack of its own), or the whole token's cap when memory couples the rounds
    a2 = list(a1)
    for members in rounds:
        cap = math.floor((1 + options.time_slack) * q.round_time(members, a1))
        point, _, _ = _cp_sat(q, a1, dead, mine, room, [members], options, share, cap=cap, hint=a1)
        for g in members:
            a2[g] = a1[g] if point is None else point[g]
    if not _fits(q, a2, dead, held, room):
        untouched = q.time_units(a1) - sum(q.round_time(members, a1) for members in rounds)
        cap = math.floor((1 + options.time_slack) * q.time_units(a1)) - untouched
        a2, _, _ = _cp_sat(q, a1, dead, mine, room, rounds, options, options.max_deterministic_time, cap=cap,
                           hint=a1)
        a2 = a2 or a1
    # phase 2 may trade time only for importance; when it saves none, keep phase 1's faster plan
    return (a2 if q.loss_units(a2) < q.loss_units(a1) else a1), status


def _fits(q: Problem, a: list[int], dead: int, held: list[int], room: list[int]) -> bool:
    used = [0] * len(room)
    for g in held:
        used[a[g]] += q.size[g]
    return used[dead] == 0 and all(u <= r for u, r in zip(used, room))


def _cp_sat(q: Problem, a: list[int], dead: int, mine: set[int], room: list[int], rounds, options, budget: float,
            *, cap: int | None = None, hint=None, lower=None):
    """One CP-SAT solve of the moved groups (`mine`) of `rounds`, everything else pinned as in `a`:
    the least total time of those rounds, or (cap) the least lost importance within that total
    (one round: ties go to the faster plan). (assignment or None, status name, bound)."""
    survivors = [s for s in range(len(q.device_names)) if s != dead]
    moving = [g for members in rounds for g in members if g in mine]
    m = cp_model.CpModel()
    x = {g: {s: m.new_bool_var(f"x{g}_{s}") for s in survivors} for g in moving}
    for row in x.values():
        m.add_exactly_one(row.values())
    for s in survivors:
        m.add(sum(q.size[g] * x[g][s] for g in moving) <= room[s])
    times = []
    for k, members in enumerate(rounds):
        ours = [g for g in members if g in mine]
        # the pinned groups of the round: per survivor a constant load, and whether it is in the round
        base = {s: [0, False, False] for s in survivors}
        for g in members:
            if g not in mine:
                cell = base[a[g]]
                cell[0], cell[1], cell[2] = cell[0] + q.comp[g][a[g]], cell[1] or q.critical[g], True
        upper = max(base[s][0] + sum(q.comp[g][s] for g in ours) + q.rtt[s] + q.wait[s] for s in survivors)
        if cap is not None and len(rounds) == 1:
            upper = min(upper, cap)
        t = m.new_int_var(min(lower[k], upper) if lower else 0, upper, f"T{k}")
        for s in survivors:
            load, crit, present = base[s]
            expr = load + sum(q.comp[g][s] * x[g][s] for g in ours)
            # as `Problem.round_time`: a device in the round pays its round trip, and the expected
            # wait if it holds a critical group; the moved groups may bring either
            for cost, which, paid in ((q.rtt[s], ours, present),
                                      (q.wait[s], [g for g in ours if q.critical[g]], crit)):
                if cost and paid:
                    expr = expr + cost
                elif cost and which:
                    y = m.new_bool_var("")
                    for g in which:
                        m.add_implication(x[g][s], y)
                    expr = expr + cost * y
            m.add(t >= expr)
        times.append(t)
    total = sum(times)
    if cap is None:
        m.minimize(total)
    else:
        m.add(total <= cap)
        loss = sum(q.loss[g][s] * x[g][s] for g in moving for s in survivors if q.loss[g][s])
        # the whole model: loss alone, as loss times the total time could overflow 64 bits
        m.minimize(loss * (cap + 1) + total if len(rounds) == 1 else loss)
    if hint is not None:
        for g, row in x.items():
            for s, var in row.items():
                m.add_hint(var, hint[g] == s)
    solver = _solver(options, budget)
    status = solver.solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, solver.status_name(status), 0
    return _read(solver, x, a), solver.status_name(status), math.ceil(solver.best_objective_bound - 1e-6)


def _read(solver, x, a) -> list[int]:
    out = list(a)
    for g, row in x.items():
        out[g] = next(s for s, var in row.items() if solver.boolean_value(var))
    return out


def _greedy(q: Problem, a: list[int], dead: int, held: list[int], room: list[int]) -> list[int] | None:
    """A first plan for the solver: biggest groups first, each where its round's time grows least
    among the survivors with room (None if greedy packing fails; the solver then starts cold)."""
    out, left = list(a), list(room)
    round_of = {g: members for members in q.rounds for g in members}
    for g in sorted(held, key=lambda g: (-q.size[g], g)):
        fits = [s for s in range(len(q.device_names)) if s != dead and q.size[g] <= left[s]]
        if not fits:
            return None

        def cost(s):
            trial = list(out)
            trial[g] = s
            live = [h for h in round_of[g] if h == g or trial[h] != dead]
            return q.round_time(live, trial), q.loss[g][s], s
        s = min(fits, key=cost)
        out[g], left[s] = s, left[s] - q.size[g]
    return out
