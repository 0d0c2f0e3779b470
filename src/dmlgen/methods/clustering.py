"""k-means pseudo labels for training (methods.md §2.5): the MIC option of Sharing (§5.6), later SLADE (§7).

::

    labels, centroids = kmeans_pseudo_labels(features, 30, standardize_by_class="mean", labels=y, seed=0)

Rows are L2-normalised first (``l2_normalize``), then standardised per class: ``"mean"`` subtracts each
sample's class mean, ``"mstd"`` also divides by the per-dimension class std (floored at 1e-8). Standardising
removes what tells the classes apart, so the clusters follow characteristics *shared* across classes.

Backends: ``faiss`` (its parameters go to the ``faiss.Kmeans`` constructor, never set afterwards, §9),
``sklearn`` (``KMeans`` with k-means++), ``torch`` (:func:`dmlgen.evaluation.clustering.kmeans`), ``auto``:
faiss when installed, else scikit-learn. Each is deterministic for a given seed on a given machine; the
backends do not agree with one another.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from dmlgen.errors import ConfigError, DataError

Standardization = Literal["mean", "mstd"]
ClusterBackend = Literal["auto", "faiss", "sklearn", "torch"]
BACKENDS = ("auto", "faiss", "sklearn", "torch")
#: Floor of the per-dimension class std in ``"mstd"`` (a constant dimension would divide by zero).
STD_FLOOR = 1e-8


def faiss_installed() -> bool:
    """Whether ``import faiss`` works (the ``faiss`` extra)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``faiss`` when installed, else ``sklearn``; unknown names are a ConfigError."""
    if backend not in BACKENDS:
        raise ConfigError(f"k-means backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "faiss" if faiss_installed() else "sklearn"
    if backend == "faiss" and not faiss_installed():
        raise ConfigError("k-means backend 'faiss' needs the faiss package: pip install 'dmlgen[faiss]' "
                          "(or choose sklearn)")
    return backend


def standardize_features(features: np.ndarray, labels: np.ndarray, mode: Standardization) -> np.ndarray:
    """Features ``(N, D)`` minus their class mean (``"mean"``), also divided by the per-dimension class std
    (``"mstd"``, population std, floored at 1e-8). Returns a new float64 array; labels ``(N,)`` any ints."""
    if mode not in ("mean", "mstd"):
        raise ConfigError(f"standardize_by_class: {mode!r} is not one of None, 'mean', 'mstd'")
    x = np.asarray(features, dtype=np.float64)
    _, inverse = np.unique(np.asarray(labels), return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)[:, None]
    sums = np.zeros((len(counts), x.shape[1]))
    np.add.at(sums, inverse, x)
    means = sums / counts
    out = x - means[inverse]
    if mode == "mstd":
        sq = np.zeros_like(sums)
        np.add.at(sq, inverse, out * out)
        std = np.sqrt(sq / counts)
        out = out / np.maximum(std, STD_FLOOR)[inverse]
    return out


def kmeans_pseudo_labels(
    features: torch.Tensor | np.ndarray,
    num_clusters: int,
    *,
    standardize_by_class: Standardization | None = None,
    labels: torch.Tensor | np.ndarray | None = None,
    l2_normalize: bool = True,
    backend: ClusterBackend = "auto",
    seed: int = 0,
    n_iter: int = 20,
    n_init: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``features (N, D)`` into ``num_clusters`` pseudo labels.

    Returns ``(assignments (N,) int64 in 0..K-1, centroids (K, D) float32)`` in the space that was clustered
    (after normalisation and standardisation). A cluster may end up empty (sklearn and faiss re-seed empty
    clusters while iterating, but the final assignment can still leave one empty); count them with
    ``K - len(assignments.unique())``.

    Raises DataError for non-finite features, ``num_clusters`` outside ``1..N``, or labels that are missing
    (standardisation needs them) or of the wrong length; ConfigError for an unknown backend or mode.
    """
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) \
        else np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"kmeans_pseudo_labels: features must be a non-empty (N, D) array, got shape {x.shape}")
    n = x.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= n:
        raise DataError(f"kmeans_pseudo_labels: {num_clusters!r} clusters of {n} samples; need 1 <= K <= {n}")
    if n_iter < 1 or n_init < 1:
        raise DataError(f"kmeans_pseudo_labels: n_iter and n_init must be >= 1, got {n_iter}, {n_init}")
    if not np.isfinite(x).all():
        raise DataError("kmeans_pseudo_labels: features contain NaN or infinite values")
    if l2_normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if standardize_by_class is not None:
        if labels is None:
            raise DataError(f"kmeans_pseudo_labels: standardize_by_class={standardize_by_class!r} needs labels "
                            "(training data only)")
        y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if y.shape != (n,):
            raise DataError(f"kmeans_pseudo_labels: labels have shape {y.shape}, features {n} rows")
        x = standardize_features(x, y, standardize_by_class)
    name = resolve_backend(backend)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if name == "faiss":
        import faiss

        # Everything through the constructor (MIC set attributes afterwards, which faiss ignores, §9);
        # max_points_per_centroid = N: cluster every point rather than faiss's default sub-sample of 256 * K.
        km = faiss.Kmeans(x32.shape[1], num_clusters, niter=n_iter, nredo=n_init, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max(n, 1))
        km.train(x32)
        _, assign = km.index.search(x32, 1)
        return torch.from_numpy(assign[:, 0].astype(np.int64)), torch.from_numpy(np.array(km.centroids))
    if name == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=num_clusters, n_init=n_init, max_iter=n_iter, random_state=seed)
        assign = km.fit_predict(x32)
        return (torch.from_numpy(assign.astype(np.int64)),
                torch.from_numpy(km.cluster_centers_.astype(np.float32)))
    from dmlgen.evaluation.clustering import kmeans

    best: tuple[float, torch.Tensor] | None = None
    t = torch.from_numpy(x32)
    for trial in range(n_init):  # keep the restart with the lowest inertia, as sklearn and faiss do
        assign = kmeans(t, num_clusters, iterations=n_iter, seed=seed + trial, backend="torch")
        centroids = _centroids(t, assign, num_clusters)
        inertia = float(((t - centroids[assign]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assign)
    assert best is not None
    return best[1], _centroids(t, best[1], num_clusters)


def _centroids(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of each cluster's rows ``(k, D)``; an empty cluster's centroid is 0."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=k).clamp_min(1).unsqueeze(1)
    return sums / counts


__all__ = ["BACKENDS", "faiss_installed", "kmeans_pseudo_labels", "resolve_backend", "standardize_features"]
