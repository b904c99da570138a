"""What one device computes: its attention heads (with their KV cache) and its MLP neurons, each
round as one ggml graph computed by one call.

The same class serves a worker process, the coordinator's own groups, and in-process simulation,
so every path runs the identical math (`layers`). Its weights are the shard's arrays, multiplied
where they lie (a memory-mapped shard is never copied). MLP output is split in two partial sums,
critical and relaxed, because the coordinator treats them differently (await vs deadline); the
coordinator's own part is one sum (it is never sent, so never late).

`DeviceBackend` is the seam: what a worker, the in-process exchange and the coordinator ask of a
device. `DeviceCompute` (every weight in RAM) and `storage.streaming.StreamingCompute` (weights
read from storage under a memory budget) both provide it.

Example (the checked-in plan's cluster with a toy one-layer model; pi5-1 holds everything):
    >>> import dataclasses
    >>> import numpy as np
    >>> from halo_runtime.core.config import ModelConfig
    >>> from halo_runtime.core.device import DeviceCompute
    >>> from halo_runtime.core.plan import Group, load_plan
    >>> cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1, head_dim=16)
    >>> groups = (Group("L0.attn.0", 0, "attn", 0, (0,), "pi5-1", True, 1.0),
    ...           Group("L0.mlp.0", 0, "mlp", 0, tuple(range(40)), "pi5-1", True, 0.8),
    ...           Group("L0.mlp.1", 0, "mlp", 1, tuple(range(40, 64)), "pi5-1", False, 0.2))
    >>> plan = dataclasses.replace(load_plan("artifacts/smollm2-135m-pi5"), model=cfg, groups=groups, max_context=64,
    ...                            failover=())
    >>> rng = np.random.default_rng(0)
    >>> shapes = {"attn.q_proj": (32, 32), "attn.k_proj": (16, 32), "attn.v_proj": (16, 32), "attn.o_proj": (32, 32),
    ...           "mlp.gate_proj": (64, 32), "mlp.up_proj": (64, 32), "mlp.down_proj": (32, 64)}
    >>> shard = {f"layers.0.{n}": rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    >>> dev = DeviceCompute(plan, "pi5-1", shard)
    >>> x = rng.standard_normal((3, 32)).astype(np.float32)      # 3 tokens' normalised inputs
    >>> dev.attention(0, x, start=0).shape, dev.cache_length(0)
    ((3, 32), 3)
    >>> critical, relaxed = dev.mlp(0, x)                       # neurons 0-39, and 40-63
    >>> g, u, d = (shard[f"layers.0.mlp.{p}_proj"] for p in ("gate", "up", "down"))
    >>> act = (x @ g.T) / (1 + np.exp(-(x @ g.T))) * (x @ u.T)
    >>> bool(np.allclose(critical + relaxed, act @ d.T, rtol=1e-4, atol=1e-4))
    True
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .formats import weight_format
from .ggmlops import Arena, GraphCache, new_input, row_bucket
from .layers import KVCache, Rows, attention, kv_keys, mlp, rope_factors
from .plan import Plan, PlanError
from .shards import LayerSlice, device_indices
from .spans import Span

import ggml.ggml as G



ATTENTION_NODES = 64
"""Nodes an attention round's graph may hold (it has ~20; an MLP round's has 4 + 3 per part):
a graph's context is sized to it, and a device keeps hundreds of graphs."""


class DeviceBackend(Protocol):
    """A device's share of the model, as a worker, the in-process exchange and the coordinator use it.
    Arrays are float32 [T, hidden]; `start` is the position of the first of the T rows."""

    def has_attention(self, layer: int) -> bool: ...

    def has_mlp(self, layer: int) -> bool: ...

    def reset(self) -> None:
        """Forget every session's KV cache."""

    def cache_length(self, layer: int, slot: int = 0) -> int: ...

    def attention(self, layer: int, x: np.ndarray, start: int, slot: int = 0) -> np.ndarray:
        """Partial attention output of its KV-head groups for rows at start.. of session `slot`
        (cached from there on)."""

    def attention_spans(self, layer: int, x: np.ndarray, spans: tuple) -> np.ndarray:
        """`attention` of several sessions' rows (`spans.Span`s, in row order), one pass."""

    def mlp(self, layer: int, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(critical partial, relaxed partial) of its MLP neurons; None where it has none."""

    def mlp_groups(self, layer: int, x: np.ndarray) -> list[np.ndarray]:
        """Each of its MLP groups' partial sum, in `Plan.groups_on` order (for simulation)."""


class DeviceCompute:
    """The slice of every layer that one device holds, its KV cache, and its rounds as graphs."""

    def __init__(self, plan: Plan | None, device: str, shard: dict[str, np.ndarray], threads: int = 1,
                 layout: tuple | None = None):
        """layout: (config, weight format, layer slices, context) for a model without a plan
        (`whole_model`, one session); otherwise they come from the plan, with its session slots."""
        self.plan, self.name, self.threads = plan, device, threads
        self.slots = 1 if layout is not None else plan.session_slots()
        if layout is None:
            layout = (plan.model, plan.weights, [device_indices(plan, device, layer)
                                                 for layer in range(plan.model.num_layers)], plan.max_context)
        cfg, weights, self.slices, capacity = layout
        self.cfg, self.fmt = cfg, weight_format(weights)
        self.arena = Arena()
        factors = rope_factors(cfg)
        self.factors = None if factors is None else self.arena.array(factors)
        # the coordinator's own MLP part is never sent, so it is never late: one product, no split
        self.one_mlp_part = plan is None or device == plan.coordinator
        self.attn, self.mlp_w, self.caches = [], [], []
        for layer, s in enumerate(self.slices):
            pre = f"layers.{layer}"
            attn = mlp_w = cache = None
            if s.kv_heads:
                attn = tuple(self._matrix(shard, f"{pre}.attn.{p}", cfg.hidden_size) for p in ("q_proj", "k_proj", "v_proj")) \
                    + (self._matrix(shard, f"{pre}.attn.o_proj", len(s.q_heads) * cfg.head_dim),)
                cache = KVCache(self.arena, len(s.kv_heads), capacity, cfg.head_dim, self.slots)
            if s.neurons:
                mlp_w = (self._matrix(shard, f"{pre}.mlp.gate_proj", cfg.hidden_size),
                         self._matrix(shard, f"{pre}.mlp.up_proj", cfg.hidden_size),
                         self._matrix(shard, f"{pre}.mlp.down_proj", len(s.neurons)))
            self.attn.append(attn)
            self.mlp_w.append(mlp_w)
            self.caches.append(cache)
        self.lengths = np.zeros((self.slots, cfg.num_layers), dtype=np.int64)
        """Rows each session slot's KV cache holds, per layer."""
        self.graphs = GraphCache()

    @classmethod
    def whole_model(cls, cfg, shard: dict[str, np.ndarray], weights: str, capacity: int, threads: int = 1,
                    name: str = "model") -> DeviceCompute:
        """Every head and neuron of a model whose shard-named weights are `shard` (a draft checkpoint)."""
        whole = LayerSlice(tuple(range(cfg.num_kv_heads)), tuple(range(cfg.num_heads)),
                           tuple(range(cfg.intermediate_size)), cfg.intermediate_size)
        return cls(None, name, shard, threads, (cfg, weights, [whole] * cfg.num_layers, capacity))

    def _matrix(self, shard, name: str, cols: int):
        if name not in shard:
            raise PlanError(f"shard of {self.name}: missing tensor {name}")
        try:
            return self.arena.matrix(np.ascontiguousarray(shard[name]), self.fmt, cols)
        except ValueError as e:
            raise PlanError(f"shard of {self.name}: {name}: {e}") from None

    def has_attention(self, layer: int) -> bool:
        return self.attn[layer] is not None

    def has_mlp(self, layer: int) -> bool:
        return self.mlp_w[layer] is not None

    def reset(self) -> None:
        self.lengths[:] = 0

    def cache_length(self, layer: int, slot: int = 0) -> int:
        return int(self.lengths[slot, layer])

    def attention(self, layer: int, x: np.ndarray, start: int, slot: int = 0) -> np.ndarray:
        """Partial attention output of this device's KV-head groups for tokens at start.. of `slot`."""
        T = x.shape[0]
        cache = self.caches[layer]
        if start + T > cache.capacity:
            raise ValueError(f"{self.name}: positions up to {start + T} exceed the plan's context {cache.capacity}")
        if not 0 <= slot < self.slots:
            raise ValueError(f"{self.name}: session slot {slot} out of range (it holds {self.slots})")
        keys, base = kv_keys(start, T, cache.capacity), slot * cache.capacity
        q, k, v, o = self.attn[layer]

        def build(ctx):
            rows = Rows.inputs(ctx, T, keys, self.factors, base)
            xin = new_input(ctx, G.GGML_TYPE_F32, T, self.cfg.hidden_size)
            return {"x": xin, **rows.named()}, {"y": attention(ctx, self.cfg, xin, q, k, v, o, cache, rows)}

        graph = self.graphs.get((layer, "attn", T, slot), T, keys, build, ATTENTION_NODES)
        graph.inputs["x"][:] = x
        Rows.fill(graph.inputs, start, base)
        # a retransmitted request for tokens already cached overwrites them from `start`
        self.lengths[slot, layer] = start + T
        return self.graphs.run(graph, T, self.threads)["y"]

    def attention_spans(self, layer: int, x: np.ndarray, spans: tuple[Span, ...]) -> np.ndarray:
        """`attention` of several sessions' rows in one graph: the projections over every row at
        once, each span attending to its own slot's keys (`layers.attention`); the same bits as a
        pass per span. The graph is kept until the spans' shape (rows, slot, cached keys) changes."""
        self.take_prefixes(spans, (layer,))
        if len(spans) == 1:
            return self.attention(layer, x, spans[0].start, spans[0].slot)
        T, cache = x.shape[0], self.caches[layer]
        for s in spans:
            if s.start + s.rows > cache.capacity:
                raise ValueError(f"{self.name}: positions up to {s.start + s.rows} exceed the plan's context "
                                 f"{cache.capacity}")
            if not 0 <= s.slot < self.slots:
                raise ValueError(f"{self.name}: session slot {s.slot} out of range (it holds {self.slots})")
        # every window reads the longest one's keys (masked keys are skipped: the same bits), so the
        # graph is rebuilt when that bucket grows or sessions come and go, not each time one of
        # eight sessions crosses a bucket
        keys = max(kv_keys(s.start, s.rows, cache.capacity) for s in spans)
        windows = tuple((s.rows, s.slot * cache.capacity, keys) for s in spans)
        q, k, v, o = self.attn[layer]

        def build(ctx):
            rows = Rows.of_windows(ctx, windows, self.factors)
            xin = new_input(ctx, G.GGML_TYPE_F32, T, self.cfg.hidden_size)
            return {"x": xin, **rows.named()}, {"y": attention(ctx, self.cfg, xin, q, k, v, o, cache, rows)}

        graph = self.graphs.get((layer, "attn", T, "spans"), T, windows, build,
                                ATTENTION_NODES + 8 * len(spans))
        graph.inputs["x"][:] = x
        Rows.fill_windows(graph.inputs, [(s.start, base) for s, (_, base, _) in zip(spans, windows)])
        for s in spans:
            self.lengths[s.slot, layer] = s.start + s.rows
        return self.graphs.run(graph, T, self.threads)["y"]

    def take_prefixes(self, spans: tuple[Span, ...], layers=None) -> None:
        """For each span with a `source`, its slot takes that slot's KV rows before the span's start,
        in `layers` (default: every layer it holds heads of). The source must hold them."""
        for s in spans:
            if s.source is None:
                continue
            for layer in range(len(self.caches)) if layers is None else layers:
                cache = self.caches[layer]
                if cache is None:
                    continue
                if self.lengths[s.source, layer] < s.start:
                    raise ValueError(f"{self.name}: layer {layer}: slot {s.slot} takes {s.start} rows of slot "
                                     f"{s.source}, which holds {self.lengths[s.source, layer]}")
                cache.copy_prefix(s.source, s.slot, s.start)
                self.lengths[s.slot, layer] = s.start

    def _mlp_parts(self, layer: int, x: np.ndarray, parts: list[tuple[int, int]], kind: str) -> list[np.ndarray]:
        gate, up, down = self.mlp_w[layer]
        T, per_col = x.shape[0], self.fmt.bytes_per_col
        # short passes run padded to a few row counts: rows are independent (a row's bits do not
        # depend on its pass), and a graph per count of every batch's rows would fill the memory
        P = row_bucket(T)

        def build(ctx):
            xin = new_input(ctx, G.GGML_TYPE_F32, P, self.cfg.hidden_size)
            outs = mlp(ctx, xin, gate, up, down, parts, per_col)
            return {"x": xin}, {f"y{i:03d}": y for i, y in enumerate(outs)}

        graph = self.graphs.get((layer, kind, P), P, 0, build, 16 + 4 * len(parts))
        graph.inputs["x"][:T] = x
        graph.inputs["x"][T:] = 0.0
        out = self.graphs.run(graph, P, self.threads)
        return [out[k][:T] for k in sorted(out)]

    def mlp(self, layer: int, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(critical partial, relaxed partial) of this device's MLP neurons; None where it has none.
        The coordinator gets (all of its neurons, None)."""
        n, n_crit = len(self.slices[layer].neurons), self.slices[layer].n_critical
        if self.one_mlp_part or n_crit in (0, n):
            (out,) = self._mlp_parts(layer, x, [(0, n)], "mlp")
            return (None, out) if n_crit == 0 and not self.one_mlp_part else (out, None)
        crit, rlx = self._mlp_parts(layer, x, [(0, n_crit), (n_crit, n)], "mlp")
        return crit, rlx

    def mlp_groups(self, layer: int, x: np.ndarray) -> list[np.ndarray]:
        """Each of this device's MLP groups' partial sum, in `Plan.groups_on` order (for simulation)."""
        parts, at = [], 0
        for g in self.plan.groups_on(self.name, layer, "mlp"):
            parts.append((at, at + len(g.members)))
            at += len(g.members)
        return self._mlp_parts(layer, x, parts, "groups")

    def close(self) -> None:
        self.graphs.close()
        self.arena.close()
