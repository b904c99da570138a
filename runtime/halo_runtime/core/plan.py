"""The plan format: one schema, defined once. The compiler writes it, every device reads it.

A plan says which device computes which neuron group of every layer, which groups are critical
(always awaited) and which are relaxed (used only if they arrive before the deadline), and where
every device listens, and (`Failover`) where a dying device's groups go. `plan.json` is written
with deterministic bytes: keys sorted, floats rounded, one group per line (`core.planjson`).

Example (the checked-in plan: SmolLM2-135M on four Raspberry Pi 5):
    >>> from halo_runtime.core.plan import load_plan
    >>> plan = load_plan("artifacts/smollm2-135m-pi5")
    >>> plan.coordinator, [d.loss for d in plan.devices]
    ('pi5-0', [0.0, 0.0, 0.05, 0.05])
    >>> [(g.id, g.critical) for g in plan.groups_on("pi5-1", layer=0)][:3]
    [('L0.attn.1', True), ('L0.mlp.0', True), ('L0.mlp.1', True)]
    >>> plan.groups_on("pi5-1", layer=0)[-1].critical          # relaxed groups come last
    False
    >>> len(plan.network_rounds()), plan.network_rounds()[:2]   # of 2 rounds per layer
    (60, [(0, 'attn'), (0, 'mlp')])
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig
from .formats import weight_format
from .plandir import PLAN_FILE, PlanError
from .planjson import dump, from_plain, to_plain
from .policy import MAX_COPIES, gilbert
from .spans import MAX_SLOTS

SCHEMA_VERSION = 1
OPTIONAL = {"omit_default": True}
ROUNDS = ("star", "push")
"""How a network round travels: a round trip through the coordinator, or one hop from every device
to every other, each adding the parts on its own view of the residual (`core.push`)."""
"""Field metadata: written to plan.json only when it differs from its default, so plans that do
not use a feature (e.g. streaming) keep the bytes they had before the field existed."""


def network_rounds(placed, coordinator: str) -> list[tuple[int, str]]:
    """(layer, kind) rounds with a group on a device other than `coordinator`, sorted; `placed`
    yields (layer, kind, device) per group. The one definition of a round the runtime sends."""
    return sorted({(layer, kind) for layer, kind, device in placed if device != coordinator})


@dataclass(frozen=True)
class Device:
    """One board of the cluster and its network link, as the profile described it."""

    name: str
    """Unique device name."""
    address: str
    """host:port where its runtime listens."""
    memory_bytes: int
    """Memory budget for weights and KV cache."""
    compute_gflops: float
    """Sustained compute for this workload, in GFLOP/s."""
    latency_ms: float = 0.1
    """One-way latency of its link to the coordinator."""
    jitter_ms: float = 0.0
    """Standard deviation of that latency."""
    bandwidth_mbps: float = 1000.0
    """Link bandwidth in Mbit/s."""
    loss: float = 0.0
    """Packet loss rate of its link, in [0, 1)."""
    burst: float = field(default=0.0, metadata=OPTIONAL)
    """Mean length of its link's loss bursts, in datagrams (Gilbert channel, `core.policy`); 0 = losses
    independent of each other."""
    storage_mbps: float = field(default=0.0, metadata=OPTIONAL)
    """Storage read bandwidth in MB/s (1e6 bytes). Above 0 the device may hold more weights than
    `memory_bytes`: those groups stay on storage and are loaded as needed (halo_runtime.storage.groupcache)."""
    power_w: tuple[float, float] | None = field(default=None, metadata=OPTIONAL)
    """Watts it draws idle and busy, as measured on the board (None: not measured; no energy figures)."""
    medium: str = field(default="", metadata=OPTIONAL)
    """The shared radio medium its link is on (e.g. one Wi-Fi channel): devices naming the same one
    take turns on the air. "" = a switched link of its own."""

    def __post_init__(self):
        if not self.name:
            raise ValueError("device name is empty")
        if not self.storage_mbps >= 0:
            raise ValueError(f"device {self.name}: storage bandwidth must be >= 0")
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"device {self.name}: address {self.address!r} is not host:port")
        if self.memory_bytes <= 0:
            raise ValueError(f"device {self.name}: memory must be positive")
        if self.compute_gflops <= 0:
            raise ValueError(f"device {self.name}: compute must be positive")
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"device {self.name}: latency and jitter must be >= 0")
        if self.bandwidth_mbps <= 0:
            raise ValueError(f"device {self.name}: bandwidth must be positive")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"device {self.name}: loss {self.loss} is outside [0, 1)")
        if self.burst != 0.0:
            if self.burst < 1.0:
                raise ValueError(f"device {self.name}: burst {self.burst} must be 0 (independent losses) or a mean "
                                 "length of at least 1 datagram")
            if self.loss > 0.0:
                try:
                    gilbert(self.loss, self.burst)  # the one statement of which bursts a loss rate admits
                except ValueError as e:
                    raise ValueError(f"device {self.name}: {e}") from None
        if self.medium and not self.medium.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"device {self.name}: medium {self.medium!r} is not a name (letters, digits, - and _)")
        if self.power_w is not None:
            if len(self.power_w) != 2 or not all(math.isfinite(w) for w in self.power_w) \
                    or not 0.0 <= self.power_w[0] <= self.power_w[1]:
                raise ValueError(f"device {self.name}: power_w {list(self.power_w)} is not [idle, busy] watts "
                                 "with 0 <= idle <= busy")

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


@dataclass(frozen=True)
class Group:
    """A neuron group: the unit of placement."""

    id: str
    """Stable name, e.g. "L3.mlp.5"."""
    layer: int
    """Decoder layer index."""
    kind: str
    """"attn" (whole GQA KV-head groups) or "mlp" (MLP neurons)."""
    index: int
    """Position among this layer's groups of this kind."""
    members: tuple[int, ...]
    """KV-head indices (attn) or intermediate-neuron indices (mlp), ascending."""
    device: str
    """Device that computes it."""
    critical: bool
    """Critical groups are always awaited; relaxed ones may be replaced when late."""
    importance: float
    """Expected share of this layer's attention (attn) or MLP (mlp) output norm it contributes."""
    streamed: bool = field(default=False, metadata=OPTIONAL)
    """Its weights stay on its device's storage and are loaded per token (memory budget too small)."""
    select_rate: float = field(default=1.0, metadata=OPTIONAL)
    """Share of calibration tokens on which the predictor selects it (MLP groups on streaming
    devices; 1.0 elsewhere): how often `predictive` loading reads it."""

    def __post_init__(self):
        if self.kind not in ("attn", "mlp"):
            raise ValueError(f"group {self.id}: kind must be attn or mlp, got {self.kind!r}")
        if not self.members:
            raise ValueError(f"group {self.id}: no members")
        if list(self.members) != sorted(set(self.members)):
            raise ValueError(f"group {self.id}: members must be ascending and unique")
        if self.kind == "attn" and not self.critical:
            raise ValueError(f"group {self.id}: attention groups hold KV state and must be critical")
        if not 0.0 <= self.select_rate <= 1.0:
            raise ValueError(f"group {self.id}: select_rate {self.select_rate} is outside [0, 1]")


@dataclass(frozen=True)
class SolverReport:
    """What CP-SAT said about the placement."""

    status: str
    """OPTIMAL or FEASIBLE."""
    objective: float
    """Objective of the returned placement (final phase)."""
    bound: float
    """Best proven bound on that objective."""
    deterministic_time: float
    """Solve time in CP-SAT's deterministic units (reproducible; wall time is not, so the plan
    does not record it: `halo-compile plan` prints it)."""
    num_workers: int
    """Search workers used."""


@dataclass(frozen=True)
class DeviceReport:
    """The compiler's prediction for one device under this plan."""

    name: str
    """Device name."""
    weight_bytes: int
    """Bytes of weights in its shard."""
    kv_cache_bytes: int
    """KV cache bytes at max_context."""
    num_groups: int
    """Groups it computes."""
    importance_share: float
    """Its share of all groups' importance (attention and MLP, layers weighted equally)."""
    predicted_time_ms: float
    """Its compute time per token, from the profile's sustained compute."""
    resident_bytes: int = field(default=0, metadata=OPTIONAL)
    """Streaming devices: weight bytes kept in RAM (0: not streaming, all weights resident)."""
    streamed_bytes: int = field(default=0, metadata=OPTIONAL)
    """Streaming devices: weight bytes of the groups loaded from storage as needed."""
    load_ms: float = field(default=0.0, metadata=OPTIONAL)
    """Streaming devices: expected storage read time per token, from the predictor's selection
    rates on calibration tokens (what `predictive` loading reads; `exact` reads all streamed bytes)."""
    energy_mj: float | None = field(default=None, metadata=OPTIONAL)
    """Predicted energy per token in mJ: busy watts over its compute time plus idle watts over the
    rest of the predicted token time (`halo_compile.placecost.energy_mj`); None without `power_w`."""
    copies: int = field(default=1, metadata=OPTIONAL)
    """Copies of each one-datagram message to and from it that the compiler chose for its link
    (`halo_compile.placecost.link_copies`); the runtime sends that many unless `--redundancy` says."""

    def __post_init__(self):
        if not 1 <= self.copies <= MAX_COPIES:
            raise ValueError(f"device report {self.name}: copies must be in 1..{MAX_COPIES}, got {self.copies}")


@dataclass(frozen=True)
class PredictorReport:
    """The per-layer semantic-aware predictor and how well it did on held-back tokens."""

    rank: int
    """Width of the low-rank bottleneck."""
    threshold: float
    """A group "matters" for a token when its contribution exceeds this share of the MLP output norm."""
    positive_rate: tuple[float, ...]
    """Per layer: share of (token, group) pairs that matter."""
    recall: tuple[float, ...]
    """Per layer: recall on held-back calibration tokens."""
    precision: tuple[float, ...]
    """Per layer: precision on held-back calibration tokens."""


@dataclass(frozen=True)
class Failover:
    """Where one device's groups go if it dies, as the compiler solved it (`halo_compile.failover`)."""

    device: str
    """The device that dies (never the coordinator: it holds the residual stream)."""
    moves: tuple[tuple[str, str], ...]
    """(group id, survivor) for every group of `device`, in plan order; empty when the survivors
    cannot hold them (`reason` says why): its death then ends the run."""
    predicted_token_ms: float = 0.0
    """Per-token time of the cluster without it, by the placement's cost model."""
    expected_lost_importance: float = 0.0
    """Expected share of a layer's output lost to packet loss without it (as `Plan`'s)."""
    reason: str = field(default="", metadata=OPTIONAL)
    """Why its groups cannot be absorbed (empty when `moves` is not)."""

    def __post_init__(self):
        if bool(self.moves) == bool(self.reason):
            raise ValueError(f"failover of {self.device}: give either moves or the reason there are none")
        if any(survivor == self.device for _, survivor in self.moves):
            raise ValueError(f"failover of {self.device}: a group cannot move to the device that died")

    @property
    def absorbable(self) -> bool:
        return bool(self.moves)


def slots_that_fit(memory_bytes: int, weight_bytes: int, kv_cache_bytes: int, streams: bool = False) -> int:
    """Sessions whose KV caches (`kv_cache_bytes` each, at max_context) fit in `memory_bytes` beside
    `weight_bytes` and the first session's cache, 1 to `spans.MAX_SLOTS` (no cache: MAX_SLOTS; a
    device streaming weights from storage: 1). The one rule for the runtime and the compiler."""
    if not kv_cache_bytes:
        return MAX_SLOTS
    if streams:
        return 1
    spare = memory_bytes - weight_bytes - kv_cache_bytes
    return max(1, min(MAX_SLOTS, 1 + spare // kv_cache_bytes))


@dataclass(frozen=True)
class Plan:
    """A compiled, deployable placement of one model on one cluster."""

    schema_version: int
    """Plan format version; the runtime refuses any other."""
    compiler_version: str
    """Version of halo-compile that wrote it."""
    seed: int
    """Seed of every random choice in the compiler."""
    model_name: str
    """Model as named on the command line."""
    model_fingerprint: str
    """SHA-256 over the model's tensors (names, shapes, fp32 bytes)."""
    model: ModelConfig
    """Model shape and numerics."""
    profile_name: str
    """Cluster profile name."""
    profile_fingerprint: str
    """SHA-256 of the profile file's bytes."""
    coordinator: str
    """Device holding embeddings, norms, LM head, predictor and the residual stream."""
    devices: tuple[Device, ...]
    """Every device, coordinator included."""
    max_context: int
    """Longest context (prompt + generated) the KV cache budget allows."""
    groups: tuple[Group, ...]
    """Every group of every layer, ordered by (layer, kind attn first, index)."""
    predictor: PredictorReport
    """Predictor summary; its weights live in the coordinator's shard."""
    solver: SolverReport
    """Placement solver summary."""
    device_reports: tuple[DeviceReport, ...]
    """Predicted memory and time per device."""
    predicted_token_ms: float
    """Predicted per-token time: per layer and round, the slowest device plus its round trip."""
    expected_lost_importance: float
    """Expected share of a layer's output lost to packet loss (relaxed groups on lossy links)."""
    loss_blind_token_ms: float
    """A placement that ignores loss: its per-token time once it waits for retransmissions."""
    loss_blind_lost_importance: float
    """That placement's expected lost share if it keeps its planned speed (waits for nothing late)."""
    shards: tuple[str, ...]
    """Shard file per device, in the order of `devices`."""
    weights: str = field(default="fp32", metadata=OPTIONAL)
    """Format the shards store projections, embeddings and LM head in: fp32, bf16, q8_0 or q4_0
    (`halo_runtime.core.formats`); norms, predictor and compensation stay fp32."""
    weights_fingerprint: str = field(default="", metadata=OPTIONAL)
    """SHA-256 over the quantised model the shards hold together (`shards.quant_fingerprint`);
    empty for fp32, whose shards reassemble to `model_fingerprint` itself."""
    failover: tuple[Failover, ...] = field(default=(), metadata=OPTIONAL)
    """One per remote device holding critical groups, in device order: where its groups go if it
    dies (the survivors keep their weights in their shards, `shards.failover_tensor`)."""
    rounds: str = field(default="star", metadata=OPTIONAL)
    """How the runtime's network rounds travel unless `halo-run --rounds` says otherwise (`ROUNDS`):
    the kind the compiler's cost model found cheaper on the profile's links."""
    star_rounds: tuple[int, ...] = field(default=(), metadata=OPTIONAL)
    """In push rounds, the network rounds (indexes into `network_rounds()`) whose parts go to the
    coordinator alone, which hands the residual out again before the next: where its round trip
    costs less than pushing every part to every device (`starred_rounds`)."""

    def __post_init__(self):
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not supported "
                             f"(this runtime reads version {SCHEMA_VERSION})")
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError("devices: duplicate device names")
        if self.coordinator not in names:
            raise ValueError(f"coordinator: {self.coordinator!r} is not a device")
        if len(self.shards) != len(self.devices):
            raise ValueError("shards: need one shard file per device")
        try:
            weight_format(self.weights)
        except ValueError as e:
            raise ValueError(f"weights: {e}") from None
        if self.rounds not in ROUNDS:
            raise ValueError(f"rounds: {self.rounds!r} is not one of {', '.join(ROUNDS)}")
        if self.star_rounds:
            n = len(self.network_rounds())
            if self.rounds != "push":
                raise ValueError("star_rounds: only a plan that runs push rounds has them")
            if (any(type(i) is not int or not 0 <= i < n for i in self.star_rounds)
                    or list(self.star_rounds) != sorted(set(self.star_rounds))):
                raise ValueError(f"star_rounds: want increasing indexes of the plan's {n} network rounds")
        if (self.weights == "fp32") != (not self.weights_fingerprint):
            raise ValueError("weights_fingerprint: required for quantised weights, absent for fp32")
        for g in self.groups:
            if g.device not in names:
                raise ValueError(f"group {g.id}: device {g.device!r} is not in devices")
            if not 0 <= g.layer < self.model.num_layers:
                raise ValueError(f"group {g.id}: layer {g.layer} out of range")
        for f in self.failover:
            if f.device not in names or f.device == self.coordinator:
                raise ValueError(f"failover: {f.device!r} is not a remote device")
            held = [g.id for g in self.groups if g.device == f.device]
            if f.moves and [gid for gid, _ in f.moves] != held:
                raise ValueError(f"failover of {f.device}: moves must name its groups, in plan order")
            for _, survivor in f.moves:
                if survivor not in names:
                    raise ValueError(f"failover of {f.device}: {survivor!r} is not a device")

    # ---- queries the runtime and the compiler share -------------------------------------------

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"no device named {name!r} in this plan (devices: {', '.join(self.device_names)})")

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    @property
    def predicted_token_mj(self) -> float | None:
        """Predicted energy per token in mJ of the devices with `power_w`, summed (None: none has it)."""
        known = [r.energy_mj for r in self.device_reports if r.energy_mj is not None]
        return sum(known) if known else None

    def link_copies(self, device: str) -> int:
        """Copies of a one-datagram message to and from `device` that the plan chose (1 on clean links)."""
        return next((r.copies for r in self.device_reports if r.name == device), 1)

    def session_slots(self, device: str | None = None) -> int:
        """Sessions whose KV caches (at max_context) fit in `device`'s memory beside its weights and
        its first session's cache, 1 to `spans.MAX_SLOTS`; without a device, the fewest of any
        device: what every device allocates and the coordinator may use. A device that streams
        weights from storage spends its spare memory on them: one session."""
        if device is None:
            return min(self.session_slots(d.name) for d in self.devices)
        rep = next(r for r in self.device_reports if r.name == device)
        return slots_that_fit(self.device(device).memory_bytes, rep.weight_bytes, rep.kv_cache_bytes,
                              streams=bool(rep.streamed_bytes))

    def failover_for(self, device: str) -> Failover | None:
        """The compiler's fallback for `device`'s death (None: it holds no critical groups, or the
        plan predates failover)."""
        return next((f for f in self.failover if f.device == device), None)

    def replaceable(self, device: str) -> bool:
        """Whether the plan's failover can hand `device`'s groups to the survivors."""
        f = self.failover_for(device)
        return f is not None and f.absorbable

    def without(self, device: str) -> Plan:
        """The plan after `device` died: its groups on the survivors its failover names (critical
        stays critical), the failover's predictions, no further failover. ValueError if it has none."""
        f = self.failover_for(device)
        if not self.replaceable(device):
            why = f.reason if f is not None else "the plan has no failover for it"
            raise ValueError(f"device {device} cannot be replaced: {why}")
        moved = dict(f.moves)
        return dataclasses.replace(
            self, groups=tuple(dataclasses.replace(g, device=moved[g.id]) if g.id in moved else g
                               for g in self.groups),
            predicted_token_ms=f.predicted_token_ms, expected_lost_importance=f.expected_lost_importance,
            failover=(), star_rounds=())  # failover runs star rounds

    def shard_file(self, name: str) -> str:
        return self.shards[self.device_names.index(name)]

    def layer_groups(self, layer: int, kind: str | None = None) -> list[Group]:
        return [g for g in self.groups if g.layer == layer and (kind is None or g.kind == kind)]

    def groups_on(self, device: str, layer: int, kind: str | None = None) -> list[Group]:
        """A device's groups in one layer, in shard order: critical first, then relaxed, by index.

        Shard rows follow this order, so a device's critical and relaxed MLP neurons are two
        contiguous slices.
        """
        mine = [g for g in self.layer_groups(layer, kind) if g.device == device]
        return sorted(mine, key=lambda g: (g.kind != "attn", not g.critical, g.index))

    def network_rounds(self) -> list[tuple[int, str]]:
        """The (layer, "attn" | "mlp") rounds that ask a remote device, in order: a round whose
        groups all stay on the coordinator sends nothing (the rounds a token waits on the network)."""
        return network_rounds(((g.layer, g.kind, g.device) for g in self.groups), self.coordinator)

    def starred_rounds(self) -> frozenset[tuple[int, str]]:
        """The (layer, kind) rounds a push pass runs through the coordinator (`star_rounds`)."""
        rounds = self.network_rounds()
        return frozenset(rounds[i] for i in self.star_rounds)

    # ---- serialisation ------------------------------------------------------------------------

    def to_json(self) -> str:
        return dump(to_plain(self)) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = PLAN_FILE) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict):
            raise PlanError(f"{source}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(f"{source}: schema_version {version} is not supported "
                            f"(this runtime reads version {SCHEMA_VERSION}); recompile the plan")
        return from_plain(cls, data, source)


def load_plan(directory: str | Path) -> Plan:
    path = Path(directory) / PLAN_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"{path}: no plan here (run `halo-compile plan` first)") from None
    return Plan.from_json(text, str(path))
