"""What the coordinator (or any view of push rounds) does about a remote device's relaxed groups:
which tokens to await them on (the predictor), and what stands in for them when they miss.

Per layer and device, a `RelaxedPart` holds the device's relaxed group indices, their calibration
mean and, if the plan has it, their low-rank estimator (`compensation.{layer}.*` of the
coordinator's shard, fitted by halo_compile.compensate); `awaited_rows` asks the predictor,
`estimate` computes the stand-in.

Example (a missing part estimated by its calibration mean on its missing row only):
    >>> import numpy as np
    >>> part = RelaxedPart([0], np.ones(2, np.float32), None, frozenset([0]))
    >>> estimate("mean", part, np.zeros((2, 2), np.float32), np.array([False, True])).tolist()
    [[0.0, 0.0], [1.0, 1.0]]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import Plan
from .predictor import predict_groups

_ONE_ROW = np.ones(1, dtype=bool)
"""`awaited` rows of a one-token round (read only: exchanges never write into it)."""


@dataclass
class RelaxedPart:
    """A remote device's relaxed groups in one layer, and what stands in for them when missing."""

    groups: list[int]
    """Their indices among the layer's MLP groups (predictor and compensation columns)."""
    mean: np.ndarray
    """[hidden] sum of their calibration-mean contributions."""
    lowrank: tuple | None
    """(gate, up, down, bias) of their low-rank estimates, concatenated; None if the plan has none."""
    group_set: frozenset = frozenset()
    """The same indices as a set, for decode's one-row test."""


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def relaxed_parts(plan: Plan, shard: dict[str, np.ndarray], devices: list[str],
                  lowrank: bool) -> list[dict[str, RelaxedPart]]:
    """Per layer: which of `devices` hold relaxed groups under `plan`, and what stands in for them
    (from `shard`'s compensation tensors; their low-rank estimates too if `lowrank`)."""
    out = []
    for i in range(plan.model.num_layers):
        means = np.asarray(shard[f"compensation.{i}.mean"], dtype=np.float32)
        per_dev = {}
        for dev in devices:
            idx = [g.index for g in plan.groups_on(dev, i, "mlp") if not g.critical]
            if idx:
                per_dev[dev] = RelaxedPart(idx, means[idx].sum(0), _lowrank(shard, i, idx) if lowrank else None,
                                            frozenset(idx))
        out.append(per_dev)
    return out


def awaited_rows(relaxed: dict[str, RelaxedPart], predictor: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """Device -> bool [T]: the tokens of x where the predictor flags one of the device's relaxed
    groups (`relaxed`: device -> its part); devices flagged on no token are left out."""
    if not relaxed:
        return {}
    flagged = predict_groups(x, predictor)
    if x.shape[0] == 1:  # decode: one row, one look at which groups are flagged
        hot = set(np.flatnonzero(flagged[0]).tolist())
        return {dev: _ONE_ROW for dev, part in relaxed.items() if hot & part.group_set}
    out = {}
    for dev, part in relaxed.items():
        rows = flagged[:, part.groups].any(1)
        if rows.any():
            out[dev] = rows
    return out


def estimate(compensation: str, part: RelaxedPart, m: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """What stands in for a relaxed `part` on the missing `rows` of MLP input m (zeros elsewhere;
    None for "zero"), by `compensation` (one of COMPENSATIONS)."""
    if compensation == "zero":
        return None
    every = bool(rows.all())
    if compensation == "mean":
        if every:
            return np.broadcast_to(part.mean, m.shape)
        return rows[:, None].astype(np.float32) * part.mean
    gate, up, down, bias = part.lowrank
    # only the missing rows are estimated: in decode that is one token, rarely
    mm = m if every else m[rows]
    est = (silu(mm @ gate.T) * (mm @ up.T)) @ down.T + bias
    if every:
        return est
    out = np.zeros_like(m)
    out[rows] = est
    return out


def _lowrank(shard: dict[str, np.ndarray], layer: int, groups: list[int]) -> tuple:
    """The low-rank estimators of `groups`, concatenated: their sum is one SwiGLU plus a bias."""
    pre = f"compensation.{layer}"
    rows = {int(g): r for r, g in enumerate(np.asarray(shard[f"{pre}.groups"]).tolist())}
    pick = np.array([rows[g] for g in groups], dtype=np.int64)
    gate, up, down = (np.asarray(shard[f"{pre}.{k}"], dtype=np.float32)[pick] for k in ("gate", "up", "down"))
    hidden = gate.shape[-1]
    return (gate.reshape(-1, hidden), up.reshape(-1, hidden), np.ascontiguousarray(down.reshape(-1, hidden).T),
            np.asarray(shard[f"{pre}.bias"], dtype=np.float32)[pick].sum(0))
