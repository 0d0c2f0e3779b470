"""2-D maps of embeddings for the report: a class-stratified sample, then UMAP (when installed) or t-SNE."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import numpy as np

from dmlgen.errors import ConfigError, DataError

MapMethod = Literal["auto", "umap", "tsne"]
MAP_METHODS = ("auto", "umap", "tsne")


def umap_available() -> bool:
    """True when ``umap-learn`` can be imported (``import umap``)."""
    return importlib.util.find_spec("umap") is not None


def sample_map_points(labels: np.ndarray, *, max_points: int, max_classes: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of the points to draw: at most ``max_classes`` classes (None or 0: all) chosen at
    random, then at most ``max_points`` of their points, spread evenly over those classes."""
    y = np.asarray(labels)
    if max_points < 1:
        raise ConfigError(f"map points must be >= 1, got {max_points}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    if max_classes and len(classes) > max_classes:
        classes = np.sort(rng.choice(classes, size=max_classes, replace=False))
    members = [np.flatnonzero(y == c) for c in classes]
    total = sum(len(m) for m in members)
    if total <= max_points:
        return np.sort(np.concatenate(members)).astype(np.int64)
    # Round-robin quota: every class keeps min(its size, an equal share), leftovers go to the larger ones.
    quota = np.zeros(len(members), dtype=np.int64)
    sizes = np.array([len(m) for m in members])
    left = max_points
    while left > 0:
        open_ = np.flatnonzero(quota < sizes)
        share = max(1, left // len(open_))
        for c in open_:
            take = min(share, sizes[c] - quota[c], left)
            quota[c] += take
            left -= take
            if left == 0:
                break
    picked = [rng.choice(m, size=q, replace=False) for m, q in zip(members, quota, strict=True) if q > 0]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def project_2d(x: Any, *, method: MapMethod = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """``(n, 2)`` float32 coordinates of the (n, D) points ``x`` and the name of the method used.

    ``auto``: UMAP when ``umap-learn`` is importable, else scikit-learn's t-SNE (PCA initialisation,
    perplexity min(30, (n - 1) / 3)). Both are seeded by ``seed``.
    """
    if method not in MAP_METHODS:
        raise ConfigError(f"map method must be one of {', '.join(MAP_METHODS)}, got {method!r}")
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or len(arr) < 4:
        raise DataError(f"a 2-D map needs at least 4 points (n, D), got shape {arr.shape}")
    if arr.shape[1] < 2:  # PCA initialisation needs two input dimensions; a zero column changes no distance
        arr = np.concatenate([arr, np.zeros((len(arr), 2 - arr.shape[1]), dtype=np.float32)], axis=1)
    if method == "umap" or (method == "auto" and umap_available()):
        try:
            import umap
        except ImportError:
            raise ConfigError("map method umap needs umap-learn: pip install umap-learn") from None
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(arr) - 1), random_state=seed)
        xy = reducer.fit_transform(arr)
        return np.asarray(xy, dtype=np.float32), f"UMAP (umap-learn {getattr(umap, '__version__', '?')})"
    import sklearn
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(arr) - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    xy = tsne.fit_transform(arr)
    note = "" if method == "tsne" else "; umap-learn is not installed"
    return np.asarray(xy, dtype=np.float32), f"t-SNE (scikit-learn {sklearn.__version__}{note})"
