"""Per-query retrieval results for the report's gallery: neighbours, marks, AP@R, worst queries first.

The per-query values follow methods.md §1.4 (leave-one-out by index, ties by reference index, AP@R divided
by R_q) and reuse :mod:`dmlgen.evaluation.metrics`, so a query's AP@R here is the one the test MAP@R
averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dmlgen.errors import DataError
from dmlgen.evaluation import metrics as M
from dmlgen.evaluation.knn import Metric, knn

# Neighbour entries (queries x depth) kept at most; a bigger query pool is cut so the depth stays exact.
MAX_ENTRIES = 20_000_000


@dataclass(frozen=True)
class QueryRanking:
    """Neighbours of a pool of queries, closest first.

    Attributes:
        queries: (P,) int64 indices of the queries in the query set.
        neighbours: (P, depth) int64 reference indices (the query set itself in leave-one-out mode).
        distances: (P, depth) float32 distances in the unit of ``metric`` (cosine: similarity).
        correct: (P, depth) bool, the neighbour has the query's label.
        num_relevant: (P,) int64 R_q, same-class references (the query excluded in leave-one-out).
        ap_at_r: (P,) float64 AP@R per query; NaN for lone queries (R_q = 0).
        first_hit: (P,) int64 1-based rank of the first correct neighbour, 0 when none is within depth.
    """

    queries: np.ndarray
    neighbours: np.ndarray
    distances: np.ndarray
    correct: np.ndarray
    num_relevant: np.ndarray
    ap_at_r: np.ndarray
    first_hit: np.ndarray


def _labels(labels: Any, n: int, name: str) -> torch.Tensor:
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{name} must be integers, got dtype {y.dtype}")
    return y.long()


def sample_queries(n: int, pool: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``pool`` of ``n`` queries (all of them when ``pool`` is None or >= n)."""
    if pool is None or pool >= n:
        return np.arange(n, dtype=np.int64)
    if pool < 1:
        raise DataError(f"query pool must be >= 1, got {pool}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=pool, replace=False)).astype(np.int64)


def rank_queries(embeddings: Any, labels: Any, gallery: Any | None = None, gallery_labels: Any | None = None, *,
                 k: int = 8, metric: Metric = "euclidean", queries: np.ndarray | None = None,
                 max_entries: int = MAX_ENTRIES) -> QueryRanking:
    """kNN of the queries ``queries`` (default: all) of ``embeddings`` (N, D) with their per-query AP@R.

    Leave-one-out within ``embeddings`` when ``gallery`` is None (the query is removed by index), else the
    queries rank ``gallery`` (M, D). The depth is max(k, max R_q) over the pool, so every AP@R is exact;
    when pool x depth would exceed ``max_entries`` the pool keeps its first queries that fit.
    """
    emb = embeddings if isinstance(embeddings, torch.Tensor) else torch.as_tensor(np.asarray(embeddings))
    if emb.ndim != 2:
        raise DataError(f"embeddings must be (N, D), got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    y_q = _labels(labels, n, "labels")
    if k < 1:
        raise DataError(f"neighbours per query must be >= 1, got {k}")
    loo = gallery is None
    if loo:
        ref, y_r = None, y_q
        (code_q,) = M.label_codes(y_q)
        code_r = code_q
        available = n - 1
    else:
        ref = gallery if isinstance(gallery, torch.Tensor) else torch.as_tensor(np.asarray(gallery))
        if gallery_labels is None:
            raise DataError("gallery given without gallery_labels")
        y_r = _labels(gallery_labels, ref.shape[0], "gallery_labels")
        code_q, code_r = M.label_codes(y_q, y_r)
        available = ref.shape[0]
    if available < 1:
        raise DataError(f"the report's retrieval gallery needs at least 2 images, got {n}")
    pool = np.arange(n, dtype=np.int64) if queries is None else np.asarray(queries, dtype=np.int64)
    if pool.ndim != 1 or len(pool) == 0 or pool.min() < 0 or pool.max() >= n:
        raise DataError(f"queries must be a non-empty list of indices in 0..{n - 1}")
    pool_t = torch.from_numpy(pool)
    num_relevant = M.count_relevant(code_q, code_r, loo)[pool_t]
    depth = min(available, max(k, int(num_relevant.max())))
    if len(pool) * depth > max_entries:
        pool = pool[: max(1, max_entries // depth)]
        pool_t = torch.from_numpy(pool)
        num_relevant = num_relevant[: len(pool)]
    if loo and len(pool) == n and bool((pool == np.arange(n)).all()):
        result = knn(emb, None, depth, metric=metric)
        nbr, dist = result.indices, result.distances
    else:
        # A pool of queries against the whole set: one extra neighbour, then drop the query itself by index.
        extra = 1 if loo else 0
        result = knn(emb[pool_t], emb if loo else ref, min(depth + extra, n if loo else available), metric=metric)
        nbr, dist = result.indices, result.distances
        if loo:
            is_self = nbr == pool_t.unsqueeze(1)
            # Rows without the query among the first depth + 1 (many exact duplicates) drop their last entry.
            drop = torch.where(is_self.any(dim=1), is_self.float().argmax(dim=1), nbr.shape[1] - 1)
            keep = torch.ones_like(nbr, dtype=torch.bool)
            keep[torch.arange(len(nbr)), drop] = False
            nbr = nbr[keep].reshape(len(nbr), -1)[:, :depth]
            dist = dist[keep].reshape(len(dist), -1)[:, :depth]
    rel = M.relevance(code_q[pool_t], code_r, nbr)
    ap = M.map_at_r(rel, num_relevant).numpy().astype(np.float64)
    ap[num_relevant.numpy() == 0] = np.nan
    first = torch.where(rel.any(dim=1), rel.float().argmax(dim=1) + 1, torch.zeros(len(rel), dtype=torch.long))
    return QueryRanking(
        queries=pool, neighbours=nbr.numpy().astype(np.int64), distances=dist.numpy().astype(np.float32),
        correct=rel.numpy().astype(bool), num_relevant=num_relevant.numpy().astype(np.int64), ap_at_r=ap,
        first_hit=first.numpy().astype(np.int64),
    )


def worst_first(ap_at_r: np.ndarray, first_hit: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Positions of the non-lone queries, worst first: lowest AP@R, then the latest first correct
    neighbour (none within depth counts as latest), then the lower query index. Lone queries (AP@R NaN)
    are left out: they have nothing to find."""
    ap = np.asarray(ap_at_r, dtype=np.float64)
    hit = np.asarray(first_hit, dtype=np.int64)
    idx = np.asarray(queries, dtype=np.int64)
    scored = np.flatnonzero(~np.isnan(ap))
    late = np.where(hit[scored] == 0, np.iinfo(np.int64).max, hit[scored])
    # lexsort: the last key is the primary one.
    order = np.lexsort((idx[scored], -late.astype(np.float64), ap[scored]))
    return scored[order]
