"""The coordinator's runs of rounds that no remote device takes part in, each one ggml graph.

A token's work is a list of rounds, two per layer (attention, then MLP). A round whose groups all
sit on the coordinator sends nothing; consecutive such rounds form a *segment*, computed by one
graph call with everything inside: the norms, the coordinator's heads and neurons, the residual
adds, the embedding lookup when the segment opens the token and the final norm and LM head when it
closes it. On a one-device plan the whole token is one segment: one call per token. Between
segments sit the network rounds (`coordinator.Coordinator`), where the coordinator posts the
round's input, computes its own part meanwhile and adds what comes back.

Example (the checked-in plan asks the network in every round, so its segments are the token's two
ends: the embedding before round 0 and the LM head after the last round):
    >>> from halo_runtime.core.plan import load_plan
    >>> from halo_runtime.core.segment import schedule
    >>> steps = schedule(load_plan("artifacts/smollm2-135m-pi5"))
    >>> steps[0], steps[1], steps[-1], len(steps)
    (Segment(rounds=(), embed=True, head=False, predictor_layer=None), (0, 'attn'), Segment(rounds=(), embed=False, head=True, predictor_layer=None), 62)
"""
from __future__ import annotations

from dataclasses import dataclass

import ggml.ggml as G
import numpy as np

from .device import DeviceCompute
from .formats import weight_format
from .ggmlops import Arena, GraphCache, mul_mat, new_input
from .layers import Rows, attention, kv_keys, mlp, rms_norm
from .plan import Plan


@dataclass(frozen=True)
class Segment:
    """Consecutive local rounds, computed in one graph."""

    rounds: tuple[tuple[int, str], ...]
    """(layer, "attn" | "mlp") rounds in order; empty for a segment that only embeds or only
    projects onto the vocabulary."""
    embed: bool
    """It opens the token: its input is token ids, looked up in the embedding table."""
    head: bool
    """It closes the token: its output is logits (final norm and LM head)."""
    predictor_layer: int | None
    """The layer whose MLP round follows remotely with this segment holding its attention round:
    the segment also outputs that layer's normalised input, which the predictor reads."""

    @property
    def attends(self) -> bool:
        """It holds an attention round, so it reads and writes KV caches (and rows' positions)."""
        return any(kind == "attn" for _, kind in self.rounds)


def schedule(plan: Plan) -> list:
    """A token's steps: Segments for runs of local rounds, (layer, kind) for network rounds; the
    first step embeds and the last projects onto the vocabulary (segments of no rounds if needed)."""
    remote = set(plan.network_rounds())
    rounds = [(layer, kind) for layer in range(plan.model.num_layers) for kind in ("attn", "mlp")]
    steps, run = [], []

    def close(head: bool):
        nonlocal run
        follow = None
        if not head and run and run[-1][1] == "attn":
            follow = run[-1][0]
        steps.append(Segment(tuple(run), embed=not steps, head=head, predictor_layer=follow))
        run = []

    for r in rounds:
        if r in remote:
            if run or not steps:
                close(head=False)
            steps.append(r)
        else:
            run.append(r)
    close(head=True)
    return steps


class Tables:
    """The coordinator's tensors outside the device slices: embeddings, norms and LM head, as ggml
    tensors (and the norms as numpy arrays, for network rounds)."""

    def __init__(self, cfg, weights: str, shard: dict[str, np.ndarray], arena: Arena):
        fmt = weight_format(weights)
        f32 = lambda name: np.ascontiguousarray(shard[name], dtype=np.float32)  # noqa: E731
        self.norms = [(f32(f"layers.{i}.input_layernorm"), f32(f"layers.{i}.post_attention_layernorm"))
                      for i in range(cfg.num_layers)]
        self.g_norms = [(arena.array(a), arena.array(b)) for a, b in self.norms]
        self.g_final = arena.array(f32("norm"))
        self.embed = arena.matrix(np.ascontiguousarray(shard["embed_tokens"]), fmt, cfg.hidden_size)
        self.head = (arena.matrix(np.ascontiguousarray(shard["lm_head"]), fmt, cfg.hidden_size)
                     if "lm_head" in shard else self.embed)


def build(ctx, seg: Segment, dev, tables: Tables, T: int, keys: int, all_positions: bool, base: int = 0):
    """The graph of one segment for T rows: (inputs, outputs) as `ggmlops.Graph` wants them.
    Inputs: tokens (int32 [T]) or h ([T, hidden]), and the rows' positions when it attends;
    outputs: h or logits ([T or 1, vocab]), and x of `predictor_layer`. base: the KV-cache row of
    the session's position 0 (`layers.Rows`)."""
    cfg = dev.cfg
    eps, hidden = cfg.rms_norm_eps, cfg.hidden_size
    inputs, outputs = {}, {}
    if seg.embed:
        tokens = new_input(ctx, G.GGML_TYPE_I32, T)
        inputs["tokens"] = tokens
        h = G.ggml_get_rows(ctx, tables.embed, tokens)
    else:
        h = inputs["h"] = new_input(ctx, G.GGML_TYPE_F32, T, hidden)
    rows = None
    if seg.attends:
        rows = Rows.inputs(ctx, T, keys, dev.factors, base)
        inputs.update(rows.named())
    per_col = dev.fmt.bytes_per_col
    for layer, kind in seg.rounds:
        in_norm, post_norm = tables.g_norms[layer]
        if kind == "attn":
            x = rms_norm(ctx, h, in_norm, eps)
            if layer == seg.predictor_layer:
                outputs["x"] = x
            q, k, v, o = dev.attn[layer]
            h = G.ggml_add(ctx, h, attention(ctx, cfg, x, q, k, v, o, dev.caches[layer], rows))
        else:
            m = rms_norm(ctx, h, post_norm, eps)
            gate, up, down = dev.mlp_w[layer]
            (y,) = mlp(ctx, m, gate, up, down, [(0, down.contents.ne[0])], per_col)
            h = G.ggml_add(ctx, h, y)
    if seg.head:
        if not all_positions and T > 1:
            h = G.ggml_view_2d(ctx, h, hidden, 1, h.contents.nb[1], (T - 1) * h.contents.nb[1])
        outputs["logits"] = mul_mat(ctx, tables.head, rms_norm(ctx, h, tables.g_final, eps))
    else:
        outputs["h"] = h
    return inputs, outputs


class Runner:
    """Runs segments on a device's weights (the coordinator's, or a whole draft model's), keeping
    the graphs of short passes (decode, draft verification) per (segment, T, keys)."""

    def __init__(self, dev, tables: Tables, capacity: int, threads: int = 1):
        self.dev, self.tables, self.capacity, self.threads = dev, tables, capacity, threads
        self.graphs = GraphCache()

    def run(self, key, seg: Segment, inp: np.ndarray, start: int, all_positions: bool = False, slot: int = 0):
        """Segment `seg` (cached under `key`) on T rows at `start` of session `slot`, fed token ids
        (an embedding segment) or h: (h or None, the predictor's x or None, logits or None)."""
        T = inp.shape[0]
        if start + T > self.capacity and seg.attends:
            # ggml would abort the process writing the KV cache past its end (DeviceCompute checks alike)
            raise ValueError(f"{self.dev.name}: positions up to {start + T} exceed the context {self.capacity}")
        keys = kv_keys(start, T, self.capacity) if seg.attends else 0
        base = slot * self.capacity if seg.attends else 0
        graph = self.graphs.get((key, T, all_positions, base), T, keys,
                                lambda ctx: build(ctx, seg, self.dev, self.tables, T, keys, all_positions, base))
        graph.inputs["tokens" if seg.embed else "h"][:] = inp
        if seg.attends:
            Rows.fill(graph.inputs, start, base)
        out = self.graphs.run(graph, T, self.threads)
        return out.get("h"), out.get("x"), out.get("logits")

    def close(self) -> None:
        self.graphs.close()


class LocalModel:
    """A whole model on this machine, each pass one graph: a draft checkpoint on the coordinator.
    `shard` holds its weights under shard names (layers.L.attn.q_proj, ..., embed_tokens, norm)."""

    def __init__(self, cfg, shard: dict[str, np.ndarray], weights: str, capacity: int, threads: int = 1):
        self.dev = DeviceCompute.whole_model(cfg, shard, weights, capacity, threads)
        self.segment = Segment(tuple((i, k) for i in range(cfg.num_layers) for k in ("attn", "mlp")),
                               embed=True, head=True, predictor_layer=None)
        self.runner = Runner(self.dev, Tables(cfg, weights, shard, self.dev.arena), capacity, threads)

    def logits(self, tokens: list[int], start: int, all_positions: bool = False) -> np.ndarray:
        """Logits of `tokens` fed at `start` (the cache past it is overwritten): [vocab], or [T, vocab]."""
        _, _, logits = self.runner.run(0, self.segment, np.asarray(tokens, dtype=np.int32), start, all_positions)
        return logits if all_positions else logits[-1]
