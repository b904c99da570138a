"""Step 4, score: how much each group matters, and whether it may be skipped when late.

Importance of an MLP neuron is its expected contribution norm to the layer output,
E|act_i| * ||down_proj[:, i]||; a group's importance is its neurons' share of the layer total.
An attention group's importance is its KV-head group's share of the summed output norms.

Criticality: attention groups are always critical (their KV cache must stay complete). MLP
groups are relaxed from the least important upwards while their cumulative share stays within
`relaxed_share`; the rest are critical. A relaxed group that misses its deadline is replaced by
an estimate of its output the coordinator holds (halo_compile.compensate).

`score_layer` is the step for one layer; `plan_groups` turns its result and the grouping into
the plan's (not yet placed) group records.

Example:
    >>> import torch
    >>> from halo_compile.group import LayerGroups
    >>> from halo_compile.score import criticality, plan_groups, score_layer
    >>> criticality([0.5, 0.3, 0.15, 0.05], relaxed_share=0.2)
    [True, True, False, False]
    >>> groups = LayerGroups(mlp=((0, 1), (2,), (3,)), attn=((0,),), neuron_importance=torch.tensor([4., 3, 2, 1]))
    >>> scores = score_layer(groups, kv_norm_sum=torch.tensor([5.0]), relaxed_share=0.35)
    >>> scores.mlp_importance, scores.mlp_critical, scores.relaxed
    ((0.7, 0.2, 0.1), (True, False, False), [1, 2])
    >>> [(g.id, g.critical) for g in plan_groups(3, groups, scores)]
    [('L3.attn.0', True), ('L3.mlp.0', True), ('L3.mlp.1', False), ('L3.mlp.2', False)]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from halo_runtime.core.plan import Group

if TYPE_CHECKING:
    from .group import LayerGroups


def neuron_importance(mean_abs_act: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """[intermediate] expected |contribution| of each neuron to the layer output."""
    return mean_abs_act.double() * down_proj.double().norm(dim=0)


def shares(values: list[float]) -> list[float]:
    total = sum(values)
    if total <= 0:
        return [1.0 / len(values)] * len(values)
    return [v / total for v in values]


def group_shares(groups: list[list[int]], per_member: torch.Tensor) -> list[float]:
    return shares([float(per_member[g].sum()) for g in groups])


def criticality(importances: list[float], relaxed_share: float) -> list[bool]:
    """True = critical. The least important groups are relaxed while their sum <= relaxed_share."""
    critical = [True] * len(importances)
    budget = relaxed_share
    for i in sorted(range(len(importances)), key=lambda i: (importances[i], i)):
        if importances[i] > budget:
            break
        budget -= importances[i]
        critical[i] = False
    return critical


@dataclass(frozen=True)
class LayerScores:
    """Step 4's result for one layer: each group's share of the layer's output, and which MLP groups
    may be relaxed."""

    attn_importance: tuple[float, ...]
    """Per attention group, its share of the summed KV-head-group output norms."""
    mlp_importance: tuple[float, ...]
    """Per MLP group, its neurons' share of the layer's neuron importance."""
    mlp_critical: tuple[bool, ...]
    """Per MLP group: True = critical (always awaited), False = relaxed."""

    def __post_init__(self):
        if len(self.mlp_importance) != len(self.mlp_critical):
            raise ValueError("mlp_importance and mlp_critical must have one entry per MLP group")
        if not all(0.0 <= s <= 1.0 + 1e-9 for s in self.attn_importance + self.mlp_importance):
            raise ValueError("importances are shares: each must lie in [0, 1]")

    @property
    def relaxed(self) -> list[int]:
        """Indices of the relaxed MLP groups, ascending."""
        return [i for i, critical in enumerate(self.mlp_critical) if not critical]


def score_layer(groups: LayerGroups, kv_norm_sum: torch.Tensor, relaxed_share: float) -> LayerScores:
    """Step 4 for one layer: shares of the groups from their neurons' importance (MLP) and from the
    summed output norm of each KV-head group, kv_norm_sum [kv heads] (attention)."""
    mlp = group_shares(groups.mlp_lists, groups.neuron_importance)
    return LayerScores(attn_importance=tuple(shares(kv_norm_sum.tolist())), mlp_importance=tuple(mlp),
                       mlp_critical=tuple(criticality(mlp, relaxed_share)))


def plan_groups(layer: int, groups: LayerGroups, scores: LayerScores) -> list[Group]:
    """The layer's groups as plan records, attention first, not yet placed (device "")."""
    attn = [Group(f"L{layer}.attn.{i}", layer, "attn", i, m, "", True, s)
            for i, (m, s) in enumerate(zip(groups.attn, scores.attn_importance, strict=True))]
    mlp = [Group(f"L{layer}.mlp.{i}", layer, "mlp", i, m, "", c, s)
           for i, (m, s, c) in enumerate(zip(groups.mlp, scores.mlp_importance, scores.mlp_critical, strict=True))]
    return attn + mlp
