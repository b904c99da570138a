"""Step 4, score: how much each group matters, and whether it may be skipped when late.

Importance of an MLP neuron is its expected contribution norm to the layer output,
E|act_i| * ||down_proj[:, i]||; a group's importance is its neurons' share of the layer total.
An attention group's importance is its KV-head group's share of the summed output norms.

Criticality: attention groups are always critical (their KV cache must stay complete). MLP
groups are relaxed from the least important upwards while their cumulative share stays within
`relaxed_share`; the rest are critical. A relaxed group that misses its deadline is replaced by
its calibration-mean contribution (`mean_contribution`), which the coordinator holds.

Example:
    >>> import torch
    >>> from halo_compile.score import criticality
    >>> criticality([0.5, 0.3, 0.15, 0.05], relaxed_share=0.2)
    [True, True, False, False]
"""
from __future__ import annotations

import torch


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


def mean_contribution(mean_act: torch.Tensor, down_proj: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """[groups, hidden] each group's calibration-mean contribution down[:, G] @ E[act_G]."""
    rows = [down_proj[:, g] @ mean_act[g].to(down_proj.dtype) for g in groups]
    return torch.stack(rows) if rows else torch.zeros(0, down_proj.shape[0])
