"""The semantic-aware predictor, device side: which MLP groups matter for this token.

Per layer, a low-rank network reads the layer's normalised input (available before attention
runs, so the answer is ready before the MLP round) and scores every MLP group of that layer.
The compiler trains it (halo_compile.predict); the coordinator only evaluates it.

Example:
    >>> import numpy as np
    >>> from halo_runtime.core.predictor import predict_groups
    >>> w = {"down": np.zeros((4, 8), np.float32), "up": np.zeros((3, 4), np.float32),
    ...      "bias": np.array([1.0, -1.0, 0.5], np.float32)}
    >>> predict_groups(np.ones((2, 8), np.float32), w).tolist()
    [[True, False, True], [True, False, True]]
"""
from __future__ import annotations

import numpy as np


def predictor_logits(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """x [T, hidden] -> logits [T, groups]."""
    return np.maximum(x @ weights["down"].T, 0) @ weights["up"].T + weights["bias"]


def predict_groups(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """[T, groups] True where the group is predicted to matter for that token."""
    return predictor_logits(x, weights) > 0


def layer_predictor(shard: dict[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """The predictor weights of one layer from the coordinator's shard."""
    return {k: np.asarray(shard[f"predictor.{layer}.{k}"], dtype=np.float32) for k in ("down", "up", "bias")}
