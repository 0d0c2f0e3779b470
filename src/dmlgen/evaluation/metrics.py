"""Retrieval metrics of "A Metric Learning Reality Check" (methods.md §1.4), vectorised per query.

Every function takes the relevance matrix of ranked neighbours, ``rel`` (B, k) bool where
``rel[q, i]`` says whether the i-th closest reference of query q has q's label, and returns one value
per query. :func:`aggregate` averages them over the non-lone queries, micro or class-balanced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dmlgen.errors import DataError


def label_codes(*label_sets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Map labels of several sets to shared dense codes 0..C-1 (same label, same code)."""
    sizes = [len(y) for y in label_sets]
    _, inverse = torch.unique(torch.cat(label_sets), return_inverse=True)
    return tuple(torch.split(inverse, sizes))


def count_relevant(query_codes: torch.Tensor, ref_codes: torch.Tensor, leave_one_out: bool) -> torch.Tensor:
    """R_q (N,) int64: references sharing the query's label, the query itself excluded in leave-one-out."""
    size = int(max(int(query_codes.max()), int(ref_codes.max()))) + 1
    per_label = torch.bincount(ref_codes, minlength=size)
    counts = per_label[query_codes]
    return counts - 1 if leave_one_out else counts


def relevance(query_codes: torch.Tensor, ref_codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, k) bool: does the neighbour ``indices[q, i]`` share query q's label."""
    return ref_codes[indices] == query_codes.unsqueeze(1)


def recall_at_k(rel: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """(B, len(ks)) float: 1 where a relevant reference is among the first K (the DML hit rate)."""
    first_hit = torch.where(rel.any(dim=1), rel.float().argmax(dim=1), rel.shape[1])
    return torch.stack([(first_hit < k).float() for k in ks], dim=1)


def precision_at_1(rel: torch.Tensor) -> torch.Tensor:
    """(B,) float: is the nearest reference relevant."""
    return rel[:, 0].float()


def _within_r(rel: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    ranks = torch.arange(rel.shape[1], device=rel.device)
    return rel & (ranks.unsqueeze(0) < num_relevant.unsqueeze(1))


def r_precision(rel: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """(B,) float: relevant among the first R_q, divided by R_q (``rel`` must hold >= R_q columns)."""
    hits = _within_r(rel, num_relevant).sum(dim=1)
    return hits.double() / num_relevant.clamp_min(1).double()


def map_at_r(rel: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """(B,) float: (1/R_q) sum_{i <= R_q} P_q(i) rel_q(i); the divisor is always R_q."""
    hit = _within_r(rel, num_relevant)
    precision = hit.cumsum(dim=1).double() / torch.arange(1, rel.shape[1] + 1, device=rel.device).double()
    return (precision * hit).sum(dim=1) / num_relevant.clamp_min(1).double()


def aggregate(per_query: torch.Tensor, query_codes: torch.Tensor, class_balanced: bool) -> torch.Tensor:
    """Mean over queries (dim 0) of ``per_query`` (N, ...), or the mean of per-class means."""
    per_query = per_query.double()
    if not class_balanced:
        return per_query.mean(dim=0)
    _, inverse, counts = torch.unique(query_codes, return_inverse=True, return_counts=True)
    flat = per_query.reshape(len(per_query), -1)
    sums = torch.zeros(len(counts), flat.shape[1], dtype=torch.float64).index_add_(0, inverse, flat)
    return (sums / counts.unsqueeze(1)).mean(dim=0).reshape(per_query.shape[1:])


def check_ks(ks: Sequence[int], available: int) -> tuple[int, ...]:
    """Validate Recall@K cut-offs against the number of references each query ranks."""
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise DataError("ks is empty: give at least one Recall@K cut-off")
    bad = [k for k in ks if k < 1]
    if bad:
        raise DataError(f"Recall@K cut-offs must be >= 1, got {bad}")
    if max(ks) > available:
        raise DataError(f"Recall@{max(ks)} asked but each query ranks only {available} references")
    return ks
