"""The semantic-aware predictor, device side: which MLP groups matter for this token.

Per layer, a low-rank network reads the layer's normalised input (available before attention
runs, so the answer is ready before the MLP round) and scores every MLP group of that layer.
The compiler trains it (halo_compile.predict); the coordinator only evaluates it.

Example:
    >>> import torch
    >>> from halo_runtime.core.predictor import predict_groups
    >>> w = {"down": torch.zeros(4, 8), "up": torch.zeros(3, 4), "bias": torch.tensor([1.0, -1.0, 0.5])}
    >>> predict_groups(torch.ones(2, 8), w).tolist()
    [[True, False, True], [True, False, True]]
"""
from __future__ import annotations

import torch


def predictor_logits(x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [T, hidden] -> logits [T, groups]."""
    return torch.relu(x @ weights["down"].T) @ weights["up"].T + weights["bias"]


def predict_groups(x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """[T, groups] True where the group is predicted to matter for that token."""
    return predictor_logits(x, weights) > 0


def layer_predictor(shard: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The predictor weights of one layer from the coordinator's shard."""
    return {k: shard[f"predictor.{layer}.{k}"] for k in ("down", "up", "bias")}
