"""The placement's integer model and its CP-SAT solves (the cost model itself: placecost.py).

Phase 1 minimises the per-token time T. Phase 2 keeps T <= (1+time_slack)*T1 and minimises lost
importance, starting from phase 1's plan. How the phases are solved (round by round, then a
knapsack over the rounds) is told in `optimise`. Same inputs and options, same plan.

Example:
    >>> from halo_runtime.core.plan import Device
    >>> from halo_compile.placecost import GroupCost, PlaceOptions
    >>> from halo_compile.placesolve import Problem, optimise
    >>> groups = [GroupCost(f"L0.mlp.{i}", 0, "mlp", True, 0.25, 10**6, 0, 10**6) for i in range(4)]
    >>> devices = [Device("a", "10.0.0.1:9000", 10**8, 5.0), Device("b", "10.0.0.2:9000", 10**8, 5.0)]
    >>> p = Problem.build(groups, devices, "a", {}, {"a": 0.0, "b": 0.0}, PlaceOptions(), loss_aware=False)
    >>> a, status, bound, runs = optimise(p, PlaceOptions(), loss_phase=False)
    >>> sorted(p.names(a).values()).count("b") > 0, status
    (True, 'OPTIMAL')
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from ortools.sat.python import cp_model

from .placecost import InfeasibleError, PlaceOptions, group_ms, mb, rtt_ms, stream_share, wait_ms

TIME_UNITS_PER_MS = 10_000
"""Solver time unit, 0.1 us: a group computes in tens of us, so whole us would skew sums by ~1%."""
GAP = 1e-3
"""Relative gap at which CP-SAT stops and calls a solve OPTIMAL (so OPTIMAL means within 0.1%)."""
LOSS_SCALE = 10**9
"""Solver units per unit of importance*miss: a small relaxed group at 1% loss loses ~1e-6."""



# ---- the integer model ----------------------------------------------------------------------------

def capacity(d, fixed_bytes: dict[str, int], groups) -> int:
    """Bytes of groups d may take: its free memory, plus every weight byte if it can stream them
    from storage (their KV caches, never streamed, still count against memory)."""
    free = d.memory_bytes - fixed_bytes.get(d.name, 0)
    return free + sum(g.weight_bytes for g in groups) if d.storage_mbps > 0 else free


@dataclass(frozen=True)
class Problem:
    """The cost model in solver integers; groups and devices are indices into these tuples."""

    group_ids: tuple[str, ...]
    device_names: tuple[str, ...]
    num_layers: int
    rounds: tuple[tuple[int, ...], ...]
    comp: tuple[tuple[int, ...], ...]
    size: tuple[int, ...]
    critical: tuple[bool, ...]
    cap: tuple[int, ...]
    rtt: tuple[int, ...]
    wait: tuple[int, ...]
    loss: tuple[tuple[int, ...], ...]
    rank: tuple[int, ...]
    classes: tuple[tuple[int, ...], ...]

    @staticmethod
    def build(groups, devices, coordinator, fixed_bytes, miss, options, loss_aware):
        def units(ms):
            return round(ms * TIME_UNITS_PER_MS)
        aware = 1.0 if loss_aware else 0.0
        miss_row = [aware * miss[d.name] for d in devices]
        share = stream_share(groups, devices, fixed_bytes)
        comp = tuple(tuple(units(group_ms(g, d, share[d.name])) for d in devices) for g in groups)
        rounds, classes = defaultdict(list), defaultdict(list)
        for i, g in enumerate(groups):
            rounds[g.layer, g.kind].append(i)
            classes[g.layer, g.kind, comp[i], g.bytes, g.critical].append(i)
        by_miss = sorted(range(len(devices)), key=lambda d: (miss_row[d], d))
        return Problem(
            group_ids=tuple(g.id for g in groups), device_names=tuple(d.name for d in devices),
            num_layers=len({g.layer for g in groups}),
            rounds=tuple(tuple(rounds[k]) for k in sorted(rounds)), comp=comp,
            size=tuple(g.bytes for g in groups), critical=tuple(g.critical for g in groups),
            cap=tuple(capacity(d, fixed_bytes, groups) for d in devices),
            rtt=tuple(units(rtt_ms(d, coordinator, options)) for d in devices),
            wait=tuple(units(aware * wait_ms(d, coordinator, options)) for d in devices),
            loss=tuple(tuple(0 if g.critical else round(g.importance * m * LOSS_SCALE)
                             for m in miss_row) for g in groups),
            rank=tuple(by_miss.index(d) for d in range(len(devices))),
            classes=tuple(tuple(sorted(c, key=lambda i: (-groups[i].importance, i)))
                          for c in classes.values() if len(c) > 1))

    def names(self, a) -> dict[str, str]:
        return {gid: self.device_names[d] for gid, d in zip(self.group_ids, a)}

    def loss_units(self, a) -> int:
        return sum(self.loss[g][d] for g, d in enumerate(a))

    def time_units(self, a) -> int:
        return sum(self.round_time(members, a) for members in self.rounds)

    def round_time(self, members, a) -> int:
        per = defaultdict(lambda: [0, False])
        for g in members:
            per[a[g]][0] += self.comp[g][a[g]]
            per[a[g]][1] |= self.critical[g]
        return max(t + self.rtt[d] + self.wait[d] * crit for d, (t, crit) in per.items())

    def fits(self, a) -> bool:
        used = [0] * len(self.cap)
        for g, d in enumerate(a):
            used[d] += self.size[g]
        return all(u <= c for u, c in zip(used, self.cap))

    def arrange(self, a) -> list[int]:
        """Among groups of equal cost, give the more important ones the less lossy devices.

        Swapping two such groups changes neither time nor memory, so this never costs anything;
        the solver gets the same order as a constraint, which also removes their symmetry.
        """
        a = list(a)
        for cls in self.classes:
            for g, d in zip(cls, sorted((a[g] for g in cls), key=lambda d: self.rank[d])):
                a[g] = d
        return a


def _greedy(p: Problem) -> list[int]:
    """Longest compute first, round by round, onto the device that would finish it soonest."""
    a = [0] * len(p.group_ids)
    for members in p.rounds:
        load, crit = [None] * len(p.cap), [False] * len(p.cap)
        for g in sorted(members, key=lambda g: (-max(p.comp[g]), g)):
            def finish(d):
                return ((p.rtt[d] if load[d] is None else load[d]) + p.comp[g][d]
                        + (p.critical[g] and not crit[d]) * p.wait[d])
            d = min(range(len(p.cap)), key=lambda d: (finish(d), p.loss[g][d], d))
            a[g], load[d], crit[d] = d, finish(d), crit[d] or p.critical[g]
    return p.arrange(a)


def _repair(p: Problem, a) -> list[int] | None:
    """Move groups off over-full devices, each time the move that slows its round least per byte."""
    a, used = list(a), [0] * len(p.cap)
    round_of = {g: k for k, members in enumerate(p.rounds) for g in members}
    load = [[[0, 0, 0] for _ in p.cap] for _ in p.rounds]  # per device: compute, groups, critical

    def moved(g, e):  # the loads of g's round with g moved to e
        cells = [list(c) for c in load[round_of[g]]]
        for dev, sign in ((a[g], -1), (e, 1)):
            c = cells[dev]
            c[0], c[1], c[2] = c[0] + sign * p.comp[g][dev], c[1] + sign, c[2] + sign * p.critical[g]
        return cells

    def finish(cells):
        return max(c[0] + p.rtt[d] + (c[2] > 0) * p.wait[d] for d, c in enumerate(cells) if c[1])

    for g, d in enumerate(a):
        used[d] += p.size[g]
        load[round_of[g]][d] = [x + y for x, y in zip(load[round_of[g]][d], (p.comp[g][d], 1, p.critical[g]))]
    for d in range(len(p.cap)):
        while used[d] > p.cap[d]:
            moves = [((finish(moved(g, e)) - finish(load[round_of[g]])) / max(p.size[g], 1), g, e)
                     for g in range(len(a)) if a[g] == d
                     for e in range(len(p.cap)) if e != d and used[e] + p.size[g] <= p.cap[e]]
            if not moves:
                return None
            _, g, e = min(moves)
            load[round_of[g]], a[g] = moved(g, e), e
            used[d], used[e] = used[d] - p.size[g], used[e] + p.size[g]
    return p.arrange(a)


@dataclass(frozen=True)
class _Run:
    """What one CP-SAT solve reported; bound in its objective's units."""

    status: str
    bound: float
    wall: float
    dtime: float


@dataclass(frozen=True)
class _Point:
    """A plan for some rounds (device per group; other rounds' entries are filler), and its cost."""

    a: tuple[int, ...]
    time: int
    loss: int


_LADDER = (0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0)
"""Phase 2's time caps per round, as fractions of its fastest time added to it (at most the slack)."""


def optimise(p: Problem, options: PlaceOptions, loss_phase: bool, candidates=()):
    """Return the final phase's (assignment, status, bound in solver units, runs).

    candidates: assignments (device index per group) found elsewhere, such as the loss-blind
    plan. Each that fits is a hint for the full-model solves and competes with phase 1's plan on
    time and with the final plan on (loss, time) within the time cap, so the result is never
    slower and lossier than a candidate: when memory couples the rounds the full model is too big
    for CP-SAT to solve within its budget, and the loss-aware model, with its retransmission waits,
    is the harder of the two (held-out profile in tests/test_place_rounds.py: 90.4 ms/token and
    0.110% lost against the loss-blind plan's 87.0 ms and 0.055%).

    Rounds interact only through memory and the sum of their times, so each round is solved alone
    (rounds of equal shape once), each with an equal share of a phase's budget. Phase 1: a round's
    fastest plan, which bounds its time from below; when these plans fit in memory together they
    are the optimum. Phase 2: each round's least loss under a ladder of time caps, then a small
    knapsack that picks one rung per round within the total time cap, spending the slack where it
    buys most. The ladder samples each round's trade-off, so phase 2 proves nothing. Only when
    memory couples the rounds does the full model go to CP-SAT, from a repaired start.
    """
    start, runs = _repair(p, _greedy(p)), []  # may be None: memory too tight for greedy moves
    candidates = [p.arrange(c) for c in candidates if p.fits(c)]
    signature = [sorted((p.comp[g], p.size[g], p.critical[g], p.loss[g], g) for g in members)
                 for members in p.rounds]
    first = {}
    for k, sig in enumerate(signature):
        first.setdefault(tuple(s[:-1] for s in sig), k)
    rep = [first[tuple(s[:-1] for s in sig)] for sig in signature]
    share = options.max_deterministic_time / len(first)
    fronts, lower = {}, {}
    for k in first.values():
        point, run = _solve(p, options, (p.rounds[k],), start, "time", budget=share)
        runs.append(run)
        if point is None:
            raise InfeasibleError(f"memory too tight to pack: the groups of round "
                                  f"{p.group_ids[p.rounds[k][0]]}.. fit on no combination of devices "
                                  f"({mb(sum(p.size[g] for g in p.rounds[k]))}; CP-SAT: {run.status})")
        fronts[k], lower[k] = [point], math.ceil(run.bound - 1e-6)

    def compose(choice):
        a = list(start or [0] * len(p.group_ids))
        for k, sig in enumerate(signature):  # a shared solve maps back by position in sorted order
            point = fronts[rep[k]][choice[k]]
            for (*_, g), (*_, h) in zip(sig, signature[rep[k]]):
                a[g] = point.a[h]
        return p.arrange(a)

    lowers = [lower[rep[k]] for k in range(len(p.rounds))]
    a1 = compose([0] * len(p.rounds))
    status = "OPTIMAL" if all(r.status == "OPTIMAL" for r in runs) else "FEASIBLE"
    bound, decomposed = sum(lowers), p.fits(a1)
    if not decomposed:
        hints = [h for h in [_repair(p, a1) or start] + candidates if h is not None]
        hint = min(hints, key=p.time_units) if hints else None
        point, run = _solve(p, options, p.rounds, hint, "time", lower=lowers)
        runs.append(run)
        if point is None:
            raise InfeasibleError(f"memory too tight to pack: {mb(sum(p.size))} of groups into "
                                  f"{mb(sum(p.cap))} free (CP-SAT: {run.status})")
        a1, status, bound = list(point.a), run.status, run.bound
        # CP-SAT keeps its hint only if it proves no worse; ties in time go to the solver's own plan
        fastest = min(candidates, key=p.time_units, default=None)
        if fastest is not None and p.time_units(fastest) < p.time_units(a1):
            a1, status = list(fastest), "FEASIBLE"
    if not loss_phase:
        return a1, status, bound, runs
    t1 = p.time_units(a1)
    cap = math.floor((1 + options.time_slack) * t1)
    if decomposed:
        for k, front in fronts.items():
            t0, left = front[0].time, share
            ladder = sorted({t0 + min(math.ceil(t0 * r), cap - t1) for r in _LADDER})
            for i, tau in enumerate(ladder):
                if front[-1].loss == 0 or left <= 0:
                    break
                # Every rung gets its part of the round's share; a hard one must not starve the rest.
                point, run = _solve(p, options, (p.rounds[k],), front[-1].a, "loss",
                                    budget=left / (len(ladder) - i), time_cap=tau)
                runs.append(run)
                left -= run.dtime
                if point is not None and point.loss < front[-1].loss:
                    front.append(point)
        shapes = list(first.values())
        taken, chosen = _choose([fronts[k] for k in shapes], [rep.count(k) for k in shapes], cap, options)
        runs += chosen
        # Rounds of one shape are interchangeable: hand out its points in round order.
        queue = {k: [i for i, n in enumerate(row) for _ in range(n)] for k, row in zip(shapes, taken)}
        choice = [queue[k].pop(0) for k in rep]
        a2 = compose(choice)
        status, bound, decomposed = "FEASIBLE", 0.0, p.fits(a2)
    within = [c for c in candidates if p.time_units(c) <= cap]
    if not decomposed:
        hint = min([a1] + within, key=lambda c: (p.loss_units(c), p.time_units(c)))
        point, run = _solve(p, options, p.rounds, hint, "loss", lower=lowers, time_cap=cap)
        runs.append(run)
        a2, status, bound = list(point.a), run.status, run.bound
    # Phase 2 may trade time only for importance; when it saves none, keep phase 1's faster plan.
    a = a2 if p.loss_units(a2) < p.loss_units(a1) else a1
    best = min(within, key=lambda c: (p.loss_units(c), p.time_units(c)), default=None)
    if best is not None and (p.loss_units(best), p.time_units(best)) < (p.loss_units(a), p.time_units(a)):
        a, status = list(best), "FEASIBLE"
    return a, ("OPTIMAL" if p.loss_units(a) == 0 else status), bound, runs


def _choose(fronts, counts, cap: int, options: PlaceOptions):
    """How many rounds of each shape take each point: least loss within the cap, then least time.

    Counting rounds of equal shape, rather than choosing per round, leaves no symmetric choices
    for CP-SAT to wade through (30 identical MLP rounds made it run out its budget).
    """
    m = cp_model.CpModel()
    take = [[m.new_int_var(0, c, "") for _ in front] for front, c in zip(fronts, counts)]
    for row, c in zip(take, counts):
        m.add(sum(row) == c)
    pairs = [(pt, v) for front, row in zip(fronts, take) for pt, v in zip(front, row)]
    m.add(sum(pt.time * v for pt, v in pairs) <= cap)
    loss, time, runs = sum(pt.loss * v for pt, v in pairs), sum(pt.time * v for pt, v in pairs), []
    value = [[c] + [0] * (len(row) - 1) for row, c in zip(take, counts)]  # phase 1's plan fits
    for objective in (loss, time):
        for row, vals in zip(take, value):
            for v, n in zip(row, vals):
                m.add_hint(v, n)
        m.minimize(objective)
        solver = _solver(options, options.max_deterministic_time)
        status = solver.solve(m)
        runs.append(_Run(solver.status_name(status), solver.best_objective_bound, solver.wall_time,
                         solver.deterministic_time))
        value = [[solver.value(v) for v in row] for row in take]
        m.clear_hints()
        m.add(loss <= sum(pt.loss * n for front, vals in zip(fronts, value) for pt, n in zip(front, vals)))
    return value, runs


def _solver(options: PlaceOptions, budget: float) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.random_seed = options.seed
    solver.parameters.num_workers = options.num_workers
    solver.parameters.interleave_search = options.num_workers > 1
    solver.parameters.max_deterministic_time = budget
    # Proving the last 0.1% is most of the work on rounds of uneven groups, and worth nothing here.
    solver.parameters.relative_gap_limit = GAP
    # Presolve probing took wall time far beyond its deterministic-time charge on these models
    # (pi5 profile, loss-blind: 9.3 s -> 1.4 s without it, same plan quality).
    solver.parameters.cp_model_probing_level = 0
    return solver


def _solve(p: Problem, options: PlaceOptions, rounds, hint, objective: str, *, budget=None,
           lower=None, time_cap=None) -> tuple[_Point | None, _Run]:
    """One CP-SAT solve over `rounds`: least total time ("time"), or least loss within time_cap
    ("loss"). The point is None when CP-SAT found no solution."""
    devices = range(len(p.device_names))
    m = cp_model.CpModel()
    x = {g: [m.new_bool_var(f"x{g}_{d}") for d in devices] for members in rounds for g in members}
    for row in x.values():
        m.add_exactly_one(row)
    for d in devices:
        m.add(sum(p.size[g] * x[g][d] for g in x) <= p.cap[d])
    for cls in p.classes:
        if cls[0] in x:
            for g, h in zip(cls, cls[1:]):
                m.add(sum(p.rank[d] * x[g][d] for d in devices)
                      <= sum(p.rank[d] * x[h][d] for d in devices))
    times, indicators = [], []
    for k, members in enumerate(rounds):
        upper = max(sum(p.comp[g][d] for g in members) for d in devices) + max(p.rtt) + max(p.wait)
        if len(rounds) == 1 and (time_cap is not None or hint is not None):
            # A lone round is never slower than its cap, or than its hint when we minimise time.
            upper = min(upper, time_cap if time_cap is not None else p.round_time(members, hint))
        mr = m.new_int_var(min(lower[k], upper) if lower else 0, upper, f"M{k}")
        for d in devices:
            work = expr = sum(p.comp[g][d] * x[g][d] for g in members)
            # Holding any group costs the round trip; holding a critical one, also the expected wait.
            for cost, which in ((p.rtt[d], members), (p.wait[d], [g for g in members if p.critical[g]])):
                if cost and which:
                    y = m.new_bool_var("")
                    for g in which:
                        m.add_implication(x[g][d], y)
                    expr = expr + cost * y  # not +=, which would grow `work` in place
                    indicators.append((y, d, which))
                    if which is members:
                        # Redundant, but it stops the LP relaxation from spreading groups thinly
                        # over many devices while paying only a sliver of each round trip.
                        m.add(work <= (upper - cost) * y)
            m.add(mr >= expr)
        times.append((mr, members))
    time = sum(mr for mr, _ in times)
    if objective == "time":
        m.minimize(time)
    else:
        m.add(time <= time_cap)
        loss = sum(p.loss[g][d] * x[g][d] for g in x for d in devices if p.loss[g][d])
        # One round: break ties by time (the knapsack wants each rung as fast as it can be). The
        # whole model: loss alone, as loss times the total time could overflow 64 bits.
        m.minimize(loss * (time_cap + 1) + time if len(rounds) == 1 else loss)
    if hint is not None:
        # A complete hint (indicators and round times too) lets CP-SAT take it as its first solution.
        for g, row in x.items():
            for d, var in enumerate(row):
                m.add_hint(var, hint[g] == d)
        for y, d, which in indicators:
            m.add_hint(y, any(hint[g] == d for g in which))
        for mr, members in times:
            m.add_hint(mr, p.round_time(members, hint))
    solver = _solver(options, budget or options.max_deterministic_time)
    status = solver.solve(m)
    run = _Run(solver.status_name(status), solver.best_objective_bound, solver.wall_time,
               solver.deterministic_time)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, run
    a = list(hint or [0] * len(p.group_ids))
    for g, row in x.items():
        a[g] = next(d for d, var in enumerate(row) if solver.boolean_value(var))
    a = p.arrange(a)
    return _Point(tuple(a), sum(p.round_time(members, a) for members in rounds),
                  sum(p.loss[g][a[g]] for g in x)), run
