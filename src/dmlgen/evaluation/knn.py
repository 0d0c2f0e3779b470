"""Exact k-nearest-neighbour search with memory bounded by a block of queries.

Queries are processed in blocks of ``block_size`` rows against all references; the block's scores
(``block_size x M`` floats, about 128 MB by default) are computed tile by tile, and each tile of about
8 MB is reduced while it is still in cache: its columns are split into groups of ``group`` references
and the maximum of each group is kept. After the block, one top-k over each row's group maxima finds
the k + 1 best groups. A group whose maximum is below the k-th largest group maximum cannot hold a
top-k score (k other groups each hold a larger one), so the exact top-k runs over the scores of those
groups only: ``(k + 1) * group`` candidates per query instead of M, gathered from the block. This
replaces a full ``topk`` over every row (the slow part of a plain matmul-plus-topk) by one vectorised
``amax`` pass per tile and two small top-k calls per block. Ties at the k-th group maximum widen the
kept set, so the result stays exact.

Scores are "larger is closer": ``q . r`` for ``inner_product`` and ``cosine`` (inputs normalised first)
and ``q . r - |r|^2 / 2`` for ``euclidean``, which orders references exactly as ``|q - r|^2`` does for a
fixed query. Ties are broken by reference index (the lower index first), as methods.md §1.3 asks.

Memory is one block of scores plus its group maxima (``block_size * M * (1 + 1 / group)`` floats) and
O(N * k) for the result.
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

DEFAULT_BLOCK_ROWS = 512  #: queries per block
_TILE_BYTES = 8 * 2**20  # one tile of scores (block rows x tile columns): reduced while still in cache
_BLOCK_BYTES = 128 * 2**20  # one block of scores (block rows x all references)


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


def _plan(num_refs: int, k: int, rows: int) -> tuple[int, int, bool]:
    """``(tile, group, pruned)``: score columns per tile, references per group, and whether groups prune.

    A tile of ``rows x tile`` scores is about 8 MB (a quarter of this machine's last-level cache), so
    it is reduced while still in cache. About k + 1 groups of each row survive, so the final exact
    top-k sees ``(k + 1) * group`` candidates after a top-k over ``num_refs / group`` group maxima:
    ``group ~ sqrt(num_refs / (k + 1))`` balances the two (at most 32, where the strided maximum stops
    paying). With few references per kept candidate, pruning is off and whole rows go to one exact
    top-k (group 1).
    """
    group = int(max(1, min(32, round(math.sqrt(num_refs / (k + 1))))))
    if group == 1 or 4 * (k + 1) * group > num_refs:
        return num_refs, 1, False
    tile = max(group, _TILE_BYTES // (4 * rows) // group * group)
    return min(tile, math.ceil(num_refs / group) * group), group, True


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
        references: (M, D) prepared embeddings, or None for leave-one-out on ``queries``.
        k: neighbours per query, 1 <= k <= M (M - 1 in leave-one-out).
        metric: see the module docstring.
        block_size: queries per block (None: 512, fewer when M is large, so that one block of
            scores stays near 128 MB).

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
    if block_size is None:
        block_size = max(1, min(DEFAULT_BLOCK_ROWS, _BLOCK_BYTES // (4 * num_r)))
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    block_size = min(block_size, num_q)

    tile, group, pruned = _plan(num_r, k, block_size)
    padded = math.ceil(num_r / group) * group
    # The per-reference bias enters through addmm: -|r|^2/2 (Euclidean) or 0, and -inf on padding.
    bias = torch.zeros(padded, dtype=torch.float32)
    if metric in ("euclidean", "squared_euclidean"):
        bias[:num_r] = refs.pow(2).sum(dim=1).mul_(-0.5)
    bias[num_r:] = -math.inf
    refs_t = torch.zeros(refs.shape[1], padded, dtype=torch.float32)
    refs_t[:, :num_r] = refs.T
    tiles = [(t0, min(t0 + tile, padded)) for t0 in range(0, padded, tile)]
    scores_buf = torch.empty(block_size, padded, dtype=torch.float32)  # one block of scores, reused
    group_max_buf = torch.empty(block_size, padded // group, dtype=torch.float32) if pruned else None
    # Group j of a tile is the strided set of columns t0 + j + m * num_groups (m < group): its maximum
    # is an elementwise max over `group` contiguous slices, which vectorises well. Groups are numbered
    # across tiles (tile t's groups start at t0 / group), which `_group_columns` inverts.
    tile_groups = torch.tensor([(t1 - t0) // group for t0, t1 in tiles])

    for start in range(0, num_q, block_size):
        stop = min(start + block_size, num_q)
        rows = stop - start
        scores = scores_buf[:rows]
        for t0, t1 in tiles:
            out = scores[:, t0:t1]
            torch.addmm(bias[t0:t1], queries[start:stop], refs_t[:, t0:t1], out=out)
            if leave_one_out:
                lo, hi = max(t0, start), min(t1, stop)
                if lo < hi:  # the query itself is never its own neighbour
                    out[lo - start:hi - start, lo - t0:hi - t0].diagonal().fill_(-math.inf)
            if pruned:  # reduced while the tile is still in cache
                num_groups = (t1 - t0) // group
                torch.amax(out.view(rows, group, num_groups), dim=1,
                           out=group_max_buf[:rows, t0 // group:t1 // group])  # type: ignore[index]
        if not pruned:
            idx, vals = _top_k_stable(scores[:, :num_r], None, k)
        else:
            chosen = _groups_holding_top_k(group_max_buf[:rows], k)  # type: ignore[index]
            cols = _group_columns(chosen, tile, group, tile_groups)
            idx, vals = _top_k_stable(torch.gather(scores, 1, cols), cols, k)
        yield start, idx, vals


def _group_columns(chosen: torch.Tensor, tile: int, group: int, tile_groups: torch.Tensor) -> torch.Tensor:
    """(B, W * group) score columns of the (B, W) chosen group numbers (see :func:`iter_knn_blocks`)."""
    t = torch.div(chosen, tile // group, rounding_mode="floor")
    t0 = t * tile
    first = t0 + (chosen - torch.div(t0, group, rounding_mode="floor"))
    stride = tile_groups[t]
    cols = first.unsqueeze(2) + stride.unsqueeze(2) * torch.arange(group)
    return cols.view(chosen.shape[0], -1)


def _groups_holding_top_k(group_max: torch.Tensor, k: int) -> torch.Tensor:
    """(B, W) indices of the groups that can hold a top-k score of their row, W >= k.

    A group whose maximum is below the k-th largest group maximum holds no top-k score (k other groups
    each have a larger one). The k + 1 largest groups are kept, which is enough unless the (k + 1)-th
    ties with the k-th somewhere; then every group reaching the k-th largest maximum is kept. Checking
    the k + 1 values is far cheaper than counting over all groups.
    """
    rows, num_groups = group_max.shape
    if num_groups <= k + 1:
        return torch.arange(num_groups).expand(rows, -1)
    top = torch.topk(group_max, k + 1, dim=1, sorted=False)
    lowest = top.values.amin(dim=1, keepdim=True)
    if int((top.values == lowest).sum()) == rows:  # the (k + 1)-th is strictly below the k-th everywhere
        return top.indices
    kth = torch.kthvalue(top.values, 2, dim=1, keepdim=True).values
    width = int((group_max >= kth).sum(dim=1).max())
    return torch.topk(group_max, width, dim=1, sorted=False).indices


def _top_k_stable(
    values: torch.Tensor, columns: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``values`` (B, W), largest first, equal values ordered by ``columns``
    (B, W) (None: by position). Returns (columns, values), each (B, k).

    ``topk`` is fast but orders ties arbitrarily; rows whose k-th value is tied with a value left
    outside the top-k are redone with a stable sort over the candidates in column order.
    """
    if columns is None:
        columns = torch.arange(values.shape[1]).expand(values.shape[0], -1)
    width = values.shape[1]
    # The (k + 1)-th largest tells whether a tie straddles the cut: only then is it equal to the k-th.
    top_vals, top_pos = torch.topk(values, min(k + 1, width), dim=1, sorted=False)
    if width > k:
        lowest = top_vals.amin(dim=1, keepdim=True)
        tied = ((top_vals == lowest).sum(dim=1) > 1).nonzero().flatten()
    else:
        tied = torch.empty(0, dtype=torch.int64)
    cols = torch.gather(columns, 1, top_pos)
    cols, by_col = torch.sort(cols, dim=1)  # by column, then stably by value
    top_vals = torch.gather(top_vals, 1, by_col)
    top_vals, by_val = torch.sort(top_vals, dim=1, descending=True, stable=True)
    cols = torch.gather(cols, 1, by_val)[:, :k]
    top_vals = top_vals[:, :k]
    if len(tied):  # a tie straddles the cut: the lowest columns among equals must win
        sub_cols, by_col = torch.sort(columns[tied], dim=1)
        sub_vals = torch.gather(values[tied], 1, by_col)
        sorted_vals, order = torch.sort(sub_vals, dim=1, descending=True, stable=True)
        top_vals[tied] = sorted_vals[:, :k]
        cols[tied] = torch.gather(sub_cols, 1, order[:, :k])
    return cols.contiguous(), top_vals.contiguous()


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
        result = _faiss_knn(q, r, k, metric)
    elif backend == "torch":
        indices = torch.empty(q.shape[0], k, dtype=torch.int64)
        scores = torch.empty(q.shape[0], k, dtype=torch.float32)
        for start, idx, sc in iter_knn_blocks(q, r, k, metric=metric, block_size=block_size):
            indices[start:start + len(idx)] = idx
            scores[start:start + len(idx)] = sc
        result = KnnResult(indices, _scores_to_distances(scores, q, metric))
    else:
        raise DataError(f"unknown kNN backend {backend!r}; choose torch or faiss")
    if metric in ("euclidean", "squared_euclidean"):
        result = _exact_euclidean(q, q if r is None else r, result, metric)
    return result


def _exact_euclidean(q: torch.Tensor, r: torch.Tensor, result: KnnResult, metric: str) -> KnnResult:
    """Recompute the returned Euclidean distances as ``|q - r|`` directly.

    The search ranks by ``q.r - |r|^2/2``, whose conversion ``|q|^2 - 2 (q.r - |r|^2/2)`` loses the small
    distances to cancellation (a duplicate comes out near 1e-3 instead of 0). The k neighbours found are
    kept; each row is re-sorted stably by the exact distance, so exact ties keep their index order.
    """
    n, k = result.indices.shape
    exact = torch.empty(n, k, dtype=torch.float32)
    rows = max(1, (16 * 2**20) // max(1, 4 * k * q.shape[1]))  # (rows, k, D) differences of about 16 MB
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        diff = q[start:stop].unsqueeze(1) - r[result.indices[start:stop]]
        exact[start:stop] = diff.pow_(2).sum(dim=2)
    exact, order = torch.sort(exact, dim=1, stable=True)
    indices = torch.gather(result.indices, 1, order)
    return KnnResult(indices, exact.sqrt_() if metric == "euclidean" else exact)


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
