"""k-means pseudo labels (methods.md §2.5): standardisation against a loop oracle, recovery of a shared factor,
determinism for a seed on every backend, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from dmlgen.errors import ConfigError, DataError
from dmlgen.methods.clustering import faiss_installed, kmeans_pseudo_labels, resolve_backend, standardize_features
from _fixtures import one_thread  # noqa: F401  (autouse: one thread per test)

BACKENDS = ["sklearn", "torch"] + (["faiss"] if faiss_installed() else [])


def loop_standardize(x: np.ndarray, y: np.ndarray, mode: str) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(len(x)):
        members = [j for j in range(len(x)) if y[j] == y[i]]
        for d in range(x.shape[1]):
            values = [float(x[j, d]) for j in members]
            mean = sum(values) / len(values)
            out[i, d] = x[i, d] - mean
            if mode == "mstd":
                std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
                out[i, d] /= max(std, 1e-8)
    return out


@pytest.mark.parametrize("mode", ["mean", "mstd"])
def test_standardisation_matches_a_loop_oracle(mode: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 5)) * rng.uniform(0.1, 3, size=5)
    y = rng.integers(0, 4, size=23) * 7 + 3  # non-contiguous label ids
    x[y == y[0], 2] = 1.5  # a constant dimension in one class: std floored, no division by zero
    got = standardize_features(x, y, mode)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, loop_standardize(x, y, mode), atol=1e-12)


def test_class_standardisation_clusters_the_shared_factor_not_the_class() -> None:
    # Each class sits at its own far-away offset; within every class half the samples carry +s, half -s on a
    # shared direction. Raw features cluster by class offset; mean-standardised ones by the shared factor.
    rng = np.random.default_rng(1)
    classes, per_class, dim = 6, 10, 8
    offsets = rng.normal(size=(classes, dim)) * 20
    shared_dir = np.zeros(dim)
    shared_dir[0] = 1.0
    y = np.repeat(np.arange(classes), per_class)
    factor = np.tile(np.repeat([1, 0], per_class // 2), classes)
    x = offsets[y] + np.where(factor[:, None] == 1, 1.0, -1.0) * 3 * shared_dir + rng.normal(size=(60, dim)) * 0.1
    plain, _ = kmeans_pseudo_labels(x, 2, l2_normalize=False, backend="sklearn", seed=0, n_init=5)
    standardised, _ = kmeans_pseudo_labels(x, 2, standardize_by_class="mean", labels=y, l2_normalize=False,
                                           backend="sklearn", seed=0, n_init=5)
    assert adjusted_rand_score(factor, standardised.numpy()) == pytest.approx(1.0)
    assert adjusted_rand_score(factor, plain.numpy()) < 0.2


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_labels_and_separated_blobs_are_found(backend: str) -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 16)) * 10
    truth = rng.integers(0, 4, size=300)
    x = torch.from_numpy(centres[truth] + rng.normal(size=(300, 16))).float()
    # Several restarts: a random initialisation can put two centroids in one blob (faiss, torch).
    a1, c1 = kmeans_pseudo_labels(x, 4, l2_normalize=False, backend=backend, seed=3, n_iter=30, n_init=10)
    a2, c2 = kmeans_pseudo_labels(x, 4, l2_normalize=False, backend=backend, seed=3, n_iter=30, n_init=10)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    assert a1.dtype == torch.int64 and a1.shape == (300,) and c1.shape == (4, 16)
    assert int(a1.min()) >= 0 and int(a1.max()) < 4
    assert adjusted_rand_score(truth, a1.numpy()) == pytest.approx(1.0)
    # Every point is nearest to its own centroid (a converged assignment in the clustered space).
    nearest = torch.cdist(x, c1).argmin(dim=1)
    assert torch.equal(nearest, a1)


def test_l2_normalisation_happens_before_clustering() -> None:
    # Two directions at very different scales: normalised, the scale no longer separates points.
    rng = np.random.default_rng(4)
    direction = np.repeat([[1.0, 0.0], [0.0, 1.0]], 20, axis=0)
    scale = np.tile([1.0, 100.0], 20)[:, None]
    x = direction * scale + rng.normal(size=(40, 2)) * 0.01
    labels, centroids = kmeans_pseudo_labels(x, 2, backend="sklearn", seed=0, n_init=4)
    assert adjusted_rand_score(np.repeat([0, 1], 20), labels.numpy()) == pytest.approx(1.0)
    assert np.allclose(np.linalg.norm(centroids.numpy(), axis=1), 1.0, atol=1e-3)


def test_bad_input_is_named() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(DataError, match=r"11 clusters of 10 samples"):
        kmeans_pseudo_labels(x, 11)
    with pytest.raises(DataError, match="needs labels"):
        kmeans_pseudo_labels(x, 2, standardize_by_class="mean")
    with pytest.raises(DataError, match="labels have shape"):
        kmeans_pseudo_labels(x, 2, standardize_by_class="mean", labels=np.zeros(9, dtype=int))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        kmeans_pseudo_labels(bad, 2)
    with pytest.raises(ConfigError, match="backend"):
        resolve_backend("cuml")
    with pytest.raises(ConfigError, match="standardize_by_class"):
        standardize_features(x.numpy(), np.zeros(10, dtype=int), "median")  # type: ignore[arg-type]
    assert resolve_backend("auto") == ("faiss" if faiss_installed() else "sklearn")
