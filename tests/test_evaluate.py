"""evaluate_embeddings against a naive double-loop oracle and pytorch-metric-learning (methods.md §1.4–1.5).

The oracle ranks every reference of every query in plain Python (ties by lower reference index, the
query skipped by index in leave-one-out) and computes each metric from its definition. Integer-valued
embeddings make float32 scores exact, so ties in the data are ties in the module too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dmlgen.evaluation.evaluate as ev_mod
from dmlgen.errors import DataError
from dmlgen.evaluation.evaluate import evaluate_embeddings
from dmlgen.evaluation.knn import METRICS, faiss_available

RETRIEVAL = ["recall", "precision@1", "r_precision", "map@r"]

# ----------------------------------------------------------------------------------------------- oracle


def _value(q, r, metric):
    if metric in ("euclidean", "squared_euclidean"):
        sq = sum((a - b) ** 2 for a, b in zip(q, r, strict=True))
        return math.sqrt(sq) if metric == "euclidean" else sq
    dot = sum(a * b for a, b in zip(q, r, strict=True))
    if metric == "inner_product":
        return -dot
    return -dot / (math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in r)))


def naive_evaluate(x, y, gallery=None, gallery_labels=None, *, metric="euclidean", ks=(1, 2, 4, 8),
                   class_balanced=False) -> dict[str, float]:
    """Every metric of methods.md §1.4 from its definition, one query at a time."""
    xq = np.asarray(x, dtype=np.float64).tolist()
    yq = [int(v) for v in np.asarray(y)]
    loo = gallery is None
    xr = xq if loo else np.asarray(gallery, dtype=np.float64).tolist()
    yr = yq if loo else [int(v) for v in np.asarray(gallery_labels)]
    per_query: dict[str, list[float]] = {}
    scored_labels: list[int] = []
    lone = 0
    for i, (qi, li) in enumerate(zip(xq, yq, strict=True)):
        cands = sorted((_value(qi, rj, metric), j) for j, rj in enumerate(xr) if not (loo and j == i))
        rel = [yr[j] == li for _, j in cands]
        r = sum(1 for j in range(len(xr)) if yr[j] == li and not (loo and j == i))
        if r == 0:
            lone += 1
            continue
        scored_labels.append(li)
        vals = {f"recall@{k}": float(any(rel[:k])) for k in ks}
        vals["precision@1"] = float(rel[0])
        vals["r_precision"] = sum(rel[:r]) / r
        hits, ap = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        vals["map@r"] = ap / r
        for name, v in vals.items():
            per_query.setdefault(name, []).append(v)
    out = {"num_queries": float(len(xq)), "num_lone_queries": float(lone)}
    for name, vals in per_query.items():
        if class_balanced:
            by_class: dict[int, list[float]] = {}
            for v, lab in zip(vals, scored_labels, strict=True):
                by_class.setdefault(lab, []).append(v)
            means = [sum(vs) / len(vs) for vs in by_class.values()]
            out[name] = sum(means) / len(means)
        else:
            out[name] = sum(vals) / len(vals)
    return out


def int_embeddings(n: int, seed: int, metric: str, d: int = 4) -> torch.Tensor:
    """Small integers with duplicates (exact ties); for cosine, vectors whose norms are powers of two."""
    g = torch.Generator().manual_seed(seed)
    if metric == "cosine":
        signs = torch.randint(0, 2, (n, 4), generator=g).float() * 2 - 1
        axis = torch.nn.functional.one_hot(torch.randint(0, 4, (n,), generator=g), 4).float()
        x = torch.where((torch.rand(n, generator=g) < 0.3).unsqueeze(1), axis * signs, signs)
        x = x * torch.randint(1, 3, (n, 1), generator=g).float()
    else:
        x = torch.randint(-2, 3, (n, d), generator=g).float()
    for t in torch.randperm(n, generator=g)[: n // 4].tolist():
        x[t] = x[int(torch.randint(0, n, (1,), generator=g))]
    return x


def labels_with_singletons(n: int, seed: int, num_classes: int = 4) -> torch.Tensor:
    """Random labels over a few classes plus two classes of size 1 (lone queries in leave-one-out)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    y[3] = 100
    y[n - 2] = 101
    return y


def assert_dicts_close(got: dict[str, float], want: dict[str, float], tol: float = 1e-9):
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=tol), name


# ----------------------------------------------------------------------------------------------- oracle tests


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("class_balanced", [False, True])
def test_leave_one_out_matches_naive(metric, class_balanced):
    x = int_embeddings(23, seed=1, metric=metric)
    y = labels_with_singletons(23, seed=2)
    ks = (1, 2, 3, 22)  # 22 = every other embedding
    got = evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=ks, metric=metric, class_balanced=class_balanced)
    want = naive_evaluate(x, y, metric=metric, ks=ks, class_balanced=class_balanced)
    assert want["num_lone_queries"] == 2.0
    assert_dicts_close(got, want)
    assert got["precision@1"] == got["recall@1"]
    assert got["recall@22"] == 1.0


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("class_balanced", [False, True])
def test_query_vs_gallery_matches_naive(metric, class_balanced):
    q = int_embeddings(15, seed=3, metric=metric)
    r = int_embeddings(19, seed=4, metric=metric)
    r[5] = q[2]  # an exact copy of a query in the gallery still counts
    yq = torch.randint(0, 5, (15,), generator=torch.Generator().manual_seed(5))
    yr = torch.randint(1, 7, (19,), generator=torch.Generator().manual_seed(6))
    yq[0] = 50  # absent from the gallery: a lone query
    yr[5] = yq[2]
    ks = (1, 4, 19)
    got = evaluate_embeddings(q, yq, r, yr, metrics=RETRIEVAL, ks=ks, metric=metric, class_balanced=class_balanced)
    want = naive_evaluate(q, yq, r, yr, metric=metric, ks=ks, class_balanced=class_balanced)
    assert want["num_lone_queries"] >= 1
    assert_dicts_close(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_random_small_cases_match_naive(seed):
    """Many classes of size 1 and 2, ties everywhere (3-valued 2-d embeddings)."""
    g = torch.Generator().manual_seed(100 + seed)
    n = 30
    x = torch.randint(0, 3, (n, 2), generator=g).float()
    y = torch.randint(0, 14, (n,), generator=g)
    got = evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=(1, 5))
    want = naive_evaluate(x, y, ks=(1, 5))
    assert_dicts_close(got, want)
    got_cb = evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=(1, 5), class_balanced=True)
    assert_dicts_close(got_cb, naive_evaluate(x, y, ks=(1, 5), class_balanced=True))


def test_hand_built_case_ties_and_lone_query():
    # labels:      0       0       1       1       2 (lone)
    x = torch.tensor([[0.0], [1.0], [1.0], [3.0], [10.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    got = evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=(1, 2))
    # q0: refs 1 (d1, rel), 2 (d1, not): tie -> index 1 first: P@1 = 1
    # q1: refs 2 (d0, not), 0 (d1, rel): P@1 = 0, MAP@R = 0, R@2 = 1
    # q2: refs 1 (d0, not), 3 (d2, rel) and 0 (d1): order 1, 0, 3: P@1 = 0, R@2 = 0
    # q3: refs 2 (d2, rel) and 1 (d2): tie -> index 1 first (not rel), then 2: P@1 = 0, R@2 = 1
    assert got["num_lone_queries"] == 1.0
    assert got["precision@1"] == pytest.approx(1 / 4)
    assert got["recall@2"] == pytest.approx(3 / 4)
    assert got["map@r"] == pytest.approx(1 / 4)
    assert got["r_precision"] == pytest.approx(1 / 4)


def test_search_depth_is_max_of_k_and_r_never_n(monkeypatch):
    seen: list[int] = []
    orig = ev_mod.iter_knn_blocks

    def spy(q, r, k, **kw):
        seen.append(k)
        return orig(q, r, k, **kw)

    monkeypatch.setattr(ev_mod, "iter_knn_blocks", spy)
    y = torch.arange(10).repeat_interleave(7)  # R = 6 for every query
    x = torch.randn(70, 4, generator=torch.Generator().manual_seed(0))
    evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=(1, 2, 4))
    evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=(1, 8))
    evaluate_embeddings(x, y, metrics=["precision@1"], ks=(1,))
    assert seen == [6, 8, 6]


def test_default_metrics_keys():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(4).repeat_interleave(6)
    x = torch.randn(24, 5, generator=g) + 5 * torch.nn.functional.one_hot(y, 5).float()
    out = evaluate_embeddings(x, y)
    assert set(out) == {"num_queries", "num_lone_queries", "recall@1", "recall@2", "recall@4", "recall@8",
                        "precision@1", "r_precision", "map@r", "nmi", "ami"}
    assert out["num_queries"] == 24.0
    for name, value in out.items():
        if name not in ("num_queries", "num_lone_queries"):
            assert 0.0 <= value <= 1.0 + 1e-12, name
    only = evaluate_embeddings(x, y, metrics=["map@r"])
    assert set(only) == {"num_queries", "num_lone_queries", "map@r"}


# ----------------------------------------------------------------------------------------------- block size / faiss


def test_block_size_does_not_change_results():
    x = int_embeddings(41, seed=7, metric="euclidean")
    y = labels_with_singletons(41, seed=8, num_classes=6)
    want = evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=(1, 2, 8), block_size=1)
    assert_dicts_close(want, naive_evaluate(x, y, ks=(1, 2, 8)))
    for bs in (2, 5, 40, 41, 1000, None):
        got = evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=(1, 2, 8), block_size=bs)
        assert got == want, bs
        got_cb = evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=(1, 2, 8), block_size=bs, class_balanced=True)
        assert_dicts_close(got_cb, naive_evaluate(x, y, ks=(1, 2, 8), class_balanced=True))
    q, yq = x[:20], y[:20]
    want = evaluate_embeddings(q, yq, x[20:], y[20:], metrics=RETRIEVAL, ks=(1, 3), block_size=1)
    for bs in (3, 20, 500):
        assert evaluate_embeddings(q, yq, x[20:], y[20:], metrics=RETRIEVAL, ks=(1, 3), block_size=bs) == want


def clustered(seed: int, num_classes: int = 40, d: int = 16, max_size: int = 12, spread: float = 0.8):
    """Random class centres with Gaussian noise; class sizes 1..max_size (some classes of size 1)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_size + 1, (num_classes,), generator=g)
    sizes[:3] = 1
    y = torch.arange(num_classes).repeat_interleave(sizes)
    y = y[torch.randperm(len(y), generator=g)]
    centres = torch.randn(num_classes, d, generator=g)
    x = centres[y] + spread * torch.randn(len(y), d, generator=g)
    return x, y


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("metric", METRICS)
def test_faiss_backend_same_metrics_as_torch(metric):
    x, y = clustered(seed=11)
    a = evaluate_embeddings(x, y, metrics=RETRIEVAL, metric=metric)
    b = evaluate_embeddings(x, y, metrics=RETRIEVAL, metric=metric, backend="faiss")
    assert_dicts_close(a, b, tol=1e-12)
    q, yq, r, yr = x[:100], y[:100], x[100:], y[100:]
    a = evaluate_embeddings(q, yq, r, yr, metrics=RETRIEVAL, metric=metric)
    b = evaluate_embeddings(q, yq, r, yr, metrics=RETRIEVAL, metric=metric, backend="faiss")
    assert_dicts_close(a, b, tol=1e-12)
    assert 0.0 < a["map@r"] < 1.0  # a non-trivial case


# ----------------------------------------------------------------------------------------------- PML oracle


pml_acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
PML_KEYS = {"precision_at_1": "precision@1", "r_precision": "r_precision", "mean_average_precision_at_r": "map@r"}


def pml_calculator(**kw):
    return pml_acc.AccuracyCalculator(include=tuple(PML_KEYS), k="max_bin_count", device=torch.device("cpu"), **kw)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("class_balanced", [False, True])
def test_matches_pml_leave_one_out(seed, class_balanced):
    x, y = clustered(seed)
    pml = pml_calculator(avg_of_avgs=class_balanced).get_accuracy(x, y, x, y, ref_includes_query=True)
    ours = evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=(1,), class_balanced=class_balanced)
    assert ours["num_lone_queries"] >= 3
    for pml_name, name in PML_KEYS.items():
        assert ours[name] == pytest.approx(pml[pml_name], abs=1e-6), name
    assert 0.05 < ours["map@r"] < 0.95  # neither trivial nor hopeless


@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("class_balanced", [False, True])
def test_matches_pml_query_vs_gallery(seed, class_balanced):
    x, y = clustered(seed, num_classes=50)
    g = torch.Generator().manual_seed(seed)
    is_query = torch.rand(len(y), generator=g) < 0.4
    q, yq, r, yr = x[is_query], y[is_query], x[~is_query], y[~is_query]
    pml = pml_calculator(avg_of_avgs=class_balanced).get_accuracy(q, yq, r, yr, ref_includes_query=False)
    ours = evaluate_embeddings(q, yq, r, yr, metrics=RETRIEVAL, ks=(1,), class_balanced=class_balanced)
    assert ours["num_lone_queries"] >= 1  # some query classes have no gallery item
    for pml_name, name in PML_KEYS.items():
        assert ours[name] == pytest.approx(pml[pml_name], abs=1e-6), name


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_nmi_ami_match_pml_with_the_same_faiss_kmeans():
    x, y = clustered(seed=4, num_classes=20, max_size=15, spread=0.6)
    pml = pml_acc.AccuracyCalculator(include=("NMI", "AMI"), device=torch.device("cpu")).get_accuracy(x, y)
    # PML: faiss.Kmeans(niter=20) with faiss's default seed, 1234
    ours = evaluate_embeddings(x, y, metrics=["nmi", "ami"], seed=1234, kmeans_iterations=20, kmeans_backend="faiss")
    assert ours["nmi"] == pytest.approx(pml["NMI"], abs=1e-9)
    assert ours["ami"] == pytest.approx(pml["AMI"], abs=1e-9)
    assert 0.3 < ours["nmi"] < 1.0


# ----------------------------------------------------------------------------------------------- bad input


X6 = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
Y6 = torch.tensor([0, 1, 0, 1, 0, 1])


def _with(row: int, value: float, x: torch.Tensor = X6) -> torch.Tensor:
    x = x.clone()
    x[row, 1] = value
    return x


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(embeddings=X6, labels=Y6[:5]), r"labels has 5 entries but there are 6 embeddings"),
        (dict(embeddings=X6, labels=Y6, gallery=X6[:4], gallery_labels=Y6),
         r"gallery_labels has 6 entries but there are 4 embeddings"),
        (dict(embeddings=_with(2, float("nan")), labels=Y6), r"embeddings holds NaN or inf .* at row 2"),
        (dict(embeddings=_with(5, float("inf")), labels=Y6), r"embeddings holds NaN or inf .* at row 5"),
        (dict(embeddings=X6, labels=Y6, gallery=_with(1, -float("inf")), gallery_labels=Y6),
         r"gallery holds NaN or inf .* at row 1"),
        (dict(embeddings=X6, labels=torch.zeros(6, dtype=torch.int64)), r"share one label.*at least 2 classes"),
        (dict(embeddings=X6[:3], labels=[0, 0, 0], gallery=X6[3:], gallery_labels=[0, 0, 0]), r"share one label"),
        (dict(embeddings=torch.empty(0, 3), labels=torch.empty(0, dtype=torch.int64)), r"embeddings is empty"),
        (dict(embeddings=np.zeros((0, 3)), labels=[]), r"embeddings is empty"),
        (dict(embeddings=X6[:, 0], labels=Y6), r"embeddings must be a 2-d \(N, D\) array, got shape \(6,\)"),
        (dict(embeddings=X6.reshape(6, 3, 1), labels=Y6), r"embeddings must be a 2-d .*\(6, 3, 1\)"),
        (dict(embeddings=X6, labels=Y6, gallery=torch.randn(4, 5), gallery_labels=Y6[:4]),
         r"embeddings are 3-d but the gallery is 5-d"),
        (dict(embeddings=X6, labels=Y6.reshape(3, 2)), r"labels must be 1-d, got shape \(3, 2\)"),
        (dict(embeddings=X6, labels=[0, 1, 0.5, 1, 0, 1]), r"labels must be integers.*0\.5"),
        (dict(embeddings=X6, labels=[0, 1, float("nan"), 1, 0, 1]), r"labels holds NaN or inf"),
        (dict(embeddings=X6, labels=np.array(list("abcabc"))), r"labels must be integers, got dtype <U1"),
        (dict(embeddings=X6, labels=np.array([0, 1, None, 1, 0, 1], dtype=object)),
         r"labels must be integers, got dtype object"),
        (dict(embeddings=X6, labels=Y6.bool()), r"labels must be integers, got dtype torch.bool"),
        (dict(embeddings=np.array([["a", "b"]] * 6), labels=Y6), r"embeddings must hold numbers, got dtype <U1"),
        (dict(embeddings=X6, labels=Y6, metrics=["recall", "f1", "nmi"]), r"unknown metric\(s\) 'f1'"),
        (dict(embeddings=X6, labels=Y6, metrics=[]), r"metrics is empty"),
        (dict(embeddings=X6, labels=Y6, metric="manhattan"), r"unknown distance 'manhattan'"),
        (dict(embeddings=X6, labels=Y6, backend="annoy"), r"unknown kNN backend 'annoy'"),
        (dict(embeddings=X6, labels=Y6, kmeans_backend="sklearn_x", metrics=["nmi"]), r"unknown k-means backend"),
        (dict(embeddings=X6, labels=Y6, ks=(1, 6)), r"Recall@6 asked but each query ranks only 5 references"),
        (dict(embeddings=X6, labels=Y6, gallery=X6[:4], gallery_labels=Y6[:4], ks=(5,)),
         r"Recall@5 asked but each query ranks only 4 references"),
        (dict(embeddings=X6, labels=Y6, ks=(0, 1)), r"cut-offs must be >= 1"),
        (dict(embeddings=X6, labels=Y6, gallery=X6), r"gallery given without gallery_labels"),
        (dict(embeddings=X6, labels=Y6, gallery_labels=Y6), r"gallery_labels given without gallery"),
        (dict(embeddings=X6, labels=torch.arange(6), metrics=RETRIEVAL, ks=(1,)), r"every query is lone"),
        (dict(embeddings=X6, labels=Y6, gallery=X6, gallery_labels=Y6 + 2, ks=(1,)), r"every query is lone"),
        (dict(embeddings=_with(4, 0.0, torch.tensor([[1.0, 2.0]] * 6)), labels=Y6, metric="cosine"),
         None),  # a zero *entry* is fine
        (dict(embeddings=torch.tensor([[1.0, 2.0]] * 3 + [[0.0, 0.0]] + [[2.0, 1.0]] * 2), labels=Y6,
              metric="cosine"), r"embeddings row 3 is all zeros: its cosine similarity is undefined"),
        (dict(embeddings=X6, labels=Y6, gallery=torch.zeros(2, 3), gallery_labels=[0, 1], metric="cosine"),
         r"gallery row 0 is all zeros"),
    ],
)
def test_bad_input_is_a_data_error_naming_the_problem(kwargs, pattern):
    kwargs = dict(kwargs)
    x, y = kwargs.pop("embeddings"), kwargs.pop("labels")
    if pattern is None:
        out = evaluate_embeddings(x, y, **kwargs, metrics=RETRIEVAL, ks=(1,))
        assert out["num_lone_queries"] == 0.0
        return
    with pytest.raises(DataError, match=pattern):
        evaluate_embeddings(x, y, **kwargs)


def test_unsigned_and_float_integral_labels_accepted():
    base = evaluate_embeddings(X6, Y6, metrics=RETRIEVAL, ks=(1,))
    for labels in (Y6.numpy().astype(np.uint16), Y6.numpy().astype(np.uint64), Y6.double(), [0, 1, 0, 1, 0, 1]):
        assert evaluate_embeddings(X6, labels, metrics=RETRIEVAL, ks=(1,)) == base


def test_lone_queries_are_counted_not_scored():
    x = torch.tensor([[0.0], [0.1], [5.0], [9.0], [9.1]])
    y = torch.tensor([0, 0, 7, 1, 1])  # the query at 5.0 is alone in its class
    out = evaluate_embeddings(x, y, metrics=RETRIEVAL, ks=(1,))
    assert out["num_lone_queries"] == 1.0 and out["num_queries"] == 5.0
    assert out["precision@1"] == 1.0 and out["map@r"] == 1.0  # the lone query would have scored 0
