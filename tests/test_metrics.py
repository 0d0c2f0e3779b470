"""Per-query retrieval metrics (dmlgen.evaluation.metrics) against plain-Python loops (methods.md §1.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmlgen.errors import DataError
from dmlgen.evaluation import metrics as M

# ----------------------------------------------------------------------------------------------- oracles


def naive_recall(rel_row: list[bool], k: int) -> float:
    for i in range(k):
        if rel_row[i]:
            return 1.0
    return 0.0


def naive_r_precision(rel_row: list[bool], r: int) -> float:
    hits = 0
    for i in range(r):
        hits += int(rel_row[i])
    return hits / r


def naive_map_at_r(rel_row: list[bool], r: int) -> float:
    total, hits = 0.0, 0
    for i in range(r):
        if rel_row[i]:
            hits += 1
            total += hits / (i + 1)
    return total / r  # the divisor is always R, not the number of hits


def random_case(seed: int, n: int = 40, k: int = 12):
    g = torch.Generator().manual_seed(seed)
    rel = torch.rand(n, k, generator=g) < 0.4
    r = torch.randint(1, k + 1, (n,), generator=g)
    return rel, r


# ----------------------------------------------------------------------------------------------- per query


@pytest.mark.parametrize("seed", range(5))
def test_per_query_metrics_match_loops(seed):
    rel, r = random_case(seed)
    rows = rel.tolist()
    ks = (1, 2, 5, 12)
    got_recall = M.recall_at_k(rel, ks)
    assert got_recall.shape == (len(rel), len(ks))
    for q, row in enumerate(rows):
        rq = int(r[q])
        for j, k in enumerate(ks):
            assert float(got_recall[q, j]) == naive_recall(row, k)
        assert float(M.precision_at_1(rel)[q]) == float(row[0])
        assert float(M.r_precision(rel, r)[q]) == pytest.approx(naive_r_precision(row, rq), abs=1e-12)
        assert float(M.map_at_r(rel, r)[q]) == pytest.approx(naive_map_at_r(row, rq), abs=1e-12)


def test_hand_computed_values():
    # ranks:        1      2     3      4     5
    rel = torch.tensor([[False, True, True, False, True]])
    r = torch.tensor([3])
    assert M.recall_at_k(rel, (1, 2, 5)).tolist() == [[0.0, 1.0, 1.0]]
    assert M.precision_at_1(rel).tolist() == [0.0]
    assert M.r_precision(rel, r).tolist() == [pytest.approx(2 / 3)]
    # MAP@R = (1/3) (1/2 + 2/3): the hit at rank 5 lies beyond R
    assert M.map_at_r(rel, r).tolist() == [pytest.approx((1 / 2 + 2 / 3) / 3)]
    perfect = torch.tensor([[True, True, True, False]])
    assert M.map_at_r(perfect, torch.tensor([3])).item() == pytest.approx(1.0)
    assert M.r_precision(perfect, torch.tensor([3])).item() == pytest.approx(1.0)
    none = torch.zeros(1, 4, dtype=torch.bool)
    assert M.map_at_r(none, torch.tensor([2])).item() == 0.0
    assert M.recall_at_k(none, (4,)).item() == 0.0


def test_relevant_beyond_r_do_not_count():
    rel = torch.tensor([[False, False, True, True]])
    assert M.r_precision(rel, torch.tensor([2])).item() == 0.0
    assert M.map_at_r(rel, torch.tensor([2])).item() == 0.0
    assert M.r_precision(rel, torch.tensor([4])).item() == pytest.approx(0.5)
    assert M.map_at_r(rel, torch.tensor([4])).item() == pytest.approx((1 / 3 + 2 / 4) / 4)


# ----------------------------------------------------------------------------------------------- labels


def test_label_codes_shared_and_dense():
    yq = torch.tensor([10, -3, 10, 7])
    yr = torch.tensor([7, 99, -3])
    cq, cr = M.label_codes(yq, yr)
    assert cq.tolist() == [2, 0, 2, 1] and cr.tolist() == [1, 3, 0]
    for a, la in zip(cq.tolist(), yq.tolist(), strict=True):
        for b, lb in zip(cr.tolist(), yr.tolist(), strict=True):
            assert (a == b) == (la == lb)


def test_count_relevant_matches_loops():
    g = torch.Generator().manual_seed(3)
    yq = torch.randint(0, 6, (30,), generator=g)
    yr = torch.randint(0, 9, (25,), generator=g)
    cq, cr = M.label_codes(yq, yr)
    got = M.count_relevant(cq, cr, leave_one_out=False)
    assert got.tolist() == [sum(int(b == a) for b in yr.tolist()) for a in yq.tolist()]
    (c,) = M.label_codes(yq)
    got = M.count_relevant(c, c, leave_one_out=True)
    assert got.tolist() == [sum(int(b == a) for j, b in enumerate(yq.tolist()) if j != i)
                            for i, a in enumerate(yq.tolist())]


def test_relevance_gathers_neighbour_labels():
    cq = torch.tensor([0, 1])
    cr = torch.tensor([1, 0, 0, 1])
    idx = torch.tensor([[1, 0, 3], [0, 2, 3]])
    assert M.relevance(cq, cr, idx).tolist() == [[True, False, False], [True, False, True]]


# ----------------------------------------------------------------------------------------------- averaging


def naive_aggregate(values: list[float], codes: list[int], class_balanced: bool) -> float:
    if not class_balanced:
        return sum(values) / len(values)
    per_class: dict[int, list[float]] = {}
    for v, c in zip(values, codes, strict=True):
        per_class.setdefault(c, []).append(v)
    means = [sum(vs) / len(vs) for vs in per_class.values()]
    return sum(means) / len(means)


@pytest.mark.parametrize("class_balanced", [False, True])
def test_aggregate_matches_loops(class_balanced):
    g = torch.Generator().manual_seed(5)
    codes = torch.tensor([0] * 10 + [3] * 2 + [7] * 1 + [4] * 5)[torch.randperm(18, generator=g)]
    values = torch.rand(18, 3, generator=g, dtype=torch.float64)
    got = M.aggregate(values, codes, class_balanced)
    assert got.shape == (3,)
    for j in range(3):
        want = naive_aggregate(values[:, j].tolist(), codes.tolist(), class_balanced)
        assert float(got[j]) == pytest.approx(want, abs=1e-12)
    one_d = M.aggregate(values[:, 0], codes, class_balanced)
    assert one_d.shape == () and float(one_d) == pytest.approx(float(got[0]), abs=1e-12)


def test_class_balanced_differs_from_micro_on_imbalanced_classes():
    codes = torch.tensor([0, 0, 0, 1])
    values = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert float(M.aggregate(values, codes, False)) == pytest.approx(0.75)
    assert float(M.aggregate(values, codes, True)) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- check_ks


def test_check_ks():
    assert M.check_ks([1, 2, np.int64(4)], 4) == (1, 2, 4)
    with pytest.raises(DataError, match=r"Recall@5 asked but each query ranks only 4 references"):
        M.check_ks([1, 5], 4)
    with pytest.raises(DataError, match=r"cut-offs must be >= 1, got \[0, -2\]"):
        M.check_ks([0, 1, -2], 4)
    with pytest.raises(DataError, match=r"ks is empty"):
        M.check_ks([], 4)
