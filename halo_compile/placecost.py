"""The placement cost model: what a group costs on a device, as plain functions of floats.

- The coordinator computes its own groups locally: no network, miss probability 0, round trip 0.
- Any other device d: rtt(d) = 2*latency_ms + 2*copies*message_bytes*8 / (bandwidth_mbps*1e3) ms
  (one request, one reply, each sent `DeliveryPolicy.copies` times), and a lost critical message
  costs an expected wait of q1(d)*rto_ms, where q1 is the chance that one attempt (request or
  reply) is lost (`DeliveryPolicy.miss_probability` with no retries: the runtime's one model of
  delivery).
- Placement prices every link at one copy of a one-datagram message, as it is: copies sent back to
  back share a burst, and a board on a lossy link is the likelier to drop out, so critical groups
  stay off it and the least important groups go there. On top, `link_copies` picks the copies the
  runtime sends (recorded in the plan: `DeviceReport.copies`): the number, 1 to MAX_COPIES, that
  minimises 2*c*(message_bytes*8 / (bandwidth_mbps*1e3) + datagram_ms) + q1_c(d)*rto_ms, what c
  copies cost the link and both ends' CPU against the retransmission waits they save (q1_c with
  the link's bursts, which copies sent back to back share). On a clean link 1; at 5% loss on 200
  Mbit/s 2 (q1 falls from 9.8% to 0.5% for 0.14 ms a round); in bursts of 4, 1 (6.3% -> 5.4%).
- Star against push rounds (`network_ms`, `round_network_ms`, `plan_network_ms`; placement
  prices star rounds, then the plan records the cheaper kind, `place.choose_rounds`, and `inspect`
  reports both): a round trip through the coordinator against one hop from every holder to every device,
  with the busiest link or shared medium (`busiest_link_ms`: devices naming one `medium` take
  turns on the air) and the datagrams each device seals and opens.
- compute(g, d) = g.flops / (d.compute_gflops*1e6) ms.
- A device with `storage_mbps` may hold more weights than its memory; the groups that do not fit
  are read from storage as needed, costing load(g, d) = g.select_rate * g.weight_bytes /
  (storage_mbps*1e3) ms per token (select_rate: how often the predictor selects the group on
  calibration tokens; what `predictive` loading reads). Which groups are streamed is decided after
  placement (halo_runtime.core.residency), so the solver charges every group on d the share
  of d's weights expected to be streamed, `stream_share`, times its load: linear, and it steers
  groups off devices whose memory is short relative to their compute. Loads are charged in full
  although the runtime overlaps them with earlier rounds: the model is conservative there.
- Each layer l has up to two synchronisation rounds r (attn, mlp); per round the slowest device's
  compute (+ load) plus its round trip (+ expected wait) is the round's time; T sums the rounds.
  A round trip is paid only to a device that holds a group of the round, so a layer whose
  attention (or MLP) stays entirely on the coordinator has no attention (MLP) round: its time is
  the coordinator's compute, and the runtime asks no one (`rounds_per_token` counts the rest).
- Energy per token of a device with `power_w` [idle, busy]: busy watts over its compute time plus
  idle watts over the rest of the token time (waiting on the network or on the others counts as
  idle), `energy_mj`. It is reported, not optimised: placement minimises time and lost importance.

A plan group's cost (`group_cost`) takes its weight bytes from `halo_runtime.core.residency`,
the definition the runtime streams by, and charges two flops (multiply, add) per weight.

Example:
    >>> from halo_runtime.core.config import ModelConfig
    >>> from halo_runtime.core.plan import Device, Group
    >>> from dataclasses import replace
    >>> from halo_compile.placecost import (GroupCost, PlaceOptions, energy_mj, group_cost, link_copies, load_ms,
    ...                                     rounds_per_token, stream_share)
    >>> cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=32, num_layers=1,
    ...                   num_heads=4, num_kv_heads=2, head_dim=2)
    >>> c = group_cost(cfg, Group("L0.mlp.0", 0, "mlp", 0, (0, 1, 2), "", False, 0.1), max_context=16)
    >>> c.weight_bytes, c.kv_bytes, c.flops                  # 3 neurons x (gate, up, down) x 8 x 4 bytes
    (288, 0, 144)
    >>> g = GroupCost("L0.mlp.0", 0, "mlp", False, 0.1, 8_000_000, 0, 4_000_000, select_rate=0.5)
    >>> sd = Device("sd", "10.0.0.1:9000", 10**7, 2.0, storage_mbps=100)
    >>> load_ms(g, sd)                                  # half the tokens read 8 MB at 100 MB/s
    40.0
    >>> stream_share([g], [sd], {})                     # 10 MB of RAM for its 8 MB: nothing streamed
    {'sd': 0.0}
    >>> a = GroupCost("L0.attn.0", 0, "attn", True, 1.0, 1, 0, 1)
    >>> rounds_per_token([a, g], {"L0.attn.0": "pi", "L0.mlp.0": "sd"}, "pi")   # attention stays home
    1
    >>> energy_mj((2.5, 7.0), compute_ms=10.0, token_ms=40.0)   # 7 W x 10 ms + 2.5 W x 30 ms
    145.0
    >>> wifi = Device("w", "10.0.0.2:9000", 10**7, 2.0, bandwidth_mbps=200, loss=0.05)
    >>> link_copies(wifi, PlaceOptions()), link_copies(replace(wifi, loss=0.001), PlaceOptions())
    (2, 1)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

from halo_runtime.core.codec import datagrams
from halo_runtime.core.config import ModelConfig
from halo_runtime.core.plan import Device, Group, Plan, SolverReport, network_rounds
from halo_runtime.core.policy import MAX_COPIES, DeliveryPolicy, pair_link
from halo_runtime.core.residency import BYTES_PER_WEIGHT, weight_bytes


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
    select_rate: float = 1.0
    """Share of calibration tokens on which the predictor selects it (attention: 1)."""

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
        if not 0.0 <= self.select_rate <= 1.0:
            raise ValueError(f"group {self.id}: select_rate {self.select_rate} is outside [0, 1]")

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


def group_cost(cfg: ModelConfig, group: Group, max_context: int, select_rate: float = 1.0,
               weights: str = "fp32") -> GroupCost:
    """The placement solver's view of a plan group: weights (stored bytes in format `weights`),
    KV cache and flops per token (two per weight, whatever the format)."""
    nbytes = weight_bytes(cfg, group.kind, len(group.members), weights)
    flops = 2 * weight_bytes(cfg, group.kind, len(group.members)) // BYTES_PER_WEIGHT
    if group.kind == "attn":
        # keys and values of its KV heads at every position of the longest context
        kv_bytes = 2 * max_context * cfg.head_dim * len(group.members) * BYTES_PER_WEIGHT
        return GroupCost(group.id, group.layer, "attn", True, group.importance, nbytes, kv_bytes, flops)
    return GroupCost(group.id, group.layer, "mlp", group.critical, group.importance, nbytes, 0, flops, select_rate)


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
    datagram_ms: float = 0.03
    """CPU a datagram costs its sender and receiver together (seal, send, receive, open: 0.012 ms
    on an EPYC core in Python, a Pi 5 some 2-3x that); what `link_copies` charges a copy beside
    its link time."""

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
        if not self.rto_ms >= 0 or not self.datagram_ms >= 0:
            raise ValueError("rto_ms and datagram_ms must be >= 0")


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
    rounds_per_token: int = 0
    """Synchronisation rounds per token: (layer, attn|mlp) rounds with a group on a remote device."""

    def __post_init__(self):
        if self.predicted_token_ms < 0 or self.expected_lost_importance < 0:
            raise ValueError("predicted time and lost importance must be >= 0")
        if self.rounds_per_token < 0:
            raise ValueError("rounds_per_token must be >= 0")



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


def predicted_token_ms(groups, assignment, devices, coordinator, miss=None, options=PlaceOptions(),
                       load=None):
    """Per-token time of the cost model. `miss` is unused, taken for symmetry with the other
    evaluators: the critical wait follows each link's loss, and relaxed replies are not awaited.
    load: group id -> storage read ms per token charged to its device's round (streamed groups)."""
    by_name, load = {d.name: d for d in devices}, load or {}
    rounds = defaultdict(lambda: defaultdict(lambda: [0.0, False]))
    for g in groups:
        d = by_name[assignment[g.id]]
        slot = rounds[g.layer, g.kind][d.name]
        slot[0] += compute_ms(g, d) + load.get(g.id, 0.0)
        slot[1] = slot[1] or g.critical
    return sum(max(t + rtt_ms(by_name[n], coordinator, options)
                   + crit * wait_ms(by_name[n], coordinator, options)
                   for n, (t, crit) in per_device.items())
               for per_device in rounds.values())


def rounds_per_token(groups, assignment: dict[str, str], coordinator: str) -> int:
    """Rounds a token waits on the network: a (layer, kind) round counts if any of its groups is on
    a device other than the coordinator (the runtime skips the others: nobody to ask)."""
    return len(network_rounds(((g.layer, g.kind, assignment[g.id]) for g in groups), coordinator))


def load_ms(g: GroupCost, d: Device) -> float:
    """Expected storage read time per token of g on d if g is streamed (0 on a device without storage)."""
    if d.storage_mbps <= 0:
        return 0.0
    return g.select_rate * g.weight_bytes / (d.storage_mbps * 1e3)


def stream_share(groups, devices, fixed_bytes: dict[str, int]) -> dict[str, float]:
    """Per device, the share of its weights expected to be streamed, before placement is known.

    A time-balanced placement gives each device bytes in proportion to its compute; whatever of
    that share exceeds its free memory (memory less fixed buffers) is streamed. Devices without
    storage_mbps stream nothing.
    """
    total = sum(g.bytes for g in groups)
    compute = sum(d.compute_gflops for d in devices)
    out = {}
    for d in devices:
        expected = total * d.compute_gflops / compute
        free = d.memory_bytes - fixed_bytes.get(d.name, 0)
        out[d.name] = 0.0 if d.storage_mbps <= 0 or expected <= 0 else min(1.0, max(0.0, 1.0 - free / expected))
    return out


def group_ms(g: GroupCost, d: Device, share: float = 0.0) -> float:
    """What the solver charges g on d: compute plus the expected share of its load."""
    return compute_ms(g, d) + share * load_ms(g, d) if share else compute_ms(g, d)


# ---- cost model pieces ----------------------------------------------------------------------------

def compute_ms(g: GroupCost, d: Device) -> float:
    return g.flops / (d.compute_gflops * 1e6)


def rtt_ms(d: Device, coordinator: str, options: PlaceOptions) -> float:
    if d.name == coordinator:
        return 0.0
    # every copy the runtime sends to and from a lossy device takes the link's time too
    copies = DeliveryPolicy().copies(d.loss, datagrams(options.message_bytes))
    return 2 * d.latency_ms + 2 * copies * options.message_bytes * 8 / (d.bandwidth_mbps * 1e3)


def wait_ms(d: Device, coordinator: str, options: PlaceOptions) -> float:
    if d.name == coordinator:
        return 0.0
    return DeliveryPolicy(relaxed_retries=0).miss_probability(d.loss) * options.rto_ms


@lru_cache(maxsize=None)
def link_copies(d: Device, options: PlaceOptions) -> int:
    """Copies of a one-datagram message to and from d that cost its round least (module docstring);
    the fewest among equals, so a clean link gets 1."""
    if d.loss <= 0:
        return 1
    n = datagrams(options.message_bytes)
    copy_ms = options.message_bytes * 8 / (d.bandwidth_mbps * 1e3) + n * options.datagram_ms

    def cost(c: int) -> float:
        sent = DeliveryPolicy().copies(d.loss, n, c)
        # a bursty link loses copies sent back to back together: there a copy saves little
        q1 = DeliveryPolicy(relaxed_retries=0).miss_probability(d.loss, burst=d.burst, planned=c)
        return round(2 * sent * copy_ms + q1 * options.rto_ms, 9)

    return min(range(1, MAX_COPIES + 1), key=lambda c: (cost(c), c))


def network_ms(rounds: list[list[str]], devices: list[Device], coordinator: str, copies: dict[str, int],
               options: PlaceOptions) -> dict[str, float]:
    """Per token, the network time of a pass's `rounds` (in order, each: the devices holding a
    group of it, the coordinator included where it holds one) as star rounds and as push rounds
    (`core.push`): the sums of `round_network_ms`, plus, for push, one hop of the coordinator's
    residual before every run of rounds that leave it: at the pass's start (after the embedding)
    and after every round it computes alone (a layer whose attention stays on the coordinator
    costs push rounds that hop, as the star's request).

        >>> from halo_runtime.core.plan import Device
        >>> boards = [Device(f"b{i}", f"10.0.0.{i}:7700", 10**9, 1.0, latency_ms=1.0) for i in range(4)]
        >>> net = network_ms([["b0", "b1", "b2", "b3"]] * 60, boards, "b0", {}, PlaceOptions())
        >>> net["push"] < net["star"]                       # one hop a round saves more than its datagrams cost
        True
        >>> local = network_ms([["b0"], ["b0", "b1", "b2", "b3"]] * 30, boards, "b0", {}, PlaceOptions())
        >>> local["push"] > local["star"]                   # attention on the coordinator: a hop each way either way
        True
        >>> from dataclasses import replace
        >>> air = [replace(d, medium="wifi") for d in boards]   # one channel: every datagram takes its turn
        >>> shared = network_ms([["b0", "b1", "b2", "b3"]] * 60, air, "b0", {}, PlaceOptions())
        >>> shared["push"] > net["push"] and shared["push"] - net["push"] > shared["star"] - net["star"]
        True
    """
    costs = pass_network_ms(rounds, devices, coordinator, copies, options)
    return {"star": sum(s for s, _ in costs), "push": sum(p for _, p in costs)}


def pass_network_ms(rounds: list[list[str]], devices: list[Device], coordinator: str, copies: dict[str, int],
                    options: PlaceOptions) -> list[tuple[float, float]]:
    """(star, push) of each of `rounds` that leaves the coordinator (`round_network_ms`), push with
    the handoff of the coordinator's residual where one comes first (`handed_off`)."""
    handoff = max((_lat(devices, coordinator, d.name) + _msg_ms(devices, d.name, options)
                   for d in devices if d.name != coordinator), default=0.0)
    return [(s, p + (handoff if first else 0.0))
            for held, first in handed_off(rounds, coordinator)
            for s, p in [round_network_ms(held, devices, coordinator, copies, options)]]


def handed_off(rounds: list[list[str]], coordinator: str) -> list[tuple[list[str], bool]]:
    """Each of `rounds` that leaves the coordinator, and whether a push pass hands every device the
    coordinator's residual before it: where it starts a run of such rounds (the first after the
    embedding, the others after a round the coordinator computed alone)."""
    out, alone = [], True  # a pass starts with the coordinator's embedding
    for held in rounds:
        remote = any(d != coordinator for d in held)
        if remote:
            out.append((held, alone))
        alone = not remote
    return out


def pass_rounds(plan: Plan) -> list[list[str]]:
    """Every round of a pass of `plan` in order (attention, MLP, per layer): the devices holding a group of it."""
    return [sorted({g.device for g in plan.layer_groups(layer, kind)})
            for layer in range(plan.model.num_layers) for kind in ("attn", "mlp")]


def plan_network_ms(plan: Plan) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """The network time of a token of `plan` in star rounds and in push rounds (`network_ms`,
    parts on the fp16 wire, the plan's copies per link), and each network round's own (star,
    push) (`pass_network_ms`; `Plan.network_rounds`' order)."""
    copies = {d: plan.link_copies(d) for d in plan.device_names}
    options = PlaceOptions(message_bytes=2 * plan.model.hidden_size)
    costs = pass_network_ms(pass_rounds(plan), list(plan.devices), plan.coordinator, copies, options)
    return {"star": sum(s for s, _ in costs), "push": sum(p for _, p in costs)}, costs


def _lat(devices: list[Device], a: str, b: str) -> float:
    """One datagram from a to b crosses a's access link and b's (the coordinator's too, as
    `benchmarks.plr_sweep --delay-from-plan` builds the lab)."""
    return sum(d.latency_ms for d in devices if d.name in (a, b))


def _msg_ms(devices: list[Device], d: str, options: PlaceOptions) -> float:
    """One part's time on d's link."""
    return options.message_bytes * 8 / (next(x for x in devices if x.name == d).bandwidth_mbps * 1e3)


def busiest_link_ms(sends: list[tuple[str, str, int]], devices: list[Device], options: PlaceOptions) -> float:
    """The longest any one link or shared medium is busy carrying `sends` ((sender, receiver,
    copies) of one part each): on switched links, a device's uplink carries what it sends and its
    downlink what it receives; devices naming the same `medium` (one Wi-Fi channel) take turns on
    the air, where a datagram from one station to another goes up to the access point and down
    again: twice, when both are on that channel.

        >>> from halo_runtime.core.plan import Device
        >>> d = [Device(n, f"10.0.0.{i}:7700", 10**9, 1.0, bandwidth_mbps=8, medium=m)
        ...      for i, (n, m) in enumerate([("a", ""), ("b", "air"), ("c", "air")])]
        >>> o = PlaceOptions(message_bytes=1000)            # 1 ms a part at 8 Mbit/s
        >>> busiest_link_ms([("a", "b", 1), ("a", "c", 2)], d, o)   # the channel: 1 + 2 transmissions
        3.0
        >>> busiest_link_ms([("b", "c", 1)], d, o)          # up and down the same channel
        2.0
    """
    medium = {d.name: d.medium for d in devices}
    busy: dict[tuple[str, str], float] = {}
    for s, v, c in sends:
        for end, direction in ((s, "up"), (v, "down")):
            key = ("air", medium[end]) if medium[end] else (direction, end)
            busy[key] = busy.get(key, 0.0) + c * _msg_ms(devices, end, options)
    return max(busy.values(), default=0.0)


def round_network_ms(held: list[str], devices: list[Device], coordinator: str, copies: dict[str, int],
                     options: PlaceOptions) -> tuple[float, float]:
    """(star, push): the network time of one round whose groups `held` lists the devices of.
    `copies`: the plan's per link (between two boards: `core.policy.pair_link`, as the runtime
    sends). Star round: the slowest participant's round trip (2 latencies, the expected wait for a
    lost request or reply), the busiest link or medium carrying every request and reply
    (`busiest_link_ms`), and the coordinator's CPU for every datagram it seals and opens
    (`datagram_ms`). Push round: the slowest pair's one-way trip (and expected wait), the busiest
    link or medium carrying every device's part to every other, and the busiest device's CPU for
    what it sends and receives. So push saves a hop only where the coordinator's link is as slow as
    the boards': behind a wired coordinator a board-to-board datagram crosses two slow links, as a
    star's round trip does; and on a shared medium it pays N - 1 times the airtime of a star's
    replies. Compute is left out: it is the same either way."""
    by_name = {d.name: d for d in devices}
    names = list(by_name)
    one = DeliveryPolicy(relaxed_retries=0)
    remote = [d for d in held if d != coordinator]
    if not remote:
        return 0.0, 0.0

    def pair(a: str, b: str) -> tuple[float, int]:
        return pair_link(by_name[a].loss, by_name[b].loss, copies.get(a, 1), copies.get(b, 1))

    star = (max(2 * _lat(devices, coordinator, d)
                + one.miss_probability(by_name[d].loss, planned=copies.get(d, 1)) * options.rto_ms for d in remote)
            + busiest_link_ms([(a, b, copies.get(d, 1)) for d in remote for a, b in ((coordinator, d), (d, coordinator))],
                              devices, options)
            + options.datagram_ms * sum(2 * copies.get(d, 1) for d in remote))
    sends = [(s, v, pair(s, v)[1]) for s in held for v in names if v != s]
    handled = dict.fromkeys(names, 0)  # datagrams each device seals or opens
    for s, v, c in sends:
        handled[s] += c
        handled[v] += c
    push = (max(_lat(devices, s, v) + pair(s, v)[0] ** c * options.rto_ms for s, v, c in sends)
            + busiest_link_ms(sends, devices, options) + options.datagram_ms * max(handled.values()))
    return star, push


def energy_mj(power_w: tuple[float, float], compute_ms: float, token_ms: float) -> float:
    """Energy per token in mJ (W x ms) of a device drawing power_w = (idle, busy) watts: busy for
    its compute time, idle for the rest of the token time (never less than 0 of it)."""
    idle, busy = power_w
    return busy * compute_ms + idle * max(0.0, token_ms - compute_ms)


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


