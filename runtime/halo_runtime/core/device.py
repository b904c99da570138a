"""What one device computes: its attention heads (with their KV cache) and its MLP neurons.

The same class serves a worker process, the coordinator's own groups, and in-process
simulation, so every path runs the identical math. MLP output is split in two partial sums,
critical and relaxed, because the coordinator treats them differently (await vs deadline); the
coordinator's own part is one sum (it is never sent, so never late).

Example (the checked-in plan's cluster with a toy one-layer model; pi5-1 holds everything):
    >>> import dataclasses, torch
    >>> from halo_runtime.core.device import DeviceCompute
    >>> from halo_runtime.core.model import ModelConfig, mlp_partial
    >>> from halo_runtime.core.plan import Group, load_plan
    >>> cfg = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=6, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1, head_dim=4)
    >>> groups = (Group("L0.attn.0", 0, "attn", 0, (0,), "pi5-1", True, 1.0),
    ...           Group("L0.mlp.0", 0, "mlp", 0, (0, 1, 2, 3), "pi5-1", True, 0.8),
    ...           Group("L0.mlp.1", 0, "mlp", 1, (4, 5), "pi5-1", False, 0.2))
    >>> plan = dataclasses.replace(load_plan("artifacts/smollm2-135m-pi5"), model=cfg, groups=groups)
    >>> shapes = {"attn.q_proj": (8, 8), "attn.k_proj": (4, 8), "attn.v_proj": (4, 8), "attn.o_proj": (8, 8),
    ...           "mlp.gate_proj": (6, 8), "mlp.up_proj": (6, 8), "mlp.down_proj": (8, 6)}
    >>> shard = {f"layers.0.{name}": torch.randn(shape) for name, shape in shapes.items()}
    >>> dev = DeviceCompute(plan, "pi5-1", shard)
    >>> x = torch.randn(3, 8)                                    # 3 tokens' normalised inputs
    >>> tuple(dev.attention(0, x, start=0).shape), dev.cache_length(0)
    ((3, 8), 3)
    >>> critical, relaxed = dev.mlp(0, x)                        # neurons 0-3, and 4-5
    >>> full = mlp_partial(x, *(shard[f"layers.0.mlp.{p}"] for p in ("gate_proj", "up_proj", "down_proj")))
    >>> torch.allclose(critical + relaxed, full, atol=1e-5)
    True
"""
from __future__ import annotations

import torch

from . import kernels
from .model import KVCache, attend, linear, swiglu
from .plan import Plan
from .shards import device_indices, fuse_rows


class DeviceCompute:
    """The slice of every layer that one device holds, and its KV cache."""

    def __init__(self, plan: Plan, device: str, shard: dict[str, torch.Tensor]):
        self.plan, self.cfg, self.name = plan, plan.model, device
        self.slices = [device_indices(plan, device, layer) for layer in range(plan.model.num_layers)]
        self.attn_weights, self.mlp_weights = [], []  # per layer: ((q|k|v), o) and ((gate|up), down)
        self.shard, self._group_downs = shard, {}
        # the coordinator's own MLP part is never sent, so it is never late: no critical/relaxed
        # split, one product (a kernel call and a sum fewer per layer in decode)
        self.one_mlp_part = device == plan.coordinator
        # quantised weights, and fp32 ones in a process given several threads (torch's one-token
        # product runs on one), go through the kernels chosen by measurement in this process
        through_kernels = plan.weights != "fp32" or kernels.THREADS > 1
        if through_kernels:
            from .qcompute import device_weights
        for layer, s in enumerate(self.slices):
            pre = f"layers.{layer}"
            # rows that read the same input are multiplied in one call: q, k and v; gate and up
            fused = {}
            if s.kv_heads:
                fused.update(fuse_rows(shard, [f"{pre}.attn.{p}" for p in ("q_proj", "k_proj", "v_proj")],
                                       f"{pre}.attn.qkv", device))
            if s.neurons:
                fused.update(fuse_rows(shard, [f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj"], f"{pre}.mlp.gate_up",
                                       device))
            if through_kernels:
                attn, mlp = device_weights(plan, device, shard, fused, layer, self.one_mlp_part)
            else:
                attn = (fused[f"{pre}.attn.qkv"], shard[f"{pre}.attn.o_proj"]) if s.kv_heads else None
                mlp = (fused[f"{pre}.mlp.gate_up"], shard[f"{pre}.mlp.down_proj"]) if s.neurons else None
            self.attn_weights.append(attn)
            self.mlp_weights.append(mlp)
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
        qkv, o = self.attn_weights[layer]
        cache = self.caches[layer]
        if cache.length != start:
            # a retransmitted request for tokens already cached: recompute from the cached prefix
            cache.truncate(start)
        heads = attend(self.cfg, linear(x, qkv), start, cache)
        return linear(heads.reshape(x.shape[0], -1), o)

    def mlp(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(critical partial, relaxed partial) of this device's MLP neurons; None where it has none.
        The coordinator gets (all of its neurons, None)."""
        gate_up, down = self.mlp_weights[layer]
        n_crit = self.slices[layer].n_critical
        act = swiglu(linear(x, gate_up))
        if self.one_mlp_part:
            return linear(act, down), None
        if not isinstance(down, torch.Tensor):  # quantised: the parts are (critical, relaxed) groups
            crit, rlx = down.parts(act)
            return (crit if n_crit else None), (rlx if act.shape[1] > n_crit else None)
        critical = act[:, :n_crit] @ down[:, :n_crit].T if n_crit else None
        relaxed = act[:, n_crit:] @ down[:, n_crit:].T if act.shape[1] > n_crit else None
        return critical, relaxed

    def mlp_groups(self, layer: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Each of this device's MLP groups' partial sum, in `Plan.groups_on` order (for simulation)."""
        gate_up, down = self.mlp_weights[layer]
        act = swiglu(linear(x, gate_up))
        if not isinstance(down, torch.Tensor):
            if layer not in self._group_downs:  # built on first use: simulation only
                from .qcompute import group_linear
                self._group_downs[layer] = group_linear(self.plan, self.name, self.shard, layer)
            return self._group_downs[layer].parts(act)
        out, at = [], 0
        for g in self.plan.groups_on(self.name, layer, "mlp"):
            n = len(g.members)
            out.append(act[:, at:at + n] @ down[:, at:at + n].T)
            at += n
        return out
