"""DistanceWeightedMiner (methods.md §2.2): the closed-form distribution against a naive formula and against
pytorch-metric-learning's weights, the empirical distribution of many draws, layouts, the cut-off fall-back,
seeding, and no NaN for antipodal, duplicate or zero embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmlgen.errors import ConfigError
from dmlgen.losses import DistanceWeightedMiner, TripletMarginLoss
from _batches import make_batch

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def naive_probabilities(x, y, *, lower=0.5, upper=1.4, ref=None, ref_y=None) -> list[list[float]]:
    """Row a: the sampling distribution over references, from the formula of methods.md §2.2, by loops."""
    q = F.normalize(x.double(), dim=1).tolist()
    r = q if ref is None else F.normalize(ref.double(), dim=1).tolist()
    ql, rl = y.tolist(), (y if ref is None else ref_y).tolist()
    dim = len(q[0])
    rows = []
    for i in range(len(q)):
        neg = [j for j in range(len(r)) if rl[j] != ql[i]]
        dist = {j: math.sqrt(sum((a - b) ** 2 for a, b in zip(q[i], r[j]))) for j in neg}
        allowed = [j for j in neg if upper is None or dist[j] < upper]
        row = [0.0] * len(r)
        if not neg:
            rows.append(row)
            continue
        if not allowed:  # cut-off removed everything: uniform over the label-valid negatives
            for j in neg:
                row[j] = 1.0 / len(neg)
            rows.append(row)
            continue
        logw = {}
        for j in allowed:
            d = max(dist[j], lower)
            logw[j] = (2 - dim) * math.log(d) - (dim - 3) / 2 * math.log(max(1 - d * d / 4, 1e-6))
        top = max(logw.values())
        total = sum(math.exp(v - top) for v in logw.values())
        for j in allowed:
            row[j] = math.exp(logw[j] - top) / total
        rows.append(row)
    return rows


def at_distances(dists: list[float], dim: int) -> torch.Tensor:
    """Unit vectors in ``dim`` dimensions: row 0 is e1, row k + 1 lies at Euclidean distance dists[k] from it."""
    rows = [F.one_hot(torch.tensor(0), dim).double()]
    for k, d in enumerate(dists):
        cos = 1 - d * d / 2
        v = torch.zeros(dim, dtype=torch.float64)
        v[0] = cos
        v[1 + k % (dim - 1)] = math.sqrt(max(1 - cos * cos, 0.0))
        rows.append(v)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------
# closed form


@pytest.mark.parametrize("upper", [1.4, None, 0.9])
@pytest.mark.parametrize("use_ref", [False, True])
def test_probabilities_match_naive_formula(upper, use_ref):
    for seed in range(3):
        x, y = make_batch(seed, d=6, dtype=torch.float64)
        ref, ref_y = make_batch(seed + 10, n_classes=6, m=3, d=6, dtype=torch.float64) if use_ref else (None, None)
        got = DistanceWeightedMiner(upper=upper).probabilities(x, y, ref, ref_y)
        want = torch.tensor(naive_probabilities(x, y, upper=upper, ref=ref, ref_y=ref_y), dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
        ry = y if ref is None else ref_y
        assert (got[y[:, None] == ry[None]] == 0).all()  # never a same-class candidate
        torch.testing.assert_close(got.sum(1), torch.ones(len(y), dtype=torch.float64))


def test_probabilities_match_pml_weights_where_semantics_coincide(monkeypatch):
    # PML normalises exp(log w - global max) * mask; same distribution per row when the cut-off leaves a
    # candidate (PML has no 1 - d^2/4 clamp, so keep d well below 2: clustered 8-d data).
    import pytorch_metric_learning.miners.distance_weighted_miner as pml_dw

    captured = {}
    original = pml_dw.lmu.get_random_triplet_indices

    def spy(labels, ref_labels=None, t_per_anchor=None, weights=None):
        captured["w"] = weights
        return original(labels, ref_labels=ref_labels, t_per_anchor=t_per_anchor, weights=weights)

    monkeypatch.setattr(pml_dw.lmu, "get_random_triplet_indices", spy)
    compared = 0
    for seed in range(3):
        for dtype in (torch.float32, torch.float64):
            x, y = make_batch(seed, n_classes=6, m=4, d=8, dtype=dtype)
            for lower, upper in [(0.5, 1.4), (0.3, 1.2)]:
                pml_miners.DistanceWeightedMiner(cutoff=lower, nonzero_loss_cutoff=upper)(x, y)
                theirs = captured["w"].double()
                ours = DistanceWeightedMiner(lower=lower, upper=upper).probabilities(x, y)
                rows = torch.isfinite(theirs).all(1) & (theirs.sum(1) > 0)
                assert rows.sum() >= len(y) // 2
                torch.testing.assert_close(ours[rows], theirs[rows], atol=1e-5, rtol=1e-4)
                compared += int(rows.sum())
    assert compared > 0


def test_empirical_distribution_matches_closed_form():
    # One anchor point repeated 150 times (so all_pos_pairs draws 150 * 149 negatives from one distribution)
    # and 7 negatives: one closer than `lower` (clamped), four in between, two beyond `upper` (never drawn).
    dists = [0.3, 0.6, 0.8, 1.0, 1.3, 1.5, 1.9]
    pts = at_distances(dists, dim=5)
    x = torch.cat([pts[:1].expand(150, -1), pts[1:]])
    y = torch.cat([torch.zeros(150, dtype=torch.long), torch.arange(1, 8)])
    miner = DistanceWeightedMiner(lower=0.5, upper=1.4, generator=torch.Generator().manual_seed(0))
    a, p, n = miner(x, y)
    from_class0 = a < 150
    assert from_class0.sum() == 150 * 149
    draws = n[from_class0] - 150
    counts = torch.bincount(draws, minlength=7).double()
    expected_p = torch.tensor(naive_probabilities(x[149:], y[149:])[0][1:], dtype=torch.float64)
    assert expected_p[5:].sum() == 0 and counts[5:].sum() == 0  # beyond the cut-off
    expected = expected_p[:5] * counts.sum()
    chi2 = float(((counts[:5] - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 4 degrees of freedom, p = 0.0004
    assert (counts[:5] / counts.sum() - expected_p[:5]).abs().max() < 0.015
    # The clamp: d = 0.3 and d = 0.5 weigh the same, so the closest negative is not over-drawn.
    w = naive_probabilities(at_distances([0.3, 0.5], 5), torch.tensor([0, 1, 2]))[0]
    assert w[1] == pytest.approx(w[2])


def test_fallback_to_uniform_when_cut_off_removes_every_negative():
    # Anchor class 0 at e1; its only negatives lie beyond `upper`: uniform over them.
    pts = at_distances([0.2, 1.6, 1.8, 1.95], dim=4)
    y = torch.tensor([0, 0, 1, 2, 3])
    probs = DistanceWeightedMiner(upper=1.4).probabilities(pts, y)
    torch.testing.assert_close(probs[0], torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3], dtype=torch.float64))
    a, p, n = DistanceWeightedMiner(upper=1.4, generator=torch.Generator().manual_seed(1))(pts, y)
    assert set(n[a == 0].tolist()) <= {2, 3, 4}


# ---------------------------------------------------------------------------------------------------------
# layouts and invariants


@pytest.mark.parametrize("layout", ["all_pos_pairs", "one_per_anchor"])
@pytest.mark.parametrize("use_ref", [False, True])
def test_layouts_and_label_invariants(layout, use_ref):
    for seed in range(3):
        x, y = make_batch(seed, n_classes=5, m=4, d=16)
        y = torch.cat([y, torch.tensor([9])])  # a lone sample: no positive, never an anchor
        x = torch.cat([x, torch.randn(1, 16)])
        ref, ref_y = make_batch(seed + 30, n_classes=7, m=3, d=16) if use_ref else (None, None)
        miner = DistanceWeightedMiner(layout=layout, generator=torch.Generator().manual_seed(seed))
        a, p, n = miner(x, y, ref, ref_y)
        ry = y if ref is None else ref_y
        assert all(t.dtype == torch.int64 and not t.requires_grad for t in (a, p, n))
        assert (y[a] == ry[p]).all() and (y[a] != ry[n]).all()
        pos = y[:, None] == ry[None]
        if ref is None:
            assert (a != p).all()
            pos.fill_diagonal_(False)
        has_pair = pos.any(1) & (y[:, None] != ry[None]).any(1)
        if layout == "all_pos_pairs":
            want = {(i, j) for i, j in zip(*torch.where(pos & has_pair[:, None])) for i, j in [(int(i), int(j))]}
            assert list(zip(a.tolist(), p.tolist())) == sorted(want)
        else:
            assert a.tolist() == torch.where(has_pair)[0].tolist()
        assert len(a) > 0


def test_upper_cut_off_is_respected_and_draws_are_seeded():
    x, y = make_batch(1, n_classes=8, m=4, d=32)
    dist = torch.cdist(F.normalize(x.double(), dim=1), F.normalize(x.double(), dim=1))
    miner = DistanceWeightedMiner(upper=1.3, generator=torch.Generator().manual_seed(5))
    a, p, n = miner(x, y)
    neg = y[:, None] != y[None]
    has_allowed = (neg & (dist < 1.3)).any(1)
    assert (dist[a, n][has_allowed[a]] < 1.3).all()
    again = DistanceWeightedMiner(upper=1.3, generator=torch.Generator().manual_seed(5))(x, y)
    other = DistanceWeightedMiner(upper=1.3, generator=torch.Generator().manual_seed(6))(x, y)
    assert torch.equal(again[2], n) and not torch.equal(other[2], n)
    # The global generator when none is given: torch.manual_seed makes it repeatable.
    torch.manual_seed(3)
    first = DistanceWeightedMiner()(x, y)[2]
    torch.manual_seed(3)
    assert torch.equal(DistanceWeightedMiner()(x, y)[2], first)


def test_works_on_a_detached_normalised_copy():
    x, y = make_batch(2, d=8, dtype=torch.float64)
    m = DistanceWeightedMiner()
    torch.testing.assert_close(m.probabilities(x, y), m.probabilities(7.5 * x, y))
    xx = x.clone().requires_grad_(True)
    out = DistanceWeightedMiner(generator=torch.Generator().manual_seed(0))(xx, y)
    assert all(not t.requires_grad for t in out)
    assert xx.grad is None


# ---------------------------------------------------------------------------------------------------------
# numerics and validation


@pytest.mark.parametrize("dim", [2, 3, 128, 512])
def test_no_nan_with_antipodal_duplicate_and_zero_embeddings(dim):
    g = torch.Generator().manual_seed(dim)
    base = F.normalize(torch.randn(4, dim, generator=g), dim=1)
    near = F.normalize(-base + 1e-4 * torch.randn(4, dim, generator=g), dim=1)
    # classes: 0 = base, 1 = exact antipodes, 2 = near-antipodes, 3 = duplicates of base[0], 4 = zero vectors
    x = torch.cat([base, -base, near, base[:1].expand(4, -1), torch.zeros(4, dim)])
    y = torch.arange(5).repeat_interleave(4)
    for upper in (1.4, None):
        probs = DistanceWeightedMiner(upper=upper).probabilities(x, y)
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(1), torch.ones(len(y), dtype=torch.float64))
        for layout in ("all_pos_pairs", "one_per_anchor"):
            a, p, n = DistanceWeightedMiner(upper=upper, layout=layout,
                                            generator=torch.Generator().manual_seed(0))(x, y)
            assert len(a) > 0 and (y[a] != y[n]).all()
    if dim >= 128:
        # Without the cut-off the near-antipodes carry the most weight but stay finite (clamped, no log 0).
        probs = DistanceWeightedMiner(upper=None).probabilities(x, y)
        assert probs[0, 4:12].sum() > 0.5


def test_triplet_loss_on_distance_weighted_triplets_matches_pml_and_is_finite():
    x, y = make_batch(4, n_classes=8, m=4, d=16)
    idx = DistanceWeightedMiner(generator=torch.Generator().manual_seed(0))(x, y)
    xo, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    vo, vp = TripletMarginLoss(margin=0.2)(xo, y, idx), pml_losses.TripletMarginLoss(margin=0.2)(xp, y, idx)
    vo.backward()
    vp.backward()
    torch.testing.assert_close(vo, vp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xo.grad, xp.grad, atol=1e-5, rtol=1e-5)


def test_degenerate_batches_give_empty_indices():
    for x, y in [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), (torch.randn(1, 4), torch.tensor([3]))]:
        out = DistanceWeightedMiner()(x, y)
        assert len(out) == 3 and all(t.numel() == 0 and t.dtype == torch.int64 for t in out)
    # Classes of one sample each: negatives but no positive pair.
    out = DistanceWeightedMiner(layout="one_per_anchor")(torch.randn(4, 3), torch.arange(4))
    assert all(t.numel() == 0 for t in out)


@pytest.mark.parametrize("kwargs,key", [({"lower": -0.1}, "lower"), ({"lower": 2.0}, "lower"),
                                        ({"upper": 0.4}, "upper"), ({"upper": "1.4"}, "upper"),
                                        ({"layout": "per_pair"}, "layout"), ({"generator": 0}, "generator")])
def test_validation(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DistanceWeightedMiner(**kwargs)
