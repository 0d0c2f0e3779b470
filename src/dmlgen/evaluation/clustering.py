"""k-means on embeddings and the clustering metrics NMI and AMI (methods.md §1.5).

k-means runs with faiss when it is installed (the backend pytorch-metric-learning uses, with the same
default of 20 iterations), else with a blocked torch implementation: random initial centroids drawn
from the data, Lloyd iterations whose assignment step reuses the exact kNN core, so no N x k matrix
is built. Scores come from scikit-learn (arithmetic normalisation, as PML).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from dmlgen.errors import DataError
from dmlgen.evaluation.knn import faiss_available, iter_knn_blocks, prepare_embeddings

KMeansBackend = Literal["auto", "faiss", "torch"]


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    backend: KMeansBackend = "auto",
) -> torch.Tensor:
    """Cluster the rows of ``x`` (N, D); returns (N,) int64 cluster ids in 0..num_clusters-1.

    Args:
        x: (N, D) embeddings.
        num_clusters: k, 1 <= k <= N.
        iterations: Lloyd iterations.
        seed: seeds the initial centroids.
        backend: ``faiss``, ``torch`` or ``auto`` (faiss when installed).
    """
    x = prepare_embeddings(x, "euclidean")
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise DataError(f"k-means asked for {num_clusters} clusters of {n} points; need 1 <= k <= {n}")
    if iterations < 1:
        raise DataError(f"k-means iterations must be >= 1, got {iterations}")
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    if backend == "faiss":
        import faiss

        # min_points_per_centroid only silences faiss's "too few points" warning; results are unchanged
        km = faiss.Kmeans(x.shape[1], num_clusters, niter=iterations, seed=seed, verbose=False,
                          min_points_per_centroid=1)
        data = np.ascontiguousarray(x.numpy())
        km.train(data)
        _, assign = km.index.search(data, 1)
        return torch.from_numpy(assign[:, 0].astype(np.int64))
    if backend != "torch":
        raise DataError(f"unknown k-means backend {backend!r}; choose auto, faiss or torch")
    return _torch_kmeans(x, num_clusters, iterations, seed)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    assign = torch.empty(len(x), dtype=torch.int64)
    for start, idx, _ in iter_knn_blocks(x, centroids, 1, metric="euclidean"):
        assign[start:start + len(idx)] = idx[:, 0]
    return assign


def _torch_kmeans(x: torch.Tensor, k: int, iterations: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    assign = _assign(x, centroids)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, sums / counts.clamp_min(1).unsqueeze(1))
        if bool(empty.any()):
            # re-seed an empty cluster at a random point so k clusters survive
            centroids[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=gen)]
        new_assign = _assign(x, centroids)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign


def clustering_scores(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    iterations: int = 20,
    seed: int = 0,
    backend: KMeansBackend = "auto",
    scores: tuple[str, ...] = ("nmi", "ami"),
) -> dict[str, float]:
    """NMI and/or AMI of k-means (k = number of distinct labels) against the labels.

    Args:
        x: (N, D) query embeddings.
        labels: (N,) integer labels.
        scores: which of ``nmi`` and ``ami`` to compute (AMI's expected-MI term is costly with
            thousands of clusters, so it is only computed when asked).
    """
    labels = torch.as_tensor(labels)
    num_classes = int(torch.unique(labels).numel())
    clusters = kmeans(x, num_classes, iterations=iterations, seed=seed, backend=backend).numpy()
    truth = labels.numpy()
    out: dict[str, float] = {}
    if "nmi" in scores:
        out["nmi"] = float(normalized_mutual_info_score(truth, clusters))
    if "ami" in scores:
        out["ami"] = float(adjusted_mutual_info_score(truth, clusters))
    return out
