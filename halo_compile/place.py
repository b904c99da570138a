"""Place every neuron group on one device with CP-SAT: fast per token, and little importance lost.

Cost model (the solver optimises it; `predicted_token_ms` evaluates it for any assignment):

- The coordinator computes its own groups locally: no network, miss probability 0, round trip 0.
- Any other device d: rtt(d) = 2*latency_ms + 2*message_bytes*8 / (bandwidth_mbps*1e3) ms (one
  request, one reply), and a lost critical message costs an expected wait of q1(d)*rto_ms, where
  q1 = 1-(1-loss)^2 is the chance that one attempt (request or reply) is lost.
- compute(g, d) = g.flops / (d.compute_gflops*1e6) ms.
- Each layer l has two synchronisation rounds r (attn, mlp). For every device d,
  M[l,r] >= sum of compute(g, d) over its groups in (l,r) + rtt(d)*[d holds a group in (l,r)]
         + q1(d)*rto_ms*[d holds a critical group in (l,r)].
  The per-token time is T = sum of M[l,r] over all rounds.
- Memory: the groups' weight_bytes + kv_bytes plus fixed_bytes[d] fit in d.memory_bytes.
- Expected lost importance = sum of g.importance*miss[d] over relaxed groups g placed on d, divided by
  the number of layers (read: per layer, the expected share of the MLP output lost). `miss` is the
  caller's post-retransmission miss probability for relaxed messages (see `miss_probability`).

Phase 1 minimises T. Phase 2 keeps T <= (1+time_slack)*T1 and minimises lost importance, starting
from phase 1's solution. `place_loss_blind` runs phase 1 with every loss treated as 0, the baseline
that shows what awareness of loss buys.

Example:
    >>> from halo_runtime.plan import Device
    >>> from halo_compile.place import GroupCost, place, miss_probability
    >>> groups = [GroupCost(f"L0.mlp.{i}", 0, "mlp", i < 2, 0.4 / 2 ** i, 10**6, 0, 10**6)
    ...           for i in range(4)]
    >>> devices = [Device("pi-0", "10.0.0.1:9000", 10**8, 5.0),
    ...            Device("pi-1", "10.0.0.2:9000", 10**8, 5.0, loss=0.05)]
    >>> p = place(groups, devices, "pi-0", {"pi-0": 10**6}, {"pi-1": miss_probability(0.05)})
    >>> sorted(p.assignment.items())
    [('L0.mlp.0', 'pi-0'), ('L0.mlp.1', 'pi-0'), ('L0.mlp.2', 'pi-0'), ('L0.mlp.3', 'pi-0')]
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from halo_runtime.plan import Device, SolverReport

TIME_UNITS_PER_MS = 10_000
"""Solver time unit is 0.1 us: a group computes in tens of us, so whole us would skew sums by ~1%."""
LOSS_SCALE = 10**9
"""Solver units per unit of importance*miss: a small relaxed group at 1% loss loses ~1e-6."""


class InfeasibleError(Exception):
    """The groups cannot be placed; the message names what does not fit."""


@dataclass(frozen=True)
class GroupCost:
    """What placing one neuron group costs: the solver's view of a group."""

    id: str
    """Stable name, e.g. "L3.mlp.5"."""
    layer: int
    """Decoder layer index."""
    kind: str
    """"attn" (the attention round) or "mlp" (the MLP round)."""
    critical: bool
    """Critical: always awaited (retransmitted); relaxed: used only if it arrives in time."""
    importance: float
    """Share of its layer's attn or mlp output (one layer's groups of one kind sum to ~1)."""
    weight_bytes: int
    """Bytes of its weights."""
    kv_bytes: int
    """KV-cache bytes at max context (attn groups); 0 for mlp."""
    flops: int
    """Floating-point operations per token."""

    def __post_init__(self):
        if not self.id:
            raise ValueError("group id is empty")
        if self.kind not in ("attn", "mlp"):
            raise ValueError(f"group {self.id}: kind must be attn or mlp, got {self.kind!r}")
        if self.layer < 0:
            raise ValueError(f"group {self.id}: layer {self.layer} is negative")
        if self.kind == "attn" and not self.critical:
            raise ValueError(f"group {self.id}: attention groups hold KV state and must be critical")
        if not (math.isfinite(self.importance) and self.importance >= 0):
            raise ValueError(f"group {self.id}: importance {self.importance} must be finite and >= 0")
        if min(self.weight_bytes, self.kv_bytes, self.flops) < 0:
            raise ValueError(f"group {self.id}: bytes and flops must be >= 0")
        if self.kind == "mlp" and self.kv_bytes:
            raise ValueError(f"group {self.id}: mlp groups hold no KV cache")

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


@dataclass(frozen=True)
class PlaceOptions:
    """Solver and cost-model settings."""

    seed: int = 0
    """CP-SAT random_seed."""
    max_deterministic_time: float = 10.0
    """CP-SAT deterministic time budget per phase (reproducible, unlike wall time)."""
    num_workers: int = 1
    """CP-SAT search workers. 1: one sequential search, whose result depends only on the model, the
    seed and the deterministic budget. Parallel workers share solutions in whatever order threads
    finish, so the same inputs could give different plans (and this machine has only 2 cores)."""
    time_slack: float = 0.05
    """Phase 2 may make the per-token time this much worse to cut lost importance."""
    message_bytes: int = 1152
    """Bytes of one partial sum on the wire (request and reply each)."""
    rto_ms: float = 5.0
    """Expected extra wait when a critical message is lost (one fast retransmission)."""

    def __post_init__(self):
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed {self.seed} is outside [0, 2**31)")
        if not self.max_deterministic_time > 0:
            raise ValueError("max_deterministic_time must be positive")
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if not self.time_slack >= 0:
            raise ValueError("time_slack must be >= 0")
        if self.message_bytes <= 0:
            raise ValueError("message_bytes must be positive")
        if not self.rto_ms >= 0:
            raise ValueError("rto_ms must be >= 0")


@dataclass(frozen=True)
class Placement:
    """Where each group goes, and what the cost model predicts for it."""

    assignment: dict[str, str]
    """Group id -> device name, in the order the groups were given."""
    solver: SolverReport
    """Final phase of the solve. `place`: objective and bound in units of expected_lost_importance;
    `place_loss_blind`: in per-token ms (of the integer model, compute rounded to 0.1 us)."""
    predicted_token_ms: float
    """Per-token time of the cost model for this assignment."""
    device_time_ms: dict[str, float]
    """Compute per token per device, every device listed."""
    expected_lost_importance: float
    """Per layer, the expected share of the MLP output lost to missed relaxed replies."""

    def __post_init__(self):
        if self.predicted_token_ms < 0 or self.expected_lost_importance < 0:
            raise ValueError("predicted time and lost importance must be >= 0")


def miss_probability(loss: float, retries: int = 1) -> float:
    """Chance a reply never arrives: request or reply lost, on the first try and on every retry."""
    if not 0.0 <= loss < 1.0:
        raise ValueError(f"loss {loss} is outside [0, 1)")
    if retries < 0:
        raise ValueError("retries must be >= 0")
    return (1.0 - (1.0 - loss) ** 2) ** (1 + retries)


def expected_lost_importance(groups, assignment, miss, num_layers) -> float:
    """Per layer, the expected importance of relaxed groups whose reply is missed.

    Devices absent from `miss` (such as the coordinator) never miss.
    """
    if num_layers <= 0:
        raise ValueError("num_layers must be positive")
    lost = sum(g.importance * miss.get(assignment[g.id], 0.0) for g in groups if not g.critical)
    return lost / num_layers


def predicted_token_ms(groups, assignment, devices, coordinator, miss=None, options=PlaceOptions()):
    """Per-token time of the cost model. `miss` is accepted for symmetry and unused: the critical
    wait comes from each link's loss, and relaxed replies are never waited for past the deadline."""
    by_name = {d.name: d for d in devices}
    rounds = defaultdict(lambda: defaultdict(lambda: [0.0, False, False]))
    for g in groups:
        d = by_name[assignment[g.id]]
        slot = rounds[g.layer, g.kind][d.name]
        slot[0] += _compute_ms(g, d)
        slot[1], slot[2] = True, slot[2] or g.critical
    total = 0.0
    for per_device in rounds.values():
        total += max(t + (_rtt_ms(by_name[n], coordinator, options) if used else 0.0)
                     + (_wait_ms(by_name[n], coordinator, options) if crit else 0.0)
                     for n, (t, used, crit) in per_device.items())
    return total


def place(groups, devices, coordinator: str, fixed_bytes: dict[str, int], miss: dict[str, float],
          options: PlaceOptions = PlaceOptions()) -> Placement:
    """Minimise per-token time, then lost importance within `time_slack` of that time."""
    groups, devices, miss = _prepare(groups, devices, coordinator, fixed_bytes, miss)
    p = _Problem.build(groups, devices, coordinator, fixed_bytes, miss, options, loss_aware=True)
    a, run = _optimise(p, options, loss_phase=True)
    scale = LOSS_SCALE * p.num_layers
    report = SolverReport(status=run.status, objective=p.loss_units(a) / scale,
                          bound=min(run.bound, p.loss_units(a)) / scale, solve_time_s=run.wall,
                          deterministic_time=run.dtime, num_workers=options.num_workers)
    return _placement(groups, devices, coordinator, miss, options, p.names(a), report)


def place_loss_blind(groups, devices, coordinator: str, fixed_bytes: dict[str, int],
                     miss: dict[str, float], options: PlaceOptions = PlaceOptions()) -> Placement:
    """Phase 1 alone with every loss treated as 0, then evaluated with the true losses."""
    groups, devices, miss = _prepare(groups, devices, coordinator, fixed_bytes, miss)
    p = _Problem.build(groups, devices, coordinator, fixed_bytes, miss, options, loss_aware=False)
    a, run = _optimise(p, options, loss_phase=False)
    t = p.time_units(a)
    report = SolverReport(status=run.status, objective=t / TIME_UNITS_PER_MS,
                          bound=min(run.bound, t) / TIME_UNITS_PER_MS, solve_time_s=run.wall,
                          deterministic_time=run.dtime, num_workers=options.num_workers)
    return _placement(groups, devices, coordinator, miss, options, p.names(a), report)


# ---- cost model pieces ----------------------------------------------------------------------------

def _compute_ms(g: GroupCost, d: Device) -> float:
    return g.flops / (d.compute_gflops * 1e6)


def _rtt_ms(d: Device, coordinator: str, options: PlaceOptions) -> float:
    if d.name == coordinator:
        return 0.0
    return 2 * d.latency_ms + 2 * options.message_bytes * 8 / (d.bandwidth_mbps * 1e3)


def _wait_ms(d: Device, coordinator: str, options: PlaceOptions) -> float:
    if d.name == coordinator:
        return 0.0
    return miss_probability(d.loss, retries=0) * options.rto_ms


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _prepare(groups, devices, coordinator, fixed_bytes, miss):
    """Validate inputs, check memory in plain arithmetic, and zero the coordinator's miss."""
    groups, devices = tuple(groups), tuple(devices)
    names = [d.name for d in devices]
    if not groups or not devices:
        raise ValueError("need at least one group and one device")
    if len(set(names)) != len(names):
        raise ValueError("duplicate device names")
    if len({g.id for g in groups}) != len(groups):
        raise ValueError("duplicate group ids")
    if coordinator not in names:
        raise ValueError(f"coordinator {coordinator!r} is not a device ({', '.join(names)})")
    for name in sorted(set(fixed_bytes) - set(names)):
        raise ValueError(f"fixed_bytes names {name!r}, which is not a device")
    for name in names:
        if name != coordinator and not 0.0 <= miss.get(name, -1.0) <= 1.0:
            raise ValueError(f"miss: device {name} needs a miss probability in [0, 1]")
    free = {}
    for d in devices:
        fixed = fixed_bytes.get(d.name, 0)
        if fixed > d.memory_bytes:
            what = "embeddings and norms" if d.name == coordinator else "fixed buffers"
            role = "coordinator" if d.name == coordinator else "device"
            raise InfeasibleError(f"{role} {d.name} needs {_mb(fixed)} for {what} "
                                  f"but has {_mb(d.memory_bytes)}")
        free[d.name] = d.memory_bytes - fixed
    need = sum(g.bytes for g in groups)
    if need > sum(free.values()):
        raise InfeasibleError(f"model needs {_mb(need)} of weights and KV cache; "
                              f"the cluster has {_mb(sum(free.values()))}")
    largest = max(free.values())
    for g in groups:
        if g.bytes > largest:
            raise InfeasibleError(f"group {g.id} ({_mb(g.bytes)}) fits on no device "
                                  f"(most free memory: {_mb(largest)})")
    miss = {n: (0.0 if n == coordinator else float(miss[n])) for n in names}
    return groups, devices, miss


def _placement(groups, devices, coordinator, miss, options, assignment, report) -> Placement:
    by_name = {d.name: d for d in devices}
    device_ms = {d.name: 0.0 for d in devices}
    for g in groups:
        device_ms[assignment[g.id]] += _compute_ms(g, by_name[assignment[g.id]])
    num_layers = len({g.layer for g in groups})
    return Placement(assignment=assignment, solver=report,
                     predicted_token_ms=predicted_token_ms(groups, assignment, devices,
                                                           coordinator, miss, options),
                     device_time_ms=device_ms,
                     expected_lost_importance=expected_lost_importance(groups, assignment, miss,
                                                                       num_layers))


# ---- the integer model ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Problem:
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
        comp = tuple(tuple(units(_compute_ms(g, d)) for d in devices) for g in groups)
        rounds, classes = defaultdict(list), defaultdict(list)
        for i, g in enumerate(groups):
            rounds[g.layer, g.kind].append(i)
            classes[g.layer, g.kind, comp[i], g.bytes, g.critical].append(i)
        by_miss = sorted(range(len(devices)), key=lambda d: (miss_row[d], d))
        return _Problem(
            group_ids=tuple(g.id for g in groups), device_names=tuple(d.name for d in devices),
            num_layers=len({g.layer for g in groups}),
            rounds=tuple(tuple(rounds[k]) for k in sorted(rounds)), comp=comp,
            size=tuple(g.bytes for g in groups), critical=tuple(g.critical for g in groups),
            cap=tuple(d.memory_bytes - fixed_bytes.get(d.name, 0) for d in devices),
            rtt=tuple(units(_rtt_ms(d, coordinator, options)) for d in devices),
            wait=tuple(units(aware * _wait_ms(d, coordinator, options)) for d in devices),
            loss=tuple(tuple(0 if g.critical else round(g.importance * m * LOSS_SCALE)
                             for m in miss_row) for g in groups),
            rank=tuple(by_miss.index(d) for d in range(len(devices))),
            classes=tuple(tuple(sorted(c, key=lambda i: (-groups[i].importance, i)))
                          for c in classes.values() if len(c) > 1))

    def names(self, a) -> dict[str, str]:
        return {gid: self.device_names[d] for gid, d in zip(self.group_ids, a)}

    def loss_units(self, a) -> int:
        return sum(self.loss[g][d] for g, d in enumerate(a))

    def fits(self, a) -> bool:
        used = [0] * len(self.cap)
        for g, d in enumerate(a):
            used[d] += self.size[g]
        return all(u <= c for u, c in zip(used, self.cap))

    def time_units(self, a) -> int:
        return sum(self.round_time(members, a) for members in self.rounds)

    def round_time(self, members, a) -> int:
        per = defaultdict(lambda: [0, 0])
        for g in members:
            per[a[g]][0] += self.comp[g][a[g]]
            per[a[g]][1] |= self.critical[g]
        return max(t + self.rtt[d] + self.wait[d] * c for d, (t, c) in per.items())

    def arrange(self, a) -> list[int]:
        """Within groups of equal cost, the more important go to the less lossy devices.

        Swapping two such groups changes neither time nor memory, so this never costs anything;
        the solver gets the same order as a constraint, which removes their symmetry.
        """
        a = list(a)
        for cls in self.classes:
            for g, d in zip(cls, sorted((a[g] for g in cls), key=lambda d: self.rank[d])):
                a[g] = d
        return a


def _greedy(p: _Problem) -> list[int] | None:
    """Longest compute first, per round, onto the device that would finish it soonest."""
    free, a = list(p.cap), [0] * len(p.group_ids)
    for members in p.rounds:
        load, crit = [None] * len(free), [False] * len(free)
        for g in sorted(members, key=lambda g: (-max(p.comp[g]), g)):
            def finish(d):
                return ((load[d] if load[d] is not None else p.rtt[d]) + p.comp[g][d]
                        + (p.critical[g] and not crit[d]) * p.wait[d])
            fits = [d for d in range(len(free)) if p.size[g] <= free[d]]
            if not fits:
                return _first_fit(p)
            d = min(fits, key=lambda d: (finish(d), p.loss[g][d], d))
            a[g], free[d], load[d], crit[d] = d, free[d] - p.size[g], finish(d), crit[d] or p.critical[g]
    return p.arrange(a)


def _first_fit(p: _Problem) -> list[int] | None:
    """Biggest group first into the device with most room: a feasible start when memory is tight."""
    free, a = list(p.cap), [0] * len(p.group_ids)
    for g in sorted(range(len(a)), key=lambda g: (-p.size[g], g)):
        d = max(range(len(free)), key=lambda d: (free[d], -d))
        if p.size[g] > free[d]:
            return None
        a[g], free[d] = d, free[d] - p.size[g]
    return p.arrange(a)


@dataclass(frozen=True)
class _Run:
    """What CP-SAT reported, summed over the solves of one phase; bound in objective units."""

    status: str
    bound: float
    wall: float
    dtime: float

    def then(self, later: "_Run") -> "_Run":
        """Account `later`'s solve after this one: its status and bound, both times summed."""
        return _Run(later.status, later.bound, self.wall + later.wall, self.dtime + later.dtime)


@dataclass(frozen=True)
class _Result:
    """One solve's assignment (device per group; only the solved rounds count) and its cost."""

    a: tuple[int, ...]
    time: int
    loss: int
    run: _Run


def _optimise(p: _Problem, options: PlaceOptions, loss_phase: bool):
    """Phase 1 (time), then optionally phase 2 (lost importance within the time slack).

    Rounds interact only through memory and the sum of their times. So each round is solved
    alone, rounds of equal shape once: first its fastest plan (least loss among those), then, for
    phase 2, every faster-or-lossier trade-off (its Pareto front). Picking one point per round
    under the time cap is a small knapsack. When the combined plan fits in memory it is optimal
    for the whole model; only when memory binds does the full model go to CP-SAT.
    """
    start = _greedy(p)
    signature = [sorted((p.comp[g], p.size[g], p.critical[g], p.loss[g], g) for g in members)
                 for members in p.rounds]
    shape_of = [tuple(s[:-1] for s in sig) for sig in signature]
    first = {}
    for k, shape in enumerate(shape_of):
        first.setdefault(shape, k)
    budget = options.max_deterministic_time / len(first)
    run = _Run("OPTIMAL", 0.0, 0.0, 0.0)
    fronts = {}
    for k in first.values():
        best = _solve(p, options, (p.rounds[k],), start, objective="lex", budget=budget)
        if best is None:
            raise InfeasibleError(f"the groups of one round ({p.group_ids[p.rounds[k][0]]} ...) "
                                  "cannot be packed into the devices' memory")
        fronts[k], run = [best], _Run(_worse(run.status, best.run.status), 0.0,
                                      run.wall + best.run.wall, run.dtime + best.run.dtime)
    lower = [_lex_floor(fronts[first[s]][0], p, p.rounds[k]) for k, s in enumerate(shape_of)]

    def compose(choice):
        a = list(start or [0] * len(p.group_ids))
        for k, shape in enumerate(shape_of):
            point = fronts[first[shape]][choice[k]]
            for (*_, g), (*_, h) in zip(signature[k], signature[first[shape]]):
                a[g] = point.a[h]
        return p.arrange(a)

    a1 = compose([0] * len(p.rounds))
    if p.fits(a1):
        run = _Run(run.status, sum(lower), run.wall, run.dtime)
    else:
        full = _solve(p, options, p.rounds, start, lower=lower, objective="time")
        if full is None:
            raise InfeasibleError("no assignment fits the devices' memory (too tight to pack)")
        a1, run = list(full.a), run.then(full.run)
    if not loss_phase:
        return a1, run
    t1 = p.time_units(a1)
    cap = math.floor((1 + options.time_slack) * t1)
    decomposed = p.fits(compose([0] * len(p.rounds)))
    if decomposed:
        for k, front in fronts.items():
            while front[-1].loss > 0:
                point = _solve(p, options, (p.rounds[k],), None, objective="lex", budget=budget,
                               lower=[front[-1].time], time_cap=front[0].time + cap - t1,
                               loss_cap=front[-1].loss - 1)
                if point is None:
                    break
                run = _Run(_worse(run.status, point.run.status), 0.0, run.wall + point.run.wall,
                           run.dtime + point.run.dtime)
                front.append(point)
        choice, knap = _choose([fronts[first[s]] for s in shape_of], cap, options)
        a2 = compose(choice)
        run = run.then(_Run(_worse(run.status, knap.status), knap.bound, knap.wall, knap.dtime))
        if not p.fits(a2):
            decomposed = False
    if not decomposed:
        full = _solve(p, options, p.rounds, a1, lower=lower, time_cap=cap, objective="loss")
        a2, run = list(full.a), run.then(full.run)
    # Phase 2 may trade time only for importance; when it saves none, keep phase 1's faster plan.
    return (a2 if p.loss_units(a2) < p.loss_units(a1) else a1), run


def _worse(a: str, b: str) -> str:
    return a if a != "OPTIMAL" else b


def _lex_floor(result: _Result, p: _Problem, members) -> int:
    """Proven lower bound on a round's time from a solve of BIG*time + loss."""
    if result.run.status == "OPTIMAL":
        return result.time
    return math.floor(result.run.bound / _big(p, members))


def _big(p: _Problem, members) -> int:
    return sum(max(p.loss[g]) for g in members) + 1


def _choose(fronts, cap: int, options: PlaceOptions):
    """Pick one Pareto point per round: least loss with total time <= cap, then least time."""
    m = cp_model.CpModel()
    pick = [[m.new_bool_var("") for _ in front] for front in fronts]
    for row in pick:
        m.add_exactly_one(row)
    m.add(sum(pt.time * v for front, row in zip(fronts, pick) for pt, v in zip(front, row)) <= cap)
    m.minimize(sum((pt.loss * (cap + 1) + pt.time) * v
                   for front, row in zip(fronts, pick) for pt, v in zip(front, row)))
    for row in pick:  # every round's fastest point is within the cap: a feasible start
        for i, v in enumerate(row):
            m.add_hint(v, i == 0)
    solver = _solver(options, options.max_deterministic_time)
    status = solver.solve(m)
    choice = [next(i for i, v in enumerate(row) if solver.boolean_value(v)) for row in pick]
    return choice, _Run(solver.status_name(status), solver.best_objective_bound // (cap + 1),
                        solver.wall_time, solver.deterministic_time)


def _solver(options: PlaceOptions, budget: float) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.random_seed = options.seed
    solver.parameters.num_workers = options.num_workers
    solver.parameters.max_deterministic_time = budget
    return solver


def _solve(p: _Problem, options: PlaceOptions, rounds, hint, *, objective: str, lower=None,
           time_cap=None, loss_cap=None, budget=None) -> _Result | None:
    """One CP-SAT solve over `rounds`: minimise their time ("time"), lost importance ("loss") or
    time then loss ("lex"); time_cap and loss_cap bound their sums. None when infeasible."""
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
        mr = m.new_int_var(min(lower[k], upper) if lower else 0, upper, f"M{k}")
        for d in devices:
            expr = sum(p.comp[g][d] * x[g][d] for g in members)
            # Holding any group costs the round trip; holding a critical one, also the expected wait.
            for cost, which in ((p.rtt[d], members), (p.wait[d], [g for g in members if p.critical[g]])):
                if cost and which:
                    y = m.new_bool_var("")
                    for g in which:
                        m.add_implication(x[g][d], y)
                    expr += cost * y
                    indicators.append((y, d, which))
            m.add(mr >= expr)
        times.append((mr, members))
    time = sum(mr for mr, _ in times)
    loss = sum(p.loss[g][d] * x[g][d] for g in x for d in devices if p.loss[g][d])
    if time_cap is not None:
        m.add(time <= time_cap)
    if loss_cap is not None:
        m.add(loss <= loss_cap)
    big = sum(_big(p, members) - 1 for members in rounds) + 1
    m.minimize({"time": time, "loss": loss, "lex": big * time + loss}[objective])
    if hint is not None:
        # A complete hint (indicators and round times too) lets CP-SAT start from it directly.
        for g, row in x.items():
            for d, var in enumerate(row):
                m.add_hint(var, hint[g] == d)
        for y, d, which in indicators:
            m.add_hint(y, any(hint[g] == d for g in which))
        for mr, members in times:
            m.add_hint(mr, p.round_time(members, hint))
    solver = _solver(options, budget or options.max_deterministic_time)
    status = solver.solve(m)
    if status == cp_model.INFEASIBLE:
        return None
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise InfeasibleError(f"CP-SAT found no placement within max_deterministic_time="
                              f"{options.max_deterministic_time} ({solver.status_name(status)}); "
                              "memory is probably too tight to pack")
    a = list(hint or [0] * len(p.group_ids))
    for g, row in x.items():
        a[g] = next(d for d, var in enumerate(row) if solver.boolean_value(var))
    a = p.arrange(a)
    return _Result(tuple(a), sum(p.round_time(members, a) for members in rounds),
                   sum(p.loss[g][a[g]] for g in x),
                   _Run(solver.status_name(status), solver.best_objective_bound, solver.wall_time,
                        solver.deterministic_time))
