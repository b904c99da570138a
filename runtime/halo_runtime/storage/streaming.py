"""A device that computes its groups from a memory-mapped shard under a memory budget.

`StreamingCompute` is a `DeviceCompute` whose weights come from a `GroupCache`: layers whose
groups all fit stay resident as whole tensors, the others are assembled per call from the
cache. The pipeline per layer l: the attention request carries l's normalised input x, which is
exactly what the predictor reads, so on receiving it the device predicts l's MLP selection and
queues those groups, then layer l+1's attention groups and (from the same x, speculatively) its
MLP selection; the background thread reads them while attention computes, the reply travels,
the coordinator aggregates and the MLP request comes back. No extra bytes on the wire.

Modes: `exact` computes every group (the cache reads missed ones on demand; streamed groups are
concatenated back into the shard's layout and multiplied by the same ggml graph as
`DeviceCompute`'s, so the answer is the full shard's);
`predictive` computes only the MLP groups the predictor selects for the token (any token of the
round), the others contribute zero.

Example (the checked-in plan's cluster with a toy 3-layer MLP on pi5-3, its shard written to a
temporary directory, and a budget for two of the three layers: the third is read when needed):
    >>> import dataclasses, tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> from halo_runtime.core.config import ModelConfig
    >>> from halo_runtime.core.device import DeviceCompute
    >>> from halo_runtime.core.plan import Group, load_plan
    >>> from halo_runtime.storage.groupcache import LoadConfig
    >>> from halo_runtime.storage.streaming import open_streaming
    >>> cfg = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=6, num_layers=3,
    ...                   num_heads=2, num_kv_heads=1, head_dim=4)
    >>> groups = tuple(Group(f"L{i}.mlp.0", i, "mlp", 0, tuple(range(6)), "pi5-3", True, 1.0) for i in range(3))
    >>> plan = dataclasses.replace(load_plan("artifacts/smollm2-135m-pi5"), model=cfg, groups=groups, failover=())
    >>> rng = np.random.default_rng(0)
    >>> shapes = {"gate_proj": (6, 8), "up_proj": (6, 8), "down_proj": (8, 6)}
    >>> shard = {f"layers.{i}.mlp.{p}": rng.standard_normal(s).astype(np.float32) for i in range(3) for p, s in shapes.items()}
    >>> plan_dir = (tmp := tempfile.TemporaryDirectory()).name
    >>> save_file(shard, f"{plan_dir}/{plan.shard_file('pi5-3')}")
    >>> dev = open_streaming(plan, plan_dir, "pi5-3", LoadConfig(budget=2 * 576, mode="exact", cold=False))
    >>> held, x = DeviceCompute(plan, "pi5-3", shard), rng.standard_normal((2, 8)).astype(np.float32)
    >>> all(np.array_equal(dev.mlp(i, x)[0], held.mlp(i, x)[0]) for i in range(3))
    True
    >>> dev.cache.stats.summary()["hit_rate"] < 1          # a group came from storage
    True
    >>> dev.close()
"""
from __future__ import annotations

from pathlib import Path

import ggml.ggml as G
import numpy as np

from ..core.device import DeviceCompute
from ..core.formats import cat_columns, weight_format
from ..core.ggmlops import Arena, Graph, new_input
from ..core.layers import KVCache, Rows, attention, kv_keys, mlp, rope_factors
from ..core.plan import Plan, PlanError
from ..core.predictor import layer_predictor, predict_groups
from ..core.residency import Residency, residency
from ..core.shards import device_indices
from .groupcache import GroupCache, LoadConfig, Storage, group_parts

_NAMES = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
_COLUMNS = {"attn": (False, False, False, True), "mlp": (False, False, True)}
"""Which of a kind's matrices are cut by columns (o and down): their groups sit side by side."""


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
        self.plan, self.cfg, self.name, self.mode, self.threads = plan, plan.model, device, config.mode, 1
        self.fmt = weight_format(plan.weights)
        L = plan.model.num_layers
        self.slices = [device_indices(plan, device, layer) for layer in range(L)]
        self.arena = Arena()
        factors = rope_factors(self.cfg)
        self.factors = None if factors is None else self.arena.array(factors)
        self.caches = [KVCache(self.arena, len(s.kv_heads), plan.max_context, self.cfg.head_dim) if s.kv_heads
                       else None for s in self.slices]
        self.slots = 1  # its spare memory holds weights, not other sessions' KV caches
        self.lengths = np.zeros((1, L), dtype=np.int64)
        self.predictors = predictors
        self.residency: Residency = residency(plan, device, config.budget)
        self.ids = {(layer, kind): [g.id for g in plan.groups_on(device, layer, kind)]
                    for layer in range(L) for kind in ("attn", "mlp")}
        self.whole: dict[tuple, tuple] = {}  # (layer, kind) -> shard arrays, when all its groups are resident
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
        self.selected: dict[int, np.ndarray] = {}
        self.pairs = [0, 0]  # predictive: (token, group) pairs computed, of all
        self.sizes = {g.id: len(g.members) for g in plan.groups if g.device == device}
        self.critical = {g.id for g in plan.groups if g.device == device and g.critical}
        self.index = {g.id: g.index for g in plan.groups if g.device == device}

    def has_attention(self, layer: int) -> bool:
        return bool(self.ids[layer, "attn"])

    def has_mlp(self, layer: int) -> bool:
        return bool(self.ids[layer, "mlp"])

    # ---- scheduling -----------------------------------------------------------------------------

    def _predict(self, layer: int, x: np.ndarray) -> np.ndarray | None:
        """[T, groups of the layer] True where the predictor says the token needs the group."""
        if self.predictors is None or not self.ids[layer, "mlp"]:
            return None
        return predict_groups(x, self.predictors[layer])

    def _mlp_order(self, layer: int, flags: np.ndarray | None) -> list[str]:
        ids = self.ids[layer, "mlp"]
        if flags is None:
            return list(ids)
        on = [g for g in ids if flags[:, self.index[g]].any()]
        return on if self.mode == "predictive" else on + [g for g in ids if g not in on]

    def _schedule(self, layer: int, x: np.ndarray | None) -> None:
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
        """Shard-layout arrays of `ids` (in shard order) of one layer and kind."""
        whole = self.whole.get((layer, kind))
        if whole is not None:  # resident groups count as hits, as they do in the cache
            with self.cache.cond:
                self.cache.stats.needed += len(ids)
                self.cache.stats.hits += len(ids)
        if whole is not None and len(ids) == len(self.ids[layer, kind]):
            return whole
        if whole is not None:  # an MLP layer held whole, some groups skipped: slices of it, no reads
            got, at = {}, 0
            for g in self.ids[layer, kind]:
                got[g], at = (at, at + self.sizes[g]), at + self.sizes[g]
            per = self.fmt.bytes_per_col / whole[-1].dtype.itemsize
            return tuple(cat_columns([t[:, int(got[g][0] * per):int(got[g][1] * per)] for g in ids]) if col
                         else np.concatenate([t[got[g][0]:got[g][1]] for g in ids])
                         for t, col in zip(whole, _COLUMNS[kind]))
        got = self.cache.get(ids)
        return tuple((cat_columns([g[i] for g in got]) if col else np.concatenate([g[i] for g in got]))
                     if len(got) > 1 else got[0][i] for i, col in enumerate(_COLUMNS[kind]))

    def _once(self, build_outputs, *weights, cols: list[int], x: np.ndarray, rows: tuple | None = None,
              mask: np.ndarray | None = None) -> list[np.ndarray]:
        """One pass through a graph over this call's weights (they change from call to call):
        build_outputs(ctx, x, weight tensors, Rows or None, act_mask or None) -> output tensors."""
        arena = Arena(16)
        T = x.shape[0]
        try:
            tensors = [arena.matrix(np.ascontiguousarray(w), self.fmt, c) for w, c in zip(weights, cols)]

            def build(ctx):
                xin = new_input(ctx, G.GGML_TYPE_F32, T, self.cfg.hidden_size)
                r = Rows.inputs(ctx, T, rows[1], self.factors) if rows else None
                inputs = {"x": xin, **(r.named() if r else {})}
                if mask is not None:
                    inputs["act_mask"] = new_input(ctx, G.GGML_TYPE_F32, T, mask.shape[1])
                outs = build_outputs(ctx, xin, tensors, r, inputs.get("act_mask"))
                return inputs, {f"y{i}": y for i, y in enumerate(outs)}

            graph = Graph(build)
            try:
                graph.inputs["x"][:] = x
                if mask is not None:
                    graph.inputs["act_mask"][:] = mask
                if rows:
                    Rows.fill(graph.inputs, rows[0])
                graph.compute(self.threads)
                return [graph.outputs[f"y{i}"].copy() for i in range(len(graph.outputs))]
            finally:
                graph.close()
        finally:
            arena.close()

    def attention(self, layer: int, x: np.ndarray, start: int, slot: int = 0) -> np.ndarray:
        if slot:
            raise ValueError(f"{self.name} streams its weights and holds one session, not slot {slot}")
        self._schedule(layer, x)
        ws = self._weights(layer, "attn", self.ids[layer, "attn"])
        cfg, cache, T = self.cfg, self.caches[layer], x.shape[0]
        hidden, q_cols = cfg.hidden_size, ws[0].shape[0]
        (out,) = self._once(lambda ctx, xin, t, r, am: [attention(ctx, cfg, xin, *t, cache, r)], *ws,
                            cols=[hidden, hidden, hidden, q_cols], x=x, rows=(start, kv_keys(start, T, cache.capacity)))
        self.lengths[0, layer] = start + T
        self.cache.release(self.ids[layer, "attn"])
        return out

    def mlp(self, layer: int, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        ids = self.ids[layer, "mlp"]
        flags = self.selected.pop(layer, None)
        if self.mode == "predictive" and flags is not None:
            cols = [self.index[g] for g in ids]
            self.pairs[0] += int(flags[:, cols].sum())
            self.pairs[1] += flags.shape[0] * len(cols)
            keep = [g for g in ids if flags[:, self.index[g]].any()]  # needed by some token
            self.cache.stats.skipped += len(ids) - len(keep)
        else:
            keep, flags = ids, None
        if not self.ids[layer, "attn"]:
            self._schedule(layer, None)  # no attention request this layer: queue the next one now
        has_crit, has_rlx = any(g in self.critical for g in ids), any(g not in self.critical for g in ids)
        zeros = np.zeros((x.shape[0], self.cfg.hidden_size), dtype=np.float32)
        if not keep:
            return (zeros if has_crit else None), (zeros.copy() if has_rlx else None)
        gate, up, down = self._weights(layer, "mlp", keep)
        n = sum(self.sizes[g] for g in keep)
        n_crit = sum(self.sizes[g] for g in keep if g in self.critical)
        parts = [p for p in ((0, n_crit), (n_crit, n)) if p[1] > p[0]]
        mask = None
        if flags is not None and x.shape[0] > 1:
            # several tokens (prefill, evaluation): each token keeps only its own selected groups,
            # the activations of the others zeroed per row
            mask = flags[:, np.array([self.index[g] for g in keep for _ in range(self.sizes[g])])].astype(np.float32)
        per = self.fmt.bytes_per_col
        outs = self._once(lambda ctx, xin, t, r, am: mlp(ctx, xin, *t, parts, per, am), gate, up, down,
                          cols=[self.cfg.hidden_size, self.cfg.hidden_size, n], x=x, mask=mask)
        self.cache.release(keep)
        critical = outs.pop(0) if n_crit else (zeros if has_crit else None)
        relaxed = outs.pop(0) if n > n_crit else (zeros if has_rlx else None)
        return critical, relaxed

    def mlp_groups(self, layer: int, x: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError("per-group simulation reads the whole shard; use DeviceCompute")

    def close(self) -> None:
        self.cache.close()
        self.cache.storage.close()
        self.arena.close()


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
    return StreamingCompute(plan, device, Storage(path, mbps=config.mbps, cold=config.cold,
                                                  fmt=weight_format(plan.weights)), config, predictors)
