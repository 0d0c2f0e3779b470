"""TripletMarginLoss against a naive loop over triplets and against pytorch-metric-learning (test-only oracle)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmlgen.errors import ConfigError, DataError
from dmlgen.losses import (
    CosineSimilarity,
    LpDistance,
    MeanReducer,
    MultiSimilarityMiner,
    SumReducer,
    TripletMarginLoss,
    TripletMarginMiner,
)
from _batches import make_batch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

TOL = {"atol": 1e-5, "rtol": 1e-5}




def naive_value(u: list[float], v: list[float], kind: str, normalize: bool) -> float:
    if normalize:
        nu, nv = math.sqrt(sum(t * t for t in u)), math.sqrt(sum(t * t for t in v))
        u, v = [t / nu for t in u], [t / nv for t in v]
    if kind == "lp":
        return math.sqrt(sum((s - t) ** 2 for s, t in zip(u, v)))
    return sum(s * t for s, t in zip(u, v))


def naive_triplet(
    x, y, *, margin, swap=False, smooth=False, kind="lp", normalize=True, reduce="avg_non_zero",
    ref=None, ref_y=None, triplets=None,
) -> float:
    """Loop over every valid (a, p, n), or over the given triplets."""
    self_ref = ref is None
    q, ql = x.double().tolist(), y.tolist()
    r, rl = (q, ql) if self_ref else (ref.double().tolist(), ref_y.tolist())
    if triplets is None:
        triplets = [
            (a, p, n)
            for a in range(len(q)) for p in range(len(r)) for n in range(len(r))
            if ql[a] == rl[p] and ql[a] != rl[n] and not (self_ref and a == p)
        ]
    inverted = kind == "cosine"
    losses = []
    for a, p, n in triplets:
        ap = naive_value(q[a], r[p], kind, normalize)
        an = naive_value(q[a], r[n], kind, normalize)
        if swap:
            pn = naive_value(r[p], r[n], kind, normalize)
            an = max(an, pn) if inverted else min(an, pn)
        v = (an - ap if inverted else ap - an) + margin
        losses.append(math.log1p(math.exp(v)) if smooth else max(v, 0.0))
    if reduce == "avg_non_zero":
        nz = [v for v in losses if v > 0]
        return sum(nz) / len(nz) if nz else 0.0
    if reduce == "mean":
        return sum(losses) / len(losses) if losses else 0.0
    return sum(losses)


def run(loss_fn, x, y, indices=None, ref=None, ref_y=None):
    """Loss value and gradients w.r.t. fresh leaf copies of x (and ref)."""
    xx = x.clone().requires_grad_(True)
    rr = None if ref is None else ref.clone().requires_grad_(True)
    out = loss_fn(xx, y, indices, rr, ref_y)
    out.backward()
    return out.detach(), xx.grad, (None if rr is None else rr.grad)


def ours_and_pml(kind: str, normalize: bool = True, **kw):
    if kind == "lp":
        d_ours, d_pml = LpDistance(normalize_embeddings=normalize), pml_distances.LpDistance(
            normalize_embeddings=normalize
        )
    else:
        d_ours, d_pml = CosineSimilarity(), pml_distances.CosineSimilarity()
    return TripletMarginLoss(distance=d_ours, **kw), pml_losses.TripletMarginLoss(distance=d_pml, **kw)


# ---------------------------------------------------------------------------------------------------------
# naive oracle


@pytest.mark.parametrize("kind,normalize", [("lp", True), ("lp", False), ("cosine", True)])
@pytest.mark.parametrize("swap,smooth", [(False, False), (True, False), (False, True)])
def test_matches_naive_loop(kind, normalize, swap, smooth):
    for seed in range(3):
        x, y = make_batch(seed, dtype=torch.float64)
        margin = 0.3 if kind == "lp" else 0.2
        loss = TripletMarginLoss(
            margin=margin, swap=swap, smooth_loss=smooth, distance=LpDistance(normalize_embeddings=normalize)
            if kind == "lp" else CosineSimilarity()
        )
        expected = naive_triplet(x, y, margin=margin, swap=swap, smooth=smooth, kind=kind, normalize=normalize)
        assert loss(x, y).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("swap", [False, True])
def test_matches_naive_loop_with_reference_set(swap):
    x, y = make_batch(0, n_classes=4, m=3, dtype=torch.float64)
    ref, ref_y = make_batch(1, n_classes=6, m=3, dtype=torch.float64)
    loss = TripletMarginLoss(margin=0.4, swap=swap)
    expected = naive_triplet(x, y, margin=0.4, swap=swap, ref=ref, ref_y=ref_y)
    assert loss(x, y, ref_emb=ref, ref_labels=ref_y).item() == pytest.approx(expected, rel=1e-9)
    # The triplet path given explicit indices (swap there uses reference-reference distances too).
    triplets = [(a, p, n) for a in range(len(y)) for p in range(len(ref_y)) for n in range(len(ref_y))
                if y[a] == ref_y[p] and y[a] != ref_y[n]][::3]
    idx = tuple(torch.tensor(t) for t in zip(*triplets))
    expected = naive_triplet(x, y, margin=0.4, swap=swap, ref=ref, ref_y=ref_y, triplets=triplets)
    assert loss(x, y, idx, ref, ref_y).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("reducer,name", [(MeanReducer(), "mean"), (SumReducer(), "sum")])
def test_other_reducers_match_naive_loop(reducer, name):
    x, y = make_batch(3, dtype=torch.float64)
    loss = TripletMarginLoss(margin=0.2, reducer=reducer)
    assert loss(x, y).item() == pytest.approx(naive_triplet(x, y, margin=0.2, reduce=name), rel=1e-9)


def test_gradient_matches_autograd_through_naive_formula():
    x, y = make_batch(4, n_classes=3, m=3, dtype=torch.float64)
    xx = x.clone().requires_grad_(True)
    TripletMarginLoss(margin=0.3)(xx, y).backward()
    # Differentiable naive version: explicit per-triplet loop with torch ops.
    x2 = x.clone().requires_grad_(True)
    z = F.normalize(x2, dim=1)
    terms = []
    for a in range(len(y)):
        for p in range(len(y)):
            for n in range(len(y)):
                if a != p and y[a] == y[p] and y[a] != y[n]:
                    terms.append(torch.relu((z[a] - z[p]).norm() - (z[a] - z[n]).norm() + 0.3))
    t = torch.stack(terms)
    (t.sum() / (t > 0).sum()).backward()
    torch.testing.assert_close(xx.grad, x2.grad, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# pytorch-metric-learning oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,normalize", [("lp", True), ("lp", False), ("cosine", True)])
@pytest.mark.parametrize("mining", [None, "semihard", "hard", "all", "easy"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["matrix", "rowwise"])
def test_matches_pml_loss_and_miner(dtype, kind, normalize, mining, rowwise, monkeypatch):
    # Both ways of computing the mined triplets' distances (see BaseMetricLoss.values_at).
    monkeypatch.setattr("dmlgen.losses.base.ROWWISE_FRACTION", 0 if rowwise else 10**9)
    for seed in range(3):
        # The last batch has > 25 rows, where torch.cdist (used by PML) switches to its matmul path.
        big = seed == 2
        x, y = make_batch(seed, n_classes=8 if big else 5, m=5 if big else 4, dtype=dtype, normalized=seed == 1)
        margin = 0.1 if kind == "lp" else 0.05
        for swap in (False, True):
            ours, pml = ours_and_pml(kind, normalize, margin=margin, swap=swap)
            if mining is None:
                idx_o = idx_p = None
            else:
                dist_o = LpDistance(normalize_embeddings=normalize) if kind == "lp" else CosineSimilarity()
                dist_p = (pml_distances.LpDistance(normalize_embeddings=normalize) if kind == "lp"
                          else pml_distances.CosineSimilarity())
                idx_o = TripletMarginMiner(0.2, mining, distance=dist_o)(x, y)
                idx_p = pml_miners.TripletMarginMiner(0.2, mining, distance=dist_p)(x, y)
            v_o, g_o, _ = run(ours, x, y, idx_o)
            v_p, g_p, _ = run(pml, x, y, idx_p)
            assert v_o.dtype == dtype
            torch.testing.assert_close(v_o, v_p, **TOL)
            torch.testing.assert_close(g_o, g_p, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("rowwise", [False, True], ids=["matrix", "rowwise"])
def test_matches_pml_with_reference_set(dtype, smooth, rowwise, monkeypatch):
    monkeypatch.setattr("dmlgen.losses.base.ROWWISE_FRACTION", 0 if rowwise else 10**9)
    for seed in range(3):
        x, y = make_batch(seed, n_classes=4, m=3, dtype=dtype)
        ref, ref_y = make_batch(seed + 10, n_classes=6, m=4, dtype=dtype)
        ours, pml = ours_and_pml("lp", margin=0.1, smooth_loss=smooth)
        v_o, g_o, gr_o = run(ours, x, y, None, ref, ref_y)
        v_p, g_p, gr_p = run(pml, x, y, None, ref, ref_y.clone())  # a distinct object, as PML expects
        torch.testing.assert_close(v_o, v_p, **TOL)
        torch.testing.assert_close(g_o, g_p, **TOL)
        torch.testing.assert_close(gr_o, gr_p, **TOL)
        # With a miner over the reference set as well.
        idx_o = TripletMarginMiner(0.2, "semihard")(x, y, ref, ref_y)
        idx_p = pml_miners.TripletMarginMiner(0.2, "semihard")(x, y, ref, ref_y.clone())
        v_o, g_o, gr_o = run(ours, x, y, idx_o, ref, ref_y)
        v_p, g_p, gr_p = run(pml, x, y, idx_p, ref, ref_y.clone())
        torch.testing.assert_close(v_o, v_p, **TOL)
        torch.testing.assert_close(g_o, g_p, **TOL)
        torch.testing.assert_close(gr_o, gr_p, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairs_from_a_pair_miner_match_pml(dtype):
    # A pair miner's output is turned into triplets by matching anchors (PML's convert_to_triplets).
    for seed in range(3):
        x, y = make_batch(seed, dtype=dtype)
        pairs_p = pml_miners.MultiSimilarityMiner(0.1)(x, y)
        ours, pml = ours_and_pml("lp", margin=0.1)
        v_o, g_o, _ = run(ours, x, y, pairs_p)
        v_p, g_p, _ = run(pml, x, y, pairs_p)
        torch.testing.assert_close(v_o, v_p, **TOL)
        torch.testing.assert_close(g_o, g_p, **TOL)
        pairs_o = MultiSimilarityMiner(0.1)(x, y)
        torch.testing.assert_close(run(ours, x, y, pairs_o)[0], v_p, **TOL)


def test_pml_default_settings_agree():
    x, y = make_batch(7)
    v_o, g_o, _ = run(TripletMarginLoss(), x, y)
    v_p, g_p, _ = run(pml_losses.TripletMarginLoss(), x, y)
    torch.testing.assert_close(v_o, v_p, **TOL)
    torch.testing.assert_close(g_o, g_p, **TOL)


# ---------------------------------------------------------------------------------------------------------
# triplets_per_anchor=int


def test_random_triplets_per_anchor():
    x, y = make_batch(0, n_classes=4, m=3, dtype=torch.float64)
    y = torch.cat([y, torch.tensor([9])])  # a lone sample: no positive, so never an anchor
    x = torch.cat([x, torch.randn(1, x.shape[1], dtype=torch.float64)])
    captured = {}
    loss = TripletMarginLoss(margin=0.5, triplets_per_anchor=5, generator=torch.Generator().manual_seed(3))
    orig = loss.compute_loss

    def spy(batch, indices_tuple):
        terms = orig(batch, indices_tuple)
        captured["idx"] = terms["loss"].indices
        return terms

    loss.compute_loss = spy  # type: ignore[method-assign]
    value = loss(x, y)
    a, p, n = captured["idx"]
    assert torch.equal(torch.bincount(a, minlength=len(y))[:-1], torch.full((len(y) - 1,), 5))
    assert (a != len(y) - 1).all()
    assert (y[a] == y[p]).all() and (a != p).all() and (y[a] != y[n]).all()
    triplets = list(zip(a.tolist(), p.tolist(), n.tolist()))
    assert value.item() == pytest.approx(naive_triplet(x, y, margin=0.5, triplets=triplets), rel=1e-9)
    # Same generator seed, same triplets; another seed, other triplets.
    again = TripletMarginLoss(margin=0.5, triplets_per_anchor=5, generator=torch.Generator().manual_seed(3))
    assert again(x, y).item() == value.item()
    other = TripletMarginLoss(margin=0.5, triplets_per_anchor=5, generator=torch.Generator().manual_seed(4))
    assert other(x, y).item() != value.item()


def test_random_triplets_cover_all_candidates():
    # Uniformity sanity check: with many draws every positive and negative of an anchor shows up.
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    from dmlgen.losses.indices import sample_triplets

    pos = (y[:, None] == y[None]) & ~torch.eye(6, dtype=torch.bool)
    a, p, n = sample_triplets(pos, y[:, None] != y[None], 400, torch.Generator().manual_seed(0))
    sel = a == 0
    assert set(p[sel].tolist()) == {1, 2} and set(n[sel].tolist()) == {3, 4, 5}
    counts = torch.bincount(n[sel], minlength=6)[3:].double()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.08


# ---------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs",
    [{"margin": "0.1"}, {"margin": float("nan")}, {"swap": 1}, {"smooth_loss": "yes"},
     {"triplets_per_anchor": 0}, {"triplets_per_anchor": "some"}, {"triplets_per_anchor": True},
     {"distance": "euclid"}, {"reducer": "median"}, {"generator": 3}],
)
def test_bad_parameters_raise_config_error(kwargs):
    with pytest.raises(ConfigError) as err:
        TripletMarginLoss(**kwargs)
    key = next(iter(kwargs))
    assert key in str(err.value) or repr(kwargs[key]) in str(err.value)


def test_bad_indices_raise_data_error():
    x, y = make_batch(0)
    loss = TripletMarginLoss()
    with pytest.raises(DataError, match="indices_tuple"):
        loss(x, y, (torch.tensor([0]), torch.tensor([1])))
    with pytest.raises(DataError, match=r"indices_tuple\[n\]"):
        loss(x, y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([len(y)])))
    with pytest.raises(DataError, match="lengths differ"):
        loss(x, y, (torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2])))


def test_pairs_to_triplets_matches_pml_as_multiset():
    from collections import Counter

    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    from dmlgen.losses.indices import pairs_to_triplets

    g = torch.Generator().manual_seed(0)
    # Random pairs with repeats (a pair listed twice must give its triplets twice, as in PML).
    a1, p = torch.randint(0, 6, (15,), generator=g), torch.randint(0, 9, (15,), generator=g)
    a2, n = torch.randint(0, 6, (20,), generator=g), torch.randint(0, 9, (20,), generator=g)
    a2, n = torch.cat([a2, a2[:4]]), torch.cat([n, n[:4]])
    got = pairs_to_triplets((a1, p, a2, n), 6, 9)
    want = lmu.convert_to_triplets((a1, p, a2, n), None)
    assert Counter(zip(*(t.tolist() for t in got))) == Counter(zip(*(t.tolist() for t in want)))
    assert len(got[0]) > 0


def test_all_triplets_matches_pml_enumeration_order():
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    from dmlgen.losses.indices import all_triplets

    _, y = make_batch(5)
    pos = (y[:, None] == y[None]) & ~torch.eye(len(y), dtype=torch.bool)
    got = all_triplets(pos, y[:, None] != y[None])
    want = lmu.get_all_triplets_indices(y)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
