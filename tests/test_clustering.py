"""k-means (torch and faiss backends) and NMI/AMI (dmlgen.evaluation.clustering, methods.md §1.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from dmlgen.errors import DataError
from dmlgen.evaluation.clustering import clustering_scores, kmeans
from dmlgen.evaluation.knn import faiss_available


def blobs(num_clusters: int, per_cluster: int, seed: int, d: int = 8, sep: float = 20.0, noise: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, d, generator=g) * sep
    y = torch.arange(num_clusters).repeat_interleave(per_cluster)
    perm = torch.randperm(len(y), generator=g)
    y = y[perm]
    return centres[y] + noise * torch.randn(len(y), d, generator=g), y


def nmi(a, b) -> float:
    return float(normalized_mutual_info_score(np.asarray(a), np.asarray(b)))


def assert_lloyd_fixed_point(x: torch.Tensor, assign: torch.Tensor):
    """Converged Lloyd: each point sits in the cluster whose mean is nearest (a loop over points)."""
    x64 = x.double()
    ids = sorted(set(assign.tolist()))
    means = {c: x64[assign == c].mean(dim=0) for c in ids}
    for i in range(len(x64)):
        d_own = float(((x64[i] - means[int(assign[i])]) ** 2).sum())
        d_best = min(float(((x64[i] - m) ** 2).sum()) for m in means.values())
        assert d_own <= d_best + 1e-6


# ----------------------------------------------------------------------------------------------- torch


def test_torch_kmeans_deterministic_for_a_seed():
    x, _ = blobs(6, 20, seed=0, sep=1.0, noise=1.0)  # overlapping: the result depends on the start
    a = kmeans(x, 6, seed=3, backend="torch")
    b = kmeans(x, 6, seed=3, backend="torch")
    assert a.dtype == torch.int64 and a.shape == (120,)
    assert torch.equal(a, b)
    assert set(a.tolist()) <= set(range(6))
    others = [kmeans(x, 6, seed=s, backend="torch") for s in range(4, 8)]
    assert any(not torch.equal(a, o) for o in others)  # the seed is used


@pytest.mark.parametrize("seed", range(6))
def test_torch_kmeans_two_separated_clusters_always_recovered(seed):
    x, y = blobs(2, 25, seed=10 + seed)
    assign = kmeans(x, 2, seed=seed, backend="torch")
    assert nmi(y, assign) == pytest.approx(1.0)


def test_torch_kmeans_recovers_separated_clusters():
    """Random initial centroids (as faiss) can start two centroids in one cluster and stay there, so
    not every seed finds the partition; every seed must end in a Lloyd fixed point, and most seeds of
    well-separated blobs recover it exactly."""
    x, y = blobs(5, 30, seed=1)
    scores = []
    for seed in range(10):
        assign = kmeans(x, 5, seed=seed, iterations=50, backend="torch")
        assert_lloyd_fixed_point(x, assign)
        scores.append(nmi(y, assign))
    assert max(scores) == pytest.approx(1.0)
    assert sum(s > 0.999 for s in scores) >= 2
    assert min(scores) > 0.6


def test_torch_kmeans_recovers_corner_clusters_and_k_equals_n():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    y = torch.arange(4).repeat_interleave(15)
    x = centres[y] + 0.01 * torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    best = max(nmi(y, kmeans(x, 4, seed=s, backend="torch")) for s in range(8))
    assert best == pytest.approx(1.0)
    # k = N: every point starts as its own centroid and stays its own cluster
    pts = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    assert sorted(kmeans(pts, 7, seed=0, backend="torch").tolist()) == list(range(7))


def test_torch_kmeans_empty_clusters_do_not_crash():
    # 40 identical points and 2 others: most starts pick duplicate centroids, so clusters go empty
    x = torch.cat([torch.zeros(40, 3), torch.tensor([[50.0, 0, 0], [0, 50.0, 0]])])
    for seed in range(5):
        assign = kmeans(x, 5, seed=seed, iterations=10, backend="torch")
        assert assign.shape == (42,) and assign.dtype == torch.int64
        assert int(assign.min()) >= 0 and int(assign.max()) < 5
        assert len(set(assign[:40].tolist())) == 1  # duplicates are never split
    same = torch.ones(10, 2)
    assign = kmeans(same, 4, seed=0, backend="torch")  # every cluster but one is always empty
    assert set(assign.tolist()) == {0}


def test_kmeans_bad_input():
    x = torch.randn(5, 2)
    with pytest.raises(DataError, match=r"k-means asked for 6 clusters of 5 points"):
        kmeans(x, 6, backend="torch")
    with pytest.raises(DataError, match=r"k-means asked for 0 clusters"):
        kmeans(x, 0, backend="torch")
    with pytest.raises(DataError, match=r"iterations must be >= 1, got 0"):
        kmeans(x, 2, iterations=0, backend="torch")
    with pytest.raises(DataError, match=r"unknown k-means backend 'sk'"):
        kmeans(x, 2, backend="sk")  # type: ignore[arg-type]
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(DataError, match=r"row 1"):
        kmeans(bad, 2, backend="torch")


# ----------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_clustering_scores_are_sklearn_on_kmeans_with_k_classes(backend):
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss not installed")
    x, y = blobs(7, 12, seed=2, sep=1.5, noise=1.0)  # overlapping: scores well below 1
    y = y * 10 + 3  # arbitrary label values
    scores = clustering_scores(x, y, seed=5, iterations=15, backend=backend)
    assign = kmeans(x, 7, seed=5, iterations=15, backend=backend).numpy()
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(y.numpy(), assign), abs=1e-12)
    assert scores["ami"] == pytest.approx(adjusted_mutual_info_score(y.numpy(), assign), abs=1e-12)
    assert 0.2 < scores["ami"] < scores["nmi"] < 0.999
    assert len(np.unique(assign)) <= 7


def test_clustering_scores_perfect_on_separated_blobs():
    x, y = blobs(2, 30, seed=3)
    s = clustering_scores(x, y, seed=0, backend="torch")
    assert s["nmi"] == pytest.approx(1.0) and s["ami"] == pytest.approx(1.0)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_kmeans_matches_pml_kmeans():
    from pytorch_metric_learning.utils.inference import FaissKMeans

    x, _ = blobs(9, 20, seed=4, sep=1.0, noise=1.0)
    ours = kmeans(x, 9, seed=1234, iterations=20, backend="faiss")
    theirs = FaissKMeans(niter=20)(x, 9)
    assert torch.equal(ours, theirs.to(torch.int64))
    other_seed = kmeans(x, 9, seed=7, iterations=20, backend="faiss")
    assert nmi(ours, other_seed) < 0.999  # the seed matters on overlapping data, so the match is not trivial
