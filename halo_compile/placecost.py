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
- Star against push rounds: `roundcost.py` (placement prices star rounds; the plan records the
  cheaper kind after it).
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
from halo_runtime.core.plan import Device, Group, SolverReport, network_rounds
from halo_runtime.core.policy import MAX_COPIES, DeliveryPolicy
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


def energy_mj(power_w: tuple[float, float], compute_ms: float, token_ms: float) -> float:
    """Energy per token in mJ (W x ms) of a device drawing power_w = (idle, busy) watts: busy for
    its compute time, idle for the rest of the token time (never less than 0 of it)."""
    idle, busy = power_w
    return busy * compute_ms + idle * max(0.0, token_ms - compute_ms)


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


