"""MultiSimilarityLoss against a naive per-anchor loop and against pytorch-metric-learning (test-only oracle)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dmlgen.errors import ConfigError, DataError
from dmlgen.losses import (
    AvgNonZeroReducer,
    CosineSimilarity,
    DegenerateBatchWarning,
    LpDistance,
    MultiSimilarityLoss,
    MultiSimilarityMiner,
    TripletMarginMiner,
)
from _batches import make_batch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

TOL = {"atol": 1e-5, "rtol": 1e-5}




def naive_ms(x, y, *, alpha=2.0, beta=50.0, base=0.5, kind="cosine", ref=None, ref_y=None, pairs=None) -> float:
    """Per-anchor loop; ``pairs`` = (set of positive (i, j), set of negative (i, j)) or None for all."""
    self_ref = ref is None
    q = F.normalize(x.double(), dim=1).tolist()
    r = q if self_ref else F.normalize(ref.double(), dim=1).tolist()
    ql, rl = y.tolist(), (y if self_ref else ref_y).tolist()
    total = 0.0
    for i in range(len(q)):
        pos_terms, neg_terms = [], []
        for j in range(len(r)):
            if kind == "cosine":
                s = sum(a * b for a, b in zip(q[i], r[j]))
                pos_e, neg_e = base - s, s - base
            else:
                s = math.sqrt(sum((a - b) ** 2 for a, b in zip(q[i], r[j])))
                pos_e, neg_e = s - base, base - s
            if pairs is None:
                is_pos = ql[i] == rl[j] and not (self_ref and i == j)
                is_neg = ql[i] != rl[j]
            else:
                is_pos, is_neg = (i, j) in pairs[0], (i, j) in pairs[1]
            if is_pos:
                pos_terms.append(math.exp(alpha * pos_e))
            if is_neg:
                neg_terms.append(math.exp(beta * neg_e))
        total += math.log1p(sum(pos_terms)) / alpha + math.log1p(sum(neg_terms)) / beta
    return total / len(q)


def run(loss_fn, x, y, indices=None, ref=None, ref_y=None):
    xx = x.clone().requires_grad_(True)
    rr = None if ref is None else ref.clone().requires_grad_(True)
    out = loss_fn(xx, y, indices, rr, ref_y)
    out.backward()
    return out.detach(), xx.grad, (None if rr is None else rr.grad)


def as_pair_sets(pairs):
    a1, p, a2, n = (t.tolist() for t in pairs)
    return set(zip(a1, p)), set(zip(a2, n))


# ---------------------------------------------------------------------------------------------------------
# naive oracle


@pytest.mark.parametrize("kind", ["cosine", "lp"])
@pytest.mark.parametrize("alpha,beta,base", [(2, 50, 0.5), (1.5, 10, 0.2)])
def test_matches_naive_loop(kind, alpha, beta, base):
    for seed in range(3):
        x, y = make_batch(seed, dtype=torch.float64)
        dist = CosineSimilarity() if kind == "cosine" else LpDistance()
        base_k = base if kind == "cosine" else 1.0
        loss = MultiSimilarityLoss(alpha=alpha, beta=beta, base=base_k, distance=dist)
        expected = naive_ms(x, y, alpha=alpha, beta=beta, base=base_k, kind=kind)
        assert loss(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_matches_naive_loop_with_miner_and_reference_set():
    x, y = make_batch(0, n_classes=4, m=3, dtype=torch.float64)
    ref, ref_y = make_batch(1, n_classes=6, m=3, dtype=torch.float64)
    loss = MultiSimilarityLoss()
    assert loss(x, y, ref_emb=ref, ref_labels=ref_y).item() == pytest.approx(
        naive_ms(x, y, ref=ref, ref_y=ref_y), rel=1e-9
    )
    pairs = MultiSimilarityMiner(0.1)(x, y, ref, ref_y)
    assert len(pairs[0]) and len(pairs[2])
    expected = naive_ms(x, y, ref=ref, ref_y=ref_y, pairs=as_pair_sets(pairs))
    assert loss(x, y, pairs, ref, ref_y).item() == pytest.approx(expected, rel=1e-9)


def test_triplets_are_read_as_pairs():
    x, y = make_batch(2, dtype=torch.float64)
    a, p, n = TripletMarginMiner(0.2, "semihard")(x, y)
    assert len(a)
    expected = naive_ms(x, y, pairs=(set(zip(a.tolist(), p.tolist())), set(zip(a.tolist(), n.tolist()))))
    assert MultiSimilarityLoss()(x, y, (a, p, n)).item() == pytest.approx(expected, rel=1e-9)


def test_one_pair_of_each_kind_still_gives_a_loss():
    # Deliberate difference from PML, which returns 0 whenever every index tensor has <= 1 element.
    x, y = make_batch(0, dtype=torch.float64)
    i = 0
    j = int(torch.where((y == y[i]) & (torch.arange(len(y)) != i))[0][0])
    k = int(torch.where(y != y[i])[0][0])
    pairs = (torch.tensor([i]), torch.tensor([j]), torch.tensor([i]), torch.tensor([k]))
    value = MultiSimilarityLoss()(x, y, pairs).item()
    assert value > 0
    assert value == pytest.approx(naive_ms(x, y, pairs=({(i, j)}, {(i, k)})), rel=1e-9)
    empty = tuple(torch.empty(0, dtype=torch.long) for _ in range(4))
    xx = x.clone().requires_grad_(True)
    out = MultiSimilarityLoss()(xx, y, empty)
    out.backward()
    assert out.item() == 0 and torch.count_nonzero(xx.grad) == 0


def test_gradient_has_no_nan_with_large_beta():
    # beta * (s - base) is large for close negatives: the masked log-sum-exp must stay finite.
    x, y = make_batch(5)
    xx = x.clone().requires_grad_(True)
    out = MultiSimilarityLoss(beta=500.0, base=-0.5)(xx, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(xx.grad).all()


# ---------------------------------------------------------------------------------------------------------
# pytorch-metric-learning oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["cosine", "lp"])
@pytest.mark.parametrize("with_miner", [False, True])
def test_matches_pml(dtype, kind, with_miner):
    for seed in range(4):
        big = seed == 3  # > 25 rows: torch.cdist (used by PML) switches to its matmul path
        n_classes, m = (8, 5) if big else (5, 4)
        x, y = make_batch(seed, n_classes=n_classes, m=m, dtype=dtype, normalized=seed % 2 == 1)
        if kind == "cosine":
            d_o, d_p, kw = CosineSimilarity(), pml_distances.CosineSimilarity(), {}
        else:
            d_o, d_p, kw = LpDistance(), pml_distances.LpDistance(), {"base": 1.0, "beta": 10}
        ours = MultiSimilarityLoss(distance=d_o, **kw)
        pml = pml_losses.MultiSimilarityLoss(distance=d_p, **kw)
        idx_o = MultiSimilarityMiner(0.1, distance=d_o)(x, y) if with_miner else None
        idx_p = pml_miners.MultiSimilarityMiner(0.1, distance=d_p)(x, y) if with_miner else None
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
        ours, pml = MultiSimilarityLoss(), pml_losses.MultiSimilarityLoss()
        for miner_o, miner_p in [(None, None), (MultiSimilarityMiner(), pml_miners.MultiSimilarityMiner())]:
            idx_o = None if miner_o is None else miner_o(x, y, ref, ref_y)
            idx_p = None if miner_p is None else miner_p(x, y, ref, ref_y.clone())
            v_o, g_o, gr_o = run(ours, x, y, idx_o, ref, ref_y)
            v_p, g_p, gr_p = run(pml, x, y, idx_p, ref, ref_y.clone())
            torch.testing.assert_close(v_o, v_p, **TOL)
            torch.testing.assert_close(g_o, g_p, **TOL)
            torch.testing.assert_close(gr_o, gr_p, **TOL)


def test_other_reducer_matches_pml():
    from pytorch_metric_learning.reducers import AvgNonZeroReducer as PmlAvgNonZero

    x, y = make_batch(3)
    v_o, g_o, _ = run(MultiSimilarityLoss(reducer=AvgNonZeroReducer()), x, y)
    v_p, g_p, _ = run(pml_losses.MultiSimilarityLoss(reducer=PmlAvgNonZero()), x, y)
    torch.testing.assert_close(v_o, v_p, **TOL)
    torch.testing.assert_close(g_o, g_p, **TOL)


# ---------------------------------------------------------------------------------------------------------
# degenerate batches and validation


def test_single_class_is_zero_with_one_warning():
    # Documented choice of this library: PML would return the positive half alone here.
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.zeros(6, dtype=torch.long)
    loss = MultiSimilarityLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1, out2 = loss(x, y), loss(x, y)
    assert len([w for w in caught if issubclass(w.category, DegenerateBatchWarning)]) == 1
    assert out1.item() == 0 and out2.item() == 0
    out1.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_overlapping_pairs_raise_data_error():
    x, y = make_batch(0)
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(DataError, match=r"pair \(0, 1\)"):
        MultiSimilarityLoss()(x, y, pairs)


@pytest.mark.parametrize("kwargs", [{"alpha": 0}, {"beta": -1.0}, {"base": None}, {"alpha": "2"}])
def test_bad_parameters_raise_config_error(kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ConfigError, match=key):
        MultiSimilarityLoss(**kwargs)
