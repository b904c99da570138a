"""Which of a device's neuron groups stay in RAM under a memory budget: the pure residency planner.

The compiler calls it to price placements (a device smaller than its groups streams the rest
from storage); the runtime's storage shell (`halo_runtime.storage`) carries it out. A group's
bytes are defined here once, for both.

Example:
    >>> from halo_runtime.core.config import ModelConfig
    >>> from halo_runtime.core.residency import choose_resident, weight_bytes
    >>> sorted(choose_resident([("a", 40, 2.0), ("b", 30, 0.9), ("c", 30, 0.5)], budget=75))
    ['a', 'b']
    >>> cfg = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=1,
    ...                   num_heads=4, num_kv_heads=2, head_dim=8)
    >>> weight_bytes(cfg, "attn", 1), weight_bytes(cfg, "mlp", 32)   # (2*8+2*8)*32*4 + 32*16*4, 3*32*32*4
    (6144, 12288)
    >>> weight_bytes(cfg, "mlp", 32, "q8_0")   # 3 matrices of 32x32 in blocks of 32 at 34 bytes each
    3264
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .formats import weight_format
from .plan import Group, Plan

BYTES_PER_WEIGHT = 4
"""Bytes of one fp32 weight (also what flops are counted from: two per weight)."""


def weight_bytes(cfg: ModelConfig, kind: str, num_members: int, weights: str = "fp32") -> int:
    """Stored bytes of a group of `num_members` KV heads (attn: q,k,v rows and o columns of each) or
    MLP neurons (mlp: gate,up rows and down columns of each) in a shard, in format `weights`
    (`formats`: block formats store whole blocks of 32 inputs, scales inside)."""
    fmt, hidden = weight_format(weights), cfg.hidden_size
    if not num_members:
        return 0
    if kind == "attn":
        q_rows = cfg.group_size * cfg.head_dim * num_members
        kv_rows = cfg.head_dim * num_members
        return fmt.nbytes(q_rows + 2 * kv_rows, hidden) + fmt.nbytes(hidden, q_rows)
    return fmt.nbytes(2 * num_members, hidden) + fmt.nbytes(hidden, num_members)


def group_bytes(plan: Plan, group: Group) -> int:
    """Stored bytes of one of the plan's groups in a shard, in the plan's format (`weight_bytes`)."""
    return weight_bytes(plan.model, group.kind, len(group.members), plan.weights)


def choose_resident(units, budget: int) -> frozenset:
    """Keys of the units kept in RAM: highest priority first, each if it still fits (greedy).

    units: (key, bytes, priority) in a fixed order; ties keep that order, so the choice is
    deterministic. Priority is how often a unit is needed per token (attention: always).
    """
    chosen, left = [], budget
    for i in sorted(range(len(units)), key=lambda i: (-units[i][2], i)):
        key, nbytes, _ = units[i]
        if nbytes <= left:
            chosen.append(key)
            left -= nbytes
    return frozenset(chosen)


def window_bytes(layer_bytes) -> int:
    """RAM kept for streamed groups: two layers in flight (one computing, the next loading)."""
    top = sorted(layer_bytes, reverse=True)[:2]
    return sum(top)


def priority(group: Group) -> float:
    """How often a group is needed per token: attention always; an MLP group at its selection rate."""
    return 2.0 if group.kind == "attn" else group.select_rate


@dataclass(frozen=True)
class Residency:
    """Which of a device's groups stay in RAM under a memory budget."""

    budget: int
    """Bytes of weights the device may hold in RAM."""
    resident: frozenset
    """Ids of the groups loaded once and kept."""
    window: int
    """Bytes reserved for streamed groups in flight."""
    resident_bytes: int
    """Bytes of the resident groups."""
    streamed_bytes: int
    """Bytes of the other groups, read from storage as needed."""

    def __post_init__(self):
        if self.resident_bytes + (self.window if self.streamed_bytes else 0) > self.budget:
            raise ValueError("resident groups and the streaming window exceed the budget")


def residency(plan: Plan, device: str, budget: int) -> Residency:
    """The device's resident groups under `budget` bytes of weights (ValueError if too small)."""
    groups = [g for layer in range(plan.model.num_layers) for g in plan.groups_on(device, layer)]
    sizes = [group_bytes(plan, g) for g in groups]
    total = sum(sizes)
    if total <= budget:
        return Residency(budget, frozenset(g.id for g in groups), 0, total, 0)
    per_layer = [0] * plan.model.num_layers
    for g, n in zip(groups, sizes):
        per_layer[g.layer] += n
    window = window_bytes(per_layer)
    if window > budget:
        raise ValueError(f"device {device}: a memory budget of {budget:,} bytes is below the "
                         f"{window:,} needed to stream (two layers of its groups in flight)")
    resident = choose_resident([(g.id, n, priority(g)) for g, n in zip(groups, sizes)], budget - window)
    kept = sum(n for g, n in zip(groups, sizes) if g.id in resident)
    return Residency(budget, resident, window, kept, total - kept)
