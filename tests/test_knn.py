"""Exact kNN (dmlgen.evaluation.knn) against a naive double loop, across block sizes, code paths and faiss.

The tie tests use small-integer embeddings (and, for cosine, vectors whose norms are powers of two), so
every score the module computes in float32 is exact and ties are real ties: the oracle then fixes the
order completely (closer first, equal distances by lower reference index).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dmlgen.evaluation.knn as knn_mod
from dmlgen.errors import DataError
from dmlgen.evaluation.knn import METRICS, knn

SIMILARITIES = ("cosine", "inner_product")


# ----------------------------------------------------------------------------------------------- oracle


def naive_value(q: list[float], r: list[float], metric: str) -> float:
    """Distance (Euclidean metrics) or similarity (cosine, inner product) by plain Python loops."""
    if metric in ("euclidean", "squared_euclidean"):
        sq = 0.0
        for a, b in zip(q, r, strict=True):
            sq += (a - b) * (a - b)
        return math.sqrt(sq) if metric == "euclidean" else sq
    dot = 0.0
    for a, b in zip(q, r, strict=True):
        dot += a * b
    if metric == "inner_product":
        return dot
    nq = math.sqrt(sum(a * a for a in q))
    nr = math.sqrt(sum(b * b for b in r))
    return dot / (nq * nr)


def naive_knn(queries, references, k: int, metric: str):
    """(indices, values) lists: every reference scored in a double loop, sorted by (closeness, index).

    ``references=None`` means leave-one-out: the query is skipped by its index, never by its distance.
    """
    q = np.asarray(queries, dtype=np.float64).tolist()
    loo = references is None
    r = q if loo else np.asarray(references, dtype=np.float64).tolist()
    all_idx, all_val = [], []
    for i, qi in enumerate(q):
        cands = []
        for j, rj in enumerate(r):
            if loo and j == i:
                continue
            v = naive_value(qi, rj, metric)
            key = -v if metric in SIMILARITIES else v
            cands.append((key, j, v))
        cands.sort()  # ties: lower reference index first
        all_idx.append([j for _, j, _ in cands[:k]])
        all_val.append([v for _, _, v in cands[:k]])
    return np.array(all_idx, dtype=np.int64), np.array(all_val, dtype=np.float64)


# ----------------------------------------------------------------------------------------------- data


def int_data(n: int, d: int, seed: int, high: int = 3, metric: str = "euclidean") -> torch.Tensor:
    """Small-integer embeddings with many exact ties and exact duplicates of earlier rows.

    For cosine, rows are ±1 vectors (norm 2 when d = 4) or signed unit axes (norm 1), times 1 or 2, so
    L2 normalisation in float32 is exact and equal cosines really are equal.
    """
    g = torch.Generator().manual_seed(seed)
    if metric == "cosine":
        assert d == 4
        signs = torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1
        axis = torch.nn.functional.one_hot(torch.randint(0, d, (n,), generator=g), d).float()
        use_axis = torch.rand(n, generator=g) < 0.3
        x = torch.where(use_axis.unsqueeze(1), axis * signs, signs)
        x = x * torch.randint(1, 3, (n, 1), generator=g).float()
    else:
        x = torch.randint(-high, high + 1, (n, d), generator=g).float()
    # exact duplicates: copy some rows onto later ones
    dup = torch.randperm(n, generator=g)[: max(1, n // 4)]
    for t in dup.tolist():
        s = int(torch.randint(0, n, (1,), generator=g))
        x[t] = x[s]
    return x


def assert_matches_oracle(res, queries, references, k, metric, exact_values=True):
    idx, val = naive_knn(queries, references, k, metric)
    assert res.indices.dtype == torch.int64
    assert tuple(res.indices.shape) == (len(queries), k)
    np.testing.assert_array_equal(res.indices.numpy(), idx)
    tol = 1e-6 if exact_values else 1e-4
    np.testing.assert_allclose(res.distances.double().numpy(), val, rtol=tol, atol=tol)


def true_scores(queries: torch.Tensor, refs: torch.Tensor | None, metric: str) -> np.ndarray:
    """(N, M) float64 closeness (larger is closer) by a loop over queries; -inf on the query itself."""
    q = queries.double().numpy()
    r = q if refs is None else refs.double().numpy()
    out = np.empty((len(q), len(r)))
    for i in range(len(q)):
        if metric == "cosine":
            out[i] = (r @ q[i]) / (np.linalg.norm(r, axis=1) * np.linalg.norm(q[i]))
        elif metric == "inner_product":
            out[i] = r @ q[i]
        else:
            out[i] = -((r - q[i]) ** 2).sum(axis=1)
        if refs is None:
            out[i, i] = -np.inf
    return out


def assert_same_up_to_near_ties(a: torch.Tensor, b: torch.Tensor, scores: np.ndarray, tol: float = 1e-5):
    """Both are valid rankings of the same float64 scores; they may differ only where scores are within tol."""
    a, b = a.numpy(), b.numpy()
    for row in range(len(a)):
        assert len(set(a[row])) == a.shape[1] and len(set(b[row])) == b.shape[1]
    sa = np.take_along_axis(scores, a, axis=1)
    sb = np.take_along_axis(scores, b, axis=1)
    assert np.isfinite(sa).all() and np.isfinite(sb).all()  # never the query itself
    np.testing.assert_allclose(sa, sb, rtol=0, atol=tol * max(1.0, np.abs(scores[np.isfinite(scores)]).max()))
    # and each is sorted by the exact scores up to the same tolerance
    assert (np.diff(sa, axis=1) <= tol * max(1.0, np.abs(sa).max())).all()
    assert (a != b).sum() <= max(2, a.size // 1000)  # near ties are rare in random data


# ----------------------------------------------------------------------------------------------- exact ties


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 3, 12])  # 12 = M - 1: every other embedding
def test_leave_one_out_matches_naive_with_ties_and_duplicates(metric, k):
    x = int_data(13, 4, seed=1 + k, metric=metric)
    assert len(torch.unique(x, dim=0)) < len(x)  # duplicates present, so the tie-break matters
    res = knn(x, None, k, metric=metric)
    assert_matches_oracle(res, x, None, k, metric)
    own = torch.arange(len(x)).unsqueeze(1)
    assert not bool((res.indices == own).any())  # the query is never its own neighbour


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 4, 11])  # 11 = M: every gallery item
def test_query_vs_gallery_matches_naive_with_ties(metric, k):
    q = int_data(9, 4, seed=20 + k, metric=metric)
    r = int_data(11, 4, seed=40 + k, metric=metric)
    r[3] = q[0]  # a gallery item equal to a query is a neighbour like any other
    r[7] = q[0]
    res = knn(q, r, k, metric=metric)
    assert_matches_oracle(res, q, r, k, metric)
    if metric in ("euclidean", "squared_euclidean") and k >= 2:
        assert res.indices[0, :2].tolist() == [3, 7]
        assert res.distances[0, :2].tolist() == [0.0, 0.0]


def test_duplicates_of_the_query_are_neighbours_in_index_order():
    x = torch.tensor([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0], [1.0, 1.0], [1.0, 2.0]])
    res = knn(x, None, 3, metric="euclidean")
    assert res.indices.tolist() == [[1, 3, 4], [0, 3, 4], [4, 0, 1], [0, 1, 4], [0, 1, 3]]
    assert res.distances[0].tolist() == [0.0, 0.0, 1.0]
    # three-way tie at the cut: only the lowest indices survive, whatever the block size
    for bs in (1, 2, 5):
        assert knn(x, None, 1, block_size=bs).indices[:, 0].tolist() == [1, 0, 4, 0, 0]


@pytest.mark.parametrize("metric", METRICS)
def test_random_float_data_matches_naive_all_metrics(metric):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(17, 6, generator=g)
    r = torch.randn(23, 6, generator=g) * 2 + 0.5
    assert_matches_oracle(knn(q, r, 23, metric=metric), q, r, 23, metric, exact_values=False)
    assert_matches_oracle(knn(q, None, 16, metric=metric), q, None, 16, metric, exact_values=False)


def test_cosine_ignores_norms_and_inner_product_does_not():
    q = torch.tensor([[1.0, 0.0]])
    r = torch.tensor([[10.0, 1.0], [1.0, 0.0], [3.0, 0.0]])
    assert knn(q, r, 3, metric="cosine").indices.tolist() == [[1, 2, 0]]  # 1 and 2 tie at cos = 1
    assert knn(q, r, 3, metric="inner_product").indices.tolist() == [[0, 2, 1]]
    d = knn(q, r, 3, metric="cosine").distances
    assert torch.allclose(d[0, :2], torch.ones(2))  # similarities: larger is closer


# ----------------------------------------------------------------------------------------------- block size


@pytest.mark.parametrize("metric", METRICS)
def test_block_size_does_not_change_results(metric):
    x = int_data(37, 4, seed=3, metric=metric)
    ref = knn(x, None, 9, metric=metric, block_size=1)
    assert_matches_oracle(ref, x, None, 9, metric)
    for bs in (2, 5, 36, 37, 100, None):
        other = knn(x, None, 9, metric=metric, block_size=bs)
        assert torch.equal(other.indices, ref.indices), bs
        assert torch.equal(other.distances, ref.distances), bs
    # random floats: a one-row block may round a score differently from a many-row block (1 ulp), so
    # references closer than that may swap; everything else is identical
    g = torch.Generator().manual_seed(4)
    q, r = torch.randn(29, 5, generator=g), torch.randn(31, 5, generator=g)
    ref = knn(q, r, 7, metric=metric, block_size=1)
    for bs in (3, 29, 1000):
        other = knn(q, r, 7, metric=metric, block_size=bs)
        assert_same_up_to_near_ties(other.indices, ref.indices, true_scores(q, r, metric))
        torch.testing.assert_close(other.distances, ref.distances, rtol=1e-5, atol=1e-5)


def test_iter_knn_blocks_covers_every_query_once_in_order():
    x = knn_mod.prepare_embeddings(int_data(23, 3, seed=5), "euclidean")
    starts, rows = [], 0
    for start, idx, sc in knn_mod.iter_knn_blocks(x, None, 4, block_size=6):
        assert start == rows
        assert idx.shape == sc.shape == (min(6, 23 - start), 4)
        assert bool((sc[:, :-1] >= sc[:, 1:]).all())  # scores: larger is closer, sorted
        starts.append(start)
        rows += len(idx)
    assert starts == [0, 6, 12, 18] and rows == 23


# ----------------------------------------------------------------------------------------------- code paths


def _record_candidates(monkeypatch):
    """Wrap the final top-k so a test can check which path (and how many candidates) it took."""
    widths: list[tuple[int, bool]] = []
    orig = knn_mod._top_k_stable

    def wrapped(values, columns, k):
        # the dense path hands over whole rows: every reference is a candidate
        dense = columns is None or bool((columns == torch.arange(values.shape[1])).all())
        widths.append((values.shape[1], dense))
        return orig(values, columns, k)

    monkeypatch.setattr(knn_mod, "_top_k_stable", wrapped)
    return widths


def naive_rows(queries: torch.Tensor, refs: torch.Tensor, rows, k: int, loo: bool):
    """Squared-Euclidean oracle for selected query rows (integer data, so float64 is exact): one query
    at a time against every reference, a stable sort puts equal distances in reference-index order."""
    q64, r64 = queries.double().numpy(), refs.double().numpy()
    out = []
    for i in rows:
        dist = ((r64 - q64[i]) ** 2).sum(axis=1)
        order = [j for j in np.argsort(dist, kind="stable").tolist() if not (loo and j == i)]
        out.append(order[:k])
    return np.array(out)


def test_group_size_one_path(monkeypatch):
    widths = _record_candidates(monkeypatch)
    x = int_data(40, 3, seed=8)
    assert knn_mod._plan(40, 5, 40)[2] is False  # 40 references: pruning would keep them all
    res = knn(x, None, 5, metric="squared_euclidean")
    assert widths and all(no_cols for _, no_cols in widths)  # the dense path, no gathered columns
    assert_matches_oracle(res, x, None, 5, "squared_euclidean")


def test_grouped_path_with_ties_gallery(monkeypatch):
    """M = 3000, k = 5: groups of 18 references; heavy ties make many groups reach the bound."""
    widths = _record_candidates(monkeypatch)
    g = torch.Generator().manual_seed(9)
    refs = torch.randint(-2, 3, (3000, 3), generator=g).float()
    queries = torch.randint(-2, 3, (25, 3), generator=g).float()
    assert knn_mod._plan(3000, 5, 7)[2]
    res = knn(queries, refs, 5, metric="squared_euclidean", block_size=7)
    assert widths and not any(no_cols for _, no_cols in widths)
    np.testing.assert_array_equal(res.indices.numpy(), naive_rows(queries, refs, range(25), 5, loo=False))


def test_large_candidate_width_path(monkeypatch):
    """Ties over a coarse grid: more than 2048 candidates per row reach the final exact sort."""
    widths = _record_candidates(monkeypatch)
    g = torch.Generator().manual_seed(10)
    refs = torch.randint(0, 3, (5000, 3), generator=g).float()
    queries = refs[:20].clone()
    res = knn(queries, refs, 10, metric="euclidean")
    assert knn_mod._plan(5000, 10, 20)[2]
    assert max(w for w, _ in widths) > 2048
    np.testing.assert_array_equal(res.indices.numpy(), naive_rows(queries, refs, range(20), 10, loo=False))
    assert bool((res.distances[:, 0] == 0).all())


def test_large_k_dense_path(monkeypatch):
    """k = 2500 of 4000 references (candidate width 4000 > 2048), with ties at the cut."""
    widths = _record_candidates(monkeypatch)
    g = torch.Generator().manual_seed(11)
    refs = torch.randint(-3, 4, (4000, 2), generator=g).float()
    queries = torch.randint(-3, 4, (6, 2), generator=g).float()
    res = knn(queries, refs, 2500, metric="squared_euclidean")
    assert max(w for w, _ in widths) > 2048
    np.testing.assert_array_equal(res.indices.numpy(), naive_rows(queries, refs, range(6), 2500, loo=False))


def test_leave_one_out_across_tiles_and_blocks():
    """N = 5000 leave-one-out at the real tile size: two score tiles, the last one padded."""
    g = torch.Generator().manual_seed(12)
    x = torch.randint(-2, 3, (5000, 3), generator=g).float()
    assert knn_mod._plan(5000, 6, 333)[2]
    res = knn(x, None, 6, metric="squared_euclidean", block_size=333)
    rows = list(range(0, 40)) + list(range(4080, 4110)) + list(range(4980, 5000))
    np.testing.assert_array_equal(res.indices[rows].numpy(), naive_rows(x, x, rows, 6, loo=True))
    assert not bool((res.indices == torch.arange(5000).unsqueeze(1)).any())


@pytest.mark.parametrize("k, n", [(3, 2010), (1, 997), (150, 151), (40, 303)])
def test_many_small_tiles_leave_one_out_and_gallery(monkeypatch, k, n):
    """Tiles shrunk to a few groups: tile edges, padding, and the diagonal falling in every tile."""
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-2, 3, (n, 2), generator=g).float()
    # the smallest pruned plan: groups of 2, tiles of 2 k groups (keep k of them)
    monkeypatch.setattr(knn_mod, "_plan", lambda num_refs, kk, rows: (4 * kk, 2, True))
    tile = 4 * k
    if n > 2 * tile:
        assert -(-n // tile) >= 3 and n % tile != 0  # several tiles, the last one padded
    for bs in (1, 7, n) if n < 500 else (13, n):
        res = knn(x, None, k, metric="squared_euclidean", block_size=bs)
        np.testing.assert_array_equal(res.indices.numpy(), naive_rows(x, x, range(n), k, loo=True))
    q = torch.randint(-2, 3, (11, 2), generator=g).float()
    res = knn(q, x, min(k + 1, n), metric="squared_euclidean", block_size=4)
    np.testing.assert_array_equal(res.indices.numpy(), naive_rows(q, x, range(11), min(k + 1, n), loo=False))


def test_top_k_stable_ties_straddling_the_cut():
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 0.0, 5.0, 5.0, 1.0]])
    cols, vals = knn_mod._top_k_stable(values, None, 2)
    assert cols.tolist() == [[1, 2], [0, 2]]
    assert vals.tolist() == [[3.0, 3.0], [5.0, 5.0]]
    columns = torch.tensor([[10, 11, 12, 13, 14], [3, 4, 8, 9, 20]])
    cols, vals = knn_mod._top_k_stable(values, columns, 3)
    assert cols.tolist() == [[11, 12, 14], [3, 8, 9]]


# ----------------------------------------------------------------------------------------------- faiss


@pytest.mark.skipif(not knn_mod.faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("metric", METRICS)
def test_faiss_backend_same_neighbours_as_torch(metric):
    g = torch.Generator().manual_seed(14)
    x = torch.randn(300, 16, generator=g)
    r = torch.randn(250, 16, generator=g)
    for refs, k in ((None, 40), (r, 40), (None, 299), (r, 250)):
        a = knn(x, refs, k, metric=metric)
        b = knn(x, refs, k, metric=metric, backend="faiss")
        scores = true_scores(x, refs, metric)
        if k == 40:  # no near ties around the first 40 of this data: identical
            assert torch.equal(a.indices, b.indices)
        assert_same_up_to_near_ties(a.indices, b.indices, scores)
        torch.testing.assert_close(a.distances, b.distances, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not knn_mod.faiss_available(), reason="faiss not installed")
def test_faiss_leave_one_out_never_returns_the_query():
    x = torch.zeros(6, 3)  # all duplicates: faiss may or may not return the query itself first
    res = knn(x, None, 5, backend="faiss")
    for i in range(6):
        assert sorted(res.indices[i].tolist()) == [j for j in range(6) if j != i]
    assert bool((res.distances == 0).all())
    # 12 duplicates, k = 2: most queries are not among faiss's 3 results; k of them must still come back
    x = torch.cat([torch.zeros(12, 3), torch.ones(3, 3)])
    res = knn(x, None, 2, backend="faiss")
    assert res.indices.shape == (15, 2)
    for i in range(15):
        row = res.indices[i].tolist()
        assert i not in row and len(set(row)) == 2
        assert all((j < 12) == (i < 12) for j in row)
    assert bool((res.distances == 0).all())


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_k_larger_than_references(backend):
    if backend == "faiss" and not knn_mod.faiss_available():
        pytest.skip("faiss not installed")
    x = torch.randn(5, 3)
    with pytest.raises(DataError, match=r"k = 5 .*only 4"):
        knn(x, None, 5, backend=backend)
    with pytest.raises(DataError, match=r"k = 4 .*only 3 references"):
        knn(x, x[:3], 4, backend=backend)
    with pytest.raises(DataError, match=r"k = 0"):
        knn(x, None, 0, backend=backend)


@pytest.mark.parametrize(
    "queries, refs, pattern",
    [
        (torch.randn(5), None, r"queries must be a 2-d \(N, D\) array, got shape \(5,\)"),
        (torch.randn(2, 3, 4), None, r"queries must be a 2-d .*\(2, 3, 4\)"),
        (torch.randn(0, 3), None, r"queries is empty"),
        (torch.randn(4, 0), None, r"queries has 0 dimensions"),
        (torch.randn(4, 3), torch.randn(4, 5), r"queries are 3-d but references are 5-d"),
        (torch.randn(4, 3), torch.randn(4, 3, 1), r"references must be a 2-d"),
        (torch.ones(4, 3, dtype=torch.bool), None, r"must hold numbers"),
    ],
)
def test_bad_shapes_and_types(queries, refs, pattern):
    with pytest.raises(DataError, match=pattern):
        knn(queries, refs, 1)


def test_non_finite_rows_are_named():
    x = torch.randn(6, 3)
    x[4, 1] = float("nan")
    with pytest.raises(DataError, match=r"queries holds NaN or inf in 1 row\(s\), the first at row 4"):
        knn(x, None, 1)
    r = torch.randn(5, 3)
    r[2, 0] = float("inf")
    r[3, 0] = -float("inf")
    with pytest.raises(DataError, match=r"references holds NaN or inf in 2 row\(s\), the first at row 2"):
        knn(torch.randn(3, 3), r, 1)


def test_zero_vector_with_cosine_is_refused_and_fine_otherwise():
    x = torch.randn(5, 3)
    x[3] = 0
    with pytest.raises(DataError, match=r"row 3 is all zeros.*cosine"):
        knn(x, None, 2, metric="cosine")
    assert knn(x, None, 2, metric="euclidean").indices.shape == (5, 2)


def test_unknown_metric_backend_and_block_size():
    x = torch.randn(5, 3)
    with pytest.raises(DataError, match=r"unknown distance 'manhattan'"):
        knn(x, None, 1, metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"unknown kNN backend 'annoy'"):
        knn(x, None, 1, backend="annoy")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"block_size must be >= 1, got 0"):
        knn(x, None, 1, block_size=0)


def test_numpy_and_integer_inputs_accepted():
    x = np.array([[0, 0], [0, 1], [3, 3]], dtype=np.int64)
    res = knn(x, None, 1)
    assert res.indices[:, 0].tolist() == [1, 0, 1]
    assert res.distances.dtype == torch.float32


@pytest.mark.parametrize("use_default_plan", [False, True])
def test_top_k_spread_over_k_groups_of_one_tile(monkeypatch, use_default_plan):
    """The k nearest references each sit in their own group of the same tile, so a tile must keep
    k groups (k - 1 would lose one)."""
    k = 6
    if not use_default_plan:
        monkeypatch.setattr(knn_mod, "_plan", lambda num_refs, kk, rows: (4 * kk, 2, True))
    g = torch.Generator().manual_seed(21)
    refs = torch.randint(50, 60, (3000, 2), generator=g).float()
    tile, group, pruned = knn_mod._plan(3000, k, 1)
    assert pruned and k * group <= tile
    near = torch.arange(k) * group  # one reference in each of the first k groups
    refs[near] = torch.tensor([[float(i), 0.0] for i in range(k)])
    query = torch.zeros(1, 2)
    res = knn(query, refs, k, metric="squared_euclidean", block_size=1)
    assert res.indices[0].tolist() == near.tolist()


def test_ties_at_the_kth_group_maximum_widen_the_kept_groups(monkeypatch):
    """Heavy duplicates make many group maxima equal to the k-th: more than k + 1 groups must be kept,
    and the result still equals the (distance, index) oracle."""
    kept: list[int] = []
    orig = knn_mod._groups_holding_top_k

    def wrapped(group_max, kk):
        chosen = orig(group_max, kk)
        kept.append(chosen.shape[1] - (kk + 1))
        return chosen

    monkeypatch.setattr(knn_mod, "_groups_holding_top_k", wrapped)
    monkeypatch.setattr(knn_mod, "_plan", lambda num_refs, kk, rows: (4 * kk + 8, 2, True))
    g = torch.Generator().manual_seed(13)
    x = torch.randint(0, 3, (300, 4), generator=g).float()
    for k in (1, 3, 5):
        res = knn(x, None, k, metric="squared_euclidean", block_size=37)
        np.testing.assert_array_equal(res.indices.numpy(), naive_rows(x, x, range(300), k, loo=True))
    assert max(kept) > 0  # the widened path ran


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_returned_euclidean_distances_are_exact_for_duplicates(backend):
    """The ranking score loses small distances to cancellation; knn() recomputes them: a duplicate is at
    exactly 0 and every distance matches a float64 computation."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(21)
    x = torch.randn(300, 64, generator=g) * 10
    x[150:] = x[:150]  # every row has a duplicate
    for metric in ("euclidean", "squared_euclidean"):
        res = knn(x, None, 4, metric=metric, backend=backend)
        assert bool((res.distances[:, 0] == 0).all())
        d64 = (x.double()[:, None, :] - x.double()[res.indices]).pow(2).sum(-1)
        want = d64.sqrt() if metric == "euclidean" else d64
        np.testing.assert_allclose(res.distances.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-4)
        assert bool((res.distances[:, 1:] >= res.distances[:, :-1]).all())
