"""NormalizedSoftmaxLoss against a naive per-sample loop and against pytorch-metric-learning (proxies copied)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dmlgen.errors import ConfigError, DataError
from dmlgen.losses import (
    DegenerateBatchWarning,
    DotProductSimilarity,
    LpDistance,
    NormalizedSoftmaxLoss,
    SumReducer,
    TripletMarginMiner,
)
from _batches import make_batch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

TOL = {"atol": 1e-5, "rtol": 1e-5}


def naive_normalized_softmax(x, y, proxies, *, temperature=0.05, kind="cosine", normalize=True,
                             weights=None) -> float:
    """Mean over samples of the cross-entropy with logits cos(x, p_c) / T (or -d(x, p_c) / T), by loops."""
    xs = (F.normalize(x.double(), dim=1) if normalize else x.double()).tolist()
    ps = F.normalize(proxies.double(), dim=1).tolist()
    total = 0.0
    for i, (xi, yi) in enumerate(zip(xs, y.tolist())):
        if kind == "cosine":
            logits = [sum(a * b for a, b in zip(xi, pc)) / temperature for pc in ps]
        else:
            logits = [-math.sqrt(sum((a - b) ** 2 for a, b in zip(xi, pc))) / temperature for pc in ps]
        top = max(logits)
        ce = top + math.log(sum(math.exp(v - top) for v in logits)) - logits[yi]
        total += ce * (1.0 if weights is None else weights[i])
    return total / len(xs)


def pair(num_classes, dim, kind="cosine", normalize=True, **kw):
    if kind == "cosine":
        d_o = DotProductSimilarity(normalize_embeddings=normalize)
        d_p = pml_distances.DotProductSimilarity(normalize_embeddings=normalize)
    else:
        d_o, d_p = LpDistance(), pml_distances.LpDistance()
    ours = NormalizedSoftmaxLoss(num_classes, dim, distance=d_o, **kw)
    pml = pml_losses.NormalizedSoftmaxLoss(num_classes, dim, distance=d_p, **kw)
    with torch.no_grad():
        pml.W.copy_(ours.proxies.t())
    return ours, pml


def run(loss_fn, x, y, indices=None, ref=None, ref_y=None):
    xx = x.clone().requires_grad_(True)
    rr = None if ref is None else ref.clone().requires_grad_(True)
    out = loss_fn(xx, y, indices, rr, ref_y)
    out.backward()
    return out.detach(), xx.grad, (None if rr is None else rr.grad)


# ---------------------------------------------------------------------------------------------------------
# naive oracle


@pytest.mark.parametrize("kind,normalize", [("cosine", True), ("cosine", False), ("lp", True)])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_matches_naive_loop(kind, normalize, temperature):
    for seed in range(3):
        torch.manual_seed(seed)
        x, y = make_batch(seed, dtype=torch.float64, normalized=not normalize)
        ours, _ = pair(7, x.shape[1], kind, normalize, temperature=temperature)
        expected = naive_normalized_softmax(x, y, ours.proxies.detach(), temperature=temperature, kind=kind,
                                            normalize=normalize)
        assert ours.double()(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_miner_weights_and_reference_set():
    torch.manual_seed(0)
    x, y = make_batch(0, n_classes=4, m=3, dtype=torch.float64)
    loss = NormalizedSoftmaxLoss(5, x.shape[1]).double()
    a, p, n = TripletMarginMiner(0.2, "semihard")(x, y)
    assert len(a)
    counts = torch.bincount(torch.cat([a, p, n]), minlength=len(y)).double()
    weights = (counts / counts.max()).tolist()
    expected = naive_normalized_softmax(x, y, loss.proxies.detach(), weights=weights)
    assert loss(x, y, (a, p, n)).item() == pytest.approx(expected, rel=1e-9)
    # Reference samples join the batch.
    ref, ref_y = make_batch(1, n_classes=5, m=2, dtype=torch.float64)
    v_ref, g_x, g_r = run(loss, x, y, None, ref, ref_y)
    v_cat, g_cat, _ = run(loss, torch.cat([x, ref]), torch.cat([y, ref_y]))
    torch.testing.assert_close(v_ref, v_cat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([g_x, g_r]), g_cat, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# pytorch-metric-learning oracle


def test_initialisation_is_pmls():
    torch.manual_seed(5)
    ours = NormalizedSoftmaxLoss(30, 12)
    torch.manual_seed(5)
    pml = pml_losses.NormalizedSoftmaxLoss(30, 12)
    assert torch.equal(ours.proxies.detach(), pml.W.detach().t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,normalize", [("cosine", True), ("cosine", False), ("lp", True)])
@pytest.mark.parametrize("with_miner", [False, True])
def test_matches_pml(dtype, kind, normalize, with_miner):
    for seed in range(3):
        torch.manual_seed(seed)
        big = seed == 2  # > 25 rows: torch.cdist (used by PML) switches to its matmul path
        x, y = make_batch(seed, n_classes=8 if big else 5, m=5 if big else 4, dtype=dtype,
                          normalized=seed == 1 or not normalize)
        ours, pml = pair(9 if seed == 0 else 8, x.shape[1], kind, normalize, temperature=0.1)
        idx = TripletMarginMiner(0.2, "semihard")(x, y) if with_miner else None
        v_o, g_o, _ = run(ours, x, y, idx)
        v_p, g_p, _ = run(pml, x, y, idx)
        assert v_o.dtype == dtype
        torch.testing.assert_close(v_o, v_p, **TOL)
        torch.testing.assert_close(g_o, g_p, **TOL)
        torch.testing.assert_close(ours.proxies.grad, pml.W.grad.t().float(), **TOL)


def test_matches_pml_with_sum_reducer_and_defaults():
    torch.manual_seed(1)
    x, y = make_batch(3)
    ours, pml = pair(6, x.shape[1])
    v_o, g_o, _ = run(ours, x, y)
    v_p, g_p, _ = run(pml, x, y)
    torch.testing.assert_close(v_o, v_p, **TOL)
    torch.testing.assert_close(g_o, g_p, **TOL)
    ours = NormalizedSoftmaxLoss(6, x.shape[1], reducer=SumReducer())
    pml = pml_losses.NormalizedSoftmaxLoss(6, x.shape[1], reducer=pml_reducers.SumReducer())
    with torch.no_grad():
        pml.W.copy_(ours.proxies.t())
    torch.testing.assert_close(run(ours, x, y)[0], run(pml, x, y)[0], **TOL)


# ---------------------------------------------------------------------------------------------------------
# batches with one class or one sample, and bad input


@pytest.mark.parametrize("n", [1, 6])
def test_one_class_or_one_sample_is_a_real_loss_without_warning(n):
    torch.manual_seed(0)
    loss = NormalizedSoftmaxLoss(4, 5)
    x = torch.randn(n, 5, requires_grad=True)
    y = torch.full((n,), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateBatchWarning)
        out = loss(x, y)
    out.backward()
    assert torch.isfinite(out) and out.item() > 0 and x.grad.abs().sum() > 0
    expected = naive_normalized_softmax(x.detach(), y, loss.proxies.detach())
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_identical_zero_and_large_embeddings_give_no_nan():
    loss = NormalizedSoftmaxLoss(4, 5, temperature=0.001)
    for x in (torch.ones(8, 5), torch.full((8, 5), 1e4), torch.zeros(8, 5)):
        x = x.clone().requires_grad_(True)
        out = loss(x, torch.arange(4).repeat(2))
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(loss.proxies.grad).all()


def test_bad_labels_and_embedding_size_raise_data_error():
    loss = NormalizedSoftmaxLoss(5, 8)
    x, y = make_batch(0)
    assert torch.isfinite(loss(x, y))
    with pytest.raises(DataError, match=r"label 5 is outside \[0, 5\)"):
        loss(x, y + 1)
    with pytest.raises(DataError, match="embedding_size"):
        loss(torch.randn(4, 9), torch.arange(4))


@pytest.mark.parametrize("kwargs,key", [({"num_classes": -1}, "num_classes"), ({"embedding_size": 0}, "embedding_size"),
                                        ({"temperature": 0.0}, "temperature"), ({"temperature": None}, "temperature")])
def test_bad_parameters_raise_config_error(kwargs, key):
    args = {"num_classes": 3, "embedding_size": 4, **kwargs}
    with pytest.raises(ConfigError, match=key):
        NormalizedSoftmaxLoss(**args)
