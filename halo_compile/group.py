"""Step 3, group: cluster each layer's MLP neurons into neuron groups by co-activation.

Neurons that fire together on the same tokens belong together: then, for a given token, a few
groups carry most of the layer's output and the rest can be late without much harm. We build a
k-nearest-neighbour graph on the correlation of |activation| over the sampled calibration tokens
and find communities with networkx's Louvain method (seeded, so deterministic). Communities are
then merged or split to exactly `num_groups`: splits cut a community along importance order, so
the pieces are homogeneous in importance and the least important ones can be relaxed together.
Sizes stay uneven; no rule ties them to the device count.

Attention groups are whole GQA KV-head groups: one KV head with the query heads that read it.

`group_layer` is the step for one layer; its result, `LayerGroups`, is what scoring, prediction
and compensation read.

Example:
    >>> import torch
    >>> from halo_compile.group import group_layer, group_neurons
    >>> acts = torch.randn(256, 64)
    >>> groups = group_neurons(acts, torch.rand(64), num_groups=4, seed=0)
    >>> len(groups), sorted(n for g in groups for n in g) == list(range(64))
    (4, True)
    >>> x, gate, up, down = torch.randn(128, 8), torch.randn(24, 8), torch.randn(24, 8), torch.randn(8, 24)
    >>> layer = group_layer(x, gate, up, down, mean_abs_act=torch.rand(24), num_kv_heads=2, num_groups=3)
    >>> len(layer.mlp), sorted(n for g in layer.mlp for n in g) == list(range(24)), layer.attn
    (3, True, ((0,), (1,)))
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from halo_runtime.core.model import mlp_activations

from .score import neuron_importance

# Similarities are rounded before they reach the graph so that float noise in the last bits
# cannot change an edge's rank and with it the plan.
SIMILARITY_DECIMALS = 4


def _normalised(acts: torch.Tensor) -> torch.Tensor:
    """|activation| centred and scaled per neuron, so that a.T @ a is the Pearson correlation."""
    a = acts.abs().double()
    a = a - a.mean(0)
    return a / a.norm(dim=0).clamp_min(1e-12)


def _rounded(corr: torch.Tensor) -> torch.Tensor:
    return torch.round(corr * 10 ** SIMILARITY_DECIMALS) / 10 ** SIMILARITY_DECIMALS


def coactivation(acts: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of |activation| between neurons: [n, n], from acts [tokens, n]."""
    a = _normalised(acts)
    return _rounded(a.T @ a)


KNN_BLOCK_BYTES = 64 << 20
"""Memory for one block of correlation rows: the whole [n, n] matrix of an 8B layer (n = 14,336)
is 1.6 GB in float64, and sorting it needs as much again."""


def knn_graph(similarity: torch.Tensor | None, k: int, acts: torch.Tensor | None = None) -> nx.Graph:
    """The k-nearest-neighbour graph of a similarity matrix, or, given `acts` [tokens, n] instead,
    of `coactivation(acts)` computed a block of rows at a time (the same numbers, never the whole
    matrix)."""
    if similarity is not None:
        n, a = similarity.shape[0], None
    else:
        a = _normalised(acts)
        n = a.shape[1]
    k = min(k, n - 1)
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    if k <= 0:
        return graph
    block = max(1, KNN_BLOCK_BYTES // (8 * n))
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        sim = similarity[r0:r1].clone() if a is None else _rounded(a[:, r0:r1].T @ a)
        rows = torch.arange(r1 - r0)
        sim[rows, rows + r0] = -2.0
        # most similar first, ties broken by neuron index, never by float noise: the order of a stable
        # sort of -sim, found by top-k on a unique integer key (similarities are multiples of 1e-4)
        key = torch.round(sim * 10 ** SIMILARITY_DECIMALS).long() * -n + torch.arange(n)
        order = torch.topk(key, k, dim=1, largest=False, sorted=True).indices
        weights = sim.gather(1, order)
        for i, (js, ws) in enumerate(zip(order.tolist(), weights.tolist(), strict=True)):
            for j, weight in zip(js, ws, strict=True):
                if weight > 0:
                    graph.add_edge(min(i + r0, j), max(i + r0, j), weight=weight)
    return graph


def _split(members: list[int], importance: torch.Tensor) -> tuple[list[int], list[int]]:
    ranked = sorted(members, key=lambda n: (-float(importance[n]), n))
    half = len(ranked) // 2
    return sorted(ranked[:half]), sorted(ranked[half:])


def _link(graph: nx.Graph, a: set[int], b: set[int]) -> float:
    small, big = (a, b) if len(a) < len(b) else (b, a)
    return sum(d["weight"] for u in small for v, d in graph[u].items() if v in big)


def _links(graph: nx.Graph, small: set[int], groups: list[list[int]]) -> dict[int, float]:
    """`_link(graph, small, set(groups[i]))` for every group i larger than `small`, in one pass over
    small's edges, adding in the same order (so the same floats)."""
    where = {v: i for i, g in enumerate(groups) for v in g}
    terms: dict[int, list[float]] = {}
    for u in small:
        for v, d in graph[u].items():
            terms.setdefault(where[v], []).append(d["weight"])
    return {i: sum(t) for i, t in terms.items()}


def group_neurons(acts: torch.Tensor, importance: torch.Tensor, num_groups: int, seed: int = 0,
                  knn: int = 12, max_size_factor: float = 2.0) -> list[list[int]]:
    """Partition neurons 0..n-1 into exactly `num_groups` groups (each a sorted list).

    acts: [tokens, n] sampled activations; importance: [n] per-neuron importance (used to
    split communities so pieces are homogeneous in importance).
    """
    n = acts.shape[1]
    num_groups = max(1, min(num_groups, n))
    graph = knn_graph(None, knn, acts=acts)
    communities = nx.community.louvain_communities(graph, weight="weight", seed=seed)
    groups = sorted((sorted(c) for c in communities), key=lambda c: c[0])
    cap = max(1, int(max_size_factor * n / num_groups))
    # split oversized communities along importance order
    while any(len(g) > cap for g in groups) or len(groups) < num_groups:
        largest = max(range(len(groups)), key=lambda i: (len(groups[i]), -groups[i][0]))
        if len(groups[largest]) < 2:
            break
        a, b = _split(groups.pop(largest), importance)
        groups += [a, b]
        groups.sort(key=lambda c: c[0])
    # merge the smallest into its best-connected neighbour until the count is right
    while len(groups) > num_groups:
        smallest = min(range(len(groups)), key=lambda i: (len(groups[i]), groups[i][0]))
        small = set(groups[smallest])
        candidates = [i for i in range(len(groups)) if i != smallest and len(groups[i]) + len(small) <= cap]
        candidates = candidates or [i for i in range(len(groups)) if i != smallest]
        links = _links(graph, small, groups)
        target = max(candidates, key=lambda i: (_link(graph, small, set(groups[i])) if len(groups[i]) <= len(small)
                                                else links.get(i, 0), -len(groups[i]), -groups[i][0]))
        groups[target] = sorted(set(groups[target]) | small)
        groups.pop(smallest)
    # order groups by importance, most important first, so group ids read meaningfully
    groups.sort(key=lambda g: (-float(importance[g].sum()), g[0]))
    return groups


def attention_groups(num_kv_heads: int) -> list[list[int]]:
    """One group per KV head: it and its query heads must live together (they share KV cache)."""
    return [[h] for h in range(num_kv_heads)]


@dataclass(frozen=True)
class LayerGroups:
    """Step 3's result for one layer: which neurons, and which KV heads, form each group."""

    mlp: tuple[tuple[int, ...], ...]
    """MLP groups, most important first; each its neuron indices, ascending."""
    attn: tuple[tuple[int, ...], ...]
    """Attention groups, one per KV head: the KV-head indices of each."""
    neuron_importance: torch.Tensor
    """[intermediate] each neuron's importance (`score.neuron_importance`): it split the groups, and
    scoring and compensation read it again."""

    def __post_init__(self):
        n = self.neuron_importance.shape[0]
        if sorted(i for g in self.mlp for i in g) != list(range(n)):
            raise ValueError(f"mlp groups must hold each of the layer's {n} neurons exactly once")
        for g in self.mlp + self.attn:
            if not g or list(g) != sorted(g):
                raise ValueError(f"group {g}: members must be non-empty and ascending")

    @property
    def mlp_lists(self) -> list[list[int]]:
        """The MLP groups as lists: a tuple would index a tensor's dimensions, a list picks entries."""
        return [list(g) for g in self.mlp]


def group_layer(mlp_in: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                mean_abs_act: torch.Tensor, num_kv_heads: int, num_groups: int, seed: int = 0) -> LayerGroups:
    """Step 3 for one layer: its MLP neurons grouped by co-activation on the sampled MLP inputs
    mlp_in [T, hidden] (gate, up, down: the layer's MLP weights; mean_abs_act [intermediate]:
    E|activation| over all calibration tokens), and one attention group per KV head."""
    importance = neuron_importance(mean_abs_act, down)
    members = group_neurons(mlp_activations(mlp_in, gate, up), importance, num_groups, seed)
    return LayerGroups(mlp=tuple(tuple(m) for m in members),
                       attn=tuple(tuple(m) for m in attention_groups(num_kv_heads)),
                       neuron_importance=importance)
