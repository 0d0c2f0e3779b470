"""ContrastiveLoss against a naive loop over pairs and against pytorch-metric-learning (test-only oracle)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dmlgen.errors import ConfigError
from dmlgen.losses import (
    BatchHardMiner,
    ContrastiveLoss,
    CosineSimilarity,
    DegenerateBatchWarning,
    LpDistance,
    MeanReducer,
    MultiSimilarityMiner,
    TripletMarginMiner,
)
from _batches import make_batch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

TOL = {"atol": 1e-5, "rtol": 1e-5}


def naive_contrastive(x, y, *, pos_margin=0.0, neg_margin=1.0, kind="lp", normalize=True, reduce="avg_non_zero",
                      ref=None, ref_y=None, pairs=None) -> float:
    """Loop over every positive and negative pair (or the given ``pairs`` = (pos list, neg list))."""
    self_ref = ref is None
    q = (F.normalize(x.double(), dim=1) if normalize else x.double()).tolist()
    r = q if self_ref else (F.normalize(ref.double(), dim=1) if normalize else ref.double()).tolist()
    ql, rl = y.tolist(), (y if self_ref else ref_y).tolist()

    def value(i, j):
        if kind == "lp":
            return math.sqrt(sum((a - b) ** 2 for a, b in zip(q[i], r[j])))
        return sum(a * b for a, b in zip(q[i], r[j]))

    if pairs is None:
        pos = [(i, j) for i in range(len(q)) for j in range(len(r)) if ql[i] == rl[j] and not (self_ref and i == j)]
        neg = [(i, j) for i in range(len(q)) for j in range(len(r)) if ql[i] != rl[j]]
    else:
        pos, neg = pairs
    if kind == "lp":
        pos_l = [max(value(i, j) - pos_margin, 0.0) for i, j in pos]
        neg_l = [max(neg_margin - value(i, j), 0.0) for i, j in neg]
    else:
        pos_l = [max(pos_margin - value(i, j), 0.0) for i, j in pos]
        neg_l = [max(value(i, j) - neg_margin, 0.0) for i, j in neg]

    def red(v):
        if reduce == "avg_non_zero":
            nz = [t for t in v if t > 0]
            return sum(nz) / len(nz) if nz else 0.0
        return sum(v) / len(v) if v else 0.0

    return red(pos_l) + red(neg_l)


def run(loss_fn, x, y, indices=None, ref=None, ref_y=None):
    xx = x.clone().requires_grad_(True)
    rr = None if ref is None else ref.clone().requires_grad_(True)
    out = loss_fn(xx, y, indices, rr, ref_y)
    out.backward()
    return out.detach(), xx.grad, (None if rr is None else rr.grad)


def ours_and_pml(kind, normalize=True, **kw):
    if kind == "lp":
        return (ContrastiveLoss(distance=LpDistance(normalize_embeddings=normalize), **kw),
                pml_losses.ContrastiveLoss(distance=pml_distances.LpDistance(normalize_embeddings=normalize), **kw))
    return (ContrastiveLoss(distance=CosineSimilarity(), **kw),
            pml_losses.ContrastiveLoss(distance=pml_distances.CosineSimilarity(), **kw))


MARGINS = {"lp": [(0.0, 1.0), (0.3, 0.8)], "cosine": [(0.8, 0.3), (1.0, 0.0)]}


# ---------------------------------------------------------------------------------------------------------
# naive oracle


@pytest.mark.parametrize("kind,normalize", [("lp", True), ("lp", False), ("cosine", True)])
def test_matches_naive_loop(kind, normalize):
    for seed in range(3):
        x, y = make_batch(seed, dtype=torch.float64)
        pm, nm = MARGINS[kind][seed % 2]
        if kind == "lp" and not normalize:
            pm, nm = 2.0, 8.0  # raw embeddings are ~3x larger
        loss, _ = ours_and_pml(kind, normalize, pos_margin=pm, neg_margin=nm)
        expected = naive_contrastive(x, y, pos_margin=pm, neg_margin=nm, kind=kind, normalize=normalize)
        assert expected > 0
        assert loss(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_matches_naive_loop_with_mean_reducer_reference_set_and_pairs():
    x, y = make_batch(0, n_classes=4, m=3, dtype=torch.float64)
    ref, ref_y = make_batch(1, n_classes=6, m=3, dtype=torch.float64)
    loss = ContrastiveLoss(pos_margin=0.2, neg_margin=0.9, reducer=MeanReducer())
    expected = naive_contrastive(x, y, pos_margin=0.2, neg_margin=0.9, reduce="mean", ref=ref, ref_y=ref_y)
    assert loss(x, y, ref_emb=ref, ref_labels=ref_y).item() == pytest.approx(expected, rel=1e-9)
    # A miner's pairs over the reference set (repeats of a pair count twice, as element lists).
    a1, p, a2, n = MultiSimilarityMiner(0.3)(x, y, ref, ref_y)
    assert len(a1) and len(a2)
    pairs = (list(zip(a1.tolist(), p.tolist())), list(zip(a2.tolist(), n.tolist())))
    expected = naive_contrastive(x, y, pos_margin=0.2, neg_margin=0.9, reduce="mean", ref=ref, ref_y=ref_y,
                                 pairs=pairs)
    assert loss(x, y, (a1, p, a2, n), ref, ref_y).item() == pytest.approx(expected, rel=1e-9)


def test_triplets_are_read_as_pairs():
    x, y = make_batch(2, dtype=torch.float64)
    a, p, n = TripletMarginMiner(0.2, "semihard")(x, y)
    assert len(a)
    pairs = (list(zip(a.tolist(), p.tolist())), list(zip(a.tolist(), n.tolist())))
    expected = naive_contrastive(x, y, pos_margin=0.1, neg_margin=1.2, pairs=pairs)
    assert ContrastiveLoss(0.1, 1.2)(x, y, (a, p, n)).item() == pytest.approx(expected, rel=1e-9)


def test_gradient_matches_autograd_through_naive_formula():
    x, y = make_batch(4, n_classes=3, m=3, dtype=torch.float64)
    xx = x.clone().requires_grad_(True)
    ContrastiveLoss(0.2, 1.1)(xx, y).backward()
    x2 = x.clone().requires_grad_(True)
    z = F.normalize(x2, dim=1)
    pos, neg = [], []
    for i in range(len(y)):
        for j in range(len(y)):
            d = (z[i] - z[j]).norm() if i != j else None
            if i != j and y[i] == y[j]:
                pos.append(torch.relu(d - 0.2))
            elif y[i] != y[j]:
                neg.append(torch.relu(1.1 - d))
    tp, tn = torch.stack(pos), torch.stack(neg)
    (tp.sum() / (tp > 0).sum() + tn.sum() / (tn > 0).sum()).backward()
    torch.testing.assert_close(xx.grad, x2.grad, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# pytorch-metric-learning oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,normalize", [("lp", True), ("lp", False), ("cosine", True)])
@pytest.mark.parametrize("mining", [None, "ms", "semihard", "batch_hard"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["matrix", "rowwise"])
def test_matches_pml(dtype, kind, normalize, mining, rowwise, monkeypatch):
    # Both ways of computing a miner's pairs' distances (see BaseMetricLoss.values_at).
    monkeypatch.setattr("dmlgen.losses.base.ROWWISE_FRACTION", 0 if rowwise else 10**9)
    for seed in range(3):
        big = seed == 2  # > 25 rows: torch.cdist (used by PML) switches to its matmul path
        x, y = make_batch(seed, n_classes=8 if big else 5, m=5 if big else 4, dtype=dtype, normalized=seed == 1)
        pm, nm = MARGINS[kind][seed % 2]
        if kind == "lp" and not normalize and seed != 1:
            pm, nm = 2.0, 8.0
        ours, pml = ours_and_pml(kind, normalize, pos_margin=pm, neg_margin=nm)
        if mining is None:
            idx_o = idx_p = None
        elif mining == "ms":
            idx_o = MultiSimilarityMiner(0.1)(x, y)
            idx_p = pml_miners.MultiSimilarityMiner(0.1)(x, y)
        elif mining == "semihard":
            idx_o = TripletMarginMiner(0.2, "semihard")(x, y)
            idx_p = pml_miners.TripletMarginMiner(0.2, "semihard")(x, y)
        else:
            idx_o = BatchHardMiner()(x, y)
            idx_p = pml_miners.BatchHardMiner()(x, y)
        v_o, g_o, _ = run(ours, x, y, idx_o)
        v_p, g_p, _ = run(pml, x, y, idx_p)
        assert v_o.dtype == dtype
        torch.testing.assert_close(v_o, v_p, **TOL)
        torch.testing.assert_close(g_o, g_p, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_pml_with_reference_set(dtype):
    for seed in range(3):
        x, y = make_batch(seed, n_classes=4, m=3, dtype=dtype)
        ref, ref_y = make_batch(seed + 10, n_classes=6, m=4, dtype=dtype)
        ours, pml = ours_and_pml("lp", pos_margin=0.1, neg_margin=0.9)
        v_o, g_o, gr_o = run(ours, x, y, None, ref, ref_y)
        v_p, g_p, gr_p = run(pml, x, y, None, ref, ref_y.clone())  # a distinct object, as PML expects
        torch.testing.assert_close(v_o, v_p, **TOL)
        torch.testing.assert_close(g_o, g_p, **TOL)
        torch.testing.assert_close(gr_o, gr_p, **TOL)


def test_pml_default_settings_and_mean_reducer_agree():
    x, y = make_batch(7)
    v_o, g_o, _ = run(ContrastiveLoss(), x, y)
    v_p, g_p, _ = run(pml_losses.ContrastiveLoss(), x, y)
    torch.testing.assert_close(v_o, v_p, **TOL)
    torch.testing.assert_close(g_o, g_p, **TOL)
    v_o, g_o, _ = run(ContrastiveLoss(reducer="mean"), x, y)
    v_p, g_p, _ = run(pml_losses.ContrastiveLoss(reducer=pml_reducers.MeanReducer()), x, y)
    torch.testing.assert_close(v_o, v_p, **TOL)
    torch.testing.assert_close(g_o, g_p, **TOL)


# ---------------------------------------------------------------------------------------------------------
# edge cases and validation


@pytest.mark.parametrize("x,y", [(torch.randn(6, 4), torch.full((6,), 2)), (torch.randn(1, 4), torch.tensor([0]))],
                         ids=["single_class", "single_sample"])
def test_degenerate_batch_is_zero_with_one_warning(x, y):
    loss = ContrastiveLoss()
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loss(x, y)
        loss(x, y)
    assert len([w for w in caught if issubclass(w.category, DegenerateBatchWarning)]) == 1
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_no_nan_for_duplicates_and_one_pair_still_counts():
    x = torch.ones(6, 3, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    out = ContrastiveLoss()(x, y)
    out.backward()
    assert torch.isfinite(out) and out.item() == pytest.approx(1.0, abs=1e-5)  # every negative at d=0
    assert torch.isfinite(x.grad).all()
    # PML returns 0 for one pair of each kind; here it is the pair losses.
    x2, y2 = make_batch(0, dtype=torch.float64)
    i, j = 0, int(torch.where((y2 == y2[0]) & (torch.arange(len(y2)) != 0))[0][0])
    k = int(torch.where(y2 != y2[0])[0][0])
    pairs = (torch.tensor([i]), torch.tensor([j]), torch.tensor([i]), torch.tensor([k]))
    expected = naive_contrastive(x2, y2, pos_margin=0.0, neg_margin=2.0, pairs=([(i, j)], [(i, k)]))
    assert expected > 0
    assert ContrastiveLoss(0.0, 2.0)(x2, y2, pairs).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("kwargs", [{"pos_margin": "0"}, {"neg_margin": float("inf")}, {"neg_margin": True},
                                    {"distance": "euclid"}])
def test_bad_parameters_raise_config_error(kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ConfigError) as err:
        ContrastiveLoss(**kwargs)
    assert key in str(err.value) or repr(kwargs[key]) in str(err.value)
