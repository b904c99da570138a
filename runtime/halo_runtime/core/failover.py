"""A survivor's compute after a device died: its own groups plus those the plan's failover gives it.

The compiler solved, for each device holding critical groups, where its groups go if it dies
(`Plan.failover`), and put their weights in the survivors' shards (`shards.failover_tensor`,
mapped from the file, read only once used). When the coordinator declares that device dead, every
survivor that adopts some of its groups builds them as one more `DeviceCompute` (`adopt`) and
answers each round with the sum of both (`WithAdopted`): the same messages, the same reply kinds,
one graph call more per round where it adopted something. Their KV cache is rebuilt from the
attention inputs the coordinator sent this session (exactly the rows the dead device received).

Example (the toy cluster of `core.device`'s example: pi5-2 dies, pi5-1 takes its MLP group):
    >>> import dataclasses
    >>> import numpy as np
    >>> from halo_runtime.core.config import ModelConfig
    >>> from halo_runtime.core.device import DeviceCompute
    >>> from halo_runtime.core.failover import WithAdopted
    >>> from halo_runtime.core.plan import Failover, Group, load_plan
    >>> cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1, head_dim=16)
    >>> groups = (Group("L0.attn.0", 0, "attn", 0, (0,), "pi5-1", True, 1.0),
    ...           Group("L0.mlp.0", 0, "mlp", 0, tuple(range(32)), "pi5-1", True, 0.8),
    ...           Group("L0.mlp.1", 0, "mlp", 1, tuple(range(32, 64)), "pi5-2", True, 0.2))
    >>> plan = dataclasses.replace(load_plan("artifacts/smollm2-135m-pi5"), model=cfg, groups=groups, max_context=8,
    ...     failover=(Failover("pi5-2", (("L0.mlp.1", "pi5-1"),), 1.0, 0.0),))
    >>> rng = np.random.default_rng(0)
    >>> w = {"gate": rng.standard_normal((64, 32)), "up": rng.standard_normal((64, 32)),
    ...      "down": rng.standard_normal((32, 64))}
    >>> def mlp_shard(rows):  # a shard's MLP tensors for neurons `rows`
    ...     return {"layers.0.mlp.gate_proj": w["gate"][rows].astype(np.float32),
    ...             "layers.0.mlp.up_proj": w["up"][rows].astype(np.float32),
    ...             "layers.0.mlp.down_proj": np.ascontiguousarray(w["down"][:, rows], dtype=np.float32)}
    >>> attn = {f"layers.0.attn.{p}": rng.standard_normal((32 if p in ("q_proj", "o_proj") else 16, 32)
    ...         ).astype(np.float32) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    >>> mine = {**attn, **mlp_shard(slice(0, 32)), **{f"failover.pi5-2.{k}": v for k, v in mlp_shard(slice(32, 64)).items()}}
    >>> both = WithAdopted(DeviceCompute(plan, "pi5-1", mine), adopt(plan, "pi5-2", "pi5-1", mine))
    >>> x = rng.standard_normal((2, 32)).astype(np.float32)
    >>> critical, relaxed = both.mlp(0, x)
    >>> g, u, d = (w[k].astype(np.float32) for k in ("gate", "up", "down"))
    >>> whole = ((x @ g.T) / (1 + np.exp(-(x @ g.T))) * (x @ u.T)) @ d.T
    >>> bool(np.allclose(critical, whole, rtol=1e-4, atol=1e-4)), relaxed
    (True, None)
"""
from __future__ import annotations

import numpy as np

from .device import DeviceBackend, DeviceCompute
from .plan import Plan
from .shards import adopted_plan, adopted_shard


def adopt(plan: Plan, dead: str, holder: str, shard: dict[str, np.ndarray], threads: int = 1) -> DeviceCompute | None:
    """What `holder` computes of `dead`'s groups (its shard's failover tensors); None if nothing."""
    sub = adopted_plan(plan, dead, holder)
    return None if sub is None else DeviceCompute(sub, holder, adopted_shard(shard, dead), threads)


def _add(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """a + b in this order (the order fixes the bits), None where neither has a part."""
    if a is None or b is None:
        return b if a is None else a
    return a + b


class WithAdopted:
    """A `DeviceBackend`: a device's own compute and what it adopted, summed per round (own first)."""

    def __init__(self, own: DeviceBackend, adopted: DeviceCompute):
        self.own, self.adopted = own, adopted

    def has_attention(self, layer: int) -> bool:
        return self.own.has_attention(layer) or self.adopted.has_attention(layer)

    def has_mlp(self, layer: int) -> bool:
        return self.own.has_mlp(layer) or self.adopted.has_mlp(layer)

    def reset(self) -> None:
        self.own.reset()
        self.adopted.reset()

    @property
    def slots(self) -> int:
        return min(self.own.slots, self.adopted.slots)

    def cache_length(self, layer: int, slot: int = 0) -> int:
        part = self.own if self.own.has_attention(layer) else self.adopted
        return part.cache_length(layer, slot)

    def attention(self, layer: int, x: np.ndarray, start: int, slot: int = 0) -> np.ndarray:
        own = self.own.attention(layer, x, start, slot) if self.own.has_attention(layer) else None
        adopted = self.adopted.attention(layer, x, start, slot) if self.adopted.has_attention(layer) else None
        return _add(own, adopted)

    def attention_spans(self, layer: int, x: np.ndarray, spans: tuple) -> np.ndarray:
        own = self.own.attention_spans(layer, x, spans) if self.own.has_attention(layer) else None
        adopted = self.adopted.attention_spans(layer, x, spans) if self.adopted.has_attention(layer) else None
        return _add(own, adopted)

    def mlp(self, layer: int, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        own = self.own.mlp(layer, x) if self.own.has_mlp(layer) else (None, None)
        adopted = self.adopted.mlp(layer, x) if self.adopted.has_mlp(layer) else (None, None)
        return _add(own[0], adopted[0]), _add(own[1], adopted[1])

    def mlp_groups(self, layer: int, x: np.ndarray) -> list[np.ndarray]:
        return self.own.mlp_groups(layer, x) + self.adopted.mlp_groups(layer, x)

    def rebuild(self, layer: int, x: np.ndarray, slot: int = 0) -> None:
        """Fill the adopted heads' KV cache of `layer` in `slot` with the rows of positions 0.. (a failover)."""
        if self.adopted.has_attention(layer) and x.shape[0]:
            self.adopted.attention(layer, x, 0, slot)

    def close(self) -> None:
        self.adopted.close()
