"""Step 3, group: cluster each layer's MLP neurons into neuron groups by co-activation.

Neurons that fire together on the same tokens belong together: then, for a given token, a few
groups carry most of the layer's output and the rest can be late without much harm. We build a
k-nearest-neighbour graph on the correlation of |activation| over the sampled calibration tokens
(tensor products a block at a time; `knn_graph`) and find communities with the Louvain method
(igraph's C implementation, seeded, so deterministic; `louvain`). Communities are
then merged or split to exactly `num_groups`: splits cut a community along importance order, so
the pieces are homogeneous in importance and the least important ones can be relaxed together.
Sizes stay uneven; no rule ties them to the device count.

Attention groups are whole GQA KV-head groups: one KV head with the query heads that read it.

`group_layer` is the step for one layer; its result, `LayerGroups`, is what scoring, prediction
and compensation read.

Example:
    >>> import torch
    >>> from halo_compile.group import coactivation, group_layer, group_neurons, knn_graph, louvain, modularity
    >>> acts = torch.randn(256, 64)
    >>> groups = group_neurons(acts, torch.rand(64), num_groups=4, seed=0)
    >>> len(groups), sorted(n for g in groups for n in g) == list(range(64))
    (4, True)
    >>> sorted(len(g) for g in group_neurons(acts, torch.rand(64), num_groups=4, seed=0, unit=8))[0] % 8
    0
    >>> graph = knn_graph(None, 6, acts=acts)
    >>> full = knn_graph(coactivation(acts), 6)      # from the whole matrix: the same graph
    >>> [torch.equal(x, y) for x, y in zip((graph.src, graph.dst, graph.weight), (full.src, full.dst, full.weight))]
    [True, True, True]
    >>> louvain(graph, seed=3) == louvain(graph, seed=3), modularity(graph, louvain(graph)) > 0.2
    (True, True)
    >>> x, gate, up, down = torch.randn(128, 8), torch.randn(24, 8), torch.randn(24, 8), torch.randn(8, 24)
    >>> layer = group_layer(x, gate, up, down, mean_abs_act=torch.rand(24), num_kv_heads=2, num_groups=3)
    >>> len(layer.mlp), sorted(n for g in layer.mlp for n in g) == list(range(24)), layer.attn
    (3, True, ((0,), (1,)))
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .reference import mlp_activations
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
"""Memory for one slice of gathered candidate columns in the float64 pass: the whole [n, n]
correlation matrix of an 8B layer (n = 14,336) would be 1.6 GB in float64."""

KNN_BLOCK = 1024
"""Rows of one strip of the float32 correlation matrix. Only the part of a strip on and right of
the diagonal is computed and kept for the later strips (the upper triangle: 0.4 GB for an 8B
layer), so narrower strips do less redundant work on the diagonal (at n = 8192: 56% of the full
product, 62% with 2048 rows)."""

KNN_SPARE = 8
"""Extra candidates per row that the float32 pass hands to the exact float64 pass: the float32
correlations differ from the float64 ones by ~1e-6, far below the 1e-4 rounding grid, so the true
k nearest are among the k + 8 float32 nearest unless 8 more neurons tie within 1e-6 of the k-th."""


@dataclass(frozen=True)
class KnnGraph:
    """An undirected weighted graph on neurons 0..n-1, each edge once (src < dst), edges sorted."""

    n: int
    """Number of nodes (neurons)."""
    src: torch.Tensor
    """[edges] int64 lower endpoint of each edge."""
    dst: torch.Tensor
    """[edges] int64 higher endpoint."""
    weight: torch.Tensor
    """[edges] float64 similarity (> 0, a multiple of 1e-4)."""

    def __post_init__(self):
        if not (self.src.shape == self.dst.shape == self.weight.shape) or self.src.dim() != 1:
            raise ValueError("knn graph: src, dst and weight must be 1-d and of one length")
        if self.src.numel() and not (bool((self.src < self.dst).all()) and int(self.dst.max()) < self.n):
            raise ValueError("knn graph: every edge needs src < dst < n")

    def links(self, members: list[int], where: torch.Tensor, count: int) -> torch.Tensor:
        """[count] total edge weight between the node set `members` and each group, where
        where[v] is node v's group (edges with both ends in `members` are not counted)."""
        inside = torch.zeros(self.n, dtype=torch.bool)
        inside[members] = True
        a, b = inside[self.src], inside[self.dst]
        other = torch.cat([self.dst[a & ~b], self.src[b & ~a]])
        w = torch.cat([self.weight[a & ~b], self.weight[b & ~a]])
        return torch.bincount(where[other], weights=w, minlength=count)


def _top_candidates(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] the k nearest neighbours of each neuron by the (float64, rounded) correlation of the
    normalised activations a [tokens, n], most similar first, ties by neuron index, and [n, k] their
    correlations. Candidates are found in float32 (a quarter of float64's time), a strip of
    KNN_BLOCK rows at a time, keeping each neuron's k + KNN_SPARE best; the matrix is symmetric, so
    a strip computes only its columns from its own first row on and copies the rest from the earlier
    strips (about half the products); the candidates are then scored in float64."""
    n = a.shape[1]
    a32 = a.float()
    c = min(n - 1, k + KNN_SPARE)
    upper: list[tuple[int, torch.Tensor]] = []  # (first row, the strip's columns from that row on)
    cand = []
    for r0 in range(0, n, KNN_BLOCK):
        r1 = min(n, r0 + KNN_BLOCK)
        strip = torch.empty(r1 - r0, n)
        for q0, right in upper:
            strip[:, q0:q0 + right.shape[0]] = right[:, r0 - q0:r1 - q0].T
        right = a32[:, r0:r1].T @ a32[:, r0:]
        strip[:, r0:] = right
        if r1 < n:
            upper.append((r0, right))
        rows = torch.arange(r1 - r0)
        strip[rows, rows + r0] = -3.0  # below any correlation: never its own neighbour
        cand.append(torch.topk(strip, c, dim=1, sorted=False).indices)
    del upper
    cand = torch.cat(cand).sort(dim=1).values
    # the float64 correlation of each candidate pair (a dot product of two columns), in slices of
    # rows so the gathered columns [rows, candidates, tokens] stay within the block budget
    rows_of = a.T.contiguous()  # [n, tokens]: a neuron's column as a contiguous row, cheap to gather
    step = max(1, KNN_BLOCK_BYTES // (8 * a.shape[0] * c))
    exact = _rounded(torch.cat([torch.einsum("bct,bt->bc", rows_of[cand[s:s + step]], rows_of[s:s + step])
                                for s in range(0, n, step)]))
    # most similar first, ties broken by neuron index, never by float noise: the order of a stable
    # sort of -sim, found by top-k on a unique integer key (similarities are multiples of 1e-4)
    key = torch.round(exact * 10 ** SIMILARITY_DECIMALS).long() * -n + cand
    pick = torch.topk(key, k, dim=1, largest=False, sorted=True).indices
    return cand.gather(1, pick), exact.gather(1, pick)


def knn_graph(similarity: torch.Tensor | None, k: int, acts: torch.Tensor | None = None) -> KnnGraph:
    """The k-nearest-neighbour graph of a similarity matrix, or, given `acts` [tokens, n] instead,
    of `coactivation(acts)` (the same neighbours and weights, found a block at a time by
    `_top_candidates`, never the whole matrix). Edges of weight <= 0 are dropped; an edge found
    from both ends keeps the weight seen from its higher endpoint."""
    n = similarity.shape[0] if similarity is not None else acts.shape[1]
    k = min(k, n - 1)
    empty = torch.zeros(0, dtype=torch.long)
    if k <= 0:
        return KnnGraph(n, empty, empty.clone(), torch.zeros(0, dtype=torch.float64))
    if similarity is not None:
        sim = similarity.double().clone()
        sim.fill_diagonal_(-2.0)
        key = torch.round(sim * 10 ** SIMILARITY_DECIMALS).long() * -n + torch.arange(n)
        order = torch.topk(key, k, dim=1, largest=False, sorted=True).indices
        nbr, w = order, sim.gather(1, order)
    else:
        nbr, w = _top_candidates(_normalised(acts), k)
    row = torch.arange(n).unsqueeze(1).expand(n, k).reshape(-1)
    nbr, w = nbr.reshape(-1), w.reshape(-1).double()
    keep = w > 0
    row, nbr, w = row[keep], nbr[keep], w[keep]
    lo, hi = torch.minimum(row, nbr), torch.maximum(row, nbr)
    # one edge per pair: sort by (pair, row found from) and keep the last of each pair
    order = torch.argsort((lo * n + hi) * 2 + (row == hi).long(), stable=True)
    lo, hi, w = lo[order], hi[order], w[order]
    last = torch.ones(lo.numel(), dtype=torch.bool)
    if lo.numel() > 1:
        last[:-1] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return KnnGraph(n, lo[last], hi[last], w[last])


def louvain(graph: KnnGraph, seed: int = 0) -> list[list[int]]:
    """Communities of `graph` by the Louvain method (igraph's C `community_multilevel`, modularity
    at resolution 1), each a sorted list, ordered by first member. igraph draws its random numbers
    (the order nodes are visited) from a Python generator we seed, so the result is deterministic."""
    import igraph

    g = igraph.Graph(n=graph.n, edges=torch.stack([graph.src, graph.dst], 1).tolist(),
                     edge_attrs={"weight": graph.weight.tolist()})
    igraph.set_random_number_generator(random.Random(seed))
    try:
        membership = g.community_multilevel(weights="weight").membership
    finally:
        igraph.set_random_number_generator(random)
    communities: dict[int, list[int]] = {}
    for v, c in enumerate(membership):
        communities.setdefault(c, []).append(v)
    return sorted(communities.values(), key=lambda c: c[0])


def modularity(graph: KnnGraph, groups: list[list[int]]) -> float:
    """Newman modularity (resolution 1) of a partition of `graph`'s nodes: how much more edge weight
    lies inside groups than chance would put there (the quantity Louvain maximises)."""
    where = torch.empty(graph.n, dtype=torch.long)
    for i, g in enumerate(groups):
        where[g] = i
    m = float(graph.weight.sum())
    if m <= 0:
        return 0.0
    inside = float(graph.weight[where[graph.src] == where[graph.dst]].sum())
    degree = torch.bincount(graph.src, weights=graph.weight, minlength=graph.n) + \
        torch.bincount(graph.dst, weights=graph.weight, minlength=graph.n)
    per_group = torch.bincount(where, weights=degree, minlength=len(groups))
    return inside / m - float((per_group ** 2).sum()) / (4 * m * m)


def _split(members: list[int], importance: torch.Tensor) -> tuple[list[int], list[int]]:
    ranked = sorted(members, key=lambda n: (-float(importance[n]), n))
    half = len(ranked) // 2
    return sorted(ranked[:half]), sorted(ranked[half:])


def group_neurons(acts: torch.Tensor, importance: torch.Tensor, num_groups: int, seed: int = 0,
                  knn: int = 12, max_size_factor: float = 2.0, unit: int = 1) -> list[list[int]]:
    """Partition neurons 0..n-1 into exactly `num_groups` groups (each a sorted list).

    acts: [tokens, n] sampled activations; importance: [n] per-neuron importance (used to
    split communities so pieces are homogeneous in importance). unit: every group's size is a
    multiple of it (the weight format's block; n must be one too), see `snap_sizes`.
    """
    n = acts.shape[1]
    if n % unit:
        raise ValueError(f"{n} neurons cannot be grouped in multiples of {unit}")
    num_groups = max(1, min(num_groups, n // unit))
    graph = knn_graph(None, knn, acts=acts)
    groups = louvain(graph, seed)
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
        small = groups[smallest]
        candidates = [i for i in range(len(groups)) if i != smallest and len(groups[i]) + len(small) <= cap]
        candidates = candidates or [i for i in range(len(groups)) if i != smallest]
        where = torch.empty(n, dtype=torch.long)
        for i, g in enumerate(groups):
            where[g] = i
        links = graph.links(small, where, len(groups)).tolist()
        target = max(candidates, key=lambda i: (links[i], -len(groups[i]), -groups[i][0]))
        groups[target] = sorted(groups[target] + small)
        groups.pop(smallest)
    if unit > 1:
        groups = snap_sizes(groups, graph, importance, unit)
    # order groups by importance, most important first, so group ids read meaningfully
    groups.sort(key=lambda g: (-float(importance[g].sum()), g[0]))
    return groups


def snap_sizes(groups: list[list[int]], graph: KnnGraph, importance: torch.Tensor, unit: int) -> list[list[int]]:
    """The groups with sizes rounded to multiples of `unit` (at least one each; largest remainders
    round up, so the total stays), moving as few neurons as that takes: each group over its size
    gives up the members least linked to it, and each of those joins the short group it is most
    linked to (ties: the more important neuron first, then the lower group)."""
    n = graph.n
    sizes = [len(g) / unit for g in groups]
    target = [max(1, int(s)) for s in sizes]
    order = sorted(range(len(groups)), key=lambda i: (-(sizes[i] - int(sizes[i])), i))
    at = 0
    while sum(target) < n // unit:
        target[order[at % len(order)]] += 1
        at += 1
    while sum(target) > n // unit:
        i = max(range(len(groups)), key=lambda j: (target[j], -j))
        target[i] -= 1
    where = torch.empty(n, dtype=torch.long)
    for i, g in enumerate(groups):
        where[g] = i
    # affinity[v, g]: edge weight between neuron v and the members of group g
    affinity = torch.zeros(n, len(groups), dtype=torch.float64)
    affinity.index_put_((graph.src, where[graph.dst]), graph.weight, accumulate=True)
    affinity.index_put_((graph.dst, where[graph.src]), graph.weight, accumulate=True)
    pool, kept = [], []
    for i, g in enumerate(groups):
        ranked = sorted(g, key=lambda v: (-float(affinity[v, i]), -float(importance[v]), v))
        kept.append(ranked[:target[i] * unit])
        pool += ranked[target[i] * unit:]
    need = {i: target[i] * unit - len(kept[i]) for i in range(len(groups)) if target[i] * unit > len(kept[i])}
    for v in sorted(pool, key=lambda v: (-float(importance[v]), v)):
        i = max(need, key=lambda j: (float(affinity[v, j]), -j))
        kept[i].append(v)
        need[i] -= 1
        if not need[i]:
            del need[i]
    return [sorted(g) for g in kept]


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
                mean_abs_act: torch.Tensor, num_kv_heads: int, num_groups: int, seed: int = 0,
                acts: torch.Tensor | None = None, unit: int = 1) -> LayerGroups:
    """Step 3 for one layer: its MLP neurons grouped by co-activation on the sampled MLP inputs
    mlp_in [T, hidden] (gate, up, down: the layer's MLP weights; mean_abs_act [intermediate]:
    E|activation| over all calibration tokens), and one attention group per KV head. `acts`
    [T, intermediate]: those tokens' MLP activations where the caller has them (profiling keeps
    them), else computed from mlp_in. unit: MLP group sizes are multiples of it (`group_neurons`)."""
    importance = neuron_importance(mean_abs_act, down)
    acts = mlp_activations(mlp_in, gate, up) if acts is None else acts
    members = group_neurons(acts, importance, num_groups, seed, unit=unit)
    return LayerGroups(mlp=tuple(tuple(m) for m in members),
                       attn=tuple(tuple(m) for m in attention_groups(num_kv_heads)),
                       neuron_importance=importance)
