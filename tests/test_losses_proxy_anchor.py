"""ProxyAnchorLoss against a naive loop over proxies and against pytorch-metric-learning (proxies copied over)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dmlgen.errors import ConfigError, DataError
from dmlgen.losses import (
    CosineSimilarity,
    DegenerateBatchWarning,
    LpDistance,
    MeanReducer,
    MultiSimilarityMiner,
    ProxyAnchorLoss,
    TripletMarginMiner,
)
from _batches import make_batch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

TOL = {"atol": 1e-5, "rtol": 1e-5}


def naive_proxy_anchor(x, y, proxies, *, margin=0.1, alpha=32.0, kind="cosine") -> float:
    """Loop over proxies and samples (float64)."""
    xs = F.normalize(x.double(), dim=1).tolist()
    ps = F.normalize(proxies.double(), dim=1).tolist()
    labels = y.tolist()
    pos_sum, neg_sum, with_pos = 0.0, 0.0, 0
    for c, pc in enumerate(ps):
        pos_terms, neg_terms = [], []
        for xi, yi in zip(xs, labels):
            if kind == "cosine":
                s = sum(a * b for a, b in zip(xi, pc))
                pos_e, neg_e = -alpha * (s - margin), alpha * (s + margin)
            else:
                d = math.sqrt(sum((a - b) ** 2 for a, b in zip(xi, pc)))
                pos_e, neg_e = alpha * (d - margin), alpha * (-margin - d)
            (pos_terms if yi == c else neg_terms).append(math.exp(pos_e if yi == c else neg_e))
        if pos_terms:
            with_pos += 1
            pos_sum += math.log1p(sum(pos_terms))
        neg_sum += math.log1p(sum(neg_terms))
    return pos_sum / with_pos + neg_sum / len(ps)


def pair(num_classes, dim, kind="cosine", **kw):
    """Our loss and PML's with the same proxies."""
    d_o, d_p = ((CosineSimilarity(), pml_distances.CosineSimilarity()) if kind == "cosine"
                else (LpDistance(), pml_distances.LpDistance()))
    ours = ProxyAnchorLoss(num_classes, dim, distance=d_o, **kw)
    pml = pml_losses.ProxyAnchorLoss(num_classes, dim, distance=d_p, **kw)
    with torch.no_grad():
        pml.proxies.copy_(ours.proxies)
    return ours, pml


def run(loss_fn, x, y, indices=None, ref=None, ref_y=None):
    xx = x.clone().requires_grad_(True)
    rr = None if ref is None else ref.clone().requires_grad_(True)
    out = loss_fn(xx, y, indices, rr, ref_y)
    out.backward()
    return out.detach(), xx.grad, (None if rr is None else rr.grad)


# ---------------------------------------------------------------------------------------------------------
# naive oracle


@pytest.mark.parametrize("kind", ["cosine", "lp"])
@pytest.mark.parametrize("margin,alpha", [(0.1, 32.0), (0.3, 8.0)])
def test_matches_naive_loop(kind, margin, alpha):
    for seed in range(3):
        torch.manual_seed(seed)
        x, y = make_batch(seed, n_classes=5, dtype=torch.float64)
        num_classes = 7  # two proxies without samples: only their negative term counts
        loss = ProxyAnchorLoss(num_classes, x.shape[1], margin=margin, alpha=alpha,
                               distance=CosineSimilarity() if kind == "cosine" else LpDistance()).double()
        expected = naive_proxy_anchor(x, y, loss.proxies.detach(), margin=margin, alpha=alpha, kind=kind)
        assert loss(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_gradients_match_autograd_through_naive_formula():
    torch.manual_seed(0)
    x, y = make_batch(1, n_classes=3, m=3, dtype=torch.float64)
    loss = ProxyAnchorLoss(4, x.shape[1], margin=0.2, alpha=4.0).double()
    xx = x.clone().requires_grad_(True)
    loss(xx, y).backward()
    x2 = x.clone().requires_grad_(True)
    p2 = loss.proxies.detach().clone().requires_grad_(True)
    sim = F.normalize(x2, dim=1) @ F.normalize(p2, dim=1).T
    pos_terms, neg_terms = [], []
    for c in range(4):
        pos = [torch.exp(-4.0 * (sim[i, c] - 0.2)) for i in range(len(y)) if y[i] == c]
        neg = [torch.exp(4.0 * (sim[i, c] + 0.2)) for i in range(len(y)) if y[i] != c]
        if pos:
            pos_terms.append(torch.log1p(torch.stack(pos).sum()))
        neg_terms.append(torch.log1p(torch.stack(neg).sum()))
    (torch.stack(pos_terms).sum() / len(pos_terms) + torch.stack(neg_terms).sum() / 4).backward()
    torch.testing.assert_close(xx.grad, x2.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(loss.proxies.grad, p2.grad, atol=1e-10, rtol=1e-8)


def test_reference_set_adds_samples():
    torch.manual_seed(0)
    x, y = make_batch(0, n_classes=4, m=3, dtype=torch.float64)
    ref, ref_y = make_batch(1, n_classes=6, m=2, dtype=torch.float64)
    loss = ProxyAnchorLoss(6, x.shape[1]).double()
    v_ref, g_x, g_r = run(loss, x, y, None, ref, ref_y)
    v_cat, g_cat, _ = run(loss, torch.cat([x, ref]), torch.cat([y, ref_y]))
    torch.testing.assert_close(v_ref, v_cat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([g_x, g_r]), g_cat, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# pytorch-metric-learning oracle


def test_initialisation_is_pmls():
    torch.manual_seed(3)
    ours = ProxyAnchorLoss(50, 16)
    torch.manual_seed(3)
    pml = pml_losses.ProxyAnchorLoss(50, 16)
    assert torch.equal(ours.proxies.detach(), pml.proxies.detach())
    big = ProxyAnchorLoss(400, 256).proxies.detach()
    assert big.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.02)  # kaiming_normal, fan_out = C


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["cosine", "lp"])
@pytest.mark.parametrize("mining", [None, "semihard", "ms"])
def test_matches_pml(dtype, kind, mining):
    for seed in range(3):
        torch.manual_seed(seed)
        big = seed == 2  # > 25 rows: torch.cdist (used by PML) switches to its matmul path
        x, y = make_batch(seed, n_classes=8 if big else 5, m=5 if big else 4, dtype=dtype, normalized=seed == 1)
        num_classes = 10 if seed == 0 else 8 if big else 5
        kw = {"margin": 0.1, "alpha": 32} if kind == "cosine" else {"margin": 0.2, "alpha": 4}
        ours, pml = pair(num_classes, x.shape[1], kind, **kw)
        if mining is None:
            idx = None
        elif mining == "semihard":
            idx = TripletMarginMiner(0.2, "semihard")(x, y)
        else:
            idx = MultiSimilarityMiner(0.1)(x, y)
        v_o, g_o, _ = run(ours, x, y, idx)
        v_p, g_p, _ = run(pml, x, y, idx)
        assert v_o.dtype == dtype
        torch.testing.assert_close(v_o, v_p, **TOL)
        torch.testing.assert_close(g_o, g_p, **TOL)
        torch.testing.assert_close(ours.proxies.grad, pml.proxies.grad.float(), **TOL)


def test_matches_pml_with_mean_reducer():
    torch.manual_seed(0)
    x, y = make_batch(2)
    ours = ProxyAnchorLoss(7, x.shape[1], reducer=MeanReducer())
    pml = pml_losses.ProxyAnchorLoss(7, x.shape[1], reducer=pml_reducers.MeanReducer())
    with torch.no_grad():
        pml.proxies.copy_(ours.proxies)
    v_o, g_o, _ = run(ours, x, y)
    v_p, g_p, _ = run(pml, x, y)
    torch.testing.assert_close(v_o, v_p, **TOL)
    torch.testing.assert_close(g_o, g_p, **TOL)


# ---------------------------------------------------------------------------------------------------------
# batches with one class or one sample, and bad input


@pytest.mark.parametrize("n", [1, 6])
def test_one_class_or_one_sample_is_a_real_loss_without_warning(n):
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(4, 5)
    x = torch.randn(n, 5, requires_grad=True)
    y = torch.full((n,), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateBatchWarning)
        out = loss(x, y)
    out.backward()
    assert torch.isfinite(out) and out.item() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert out.item() == pytest.approx(naive_proxy_anchor(x.detach(), y, loss.proxies.detach()), rel=1e-5)


def test_identical_and_large_embeddings_give_no_nan():
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(4, 5, alpha=500.0)
    for x in (torch.ones(8, 5), torch.full((8, 5), 1e4), torch.zeros(8, 5)):
        x = x.clone().requires_grad_(True)
        out = loss(x, torch.arange(4).repeat(2))
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all()


def test_bad_labels_and_embedding_size_raise_data_error():
    loss = ProxyAnchorLoss(5, 8)
    x, y = make_batch(0)  # labels 0..4, D = 8
    assert torch.isfinite(loss(x, y))
    with pytest.raises(DataError, match=r"label 5 is outside \[0, 5\).*num_classes=5"):
        loss(x, y + 1)
    with pytest.raises(DataError, match=r"label -1"):
        loss(x, y - 1)
    with pytest.raises(DataError, match=r"label 9"):
        loss(x, y, ref_emb=x[:2].clone(), ref_labels=torch.tensor([0, 9]))
    with pytest.raises(DataError, match="embedding_size"):
        loss(torch.randn(4, 6), torch.arange(4))


@pytest.mark.parametrize("kwargs,key", [({"num_classes": 0}, "num_classes"), ({"num_classes": 2.0}, "num_classes"),
                                        ({"embedding_size": True}, "embedding_size"), ({"alpha": 0}, "alpha"),
                                        ({"margin": "0.1"}, "margin")])
def test_bad_parameters_raise_config_error(kwargs, key):
    args = {"num_classes": 3, "embedding_size": 4, **kwargs}
    with pytest.raises(ConfigError, match=key):
        ProxyAnchorLoss(**args)


def test_proxies_are_a_parameter_in_the_state_dict():
    loss = ProxyAnchorLoss(6, 4)
    assert [n for n, _ in loss.named_parameters()] == ["proxies"] and loss.proxies.shape == (6, 4)
    fresh = ProxyAnchorLoss(6, 4)
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.proxies, loss.proxies)
    with pytest.raises(RuntimeError, match="size mismatch"):
        ProxyAnchorLoss(7, 4).load_state_dict(loss.state_dict())
