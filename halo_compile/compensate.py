"""Step 4b, compensate: a small estimate of each relaxed group's output, for when its reply is missing.

When a relaxed part misses its deadline the coordinator must add something in its place. The
calibration mean removes only ~3% of the error (a group's output varies far more than its mean).
The coordinator does hold the layer's MLP input, so it can compute a cheap function of it: for
each relaxed group we keep its `rank` most important neurons exactly (their gate and up rows) and
refit their down projection, plus a bias, by least squares on the sampled calibration tokens.
Neurons grouped by co-activation fire together, so a few of them explain much of the rest: with
16 neurons the held-back error is about half that of the mean. The estimate is a SwiGLU
(`halo_runtime.model.mlp_partial` plus a bias), and the estimates of a device's relaxed groups
add up to one SwiGLU, so the coordinator evaluates a whole missing part in one call.

Coordinator shard tensors per layer i (G MLP groups, R relaxed groups, r = rank, h = hidden):
    compensation.{i}.mean   [G, h]      every group's calibration-mean contribution
    compensation.{i}.groups [R] int64   group indices, ascending
    compensation.{i}.gate   [R, r, h]   gate rows of the kept neurons (zero rows pad small groups)
    compensation.{i}.up     [R, r, h]   up rows
    compensation.{i}.down   [R, r, h]   refit down projection, transposed
    compensation.{i}.bias   [R, h]

`compensate_layer` is the step for one layer (the low-rank tensors only when rank > 0).

Example:
    >>> import torch
    >>> from halo_compile.compensate import compensate_layer, lowrank_compensation
    >>> from halo_compile.group import LayerGroups
    >>> from halo_compile.score import LayerScores
    >>> x, gate, up, down = torch.randn(256, 8), torch.randn(12, 8), torch.randn(12, 8), torch.randn(8, 12)
    >>> est = lowrank_compensation(x, gate, up, down, [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]], [1],
    ...                            torch.rand(12), rank=4)
    >>> tuple(est.tensors["gate"].shape), est.error[0] < 1e-6      # a 4-neuron group is kept whole
    ((1, 4, 8), True)
    >>> groups = LayerGroups(mlp=(tuple(range(8)), (8, 9, 10, 11)), attn=((0,),), neuron_importance=torch.rand(12))
    >>> scores = LayerScores(attn_importance=(1.0,), mlp_importance=(0.9, 0.1), mlp_critical=(True, False))
    >>> comp = compensate_layer(torch.rand(12), x, gate, up, down, groups, scores, rank=4)
    >>> tuple(comp.mean.shape), comp.lowrank.tensors["groups"].tolist(), list(comp.tensors(2))[:2]
    ((2, 8), [1], ['compensation.2.mean', 'compensation.2.groups'])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .floats import DTYPE, settle
from .reference import mlp_activations

if TYPE_CHECKING:
    from .group import LayerGroups
    from .score import LayerScores

RIDGE = 1e-6
"""Ridge on the least-squares refit, relative to the mean feature energy: only guards singularity."""


@dataclass(frozen=True)
class Compensation:
    """One layer's low-rank compensation and how well it did on held-back tokens."""

    tensors: dict
    """groups, gate, up, down, bias (see the module docstring), without the name prefix."""
    error: list
    """Per relaxed group: held-back squared error of the estimate / squared output (zero-fill = 1)."""
    mean_error: list
    """The same for the calibration-mean compensation."""


def lowrank_compensation(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                         groups: list[list[int]], relaxed: list[int], importance: torch.Tensor,
                         rank: int = 16, holdout: float = 0.2) -> Compensation:
    """x [T, hidden] sampled MLP inputs; groups: the layer's MLP groups; relaxed: indices of those
    that get an estimator; importance [intermediate]: picks the neurons kept.

    Fitted on the first 1 - holdout of the tokens (text order) and scored on the rest. Single
    threaded so the shard's bytes do not depend on the machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        T, h = x.shape
        # recomputed here, under one thread, rather than taken from the grouping step: BLAS results
        # can depend on the thread count, and the shard's bytes must not. Only the relaxed groups'
        # neurons (a row of gate and up gives its column: the same numbers as the whole product's,
        # at a fraction of the cost for an 8B layer's 14,336 neurons).
        needed = sorted({n for gi in relaxed for n in groups[gi]})
        col = {n: c for c, n in enumerate(needed)}
        rows = torch.tensor(needed, dtype=torch.long)
        act = mlp_activations(x, gate.index_select(0, rows), up.index_select(0, rows))
        n_fit = max(1, int(T * (1 - holdout))) if T > 1 else T
        # gate and up rows are the model's own (float32 values, exact); down and bias are fitted, in float64
        out = {k: torch.zeros(len(relaxed), rank, h) for k in ("gate", "up")}
        out["down"] = torch.zeros(len(relaxed), rank, h, dtype=DTYPE)
        bias = torch.zeros(len(relaxed), h, dtype=DTYPE)
        error, mean_error = [], []
        for row, gi in enumerate(relaxed):
            members = groups[gi]
            y = (act[:, [col[n] for n in members]] @ down[:, members].T).double()
            kept = sorted(members, key=lambda n: (-float(importance[n]), n))[:rank]
            feats = torch.cat([act[:, [col[n] for n in kept]].double(), torch.ones(T, 1, dtype=torch.float64)], 1)
            f, t = feats[:n_fit], y[:n_fit]
            gram = f.T @ f
            gram += RIDGE * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=torch.float64)
            w = torch.linalg.solve(gram, f.T @ t)  # [kept + 1, hidden]
            k = len(kept)
            out["gate"][row, :k] = gate[kept]
            out["up"][row, :k] = up[kept]
            out["down"][row, :k] = w[:k]
            bias[row] = w[k]
            held = slice(n_fit, T) if T > n_fit else slice(0, T)
            energy = float((y[held] ** 2).sum()) or 1.0
            error.append(float(((y[held] - feats[held] @ w) ** 2).sum()) / energy)
            mean_error.append(float(((y[held] - t.mean(0)) ** 2).sum()) / energy)
        out["down"] = settle(out["down"])  # the same bytes on every CPU (halo_compile.floats)
        tensors = {"groups": torch.tensor(relaxed, dtype=torch.int64), **out, "bias": settle(bias)}
        return Compensation(tensors, error, mean_error)
    finally:
        torch.set_num_threads(threads)


def mean_contribution(mean_act: torch.Tensor, down_proj: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """[groups, hidden] each group's calibration-mean contribution down[:, G] @ E[act_G]."""
    rows = [down_proj[:, g] @ mean_act[g].to(down_proj.dtype) for g in groups]
    return torch.stack(rows) if rows else torch.zeros(0, down_proj.shape[0])


@dataclass(frozen=True)
class LayerCompensation:
    """Step 4b's result for one layer: what the coordinator adds in place of a missing relaxed group."""

    mean: torch.Tensor
    """[mlp groups, hidden] every group's calibration-mean contribution."""
    lowrank: Compensation | None
    """Low-rank estimates of the relaxed groups; None when the rank is 0 (the mean alone)."""

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """Its tensors under the coordinator shard's names (see the module docstring)."""
        out = {f"compensation.{layer}.mean": self.mean}
        if self.lowrank is not None:
            out.update({f"compensation.{layer}.{k}": v for k, v in self.lowrank.tensors.items()})
        return out


def compensate_layer(mean_act: torch.Tensor, mlp_in: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                     down: torch.Tensor, groups: LayerGroups, scores: LayerScores, rank: int) -> LayerCompensation:
    """Step 4b for one layer: mean_act [intermediate] is E[activation] over all calibration tokens,
    mlp_in [T, hidden] the sampled MLP inputs the low-rank estimates are fitted on."""
    members = groups.mlp_lists
    lowrank = lowrank_compensation(mlp_in, gate, up, down, members, scores.relaxed, groups.neuron_importance,
                                   rank) if rank else None
    return LayerCompensation(settle(mean_contribution(mean_act, down, members)), lowrank)
