"""MarginLoss against a naive loop over triplets (both denominators) and against pytorch-metric-learning's
MarginLoss where the two coincide (``denominator="active_hinges"``)."""

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
    DistanceWeightedMiner,
    MarginLoss,
    MeanReducer,
    TripletMarginMiner,
)
from _batches import make_batch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

TOL = {"atol": 1e-5, "rtol": 1e-5}


def naive_margin(x, y, *, margin=0.2, beta=None, nu=0.0, denominator="active_triplets", kind="lp",
                 ref=None, ref_y=None, triplets=None) -> float:
    """Loop over the triplets; ``beta`` is a float (shared) or a list indexed by class."""
    self_ref = ref is None
    q = F.normalize(x.double(), dim=1).tolist()
    r = q if self_ref else F.normalize(ref.double(), dim=1).tolist()
    ql, rl = y.tolist(), (y if self_ref else ref_y).tolist()
    if triplets is None:
        triplets = [(a, p, n) for a in range(len(q)) for p in range(len(r)) for n in range(len(r))
                    if ql[a] == rl[p] and ql[a] != rl[n] and not (self_ref and a == p)]

    def value(i, j):
        if kind == "lp":
            return math.sqrt(sum((s - t) ** 2 for s, t in zip(q[i], r[j])))
        return sum(s * t for s, t in zip(q[i], r[j]))

    total, active_t, active_h, reg = 0.0, 0, 0, 0.0
    for a, p, n in triplets:
        b = beta if isinstance(beta, float) else beta[ql[a]]
        if kind == "lp":
            hp, hn = max(value(a, p) - b + margin, 0.0), max(b - value(a, n) + margin, 0.0)
        else:
            hp, hn = max(b - value(a, p) + margin, 0.0), max(value(a, n) - b + margin, 0.0)
        total += hp + hn
        active_t += (hp > 0) or (hn > 0)
        active_h += (hp > 0) + (hn > 0)
        reg += nu * b
    div = active_t if denominator == "active_triplets" else active_h
    value_ = total / div if div else total
    if nu:
        value_ += (nu * beta if isinstance(beta, float) else reg / (div or 1))
    return value_


def f32(v: float) -> float:
    """``v`` as the float32 beta parameter holds it."""
    return float(torch.tensor(v, dtype=torch.float32))


def run(loss_fn, x, y, indices=None, ref=None, ref_y=None):
    xx = x.clone().requires_grad_(True)
    rr = None if ref is None else ref.clone().requires_grad_(True)
    out = loss_fn(xx, y, indices, rr, ref_y)
    out.backward()
    return out.detach(), xx.grad, (None if rr is None else rr.grad)


def per_class_beta(num_classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.9 + 0.6 * torch.rand(num_classes, generator=g)


# ---------------------------------------------------------------------------------------------------------
# naive oracle


@pytest.mark.parametrize("denominator", ["active_triplets", "active_hinges"])
@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("nu", [0.0, 0.05])
def test_matches_naive_loop(denominator, per_class, nu):
    for seed in range(3):
        x, y = make_batch(seed, dtype=torch.float64)
        loss = MarginLoss(margin=0.2, nu=nu, num_classes=5 if per_class else None, denominator=denominator)
        beta = per_class_beta(5, seed) if per_class else torch.tensor([1.1])
        with torch.no_grad():
            loss.beta.copy_(beta)
        b = beta.tolist() if per_class else f32(1.1)
        expected = naive_margin(x, y, beta=b, nu=nu, denominator=denominator)
        assert loss(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_the_two_denominators_differ_and_count_what_they_say():
    x, y = make_batch(1, dtype=torch.float64)
    t = MarginLoss(denominator="active_triplets")(x, y).item()
    h = MarginLoss(denominator="active_hinges")(x, y).item()
    assert t > h > 0  # a triplet with both hinges active counts once vs twice
    assert t == pytest.approx(naive_margin(x, y, beta=f32(1.2)), rel=1e-9)


def test_matches_naive_loop_with_reference_set_miner_and_similarity():
    x, y = make_batch(0, n_classes=4, m=3, dtype=torch.float64)
    ref, ref_y = make_batch(1, n_classes=6, m=3, dtype=torch.float64)
    loss = MarginLoss(num_classes=6)
    beta = per_class_beta(6, 0)
    with torch.no_grad():
        loss.beta.copy_(beta)
    expected = naive_margin(x, y, beta=beta.tolist(), ref=ref, ref_y=ref_y)
    assert loss(x, y, ref_emb=ref, ref_labels=ref_y).item() == pytest.approx(expected, rel=1e-9)
    idx = TripletMarginMiner(0.3, "all")(x, y, ref, ref_y)
    triplets = list(zip(*(t.tolist() for t in idx)))
    expected = naive_margin(x, y, beta=beta.tolist(), ref=ref, ref_y=ref_y, triplets=triplets)
    assert loss(x, y, idx, ref, ref_y).item() == pytest.approx(expected, rel=1e-9)
    # With a similarity the hinges mirror: beta is a similarity boundary.
    cos = MarginLoss(margin=0.1, beta=0.4, distance=CosineSimilarity())
    expected = naive_margin(x, y, margin=0.1, beta=f32(0.4), kind="cosine")
    assert cos(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_beta_gradient_matches_autograd_through_naive_formula():
    x, y = make_batch(3, n_classes=3, m=3, dtype=torch.float64)
    loss = MarginLoss(num_classes=3, nu=0.01, beta=1.0).double()
    xx = x.clone().requires_grad_(True)
    loss(xx, y).backward()
    beta = torch.full((3,), 1.0, dtype=torch.float64, requires_grad=True)
    x2 = x.clone().requires_grad_(True)
    z = F.normalize(x2, dim=1)
    terms, hinges, regs = [], [], []
    for a in range(9):
        for p in range(9):
            for n in range(9):
                if a != p and y[a] == y[p] and y[a] != y[n]:
                    b = beta[y[a]]
                    hp = torch.relu((z[a] - z[p]).norm() - b + 0.2)
                    hn = torch.relu(b - (z[a] - z[n]).norm() + 0.2)
                    terms.append(hp + hn)
                    hinges.append(bool(hp > 0) or bool(hn > 0))
                    regs.append(0.01 * b)
    div = sum(hinges)
    ((torch.stack(terms).sum() + torch.stack(regs).sum()) / div).backward()
    torch.testing.assert_close(xx.grad, x2.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(loss.beta.grad, beta.grad, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# pytorch-metric-learning oracle (active_hinges is PML's normaliser)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta_mode", ["fixed", "learned_shared", "learned_per_class"])
@pytest.mark.parametrize("mining", [None, "semihard", "distance_weighted"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["matrix", "rowwise"])
def test_matches_pml(dtype, beta_mode, mining, rowwise, monkeypatch):
    # Both ways of computing the selected distances (see BaseMetricLoss.values_at).
    monkeypatch.setattr("dmlgen.losses.base.ROWWISE_FRACTION", 0 if rowwise else 10**9)
    for seed in range(3):
        big = seed == 2  # > 25 rows: torch.cdist (used by PML) switches to its matmul path
        n_classes = 8 if big else 5
        x, y = make_batch(seed, n_classes=n_classes, m=5 if big else 4, dtype=dtype, normalized=seed == 1)
        nu = 0.0 if beta_mode == "fixed" else 0.02
        kw = {"margin": 0.2, "nu": nu, "beta": 1.1}
        if beta_mode == "fixed":
            ours = MarginLoss(learn_beta=False, denominator="active_hinges", **kw)
            pml = pml_losses.MarginLoss(learn_beta=False, **kw)
        elif beta_mode == "learned_shared":
            ours = MarginLoss(learn_beta=True, denominator="active_hinges", **kw)
            pml = pml_losses.MarginLoss(learn_beta=True, **kw)
        else:
            ours = MarginLoss(learn_beta=True, num_classes=n_classes, denominator="active_hinges", **kw)
            pml = pml_losses.MarginLoss(learn_beta=True, num_classes=n_classes, **kw)
            with torch.no_grad():
                beta = per_class_beta(n_classes, seed)
                ours.beta.copy_(beta)
                pml.beta.copy_(beta)
        if mining is None:
            idx = None
        elif mining == "semihard":
            idx = TripletMarginMiner(0.2, "semihard")(x, y)
            assert len(idx[0])
        else:
            idx = DistanceWeightedMiner(layout="one_per_anchor", generator=torch.Generator().manual_seed(seed))(x, y)
        v_o, g_o, _ = run(ours, x, y, idx)
        v_p, g_p, _ = run(pml, x, y, idx)
        assert v_o.dtype == dtype
        torch.testing.assert_close(v_o, v_p, **TOL)
        torch.testing.assert_close(g_o, g_p, **TOL)
        if beta_mode != "fixed":
            torch.testing.assert_close(ours.beta.grad, pml.beta.grad.to(ours.beta.dtype), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_pml_with_reference_set_and_other_reducer(dtype):
    from pytorch_metric_learning.reducers import MeanReducer as PmlMean

    for seed in range(3):
        x, y = make_batch(seed, n_classes=4, m=3, dtype=dtype)
        ref, ref_y = make_batch(seed + 10, n_classes=6, m=4, dtype=dtype)
        ours = MarginLoss(learn_beta=False, denominator="active_hinges")
        pml = pml_losses.MarginLoss()
        v_o, g_o, gr_o = run(ours, x, y, None, ref, ref_y)
        v_p, g_p, gr_p = run(pml, x, y, None, ref, ref_y.clone())
        torch.testing.assert_close(v_o, v_p, **TOL)
        torch.testing.assert_close(g_o, g_p, **TOL)
        torch.testing.assert_close(gr_o, gr_p, **TOL)
        # A mean over triplets ignores the normaliser in both libraries.
        v_o, g_o, _ = run(MarginLoss(learn_beta=False, reducer=MeanReducer()), x, y)
        v_p, g_p, _ = run(pml_losses.MarginLoss(reducer=PmlMean()), x, y)
        torch.testing.assert_close(v_o, v_p, **TOL)
        torch.testing.assert_close(g_o, g_p, **TOL)


# ---------------------------------------------------------------------------------------------------------
# parameters, state and bad input


def test_beta_is_a_parameter_or_a_buffer_and_in_the_state_dict():
    learned = MarginLoss(num_classes=7)
    assert [n for n, _ in learned.named_parameters()] == ["beta"] and learned.beta.shape == (7,)
    assert torch.equal(learned.beta.detach(), torch.full((7,), 1.2))
    fixed = MarginLoss(learn_beta=False, beta=0.9)
    assert list(fixed.parameters()) == [] and "beta" in fixed.state_dict()
    shared = MarginLoss()
    assert shared.beta.shape == (1,)
    # A state dict round-trips into a fresh module.
    with torch.no_grad():
        learned.beta.add_(torch.arange(7.0))
    fresh = MarginLoss(num_classes=7)
    fresh.load_state_dict(learned.state_dict())
    assert torch.equal(fresh.beta, learned.beta)


def test_random_triplets_per_anchor():
    x, y = make_batch(0, dtype=torch.float64)
    loss = MarginLoss(triplets_per_anchor=3, generator=torch.Generator().manual_seed(0))
    again = MarginLoss(triplets_per_anchor=3, generator=torch.Generator().manual_seed(0))
    v = loss(x, y)
    assert torch.isfinite(v) and v.item() == again(x, y).item()


def test_labels_outside_beta_range_raise_data_error():
    x, y = make_batch(0)
    with pytest.raises(DataError, match=r"label 4 is outside \[0, 4\)"):
        MarginLoss(num_classes=4)(x, y)  # labels 0..4
    with pytest.raises(DataError, match=r"label -1"):
        MarginLoss(num_classes=5)(x, torch.where(y == 0, -1, y))
    assert torch.isfinite(MarginLoss()(x, y + 100))  # a shared beta takes any label


@pytest.mark.parametrize("x,y", [(torch.randn(6, 4), torch.full((6,), 2)), (torch.randn(1, 4), torch.tensor([0]))],
                         ids=["single_class", "single_sample"])
def test_degenerate_batch_is_zero_with_one_warning(x, y):
    loss = MarginLoss(num_classes=3)
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loss(x, y)
        loss(x, y)
    assert len([w for w in caught if issubclass(w.category, DegenerateBatchWarning)]) == 1
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_no_nan_for_duplicates_and_nothing_active_is_zero():
    x = torch.ones(8, 5, requires_grad=True)
    y = torch.arange(4).repeat(2)
    loss = MarginLoss(num_classes=4)
    out = loss(x, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(loss.beta.grad).all()
    # Well separated classes and beta between the two distances: no active hinge, loss 0 (sum of nothing).
    pts = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]])
    out = MarginLoss(margin=0.1, beta=1.0, learn_beta=False)(pts, torch.tensor([0, 0, 1, 1]))
    assert out.item() == 0.0


@pytest.mark.parametrize("kwargs,key", [({"margin": "0.2"}, "margin"), ({"num_classes": 0}, "num_classes"),
                                        ({"num_classes": 3.0}, "num_classes"), ({"learn_beta": 1}, "learn_beta"),
                                        ({"denominator": "pairs"}, "denominator"), ({"nu": None}, "nu"),
                                        ({"triplets_per_anchor": 0}, "triplets_per_anchor"),
                                        ({"beta": float("nan")}, "beta"), ({"distance": "l2"}, "l2")])
def test_bad_parameters_raise_config_error(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        MarginLoss(**kwargs)
