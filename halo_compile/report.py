"""`halo-compile inspect`: a plan, read back as a per-device table a person can check.

Example (the checked-in plan):
    >>> from halo_compile.report import inspect_text
    >>> from halo_runtime.core.plan import load_plan
    >>> lines = inspect_text(load_plan("artifacts/smollm2-135m-pi5")).splitlines()
    >>> print(lines[0])
    plan: smollm2-135m on pi5 (4 devices, coordinator pi5-0), schema 1, compiler 0.1.0, seed 0
    >>> print(lines[3]); print(next(line for line in lines if line.startswith("pi5-3")))
    device              memory MB  attn mlp crit mlp rlx importance    PLR  time ms
    pi5-3                  8/6144     0        0      13       0.8%   5.0%     2.06
    >>> print(next(line for line in lines if line.startswith("rounds")))
    rounds per token: 60 of 60 (30 attention, 30 MLP; a round whose groups all stay on the coordinator asks no one)

With the boards' measured power (`power_w` in the profile), each device's report carries its
predicted energy per token, and the plan their sum:
    >>> import dataclasses
    >>> from halo_compile.place import with_energy
    >>> plan = load_plan("artifacts/smollm2-135m-pi5")
    >>> plan = dataclasses.replace(plan, devices=tuple(dataclasses.replace(d, power_w=(2.7, 7.1)) for d in plan.devices))
    >>> plan = dataclasses.replace(plan, device_reports=with_energy(plan.device_reports, plan.devices,
    ...                                                             plan.predicted_token_ms))
    >>> print(next(line for line in inspect_text(plan).splitlines() if "energy" in line))
    predicted energy per token: ... mJ (pi5-0 ..., pi5-1 ..., pi5-2 ..., pi5-3 ...; busy W x its compute time + ...)

With the compiler's failover: where each device's groups would go, what that costs, and the disk
its survivors give them:
    >>> plan = load_plan("artifacts/smollm2-135m-pi5")
    >>> lines = inspect_text(plan).splitlines()
    >>> for line in lines[-6:]:
    ...     print(line)
    (their KV cache is allocated then)
      pi5-1 dies: 85.51 ms/token (now 60.65), expected lost importance 0.0361% per layer (now 0.0361%)
        pi5-0*     adopts  138 groups (30 attn, 108 mlp): 95.8 MB of weights in its shard on disk, 8 x 30.0 MB of KV cache
        pi5-2      adopts   42 groups (0 attn, 42 mlp): 29.5 MB of weights in its shard on disk, 0.0 MB of KV cache
        pi5-3      adopts   45 groups (0 attn, 45 mlp): 33.0 MB of weights in its shard on disk, 0.0 MB of KV cache
      pi5-2, pi5-3: relaxed groups only, no failover needed: their death is compensated like a late reply
"""
from __future__ import annotations

from halo_runtime.core.plan import Failover, Plan
from halo_runtime.core.plandir import VIEW_FILE
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.push import view_over_memory

from .placecost import GroupCost, group_cost
from .roundcost import handed_off, pass_rounds, plan_network_ms

MB = 1024 * 1024


def inspect_text(plan: Plan, view_bytes: int | None = None) -> str:
    """What `halo-compile plan` and `inspect` print; `view_bytes`: the size of the plan's push view
    (`plandir.VIEW_FILE`), where it is known."""
    lines = [f"plan: {plan.model_name} on {plan.profile_name} ({len(plan.devices)} devices, "
             f"coordinator {plan.coordinator}), schema {plan.schema_version}, compiler {plan.compiler_version}, "
             f"seed {plan.seed}",
             f"model: {plan.model.num_layers} layers, hidden {plan.model.hidden_size}, "
             f"{plan.model.intermediate_size} MLP neurons and {plan.model.num_kv_heads} KV heads per layer; "
             f"max context {plan.max_context}",
             ""]
    header = f"{'device':<10} {'memory MB':>18} {'attn':>5} {'mlp crit':>8} {'mlp rlx':>7} {'importance':>10} " \
             f"{'PLR':>6} {'time ms':>8}"
    lines += [header, "-" * len(header)]
    for dev, rep in zip(plan.devices, plan.device_reports):
        mine = [g for g in plan.groups if g.device == dev.name]
        attn = sum(g.kind == "attn" for g in mine)
        crit = sum(g.kind == "mlp" and g.critical for g in mine)
        rlx = sum(g.kind == "mlp" and not g.critical for g in mine)
        used = (rep.weight_bytes + rep.kv_cache_bytes) / MB
        mem = f"{used:.0f}/{dev.memory_bytes / MB:.0f}"
        role = "*" if dev.name == plan.coordinator else ""
        lines.append(f"{dev.name + role:<10} {mem:>18} {attn:>5} {crit:>8} {rlx:>7} "
                     f"{100 * rep.importance_share:>9.1f}% {100 * dev.loss:>5.1f}% {rep.predicted_time_ms:>8.2f}")
    lines.append("(* coordinator: also holds embeddings, norms, LM head, predictors, compensation)")
    policy = DeliveryPolicy()
    bursty = [d for d in plan.devices if d.burst and d.loss]
    if bursty:
        lines.append("loss in bursts (a relaxed part's miss chance, bursty vs if independent): " + ", ".join(
            f"{d.name} mean {d.burst:g} datagrams ({100 * policy.miss_probability(d.loss, burst=d.burst):.2f}% vs "
            f"{100 * policy.miss_probability(d.loss):.2f}%)" for d in bursty))
    copied = [(d, r.copies) for d, r in zip(plan.devices, plan.device_reports) if r.copies > 1]
    if copied:
        lines.append("copies of each decode message to and from a lossy board (halo-run --redundancy overrides): "
                     + ", ".join(f"{d.name} {c} (relaxed misses {100 * policy.miss_probability(d.loss):.2f}% "
                                 f"-> {100 * policy.miss_probability(d.loss, planned=c):.4f}%)" for d, c in copied))
    fp = f", fingerprint {plan.weights_fingerprint[:12]}" if plan.weights_fingerprint else ""
    lines.append(f"weights: {plan.weights}{fp}; stored bytes per device: "
                 + ", ".join(f"{r.name} {r.weight_bytes / MB:.1f} MB" for r in plan.device_reports))
    kept = failover_disk_bytes(plan)
    if kept:
        lines.append("  and for failover, in the same shards on disk (read only after a failover): "
                     + ", ".join(f"{n} {b / MB:.1f} MB" for n, b in kept.items()))
    lines += _streaming_lines(plan)
    holders = [r for r in plan.device_reports if r.kv_cache_bytes]
    lines.append(f"session slots (KV caches that fit beside the weights; `serve` batches up to "
                 f"{plan.session_slots()}): " + ", ".join(f"{r.name} {plan.session_slots(r.name)} x "
                                                            f"{r.kv_cache_bytes / MB:.1f} MB" for r in holders))
    lines.append("")
    p = plan.predictor
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    lines.append(f"predicted time per token: {plan.predicted_token_ms:.2f} ms (per layer and round: slowest "
                 f"device plus its round trip)")
    lines += _energy_lines(plan)
    rounds = plan.network_rounds()
    attn = sum(kind == "attn" for _, kind in rounds)
    lines.append(f"rounds per token: {len(rounds)} of {2 * plan.model.num_layers} ({attn} attention, "
                 f"{len(rounds) - attn} MLP; a round whose groups all stay on the coordinator asks no one)")
    lines.append(_rounds_line(plan, rounds))
    if view_bytes is not None and len(plan.devices) > 1:
        over = view_over_memory(plan, view_bytes)
        lines.append(f"push rounds also map the view (norms, predictor, compensation: {VIEW_FILE}) on every remote "
                     f"device: {view_bytes / MB:.1f} MB, " + ("beyond the memory the plan gave " + ", ".join(
                         f"{d} ({held:.1f}/{mb:.1f} MB)" for d, (held, mb) in over.items()) if over else
                         "within every device's memory"))
    lines.append(f"expected lost importance per layer: {100 * plan.expected_lost_importance:.4f}% of the layer "
                 f"output at {plan.predicted_token_ms:.2f} ms/token (this placement"
                 + (", priced at one copy per message: the copies cut it)" if copied else ")"))
    lines.append(f"  vs a loss-blind placement: {100 * plan.loss_blind_lost_importance:.4f}% at its planned speed, "
                 f"or {plan.loss_blind_token_ms:.2f} ms/token if it waits for retransmissions")
    lines.append(f"predictor: rank {p.rank}, recall {mean(p.recall):.3f}, precision {mean(p.precision):.3f} "
                 f"on held-back tokens (positives {100 * mean(p.positive_rate):.1f}%)")
    s = plan.solver
    lines.append(f"solver: {s.status}, objective {s.objective:g}, bound {s.bound:g}, "
                 f"{s.deterministic_time:.2f} s deterministic solve time, {s.num_workers} worker(s)")
    lines += _failover_lines(plan)
    return "\n".join(lines)


def _adopted(plan: Plan, f: Failover) -> dict[str, list[GroupCost]]:
    """Per survivor of `f`, in plan device order, the costs of the groups it adopts."""
    by_id, out = {g.id: g for g in plan.groups}, {}
    for gid, survivor in f.moves:
        out.setdefault(survivor, []).append(group_cost(plan.model, by_id[gid], plan.max_context, weights=plan.weights))
    return {n: out[n] for n in plan.device_names if n in out}


def failover_disk_bytes(plan: Plan) -> dict[str, int]:
    """Per device, the bytes its shard keeps for the groups it adopts in the plan's failovers (all of
    them: it keeps each dead device's tensors apart, `shards.failover_tensor`); none without failover."""
    out: dict[str, int] = {}
    for f in plan.failover:
        for survivor, costs in _adopted(plan, f).items():
            out[survivor] = out.get(survivor, 0) + sum(c.weight_bytes for c in costs)
    return {n: out[n] for n in plan.device_names if n in out}


def _rounds_line(plan: Plan, rounds: list[tuple[int, str]]) -> str:
    """What the cost model says the network costs a token in star rounds, in push rounds and in
    push rounds mixed with the star rounds that cost less (`roundcost.mixed_pass`), what the plan
    runs (`Plan.rounds`, what `halo-run --rounds plan` runs) and, in push rounds, which rounds push."""
    net, star_rounds = plan_network_ms(plan)
    n = sum(first for _, first in handed_off(pass_rounds(plan), plan.coordinator))
    cheaper = "push" if net["mixed"] < net["star"] and len(star_rounds) < len(rounds) else "star"
    why = ("cheaper on these links" if plan.rounds == cheaper or not net["push"]
           else f"although {cheaper} is cheaper on these links (halo-compile plan --rounds, or the push view's memory)")
    line = (f"network per token (cost model, compute aside): star rounds {net['star']:.2f} ms ({len(rounds)} round "
            f"trips), push rounds {net['push']:.2f} ms ({len(rounds)} one-way hops and {n} handoff"
            f"{'s' if n != 1 else ''} of the residual), push with {len(star_rounds)} star rounds where a round trip "
            f"costs less {net['mixed']:.2f} ms; the plan runs {plan.rounds} rounds, {why}")
    if plan.rounds == "push" and plan.star_rounds:
        line += (f"\n  {len(plan.star_rounds)} of them through the coordinator; these push: "
                 + " ".join(f"{layer}.{kind}" for layer, kind in rounds if (layer, kind) not in plan.starred_rounds()))
    return line


def _failover_lines(plan: Plan) -> list[str]:
    """Where each remote device's groups go if it dies, and what that costs (none: a plan compiled
    without failover, or before it existed, prints as it did)."""
    if not plan.failover:
        return []
    lines = ["", "failover (planned by the compiler): where a device's groups go if it dies; the survivors' shards",
             "keep their weights, mapped from the shard file on disk and read into RAM only after a failover",
             "(their KV cache is allocated then)"]
    for f in plan.failover:
        if not f.absorbable:
            lines.append(f"  {f.device} dies: CANNOT BE ABSORBED, its death ends a run: {f.reason}")
            continue
        lines.append(f"  {f.device} dies: {f.predicted_token_ms:.2f} ms/token (now {plan.predicted_token_ms:.2f}), "
                     f"expected lost importance {100 * f.expected_lost_importance:.4f}% per layer "
                     f"(now {100 * plan.expected_lost_importance:.4f}%)")
        slots = plan.session_slots()
        for survivor, costs in _adopted(plan, f).items():
            attn = sum(c.kind == "attn" for c in costs)
            role = "*" if survivor == plan.coordinator else ""
            kv = sum(c.kv_bytes for c in costs) / MB
            lines.append(f"    {survivor + role:<10} adopts {len(costs):>4} group{'s' if len(costs) != 1 else ' '} ({attn} attn, "
                         f"{len(costs) - attn} mlp): {sum(c.weight_bytes for c in costs) / MB:.1f} MB of weights "
                         f"in its shard on disk, " + (f"{slots} x {kv:.1f} MB of KV cache" if kv and slots > 1
                                                      else f"{kv:.1f} MB of KV cache"))
    covered = {f.device for f in plan.failover}
    relaxed = [d for d in plan.device_names if d != plan.coordinator and d not in covered
               and any(g.device == d for g in plan.groups)]
    if relaxed:
        lines.append(f"  {', '.join(relaxed)}: relaxed groups only, no failover needed: their death is "
                     f"compensated like a late reply")
    blocked = [f.device for f in plan.failover if not f.absorbable]
    if blocked:
        lines.append(f"  devices whose loss cannot be absorbed: {', '.join(blocked)}")
    return lines


def _energy_lines(plan: Plan) -> list[str]:
    """Predicted energy per token, when the profile gave devices `power_w` (none: no line, as before)."""
    total = plan.predicted_token_mj
    if total is None:
        return []
    known = [r for r in plan.device_reports if r.energy_mj is not None]
    missing = [r.name for r in plan.device_reports if r.energy_mj is None]
    line = (f"predicted energy per token: {total:.1f} mJ (" + ", ".join(f"{r.name} {r.energy_mj:.1f}" for r in known)
            + "; busy W x its compute time + idle W x the rest of the token)")
    if missing:
        line += f"; not counted, no power_w: {', '.join(missing)}"
    return [line]


def _streaming_lines(plan: Plan) -> list[str]:
    """Resident vs streamed weights of the devices that may read weights from storage."""
    storage = [(d, r) for d, r in zip(plan.devices, plan.device_reports) if d.storage_mbps > 0]
    if not storage:
        return []
    lines = ["", f"{'streaming':<10} {'resident MB':>11} {'streamed MB':>11} {'storage MB/s':>12} "
                 f"{'load ms/token':>13} {'groups streamed':>15}"]
    for dev, rep in storage:
        streamed = sum(g.streamed for g in plan.groups if g.device == dev.name)
        resident = rep.resident_bytes if rep.streamed_bytes else rep.weight_bytes
        lines.append(f"{dev.name:<10} {resident / MB:>11.1f} {rep.streamed_bytes / MB:>11.1f} "
                     f"{dev.storage_mbps:>12g} {rep.load_ms:>13.2f} {streamed:>15}")
    lines.append("(load: expected storage reads per token at the predictor's selection rates, as in")
    lines.append(" `--load-mode predictive`; exact mode reads every streamed group on every token)")
    return lines
