"""Exact k-nearest-neighbour search that never materialises an N x M score matrix.

Queries are processed in blocks of ``block_size`` rows against all references. Each block's scores are
computed tile by tile; while a tile is still in cache its *group maxima* (max over runs of ``group_size``
consecutive references) are taken. The k-th largest group maximum is a lower bound of the k-th largest
score of the row, because the k largest group maxima are k distinct scores. So only the groups whose
maximum reaches that bound can hold a top-k neighbour: those few groups (usually exactly k) are gathered
and sorted exactly. This replaces a full ``topk`` over every row (the slow part of a plain
matmul-plus-topk) by one ``amax`` pass and a sort of about ``k * group_size`` values per query.

Scores are "larger is closer": ``q . r`` for ``inner_product`` and ``cosine`` (inputs normalised first)
and ``q . r - |r|^2 / 2`` for ``euclidean``, which orders references exactly as ``|q - r|^2`` does for a
fixed query. Ties are broken by reference index (the lower index first), as methods.md §1.3 asks.

Memory is O(block_size * M) floats for the block's tiles plus O(N * k) for the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dmlgen.errors import DataError

Metric = Literal["euclidean", "squared_euclidean", "cosine", "inner_product"]
METRICS: tuple[str, ...] = ("euclidean", "squared_euclidean", "cosine", "inner_product")
Backend = Literal["torch", "faiss"]

#: queries per block; with 60,000 references one block's scores take 8 * 60,000 * 4 bytes = 1.9 MB per row
DEFAULT_BLOCK_BYTES = 64 * 2**20
_TILE_BYTES = 4 * 2**20  # one tile of scores: small enough to be reduced while in the last-level cache


@dataclass(frozen=True)
class KnnResult:
    """Neighbours of every query, closest first.

    Attributes:
        indices: (N, k) int64 reference indices.
        distances: (N, k) float32 distances in the unit of ``metric``: Euclidean distance,
            squared Euclidean distance, cosine *similarity* or inner product (the latter two
            are similarities: larger is closer).
    """

    indices: torch.Tensor
    distances: torch.Tensor


def _check_embeddings(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":  # strings, objects, ...: torch.as_tensor would raise a TypeError
            raise DataError(f"{name} must hold numbers, got dtype {arr.dtype}")
        x = torch.as_tensor(arr)
    if x.ndim != 2:
        raise DataError(f"{name} must be a 2-d (N, D) array, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (shape {tuple(x.shape)})")
    if x.shape[1] == 0:
        raise DataError(f"{name} has 0 dimensions (shape {tuple(x.shape)})")
    if x.dtype == torch.bool or x.is_complex():  # every other dtype is a float or integer one
        raise DataError(f"{name} must hold numbers, got dtype {x.dtype}")
    x = x.detach().float()
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()
        raise DataError(f"{name} holds NaN or inf in {len(bad)} row(s), the first at row {int(bad[0])}")
    return x


def prepare_embeddings(x: torch.Tensor, metric: str, name: str = "embeddings") -> torch.Tensor:
    """Validate ``x`` (N, D) and return it as contiguous float32 (L2-normalised for ``cosine``)."""
    if metric not in METRICS:
        raise DataError(f"unknown distance {metric!r}; choose one of {', '.join(METRICS)}")
    x = _check_embeddings(x, name)
    if metric == "cosine":
        norms = x.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            row = int(torch.nonzero(norms.flatten() == 0)[0])
            raise DataError(f"{name} row {row} is all zeros: its cosine similarity is undefined")
        x = x / norms
    return x.contiguous()


def _scores_to_distances(scores: torch.Tensor, queries: torch.Tensor, metric: str) -> torch.Tensor:
    if metric in ("cosine", "inner_product"):
        return scores
    # |q - r|^2 = |q|^2 - 2 (q.r - |r|^2/2)
    sq = (queries.pow(2).sum(dim=1, keepdim=True) - 2 * scores).clamp_min_(0)
    return sq.sqrt_() if metric == "euclidean" else sq


def _group_size(num_refs: int, k: int) -> int:
    """References per group: at least 32 k groups keep the bound tight and the gathered part small."""
    return int(min(max(1, num_refs // (32 * k)), 256))


def iter_knn_blocks(
    queries: torch.Tensor,
    references: torch.Tensor | None,
    k: int,
    *,
    metric: Metric = "euclidean",
    block_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, indices, scores)`` for consecutive blocks of queries.

    Args:
        queries: (N, D) prepared embeddings (see :func:`prepare_embeddings`).
        references: (M, D) prepared embeddings, or None for leave-one-out on ``queries`` (the query
            itself is excluded by index, so duplicates of it still count as neighbours).
        k: neighbours per query, 1 <= k <= M (M - 1 in leave-one-out).
        metric: see the module docstring.
        block_size: queries per block (None: sized to about 64 MB of scores).

    Yields:
        start: index of the block's first query; indices (B, k) int64; scores (B, k) float32,
        larger is closer (``q.r - |r|^2/2`` for the Euclidean metrics).
    """
    leave_one_out = references is None
    refs = queries if references is None else references
    num_q, num_r = queries.shape[0], refs.shape[0]
    available = num_r - 1 if leave_one_out else num_r
    if not 1 <= k <= available:
        what = "other embeddings (leave-one-out)" if leave_one_out else "references"
        raise DataError(f"k = {k} neighbours requested but there are only {available} {what}")

    group = _group_size(num_r, k)
    groups_per_tile = max(1, min(math.ceil(num_r / group), _TILE_BYTES // (4 * group * 256)))
    tile = groups_per_tile * group
    num_tiles = math.ceil(num_r / tile)
    padded = num_tiles * tile
    num_groups = padded // group
    if block_size is None:
        block_size = max(1, min(num_q, DEFAULT_BLOCK_BYTES // (4 * padded)))
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")

    # One matmul per tile adds the per-reference bias: -|r|^2/2 (Euclidean) or 0, and -inf on padding.
    bias = torch.zeros(padded, dtype=torch.float32)
    if metric in ("euclidean", "squared_euclidean"):
        bias[:num_r] = refs.pow(2).sum(dim=1).mul_(-0.5)
    bias[num_r:] = -math.inf
    refs_t = torch.zeros(padded, refs.shape[1], dtype=torch.float32)
    refs_t[:num_r] = refs
    refs_t = refs_t.T.contiguous()  # (D, padded): each tile's operand is a column slice

    # allocated once: a fresh buffer per block would page-fault on every write
    buffer = torch.empty(num_tiles * min(block_size, num_q) * tile, dtype=torch.float32)
    for start in range(0, num_q, block_size):
        stop = min(start + block_size, num_q)
        q = queries[start:stop]
        rows = stop - start
        # tile-major layout: every tile (rows, tile) is contiguous, so addmm and amax stream through it
        scores = buffer[:num_tiles * rows * tile].view(num_tiles, rows, tile)
        group_max = torch.empty(rows, num_groups, dtype=torch.float32)
        for t in range(num_tiles):
            t0, t1 = t * tile, (t + 1) * tile
            out = scores[t]
            torch.addmm(bias[t0:t1], q, refs_t[:, t0:t1], out=out)
            if leave_one_out:
                lo, hi = max(t0, start), min(t1, stop)
                if lo < hi:  # the query itself is never its own neighbour
                    diag = torch.arange(lo, hi)
                    out[diag - start, diag - t0] = -math.inf
            torch.amax(out.view(rows, groups_per_tile, group), dim=2,
                       out=group_max[:, t * groups_per_tile:(t + 1) * groups_per_tile])

        if group == 1:
            cand_cols = None
            cand_vals = scores.permute(1, 0, 2).reshape(rows, padded)
        else:
            # only groups whose maximum reaches the k-th largest group maximum can hold a top-k score
            kth = torch.topk(group_max, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
            width = int((group_max >= kth).sum(dim=1).max())
            chosen = torch.topk(group_max, width, dim=1, sorted=False).indices
            chosen = torch.sort(chosen, dim=1).values  # ascending columns keep the index tie-break
            cand_cols = (chosen.unsqueeze(2) * group + torch.arange(group)).reshape(rows, width * group)
            tile_of, within = cand_cols // tile, cand_cols % tile
            row_of = torch.arange(rows).unsqueeze(1)
            cand_vals = scores.view(-1)[(tile_of * rows + row_of) * tile + within]
        idx, vals = _top_k_stable(cand_vals, cand_cols, k)
        yield start, idx, vals


def _top_k_stable(values: torch.Tensor, columns: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row, largest first, equal values ordered by column (``columns`` ascending per row).

    ``topk`` is fast but orders ties arbitrarily; rows whose k-th value is tied with a value outside
    the top-k are redone with a stable sort.
    """
    top_vals, top_pos = torch.topk(values, k, dim=1, sorted=False)
    cols = top_pos if columns is None else torch.gather(columns, 1, top_pos)
    # order the k winners: by column, then stably by value
    cols, by_col = torch.sort(cols, dim=1)
    top_vals = torch.gather(top_vals, 1, by_col)
    top_vals, by_val = torch.sort(top_vals, dim=1, descending=True, stable=True)
    cols = torch.gather(cols, 1, by_val)
    kth = top_vals[:, -1:]
    tied = ((values >= kth).sum(dim=1) > k).nonzero().flatten()
    if len(tied):  # a tie straddles the cut: the lowest columns among equals must win
        sub = values[tied]
        sorted_vals, order = torch.sort(sub, dim=1, descending=True, stable=True)
        top_vals[tied] = sorted_vals[:, :k]
        cols[tied] = order[:, :k] if columns is None else torch.gather(columns[tied], 1, order[:, :k])
    return cols, top_vals.contiguous()


def knn(
    queries: torch.Tensor,
    references: torch.Tensor | None = None,
    k: int = 1,
    *,
    metric: Metric = "euclidean",
    block_size: int | None = None,
    backend: Backend = "torch",
) -> KnnResult:
    """Exact k nearest neighbours, closest first, ties broken by reference index.

    Args:
        queries: (N, D) embeddings.
        references: (M, D) embeddings, or None for leave-one-out on ``queries``.
        k: neighbours per query.
        metric: ``euclidean`` | ``squared_euclidean`` | ``cosine`` | ``inner_product``.
        block_size: queries per block (torch backend; memory is O(block_size * M)).
        backend: ``torch`` (this module) or ``faiss`` (flat index; same neighbours up to ties).

    Returns:
        :class:`KnnResult` with (N, k) indices and distances.
    """
    q = prepare_embeddings(queries, metric, "queries")
    r = None if references is None else prepare_embeddings(references, metric, "references")
    if r is not None and r.shape[1] != q.shape[1]:
        raise DataError(f"queries are {q.shape[1]}-d but references are {r.shape[1]}-d")
    if backend == "faiss":
        return _faiss_knn(q, r, k, metric)
    if backend != "torch":
        raise DataError(f"unknown kNN backend {backend!r}; choose torch or faiss")
    indices = torch.empty(q.shape[0], k, dtype=torch.int64)
    scores = torch.empty(q.shape[0], k, dtype=torch.float32)
    for start, idx, sc in iter_knn_blocks(q, r, k, metric=metric, block_size=block_size):
        indices[start:start + len(idx)] = idx
        scores[start:start + len(idx)] = sc
    return KnnResult(indices, _scores_to_distances(scores, q, metric))


def faiss_available() -> bool:
    """True when ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _import_faiss():  # type: ignore[no-untyped-def]
    try:
        import faiss
    except ImportError:
        raise DataError("backend 'faiss' needs the faiss package: pip install 'dmlgen[faiss]'") from None
    return faiss


def _faiss_knn(q: torch.Tensor, r: torch.Tensor | None, k: int, metric: str) -> KnnResult:
    faiss = _import_faiss()
    leave_one_out = r is None
    refs = q if r is None else r
    available = refs.shape[0] - 1 if leave_one_out else refs.shape[0]
    if not 1 <= k <= available:
        raise DataError(f"k = {k} neighbours requested but there are only {available} references")
    dim = q.shape[1]
    index = faiss.IndexFlatIP(dim) if metric in ("cosine", "inner_product") else faiss.IndexFlatL2(dim)
    index.add(refs.numpy())
    extra = 1 if leave_one_out else 0
    dist, idx = index.search(q.numpy(), k + extra)
    dist_t, idx_t = torch.from_numpy(dist), torch.from_numpy(idx)
    if leave_one_out:
        own = torch.arange(q.shape[0]).unsqueeze(1)
        is_self = idx_t == own
        # drop the query itself; where it was not returned (many exact duplicates) drop the last column
        drop = torch.where(is_self.any(dim=1), is_self.float().argmax(dim=1), torch.full((q.shape[0],), k))
        keep = torch.ones_like(idx_t, dtype=torch.bool)
        keep[torch.arange(q.shape[0]), drop] = False
        idx_t = idx_t[keep].view(-1, k)
        dist_t = dist_t[keep].view(-1, k)
    if metric == "euclidean":
        dist_t = dist_t.clamp_min(0).sqrt()
    return KnnResult(idx_t.to(torch.int64), dist_t.float())
