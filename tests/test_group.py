"""Grouping (halo_compile.group): the kNN co-activation graph, Louvain, and the final partition."""
import pytest
import torch

from halo_compile.group import KnnGraph, coactivation, group_neurons, knn_graph, louvain, modularity


def planted(tokens: int = 400, blocks: int = 6, size: int = 40, seed: int = 0) -> torch.Tensor:
    """[tokens, blocks * size] activations where each block of neurons fires on its own tokens."""
    gen = torch.Generator().manual_seed(seed)
    on = torch.rand(tokens, blocks, generator=gen) < 0.3
    acts = on.repeat_interleave(size, 1).float() * (1 + torch.rand(tokens, blocks * size, generator=gen))
    return acts + 0.3 * torch.randn(tokens, blocks * size, generator=gen)


def edges(g: KnnGraph) -> list[tuple[int, int, float]]:
    return list(zip(g.src.tolist(), g.dst.tolist(), g.weight.tolist(), strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 12, 50])
def test_knn_from_activations_equals_the_full_matrix(seed, k):
    """The float32-candidate, block-at-a-time graph is the graph of the whole float64 matrix."""
    acts = planted(seed=seed) if seed else torch.randn(300, 257, generator=torch.Generator().manual_seed(5))
    assert edges(knn_graph(None, k, acts=acts)) == edges(knn_graph(coactivation(acts), k))


def test_knn_blocks_do_not_change_the_graph(monkeypatch):
    import halo_compile.group as group

    acts = planted(seed=3)
    whole = edges(knn_graph(None, 12, acts=acts))
    monkeypatch.setattr(group, "KNN_BLOCK", 37)  # 37-neuron blocks, uneven at the end
    monkeypatch.setattr(group, "KNN_BLOCK_BYTES", 8 * 400 * 20 * 7)  # 7 rows a slice in the float64 pass
    assert edges(knn_graph(None, 12, acts=acts)) == whole


def test_knn_graph_edges_are_unique_positive_and_ordered():
    g = knn_graph(None, 12, acts=planted())
    pairs = list(zip(g.src.tolist(), g.dst.tolist(), strict=True))
    assert pairs == sorted(set(pairs)) and bool((g.weight > 0).all()) and bool((g.src < g.dst).all())


def test_tiny_layers():
    assert knn_graph(None, 12, acts=torch.randn(8, 1)).src.numel() == 0
    assert louvain(knn_graph(None, 12, acts=torch.randn(8, 1))) == [[0]]
    assert sorted(n for grp in group_neurons(torch.randn(16, 3), torch.rand(3), 4) for n in grp) == [0, 1, 2]


def test_knn_graph_checks_its_edges():
    one = torch.tensor([1])
    with pytest.raises(ValueError, match="src < dst"):
        KnnGraph(3, one, one, torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="one length"):
        KnnGraph(3, one, torch.tensor([2, 2]), torch.tensor([0.5], dtype=torch.float64))


def test_links_sum_the_weights_to_each_group():
    g = knn_graph(None, 8, acts=planted())
    where = torch.arange(g.n) // 40
    small = list(range(0, 60))
    want = torch.zeros(6, dtype=torch.float64)
    for u, v, w in edges(g):
        if (u in small) != (v in small):
            want[where[v if u in small else u]] += w
    assert torch.allclose(g.links(small, where, 6), want)


def test_louvain_is_seeded_and_finds_planted_blocks():
    g = knn_graph(None, 12, acts=planted())
    found = louvain(g, seed=0)
    assert found == louvain(g, seed=0)
    assert sorted(n for c in found for n in c) == list(range(g.n))
    truth = [list(range(b * 40, (b + 1) * 40)) for b in range(6)]
    assert modularity(g, found) >= modularity(g, truth) - 1e-9 > 0.5


def test_group_neurons_is_deterministic_and_exact_in_count():
    acts, importance = planted(), torch.rand(240, generator=torch.Generator().manual_seed(1))
    for num in (1, 4, 6, 16):
        groups = group_neurons(acts, importance, num, seed=0)
        assert len(groups) == num and sorted(n for g in groups for n in g) == list(range(240))
        assert groups == group_neurons(acts, importance, num, seed=0)
    # six planted blocks, six groups: the blocks come back
    assert sorted(map(tuple, group_neurons(acts, importance, 6))) == [tuple(range(b * 40, (b + 1) * 40))
                                                                     for b in range(6)]
