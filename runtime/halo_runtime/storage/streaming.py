"""A device that computes its groups from a memory-mapped shard under a memory budget.

`StreamingCompute` is a `DeviceCompute` whose weights come from a `GroupCache`: layers whose
groups all fit stay resident as whole tensors, the others are assembled per call from the
cache. The pipeline per layer l: the attention request carries l's normalised input x, which is
exactly what the predictor reads, so on receiving it the device predicts l's MLP selection and
queues those groups, then layer l+1's attention groups and (from the same x, speculatively) its
MLP selection; the background thread reads them while attention computes, the reply travels,
the coordinator aggregates and the MLP request comes back. No extra bytes on the wire.

Modes: `exact` computes every group (the cache reads missed ones on demand; streamed groups are
concatenated back into the shard's layout, so the math is the full shard's: equal up to BLAS
rounding, which here varies in the last bits with where a tensor sits in memory);
`predictive` computes only the MLP groups the predictor selects for the token (any token of the
round), the others contribute zero.

Example (the checked-in plan's cluster with a toy 3-layer MLP on pi5-3, its shard written to a
temporary directory, and a budget for two of the three layers: the third is read when needed):
    >>> import dataclasses, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from halo_runtime.core.device import DeviceCompute
    >>> from halo_runtime.core.model import ModelConfig
    >>> from halo_runtime.core.plan import Group, load_plan
    >>> from halo_runtime.storage.groupcache import LoadConfig
    >>> from halo_runtime.storage.streaming import open_streaming
    >>> cfg = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=6, num_layers=3,
    ...                   num_heads=2, num_kv_heads=1, head_dim=4)
    >>> groups = tuple(Group(f"L{i}.mlp.0", i, "mlp", 0, tuple(range(6)), "pi5-3", True, 1.0) for i in range(3))
    >>> plan = dataclasses.replace(load_plan("artifacts/smollm2-135m-pi5"), model=cfg, groups=groups)
    >>> shapes = {"gate_proj": (6, 8), "up_proj": (6, 8), "down_proj": (8, 6)}
    >>> shard = {f"layers.{i}.mlp.{p}": torch.randn(s) for i in range(3) for p, s in shapes.items()}
    >>> plan_dir = (tmp := tempfile.TemporaryDirectory()).name
    >>> save_file(shard, f"{plan_dir}/{plan.shard_file('pi5-3')}")
    >>> dev = open_streaming(plan, plan_dir, "pi5-3", LoadConfig(budget=2 * 576, mode="exact", cold=False))
    >>> held, x = DeviceCompute(plan, "pi5-3", shard), torch.randn(2, 8)
    >>> all(torch.allclose(dev.mlp(i, x)[0], held.mlp(i, x)[0], atol=1e-6) for i in range(3))
    True
    >>> dev.cache.stats.summary()["hit_rate"] < 1          # a group came from storage
    True
    >>> dev.close()
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.device import DeviceCompute
from ..core.model import KVCache, attention_partial, mlp_activations
from ..core.plan import Plan, PlanError
from ..core.predictor import layer_predictor, predict_groups
from ..core.residency import Residency, residency
from ..core.shards import device_indices
from .groupcache import GroupCache, LoadConfig, Storage, group_parts

_NAMES = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
_DIMS = {"attn": (0, 0, 0, 1), "mlp": (0, 0, 1)}


def plan_budget(plan: Plan, device: str) -> int | None:
    """Weight bytes the plan lets `device` hold in RAM, or None if it does not stream."""
    dev = plan.device(device)
    if dev.storage_mbps <= 0 or not any(g.streamed for g in plan.groups if g.device == device):
        return None
    rep = next(r for r in plan.device_reports if r.name == device)
    return dev.memory_bytes - rep.kv_cache_bytes


class StreamingCompute(DeviceCompute):
    """One device's part of the plan, its weights loaded as needed under `config.budget`."""

    def __init__(self, plan: Plan, device: str, storage: Storage, config: LoadConfig,
                 predictors: list | None = None):
        """predictors: per layer the predictor weights (from the coordinator's shard); needed for
        `predictive` mode, used in `exact` mode to read the likely-active groups first."""
        if device == plan.coordinator:
            raise ValueError("the coordinator cannot stream its weights (it holds the residual stream)")
        if config.mode == "predictive" and predictors is None:
            raise ValueError("predictive loading needs the predictor (the coordinator's shard)")
        self.plan, self.cfg, self.name, self.mode = plan, plan.model, device, config.mode
        L = plan.model.num_layers
        self.slices = [device_indices(plan, device, layer) for layer in range(L)]
        self.caches = [KVCache() for _ in range(L)]
        self.predictors = predictors
        self.residency: Residency = residency(plan, device, config.budget)
        self.ids = {(layer, kind): [g.id for g in plan.groups_on(device, layer, kind)]
                    for layer in range(L) for kind in ("attn", "mlp")}
        self.whole: dict[tuple, tuple] = {}  # (layer, kind) -> shard tensors, when all its groups are resident
        parts = {}
        for (layer, kind), ids in self.ids.items():
            if not ids:
                continue
            gp = group_parts(plan, device, layer, kind)
            if all(g in self.residency.resident for g in ids):
                self.whole[layer, kind] = tuple(storage.tensor(f"layers.{layer}.{kind}.{n}") for n in _NAMES[kind])
            else:
                parts.update(gp)
        self.cache = GroupCache(storage, parts, self.residency)
        self.selected: dict[int, torch.Tensor] = {}
        self.pairs = [0, 0]  # predictive: (token, group) pairs computed, of all
        self.sizes = {g.id: len(g.members) for g in plan.groups if g.device == device}
        self.critical = {g.id for g in plan.groups if g.device == device and g.critical}
        self.index = {g.id: g.index for g in plan.groups if g.device == device}

    # ---- scheduling -----------------------------------------------------------------------------

    def _predict(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """[T, groups of the layer] True where the predictor says the token needs the group."""
        if self.predictors is None or not self.ids[layer, "mlp"]:
            return None
        return predict_groups(x.float(), self.predictors[layer])

    def _mlp_order(self, layer: int, flags: torch.Tensor | None) -> list[str]:
        ids = self.ids[layer, "mlp"]
        if flags is None:
            return list(ids)
        on = [g for g in ids if bool(flags[:, self.index[g]].any())]
        return on if self.mode == "predictive" else on + [g for g in ids if g not in on]

    def _schedule(self, layer: int, x: torch.Tensor | None) -> None:
        """Queue what the next rounds need: this layer's MLP, then the next layer's attention and MLP."""
        nxt = (layer + 1) % self.cfg.num_layers  # after the last layer: the next token's first
        order = []
        if x is not None:
            self.selected[layer] = self._predict(layer, x)
            order += self._mlp_order(layer, self.selected[layer])
        order += self.ids[nxt, "attn"]
        # the next layer's selection, guessed from this layer's input (the residual stream drifts slowly)
        order += self._mlp_order(nxt, self._predict(nxt, x) if x is not None else None)
        self.cache.prefetch([g for g in order if g in self.cache.parts])

    # ---- compute --------------------------------------------------------------------------------

    def _weights(self, layer: int, kind: str, ids: list[str]) -> tuple:
        """Shard-layout tensors of `ids` (in shard order) of one layer and kind."""
        whole = self.whole.get((layer, kind))
        if whole is not None:  # resident groups count as hits, as they do in the cache
            with self.cache.cond:
                self.cache.stats.needed += len(ids)
                self.cache.stats.hits += len(ids)
        if whole is not None and len(ids) == len(self.ids[layer, kind]):
            return whole
        if whole is not None:  # an MLP layer held whole, some groups skipped: slices of it, no reads
            starts, at = {}, 0
            for g in self.ids[layer, kind]:
                starts[g], at = at, at + self.sizes[g]
            return tuple(torch.cat([t.narrow(dim, starts[g], self.sizes[g]) for g in ids], dim)
                         for t, dim in zip(whole, _DIMS[kind]))
        got = self.cache.get(ids)
        return tuple(torch.cat([g[i] for g in got], dim) if len(got) > 1 else got[0][i]
                     for i, dim in enumerate(_DIMS[kind]))

    def attention(self, layer: int, x: torch.Tensor, start: int) -> torch.Tensor:
        self._schedule(layer, x)
        q, k, v, o = self._weights(layer, "attn", self.ids[layer, "attn"])
        cache = self.caches[layer]
        if cache.length != start:
            cache.truncate(start)
        out = attention_partial(self.cfg, x, start, q, k, v, o, cache)
        self.cache.release(self.ids[layer, "attn"])
        return out

    def mlp(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        ids = self.ids[layer, "mlp"]
        flags = self.selected.pop(layer, None)
        if self.mode == "predictive" and flags is not None:
            cols = [self.index[g] for g in ids]
            self.pairs[0] += int(flags[:, cols].sum())
            self.pairs[1] += flags.shape[0] * len(cols)
            keep = [g for g in ids if bool(flags[:, self.index[g]].any())]  # needed by some token
            self.cache.stats.skipped += len(ids) - len(keep)
        else:
            keep, flags = ids, None
        if not self.ids[layer, "attn"]:
            self._schedule(layer, None)  # no attention request this layer: queue the next one now
        has_crit, has_rlx = any(g in self.critical for g in ids), any(g not in self.critical for g in ids)
        zeros = torch.zeros(x.shape[0], self.cfg.hidden_size, dtype=x.dtype)
        if not keep:
            return (zeros if has_crit else None), (zeros.clone() if has_rlx else None)
        gate, up, down = self._weights(layer, "mlp", keep)
        n_crit = sum(self.sizes[g] for g in keep if g in self.critical)
        act = mlp_activations(x, gate, up)
        if flags is not None and x.shape[0] > 1:
            # several tokens (prefill, evaluation): each token keeps only its own selected groups
            cols = torch.tensor([self.index[g] for g in keep for _ in range(self.sizes[g])])
            act = act * flags[:, cols].to(act.dtype)
        critical = act[:, :n_crit] @ down[:, :n_crit].T if n_crit else (zeros if has_crit else None)
        relaxed = act[:, n_crit:] @ down[:, n_crit:].T if act.shape[1] > n_crit else (zeros if has_rlx else None)
        self.cache.release(keep)
        return critical, relaxed

    def mlp_groups(self, layer: int, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError("per-group simulation reads the whole shard; use DeviceCompute")

    def close(self) -> None:
        self.cache.close()
        self.cache.storage.close()


def open_streaming(plan: Plan, plan_dir: str | Path, device: str, config: LoadConfig) -> StreamingCompute:
    """A StreamingCompute over the device's shard file; the predictor comes from the coordinator's
    shard in the same directory (copy it to the board too), read once (a few hundred KB)."""
    path = Path(plan_dir) / plan.shard_file(device)
    if not path.exists():
        raise PlanError(f"{path}: shard of device {device} is missing (recompile or copy it here)")
    predictors = None
    coord = Path(plan_dir) / plan.shard_file(plan.coordinator)
    if coord.exists():
        store = Storage(coord)
        try:
            keys = {n: store.tensor(n) for n in store.names() if n.startswith("predictor.")}
        finally:
            store.close()
        predictors = [layer_predictor(keys, layer) for layer in range(plan.model.num_layers)]
    return StreamingCompute(plan, device, Storage(path, mbps=config.mbps, cold=config.cold), config, predictors)
