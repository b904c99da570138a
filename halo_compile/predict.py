"""Step 5, predict: train the per-layer semantic-aware predictor of which MLP groups matter.

Label: group g matters for token t when its contribution ||down[:, G] @ act_G(t)|| exceeds
`threshold` times the norm of the whole MLP output for t. Importance is contextual: a group
that is unimportant on average can dominate on some tokens, and those are the tokens where the
coordinator should wait for it rather than compensate. The network (Deja Vu style) is
Linear(hidden, rank) -> ReLU -> Linear(rank, groups), trained with class-balanced binary
cross-entropy on the sampled calibration tokens, by Adam on seeded minibatches; the last
`holdout` share of them (in text order) is held back to measure recall and precision. Training is
single-threaded and seeded so the weights, and the shard that stores them, are byte-identical
across runs.

`predict_layer` is the step for one layer: it labels the sampled tokens, trains the predictor and
measures how often it selects each group (what `predictive` loading reads on a streaming device).

Example:
    >>> import torch
    >>> from halo_compile.group import group_layer
    >>> from halo_compile.predict import predict_layer, train_predictor
    >>> x = torch.randn(512, 16); y = x[:, :3] > 0.5
    >>> p = train_predictor(x, y, rank=8, seed=0)
    >>> p.recall > 0.8
    True
    >>> m, gate, up, down = torch.randn(128, 8), torch.randn(24, 8), torch.randn(24, 8), torch.randn(8, 24)
    >>> groups = group_layer(m, gate, up, down, torch.rand(24), num_kv_heads=1, num_groups=3)
    >>> layer = predict_layer(torch.randn(128, 8), m, gate, up, down, groups, threshold=0.2, rank=4, steps=20)
    >>> len(layer.select_rate), all(0 <= r <= 1 for r in layer.select_rate), sorted(layer.tensors(5))
    (3, True, ['predictor.5.bias', 'predictor.5.down', 'predictor.5.up'])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .floats import DTYPE, settle
from .reference import mlp_activations

if TYPE_CHECKING:
    from .group import LayerGroups


@dataclass(frozen=True)
class TrainedPredictor:
    """One layer's predictor and how it did on held-back tokens."""

    weights: dict
    """down [rank, hidden], up [groups, rank], bias [groups]."""
    recall: float
    """Share of (token, group) pairs that matter which it flagged."""
    precision: float
    """Share of flagged pairs that do matter."""
    positive_rate: float
    """Share of (token, group) pairs that matter."""


def group_contributions(mlp_in: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                        groups: list[list[int]], acts: torch.Tensor | None = None) -> torch.Tensor:
    """[T, groups] norm of each group's contribution, and the full output norm as a last column.
    `acts` [T, intermediate]: the MLP activations of mlp_in where the caller has them."""
    act = mlp_activations(mlp_in, gate, up) if acts is None else acts
    # one group at a time, adding up the whole output as we go: never [groups, T, hidden] at once
    # (an 8B layer's 16 groups x 4096 tokens x 4096 hidden would be 1 GB)
    norms, total = [], None
    for g in groups:
        part = act[:, g] @ down[:, g].T
        norms.append(part.norm(dim=-1))
        total = part if total is None else total.add_(part)
    norms.append(total.norm(dim=-1) if total is not None else torch.zeros(act.shape[0]))
    return torch.stack(norms, dim=1)


def matters(contrib: torch.Tensor, threshold: float) -> torch.Tensor:
    """[T, groups] bool labels from group_contributions' output."""
    return contrib[:, :-1] > threshold * contrib[:, -1:].clamp_min(1e-12)


MAX_EPOCHS = 200
"""Passes over the training tokens at most, whatever `steps` asks: with few tokens (an 8B compile
samples 1,024) 600 steps of 512 would be 375 passes; on an 8B-shape layer 300 steps did as well
(held-back recall 0.8745, precision 0.931) as 600 (0.8692, 0.930) in half the time. SmolLM2's and
the 1B shape's 3,276 training tokens stay at 600 steps (94 passes)."""


def _batches(n: int, batch: int, steps: int, gen: torch.Generator) -> list[torch.Tensor | None]:
    """Row indices of each step's minibatch: seeded shuffles of 0..n-1, cut into batches (None =
    the whole set, when a batch would hold it all); at most MAX_EPOCHS passes over the n rows."""
    per_step = n if batch <= 0 or batch >= n else batch
    steps = min(steps, max(1, -(-MAX_EPOCHS * n // per_step)))
    if per_step == n:
        return [None] * steps
    out: list[torch.Tensor | None] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[s:s + batch] for s in range(0, n - batch + 1, batch)]
    return out[:steps]


def _uniform(shape: tuple[int, int], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform weights of variance 1 / fan_in, in float64, from `gen`'s bits (the same on every CPU)."""
    return (torch.rand(shape, generator=gen, dtype=DTYPE) * 2 - 1) * (3 / fan_in) ** 0.5


def train_predictor(x: torch.Tensor, labels: torch.Tensor, rank: int = 32, seed: int = 0,
                    steps: int = 600, lr: float = 1e-2, holdout: float = 0.2, batch: int = 512) -> TrainedPredictor:
    """x [T, hidden] predictor inputs, labels [T, groups] bool; batch: tokens per Adam step (0 = all).

    Minibatches, not the whole set per step: a step's cost then does not grow with the sample (on
    SmolLM2, 600 steps of 512 tokens match 300 full-batch steps of 3,276 in recall and precision,
    at a third of the work; on a 1B layer a tenth)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        T, d = x.shape
        G = labels.shape[1]
        n_train = max(1, int(T * (1 - holdout)))
        # float64 throughout, settled at the end: the same weights on every CPU (halo_compile.floats)
        x = x.to(DTYPE)
        xt, yt = x[:n_train], labels[:n_train].to(DTYPE)
        # uniform, not normal, initial weights of the same variance: torch draws normal numbers with
        # the CPU's own log and cos (vectorised on AVX2), uniform ones from the generator's bits alone
        down = torch.nn.Parameter(_uniform((rank, d), d, gen))
        up = torch.nn.Parameter(_uniform((G, rank), rank, gen))
        bias = torch.nn.Parameter(torch.zeros(G, dtype=DTYPE))
        # recall matters more than precision: a missed important group costs accuracy, a false
        # alarm only costs a wait, so positives are weighted up to balance the classes
        pos = yt.mean(0).clamp(1e-3, 1 - 1e-3)
        pos_weight = ((1 - pos) / pos).clamp(max=20.0)
        opt = torch.optim.Adam([down, up, bias], lr=lr)
        for rows in _batches(n_train, batch, steps, gen):
            xb, yb = (xt, yt) if rows is None else (xt[rows], yt[rows])
            opt.zero_grad()
            logits = torch.relu(xb @ down.T) @ up.T + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yb, pos_weight=pos_weight)
            loss.backward()
            opt.step()
        weights = {"down": settle(down.detach()), "up": settle(up.detach()), "bias": settle(bias.detach())}
        xv, yv = (x[n_train:], labels[n_train:]) if T - n_train > 0 else (xt, labels[:n_train])
        with torch.no_grad():
            pred = predict_groups(xv, weights)
        tp = float((pred & yv).sum())
        recall = tp / max(float(yv.sum()), 1.0)
        precision = tp / max(float(pred.sum()), 1.0)
        return TrainedPredictor(weights, recall, precision, float(labels.float().mean()))
    finally:
        torch.set_num_threads(threads)


def predict_groups(x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """[T, groups] True where the predictor flags a group: the formula of the runtime's
    `halo_runtime.core.predictor` (numpy there), in torch, which the compiler's figures come from
    (in x's float type: the compiler's float64, where CPUs agree)."""
    w = {k: v.to(x.dtype) for k, v in weights.items()}
    return (torch.relu(x @ w["down"].T) @ w["up"].T + w["bias"]) > 0


@dataclass(frozen=True)
class LayerPredictor:
    """Step 5's result for one layer: its trained predictor, and how often it selects each MLP group."""

    trained: TrainedPredictor
    """The predictor's weights and its held-back recall and precision."""
    select_rate: tuple[float, ...]
    """Per MLP group, the share of sampled tokens on which the predictor selects it (6 significant
    digits, as plan.json keeps it)."""

    def __post_init__(self):
        if len(self.select_rate) != self.trained.weights["bias"].shape[0]:
            raise ValueError("select_rate needs one entry per MLP group the predictor scores")
        if not all(0.0 <= r <= 1.0 for r in self.select_rate):
            raise ValueError("select rates are shares: each must lie in [0, 1]")

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """Its weights under the coordinator shard's names (`halo_runtime.core.predictor.layer_predictor`)."""
        return {f"predictor.{layer}.{k}": v for k, v in self.trained.weights.items()}


def predict_layer(attn_in: torch.Tensor, mlp_in: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  down: torch.Tensor, groups: LayerGroups, threshold: float, rank: int, seed: int = 0,
                  steps: int = 600, acts: torch.Tensor | None = None) -> LayerPredictor:
    """Step 5 for one layer: train on the sampled tokens' layer inputs attn_in [T, hidden] to flag the
    groups that matter, by the label computed from the same tokens' MLP inputs mlp_in [T, hidden]
    (or their MLP activations `acts` [T, intermediate], where the caller has them)."""
    contrib = group_contributions(mlp_in, gate, up, down, groups.mlp_lists, acts)
    trained = train_predictor(attn_in, matters(contrib, threshold), rank, seed, steps=steps)
    with torch.no_grad():
        rates = predict_groups(attn_in, trained.weights).float().mean(0)
    return LayerPredictor(trained, tuple(float(f"{r:.6g}") for r in rates.tolist()))
