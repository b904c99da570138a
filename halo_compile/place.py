"""Place every neuron group on one device with CP-SAT: fast per token, and little importance lost.

Cost model (the solver optimises it; `predicted_token_ms` evaluates it for any assignment):

- The coordinator computes its own groups locally: no network, miss probability 0, round trip 0.
- Any other device d: rtt(d) = 2*latency_ms + 2*message_bytes*8 / (bandwidth_mbps*1e3) ms (one
  request, one reply), and a lost critical message costs an expected wait of q1(d)*rto_ms, where
  q1 = 1-(1-loss)^2 is the chance that one attempt (request or reply) is lost.
- compute(g, d) = g.flops / (d.compute_gflops*1e6) ms.
- Each layer l has two synchronisation rounds r (attn, mlp). For every device d,
  M[l,r] >= sum of compute(g, d) over its groups in (l,r) + rtt(d)*[d holds a group in (l,r)]
         + q1(d)*rto_ms*[d holds a critical group in (l,r)];
  the per-token time is T = sum of M[l,r] over all rounds.
- Memory: the groups' weight_bytes + kv_bytes plus fixed_bytes[d] fit in d.memory_bytes.
- Expected lost importance = sum of g.importance*miss[d] over relaxed groups g on d, divided by the
  number of layers (per layer, the expected share of the MLP output lost). `miss` is the caller's
  post-retransmission miss probability of relaxed replies (see `miss_probability`).

Phase 1 minimises T. Phase 2 keeps T <= (1+time_slack)*T1 and minimises lost importance, starting
from phase 1's plan. `place_loss_blind` runs phase 1 with every loss treated as 0: the baseline that
shows what knowing the losses buys. How the phases are solved (round by round, then a knapsack
over the rounds) is told in `_optimise`. The same inputs and options always give the same plan.

Example:
    >>> from halo_runtime.plan import Device
    >>> from halo_compile.place import GroupCost, place, miss_probability
    >>> groups = [GroupCost(f"L0.mlp.{i}", 0, "mlp", i < 2, 0.4 / 2 ** i, 10**6, 0, 10**6)
    ...           for i in range(4)]
    >>> devices = [Device("pi-0", "10.0.0.1:9000", 10**8, 5.0),
    ...            Device("pi-1", "10.0.0.2:9000", 10**8, 5.0, loss=0.05)]
    >>> p = place(groups, devices, "pi-0", {"pi-0": 10**6}, {"pi-1": miss_probability(0.05)})
    >>> sorted(p.assignment.items())
    [('L0.mlp.0', 'pi-0'), ('L0.mlp.1', 'pi-0'), ('L0.mlp.2', 'pi-0'), ('L0.mlp.3', 'pi-1')]
    >>> round(p.predicted_token_ms, 3), round(p.expected_lost_importance, 6)
    (0.6, 0.000475)
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from ortools.sat.python import cp_model

from halo_runtime.plan import Device, SolverReport

TIME_UNITS_PER_MS = 10_000
"""Solver time unit, 0.1 us: a group computes in tens of us, so whole us would skew sums by ~1%."""
GAP = 1e-3
"""Relative gap at which CP-SAT stops and calls a solve OPTIMAL (so OPTIMAL means within 0.1%)."""
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
    """"attn" (the layer's attention round) or "mlp" (its MLP round)."""
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
        if not 0.0 <= self.importance <= 1.0 + 1e-6:
            raise ValueError(f"group {self.id}: importance {self.importance} is not a share in [0, 1]")
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
    """CP-SAT deterministic time budget per phase (reproducible, unlike wall time), shared by the
    phase's per-round solves; the full-model solve, needed only when memory binds, gets it again."""
    num_workers: int = 1
    """CP-SAT search workers. 1 runs one sequential search: with a fixed seed and a deterministic
    budget its result depends on nothing but the inputs. Free-running parallel workers exchange
    solutions in whatever order threads finish, so the same inputs could give another plan. Above
    1 we switch on CP-SAT's interleaved search, deterministic by design but marked experimental
    (2 workers on the pi5 profile: the same plan twice, but 5x the wall time of 1 worker)."""
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
    """The final phase. `place`: objective and bound in units of expected_lost_importance;
    `place_loss_blind`: in per-token ms of the integer model (compute rounded to 0.1 us)."""
    predicted_token_ms: float
    """Per-token time of the cost model for this assignment."""
    device_time_ms: dict[str, float]
    """Compute per token of every device."""
    expected_lost_importance: float
    """Per layer, the expected share of the MLP output lost to missed relaxed replies."""
    solve_wall_s: float = 0.0
    """Wall-clock time in the solver (varies run to run; kept out of plan.json)."""

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


def importance_at_risk(groups, assignment, miss, num_layers) -> float:
    """Per layer, the expected importance lost if nothing on a lossy link were waited for.

    This is what a loss-blind plan loses at the speed it was planned for: its time budget has no
    room for retransmission waits, so keeping that speed under loss means skipping every late
    part, critical or not. (Attention and MLP shares both count: each sums to 1 per layer.)
    """
    if num_layers <= 0:
        raise ValueError("num_layers must be positive")
    return sum(g.importance * miss.get(assignment[g.id], 0.0) for g in groups) / num_layers


def predicted_token_ms(groups, assignment, devices, coordinator, miss=None, options=PlaceOptions()):
    """Per-token time of the cost model. `miss` is unused, taken for symmetry with the other
    evaluators: the critical wait follows each link's loss, and relaxed replies are not awaited."""
    by_name = {d.name: d for d in devices}
    rounds = defaultdict(lambda: defaultdict(lambda: [0.0, False]))
    for g in groups:
        d = by_name[assignment[g.id]]
        slot = rounds[g.layer, g.kind][d.name]
        slot[0] += _compute_ms(g, d)
        slot[1] = slot[1] or g.critical
    return sum(max(t + _rtt_ms(by_name[n], coordinator, options)
                   + crit * _wait_ms(by_name[n], coordinator, options)
                   for n, (t, crit) in per_device.items())
               for per_device in rounds.values())


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
    p = _Problem.build(groups, devices, coordinator, fixed_bytes, miss, options, loss_aware=aware)
    a, status, bound, runs = _optimise(p, options, loss_phase=aware)
    value, scale = (p.loss_units(a), LOSS_SCALE * p.num_layers) if aware \
        else (p.time_units(a), TIME_UNITS_PER_MS)
    assignment, by_name = p.names(a), {d.name: d for d in devices}
    device_ms = {d.name: 0.0 for d in devices}
    for g in groups:
        device_ms[assignment[g.id]] += _compute_ms(g, by_name[assignment[g.id]])
    return Placement(
        assignment=assignment, device_time_ms=device_ms,
        solver=SolverReport(status=status, objective=value / scale, bound=min(bound, value) / scale,
                            deterministic_time=sum(r.dtime for r in runs),
                            num_workers=options.num_workers),
        predicted_token_ms=predicted_token_ms(groups, assignment, devices, coordinator, miss, options),
        expected_lost_importance=expected_lost_importance(groups, assignment, miss, p.num_layers),
        solve_wall_s=sum(r.wall for r in runs))


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
    if len(set(names)) != len(names) or len({g.id for g in groups}) != len(groups):
        raise ValueError("device names and group ids must be unique")
    if coordinator not in names:
        raise ValueError(f"coordinator {coordinator!r} is not a device ({', '.join(names)})")
    for name in sorted(set(fixed_bytes) - set(names)):
        raise ValueError(f"fixed_bytes names {name!r}, which is not a device")
    for name in names:
        if name != coordinator and not 0.0 <= miss.get(name, -1.0) <= 1.0:
            raise ValueError(f"miss: device {name} needs a miss probability in [0, 1]")
    for d in devices:
        if fixed_bytes.get(d.name, 0) > d.memory_bytes:
            what = "coordinator {} needs {} for embeddings and norms" if d.name == coordinator \
                else "device {} needs {} for fixed buffers"
            raise InfeasibleError(what.format(d.name, _mb(fixed_bytes[d.name]))
                                  + f" but has {_mb(d.memory_bytes)}")
    free = [d.memory_bytes - fixed_bytes.get(d.name, 0) for d in devices]
    need = sum(g.bytes for g in groups)
    if need > sum(free):
        raise InfeasibleError(f"model needs {_mb(need)} of weights and KV cache; "
                              f"the cluster has {_mb(sum(free))}")
    for g in groups:
        if g.bytes > max(free):
            raise InfeasibleError(f"group {g.id} ({_mb(g.bytes)}) fits on no device "
                                  f"(the most free memory is {_mb(max(free))})")
    return groups, devices, {n: (0.0 if n == coordinator else float(miss[n])) for n in names}


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


def _greedy(p: _Problem) -> list[int]:
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


def _repair(p: _Problem, a) -> list[int] | None:
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


def _optimise(p: _Problem, options: PlaceOptions, loss_phase: bool):
    """Return the final phase's (assignment, status, bound in solver units, runs).

    Rounds interact only through memory and the sum of their times, so each round is solved alone
    (rounds of equal shape once), each with an equal share of a phase's budget. Phase 1: a round's
    fastest plan, which bounds its time from below; when these plans fit in memory together they
    are the optimum. Phase 2: each round's least loss under a ladder of time caps, then a small
    knapsack that picks one rung per round within the total time cap, spending the slack where it
    buys most. The ladder samples each round's trade-off, so phase 2 proves nothing. Only when
    memory couples the rounds does the full model go to CP-SAT, from a repaired start.
    """
    start, runs = _repair(p, _greedy(p)), []  # may be None: memory too tight for greedy moves
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
                                  f"({_mb(sum(p.size[g] for g in p.rounds[k]))}; CP-SAT: {run.status})")
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
        point, run = _solve(p, options, p.rounds, _repair(p, a1) or start, "time", lower=lowers)
        runs.append(run)
        if point is None:
            raise InfeasibleError(f"memory too tight to pack: {_mb(sum(p.size))} of groups into "
                                  f"{_mb(sum(p.cap))} free (CP-SAT: {run.status})")
        a1, status, bound = list(point.a), run.status, run.bound
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
    if not decomposed:
        point, run = _solve(p, options, p.rounds, a1, "loss", lower=lowers, time_cap=cap)
        runs.append(run)
        a2, status, bound = list(point.a), run.status, run.bound
    # Phase 2 may trade time only for importance; when it saves none, keep phase 1's faster plan.
    a = a2 if p.loss_units(a2) < p.loss_units(a1) else a1
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


def _solve(p: _Problem, options: PlaceOptions, rounds, hint, objective: str, *, budget=None,
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
