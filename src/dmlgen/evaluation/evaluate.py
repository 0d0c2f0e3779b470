"""One call that scores embeddings: retrieval, clustering and generalization diagnostics.

Retrieval follows methods.md §1.4: leave-one-out (the query excluded by index) or queries against a
gallery; lone queries (no same-class reference) are excluded from every metric and counted; the kNN
depth is max(max K, max R_q), never the whole reference set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dmlgen.errors import DataError
from dmlgen.evaluation import metrics as M
from dmlgen.evaluation.clustering import KMeansBackend, clustering_scores
from dmlgen.evaluation.knn import Backend, Metric, iter_knn_blocks, knn, prepare_embeddings

RETRIEVAL_METRICS = ("recall", "precision@1", "r_precision", "map@r")
CLUSTERING_METRICS = ("nmi", "ami")
DIAGNOSTIC_METRICS = ("rho", "pi")
ALL_METRICS = RETRIEVAL_METRICS + CLUSTERING_METRICS + DIAGNOSTIC_METRICS
DEFAULT_METRICS = RETRIEVAL_METRICS + CLUSTERING_METRICS


def _as_labels(labels: Any, n: int, name: str) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        y = labels
    else:
        arr = np.asarray(labels)
        if arr.dtype.kind not in "biuf":  # strings, objects, ...: torch.as_tensor would raise a TypeError
            raise DataError(f"{name} must be integers, got dtype {arr.dtype}")
        y = torch.as_tensor(arr)
    if y.ndim != 1:
        raise DataError(f"{name} must be 1-d, got shape {tuple(y.shape)}")
    if len(y) != n:
        raise DataError(f"{name} has {len(y)} entries but there are {n} embeddings")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()):
            raise DataError(f"{name} holds NaN or inf")
        if not bool((y == y.round()).all()):
            raise DataError(f"{name} must be integers, got non-integer values such as {float(y[y != y.round()][0])}")
    elif y.dtype == torch.bool or y.is_complex():  # every other dtype is an integer one, unsigned included
        raise DataError(f"{name} must be integers, got dtype {y.dtype}")
    return y.to(torch.int64)


def _check_metric_names(metrics: Sequence[str] | None) -> tuple[str, ...]:
    if metrics is None:
        return DEFAULT_METRICS
    names = tuple(metrics)
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown:
        raise DataError(f"unknown metric(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_METRICS)}")
    if not names:
        raise DataError("metrics is empty: name at least one of " + ", ".join(ALL_METRICS))
    return names


def evaluate_embeddings(
    embeddings: Any,
    labels: Any,
    gallery: Any | None = None,
    gallery_labels: Any | None = None,
    *,
    metrics: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: Metric = "euclidean",
    class_balanced: bool = False,
    seed: int = 0,
    block_size: int | None = None,
    backend: Backend = "torch",
    kmeans_iterations: int = 20,
    kmeans_backend: KMeansBackend = "auto",
) -> dict[str, float]:
    """Score query embeddings against themselves (leave-one-out) or against a gallery.

    Args:
        embeddings: (N, D) query embeddings (tensor or array).
        labels: (N,) integer labels.
        gallery: (M, D) reference embeddings; None for leave-one-out on ``embeddings``.
        gallery_labels: (M,) labels of ``gallery``.
        metrics: names among ``recall`` (gives ``recall@K`` for each K), ``precision@1``,
            ``r_precision``, ``map@r``, ``nmi``, ``ami``, ``rho`` (spectral decay ``rho@k`` and ``rank``)
            and ``pi`` (density ratio ``pi_intra``, ``pi_inter``, ``pi_ratio``); None: retrieval + NMI/AMI.
        ks: Recall@K cut-offs.
        metric: ranking distance (``euclidean``, ``squared_euclidean``, ``cosine``, ``inner_product``).
        class_balanced: average within each query class first, then over classes.
        seed: seeds k-means.
        block_size: queries per kNN block (memory O(block_size * M)); results do not depend on it.
        backend: kNN backend, ``torch`` or ``faiss``.
        kmeans_iterations, kmeans_backend: k-means settings for NMI/AMI (k = distinct query labels).

    Returns:
        ``{metric name: value}`` plus ``num_queries`` and ``num_lone_queries`` (queries without any
        same-class reference, excluded from the retrieval metrics).
    """
    names = _check_metric_names(metrics)
    if backend not in ("torch", "faiss"):  # the retrieval loop would otherwise silently fall back to torch
        raise DataError(f"unknown kNN backend {backend!r}; choose torch or faiss")
    leave_one_out = gallery is None
    if leave_one_out and gallery_labels is not None:
        raise DataError("gallery_labels given without gallery")
    if not leave_one_out and gallery_labels is None:
        raise DataError("gallery given without gallery_labels")
    q = prepare_embeddings(embeddings, metric, "embeddings")
    y_q = _as_labels(labels, len(q), "labels")
    if leave_one_out:
        r, y_r = None, y_q
    else:
        r = prepare_embeddings(gallery, metric, "gallery")
        if r.shape[1] != q.shape[1]:
            raise DataError(f"embeddings are {q.shape[1]}-d but the gallery is {r.shape[1]}-d")
        y_r = _as_labels(gallery_labels, len(r), "gallery_labels")
    if int(torch.unique(torch.cat([y_q, y_r])).numel()) < 2:
        raise DataError("all embeddings share one label: retrieval and clustering metrics need at least 2 classes")

    out: dict[str, float] = {"num_queries": float(len(q))}
    wanted_retrieval = [m for m in names if m in RETRIEVAL_METRICS]
    if wanted_retrieval:
        out.update(_retrieval(q, r, y_q, y_r, wanted_retrieval, ks, metric, class_balanced, block_size, backend))
    if "nmi" in names or "ami" in names:
        wanted = tuple(m for m in CLUSTERING_METRICS if m in names)
        out.update(clustering_scores(q, y_q, iterations=kmeans_iterations, seed=seed, backend=kmeans_backend,
                                     scores=wanted))
    if "rho" in names:
        from dmlgen.evaluation.diagnostics import spectral_decays

        out.update(spectral_decays(q))
    if "pi" in names:
        from dmlgen.evaluation.diagnostics import density_ratio

        out.update(density_ratio(q, y_q))
    return out


def _retrieval(
    q: torch.Tensor,
    r: torch.Tensor | None,
    y_q: torch.Tensor,
    y_r: torch.Tensor,
    names: Sequence[str],
    ks: Sequence[int],
    metric: Metric,
    class_balanced: bool,
    block_size: int | None,
    backend: Backend,
) -> dict[str, float]:
    leave_one_out = r is None
    if leave_one_out:
        (code_q,) = M.label_codes(y_q)
        code_r = code_q
    else:
        code_q, code_r = M.label_codes(y_q, y_r)
    available = len(q) - 1 if leave_one_out else len(r)  # type: ignore[arg-type]
    ks = M.check_ks(ks, available) if "recall" in names else tuple(int(k) for k in ks) or (1,)
    num_relevant = M.count_relevant(code_q, code_r, leave_one_out)
    scored = num_relevant > 0
    num_lone = int((~scored).sum())
    if not bool(scored.any()):
        raise DataError("no query has a same-class reference: every query is lone, nothing to score")
    depth = min(available, max(max(ks), int(num_relevant.max())))

    n = len(q)
    hits = torch.zeros(n, len(ks))
    p_at_1 = torch.zeros(n)
    r_prec = torch.zeros(n, dtype=torch.float64)
    ap_r = torch.zeros(n, dtype=torch.float64)

    def score_block(start: int, indices: torch.Tensor) -> None:
        stop = start + len(indices)
        rel = M.relevance(code_q[start:stop], code_r, indices)
        rq = num_relevant[start:stop]
        hits[start:stop] = M.recall_at_k(rel, ks)
        p_at_1[start:stop] = M.precision_at_1(rel)
        r_prec[start:stop] = M.r_precision(rel, rq)
        ap_r[start:stop] = M.map_at_r(rel, rq)

    if backend == "faiss":
        result = knn(q, r, depth, metric=metric, backend="faiss")
        for start in range(0, n, 4096):
            score_block(start, result.indices[start:start + 4096])
    else:
        for start, indices, _ in iter_knn_blocks(q, r, depth, metric=metric, block_size=block_size):
            score_block(start, indices)

    codes = code_q[scored]
    out: dict[str, float] = {}
    if "recall" in names:
        recall = M.aggregate(hits[scored], codes, class_balanced)
        out.update({f"recall@{k}": float(v) for k, v in zip(ks, recall, strict=True)})
    if "precision@1" in names:
        out["precision@1"] = float(M.aggregate(p_at_1[scored], codes, class_balanced))
    if "r_precision" in names:
        out["r_precision"] = float(M.aggregate(r_prec[scored], codes, class_balanced))
    if "map@r" in names:
        out["map@r"] = float(M.aggregate(ap_r[scored], codes, class_balanced))
    out["num_lone_queries"] = float(num_lone)
    return out
