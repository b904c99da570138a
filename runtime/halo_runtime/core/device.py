"""What one device computes: its attention heads (with their KV cache) and its MLP neurons.

The same class serves a worker process, the coordinator's own groups, and in-process
simulation, so every path runs the identical math. MLP output is split in two partial sums,
critical and relaxed, because the coordinator treats them differently (await vs deadline).

Example:
    >>> from halo_runtime.core.device import DeviceCompute
    >>> # dev = DeviceCompute(plan, "pi5-1", load_shard(plan_dir, plan, "pi5-1"))
    >>> # partial = dev.attention(layer=0, x=normed, start=0)     -> [T, hidden]
    >>> # critical, relaxed = dev.mlp(layer=0, x=normed)           -> [T, hidden] each, or None
"""
from __future__ import annotations

import torch

from .model import KVCache, attention_partial, mlp_activations
from .plan import Plan
from .shards import device_indices


class DeviceCompute:
    """The slice of every layer that one device holds, and its KV cache."""

    def __init__(self, plan: Plan, device: str, shard: dict[str, torch.Tensor]):
        self.plan, self.cfg, self.name = plan, plan.model, device
        self.slices = [device_indices(plan, device, layer) for layer in range(plan.model.num_layers)]
        self.attn_weights, self.mlp_weights = [], []
        for layer, s in enumerate(self.slices):
            pre = f"layers.{layer}"
            self.attn_weights.append(
                tuple(shard[f"{pre}.attn.{p}"] for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
                if s.kv_heads else None)
            self.mlp_weights.append(
                tuple(shard[f"{pre}.mlp.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
                if s.neurons else None)
        self.caches = [KVCache() for _ in range(plan.model.num_layers)]

    def has_attention(self, layer: int) -> bool:
        return bool(self.slices[layer].kv_heads)

    def has_mlp(self, layer: int) -> bool:
        return bool(self.slices[layer].neurons)

    def reset(self) -> None:
        self.caches = [KVCache() for _ in range(self.cfg.num_layers)]

    def cache_length(self, layer: int) -> int:
        return self.caches[layer].length

    def attention(self, layer: int, x: torch.Tensor, start: int) -> torch.Tensor:
        """Partial attention output of this device's KV-head groups for tokens at start.. ."""
        q, k, v, o = self.attn_weights[layer]
        cache = self.caches[layer]
        if cache.length != start:
            # a retransmitted request for tokens already cached: recompute from the cached prefix
            cache.truncate(start)
        positions = torch.arange(start, start + x.shape[0])
        return attention_partial(self.cfg, x, positions, q, k, v, o, cache)

    def mlp(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(critical partial, relaxed partial) of this device's MLP neurons; None where it has none."""
        gate, up, down = self.mlp_weights[layer]
        n_crit = self.slices[layer].n_critical
        act = mlp_activations(x, gate, up)
        critical = act[:, :n_crit] @ down[:, :n_crit].T if n_crit else None
        relaxed = act[:, n_crit:] @ down[:, n_crit:].T if act.shape[1] > n_crit else None
        return critical, relaxed

    def mlp_groups(self, layer: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Each of this device's MLP groups' partial sum, in `Plan.groups_on` order (for simulation)."""
        gate, up, down = self.mlp_weights[layer]
        act = mlp_activations(x, gate, up)
        out, at = [], 0
        for g in self.plan.groups_on(self.name, layer, "mlp"):
            n = len(g.members)
            out.append(act[:, at:at + n] @ down[:, at:at + n].T)
            at += n
        return out
