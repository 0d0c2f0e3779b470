"""Distances, reducers, the registry, and edge cases shared by every loss."""

from __future__ import annotations

import pathlib
import warnings

import pytest
import torch

import dmlgen.losses as L
from dmlgen.errors import ConfigError, DataError
from dmlgen.losses import (
    AvgNonZeroReducer,
    CosineSimilarity,
    DegenerateBatchWarning,
    DotProductSimilarity,
    LossTerm,
    LpDistance,
    MeanReducer,
    MetricBatch,
    MultiSimilarityLoss,
    MultiSimilarityMiner,
    SumReducer,
    TripletMarginLoss,
    TripletMarginMiner,
    build_loss,
    build_miner,
)
from dmlgen.losses.distances import euclidean_distance_matrix


def make_batch(seed: int, n_classes: int = 5, m: int = 4, d: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = n_classes * m
    labels = torch.arange(n_classes).repeat_interleave(m)[torch.randperm(n, generator=g)]
    centers = torch.randn(n_classes, d, generator=g)
    x = 0.7 * centers[labels] + torch.randn(n, d, generator=g)
    return x.to(dtype), labels


# Factories: a loss drawing random triplets must be rebuilt (same seed) to repeat a value.
LOSS_FACTORIES = [
    lambda: TripletMarginLoss(),
    lambda: TripletMarginLoss(swap=True, smooth_loss=True),
    lambda: TripletMarginLoss(triplets_per_anchor=3, generator=torch.Generator().manual_seed(0)),
    lambda: MultiSimilarityLoss(),
    lambda: MultiSimilarityLoss(distance=LpDistance()),
    lambda: L.ContrastiveLoss(),
    lambda: L.MarginLoss(),
    lambda: L.MarginLoss(num_classes=5, denominator="active_hinges"),
]


LOSS_IDS = ["triplet", "triplet_swap_smooth", "triplet_random", "ms", "ms_lp", "contrastive", "margin",
            "margin_per_class"]


# ---------------------------------------------------------------------------------------------------------
# distances


def test_euclidean_matrix_convention():
    x, _ = make_batch(0, dtype=torch.float64)
    y = torch.randn(7, x.shape[1], dtype=torch.float64)
    torch.testing.assert_close(euclidean_distance_matrix(x, y), torch.cdist(x, y))
    d = euclidean_distance_matrix(x)
    assert torch.equal(torch.diagonal(d), torch.zeros(len(x), dtype=torch.float64))
    torch.testing.assert_close(d, torch.cdist(x, x))


def test_duplicates_get_finite_zero_gradient():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    d = euclidean_distance_matrix(x)
    assert d[0, 1].item() == pytest.approx(1e-6)
    d[0, 1].backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dist", [LpDistance(), LpDistance(normalize_embeddings=False, power=2),
                                  LpDistance(p=1), CosineSimilarity(), DotProductSimilarity(False)])
def test_pairwise_matches_matrix(dist):
    x, _ = make_batch(1, dtype=torch.float64)
    r = torch.randn(9, x.shape[1], dtype=torch.float64)
    mat = dist(x, r)
    i, j = torch.randint(0, len(x), (30,)), torch.randint(0, len(r), (30,))
    torch.testing.assert_close(dist.pairwise(x[i], r[j]), mat[i, j])


def test_fp32_duplicate_rows_cancel_exactly_in_the_self_matrix():
    # With norms from a separate reduction, |x|^2 + |x|^2 - 2 x.x of a duplicate pair is rounding noise of
    # ~1e-3 in fp32 at these norms: a spurious distance with a meaningless gradient. From the product's own
    # diagonal it cancels to 0, the clamp catches it and the pair gets no gradient.
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 10
    x[5] = x[2]
    x.requires_grad_(True)
    mat = euclidean_distance_matrix(x)
    assert mat[2, 5] == mat[5, 2] == torch.tensor(1e-12).sqrt()
    weights = torch.zeros(256, 256)
    weights[2, 5] = weights[5, 2] = 1.0
    (mat * weights).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("self_ref", [True, False])
def test_euclidean_matrix_gradient_matches_autograd_of_the_formula(self_ref):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    x[5] = x[2]  # a duplicate: clamped, zero gradient
    r = None if self_ref else torch.cat([torch.randn(6, 6, generator=g, dtype=torch.float64), x[:1]])
    w = torch.randn(9, 9 if self_ref else 7, generator=g, dtype=torch.float64)

    def formula(q, ref):
        other = q if ref is None else ref
        sq = (q * q).sum(1, keepdim=True) + (other * other).sum(1)[None] - 2.0 * q @ other.T
        d = sq.clamp_min(1e-12).sqrt()
        return d.masked_fill(torch.eye(len(q), dtype=torch.bool), 0.0) if ref is None else d

    inputs = [x.clone().requires_grad_(True)] + ([] if self_ref else [r.clone().requires_grad_(True)])
    copies = [t.detach().clone().requires_grad_(True) for t in inputs]
    ours = euclidean_distance_matrix(inputs[0], None if self_ref else inputs[1])
    ref_value = formula(copies[0], None if self_ref else copies[1])
    # The self-comparison reads the squared norms off the product's diagonal (a duplicate pair then cancels
    # exactly): equal up to rounding.
    torch.testing.assert_close(ours, ref_value, rtol=1e-13, atol=1e-13)
    (ours * w).sum().backward()
    (ref_value * w).sum().backward()
    for a, b in zip(inputs, copies):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)
    small = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    other = None if self_ref else torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, o=other: euclidean_distance_matrix(q, o), (small,))


def test_l2_normalize_matches_f_normalize_in_value_and_gradient():
    import torch.nn.functional as F

    from dmlgen.losses.distances import l2_normalize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    x[3] = 0.0  # a zero row: clamped norm, gradient 1/eps like F.normalize
    x[4] *= 1e-13  # below eps as well
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = l2_normalize(a), F.normalize(b, dim=1)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(l2_normalize, (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),))


def test_distance_direction_helpers():
    assert not LpDistance().is_inverted and CosineSimilarity().is_inverted
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])
    assert torch.equal(LpDistance().margin(a, b), a - b)
    assert torch.equal(CosineSimilarity().margin(a, b), b - a)
    assert torch.equal(LpDistance().smallest_dist(a, b), torch.tensor([1.0, 2.0]))
    assert torch.equal(CosineSimilarity().smallest_dist(a, b), torch.tensor([2.0, 3.0]))


def test_distance_matches_pml():
    pml_d = pytest.importorskip("pytorch_metric_learning.distances")
    x, _ = make_batch(2, dtype=torch.float64)
    r = torch.randn(6, x.shape[1], dtype=torch.float64)
    for ours, theirs in [(LpDistance(), pml_d.LpDistance()),
                         (LpDistance(normalize_embeddings=False, power=2), pml_d.LpDistance(
                             normalize_embeddings=False, power=2)),
                         (CosineSimilarity(), pml_d.CosineSimilarity())]:
        torch.testing.assert_close(ours(x, r), theirs(x, r))


# ---------------------------------------------------------------------------------------------------------
# reducers


def test_reducers():
    x = torch.randn(4, 3, requires_grad=True)
    batch = MetricBatch.from_inputs(x, torch.arange(4))
    losses = torch.tensor([0.0, 2.0, 0.0, 4.0])
    term = LossTerm(losses, "triplet")
    assert MeanReducer()(term, batch).item() == 1.5
    assert AvgNonZeroReducer()(term, batch).item() == 3.0
    assert SumReducer()(term, batch).item() == 6.0
    assert AvgNonZeroReducer()(LossTerm(torch.zeros(3), "triplet"), batch).item() == 0.0
    for reducer in (MeanReducer(), AvgNonZeroReducer(), SumReducer()):
        out = reducer(LossTerm(torch.empty(0), "triplet"), batch)
        out.backward()  # the empty loss is still in the embeddings' graph
        assert out.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None


def test_dense_masked_terms_and_divisor_reducer_match_the_gathered_elements():
    x = torch.randn(4, 3, requires_grad=True)
    batch = MetricBatch.from_inputs(x, torch.arange(4))
    g = torch.Generator().manual_seed(0)
    dense = torch.relu(torch.randn(6, 5, generator=g, dtype=torch.float64))
    dense[0, 0] = float("nan")  # outside the mask: must not leak into any reduction
    mask = torch.rand(6, 5, generator=g) > 0.4
    mask[0, 0] = False
    for divisor in (None, 7, torch.tensor(3), 0):
        for reducer in (MeanReducer(), AvgNonZeroReducer(), SumReducer(), L.DivisorReducer()):
            masked = reducer(LossTerm(dense, "pos_pair", divisor=divisor, mask=mask), batch)
            gathered = reducer(LossTerm(dense[mask], "pos_pair", divisor=divisor), batch)
            assert torch.isfinite(masked)
            torch.testing.assert_close(masked, gathered, rtol=1e-12, atol=1e-12)
    assert L.DivisorReducer()(LossTerm(dense[mask], "triplet", divisor=4), batch).item() == pytest.approx(
        dense[mask].sum().item() / 4)
    # An empty mask is the in-graph zero.
    for reducer in (MeanReducer(), AvgNonZeroReducer(), SumReducer(), L.DivisorReducer()):
        losses = x.sum() * torch.ones(2, 2)
        out = reducer(LossTerm(losses, "neg_pair", divisor=0, mask=torch.zeros(2, 2, dtype=torch.bool)), batch)
        out.backward()
        assert out.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None


@pytest.mark.parametrize("dist", [LpDistance(), LpDistance(normalize_embeddings=False, power=2), LpDistance(p=1),
                                  CosineSimilarity(), DotProductSimilarity(False)])
@pytest.mark.parametrize("self_ref", [True, False])
def test_values_at_rowwise_equals_the_matrix(dist, self_ref, monkeypatch):
    x, y = make_batch(1, dtype=torch.float64)
    ref, ref_y = (None, None) if self_ref else make_batch(2, n_classes=3, dtype=torch.float64)
    batch = MetricBatch.from_inputs(x, y, ref, ref_y)
    loss = TripletMarginLoss(distance=dist)
    g = torch.Generator().manual_seed(0)
    m = batch.ref_emb.shape[0]
    pairs = [(torch.randint(0, len(x), (40,), generator=g), torch.randint(0, m, (40,), generator=g)),
             (torch.arange(min(len(x), m)), torch.arange(min(len(x), m)))]  # self-pairs in self mode
    mat = dist(batch.embeddings, batch.ref_or_none)
    for fraction in (0, 10**9):  # always row by row, always from the matrix
        monkeypatch.setattr("dmlgen.losses.base.ROWWISE_FRACTION", fraction)
        for (i, j), values in zip(pairs, loss.values_at(batch, *pairs)):
            torch.testing.assert_close(values, mat[i, j], rtol=1e-10, atol=1e-10)
            if self_ref and not dist.is_inverted:
                assert (values[i == j] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# registry


def test_registry_builds_fixed_names():
    assert isinstance(build_loss("triplet_margin"), TripletMarginLoss)
    assert isinstance(build_loss("multi_similarity", alpha=1.0), MultiSimilarityLoss)
    assert isinstance(build_miner("triplet_margin", type_of_triplets="semihard"), TripletMarginMiner)
    assert isinstance(build_miner("multi_similarity", epsilon=0.2), MultiSimilarityMiner)
    assert build_miner(None) is None
    assert isinstance(build_loss("contrastive", neg_margin=0.5), L.ContrastiveLoss)
    assert isinstance(build_loss("margin", num_classes=3), L.MarginLoss)
    assert isinstance(build_loss("proxy_anchor", num_classes=3, embedding_size=4), L.ProxyAnchorLoss)
    assert isinstance(build_loss("normalized_softmax", num_classes=3, embedding_size=4), L.NormalizedSoftmaxLoss)
    assert isinstance(build_miner("batch_hard"), L.BatchHardMiner)
    assert isinstance(build_miner("distance_weighted", upper=None), L.DistanceWeightedMiner)
    assert set(L.LOSSES) == {"triplet_margin", "multi_similarity", "contrastive", "margin", "proxy_anchor",
                             "normalized_softmax", "ntxent"}
    assert set(L.MINERS) == {"triplet_margin", "multi_similarity", "batch_hard", "distance_weighted"}
    with pytest.raises(ConfigError, match="missing parameter.*'embedding_size'"):
        build_loss("proxy_anchor", num_classes=3)


def test_registry_resolves_distance_and_reducer_specs_from_yaml_values():
    loss = build_loss("triplet_margin", margin=0.1, distance={"name": "lp", "normalize_embeddings": False},
                      reducer="mean")
    assert isinstance(loss.distance, LpDistance) and not loss.distance.normalize_embeddings
    assert isinstance(loss.reducer, MeanReducer)
    miner = build_miner("multi_similarity", distance="cosine")
    assert isinstance(miner.distance, CosineSimilarity)


@pytest.mark.parametrize(
    "call,fragments",
    [
        (lambda: build_loss("triplet", margin=0.1), ["'triplet'", "multi_similarity", "triplet_margin"]),
        (lambda: build_loss("triplet_margin", marg=0.1), ["'marg'", "margin", "swap", "triplets_per_anchor"]),
        (lambda: build_loss("multi_similarity", epsilon=0.1), ["'epsilon'", "alpha", "beta", "base"]),
        (lambda: build_miner("multi_similarity", margin=0.1), ["'margin'", "epsilon"]),
        (lambda: build_miner("semihard"), ["'semihard'", "triplet_margin"]),
        (lambda: build_miner(None, epsilon=0.1), ["'epsilon'"]),
        (lambda: build_loss("triplet_margin", distance={"name": "lp", "q": 3}), ["'q'", "normalize_embeddings"]),
        (lambda: build_loss("triplet_margin", distance={"p": 2}), ["name"]),
        (lambda: build_loss("triplet_margin", reducer="median"), ["'median'", "avg_non_zero"]),
        (lambda: build_loss("triplet_margin", distance=3), ["3"]),
        (lambda: build_loss("triplet_margin", margin=True), ["margin", "True"]),
    ],
)
def test_registry_errors_name_the_value(call, fragments):
    with pytest.raises(ConfigError) as err:
        call()
    for fragment in fragments:
        assert fragment in str(err.value)


def test_library_never_imports_pml():
    root = pathlib.Path(L.__file__).parent
    for path in root.rglob("*.py"):
        assert "pytorch_metric_learning" not in path.read_text(), path


# ---------------------------------------------------------------------------------------------------------
# edge cases, for every loss


@pytest.mark.parametrize("make_loss", LOSS_FACTORIES, ids=LOSS_IDS)
@pytest.mark.parametrize("case", ["single_class", "single_sample"])
def test_degenerate_batch_is_zero_in_graph_and_warns_once(make_loss, case):
    loss = make_loss()
    if case == "single_class":
        x, y = torch.randn(6, 4), torch.full((6,), 3)
    else:
        x, y = torch.randn(1, 4), torch.tensor([3])
    x.requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loss(x, y)
        loss(x, y)
    relevant = [w for w in caught if issubclass(w.category, DegenerateBatchWarning)]
    assert len(relevant) == 1 and type(loss).__name__ in str(relevant[0].message)
    assert out.ndim == 0 and out.item() == 0.0
    out.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("make_loss", LOSS_FACTORIES, ids=LOSS_IDS)
def test_one_warning_per_reason(make_loss):
    loss = make_loss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
        loss(torch.randn(1, 4), torch.tensor([1]))
        loss(torch.randn(3, 4), torch.ones(3, dtype=torch.long))
    assert len([w for w in caught if issubclass(w.category, DegenerateBatchWarning)]) == 2


@pytest.mark.parametrize("make_loss", LOSS_FACTORIES, ids=LOSS_IDS)
@pytest.mark.parametrize("fill", [1.0, 0.0])
def test_identical_embeddings_give_no_nan(make_loss, fill):
    loss = make_loss()
    x = torch.full((8, 5), fill, requires_grad=True)
    y = torch.arange(4).repeat(2)
    out = loss(x, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    # With a miner too.
    for miner in (TripletMarginMiner(0.2, "hard"), MultiSimilarityMiner()):
        x.grad = None
        out = loss(x, y, miner(x, y))
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("make_loss", LOSS_FACTORIES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_is_computed_in_fp32(make_loss, dtype):
    loss = make_loss()
    x, y = make_batch(0)
    x_low = x.to(dtype)
    ref = make_loss()(x_low.float(), y)  # the same values, already fp32
    xx = x_low.clone().requires_grad_(True)
    out = loss(xx, y)
    out.backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert xx.grad.dtype == dtype and torch.isfinite(xx.grad.float()).all()
    # Large fp16 values: an fp16 sum for the empty loss would overflow to inf and give NaN.
    big = torch.full((4, 8), 60000.0, dtype=torch.float16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateBatchWarning)
        zero = loss(big, torch.zeros(4, dtype=torch.long))
    assert zero.item() == 0.0


@pytest.mark.parametrize("make_loss", LOSS_FACTORIES, ids=LOSS_IDS)
def test_autocast_does_not_lower_loss_precision(make_loss):
    loss = make_loss()
    x, y = make_batch(1)
    ref = make_loss()(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("make_loss", LOSS_FACTORIES, ids=LOSS_IDS)
def test_no_negatives_in_reference_but_not_degenerate(make_loss):
    torch.manual_seed(0)  # random miners: the global RNG state left by earlier tests could give a zero loss
    loss = make_loss()
    # Query of one class against a reference holding other classes: a normal (cross-batch) case.
    x = torch.randn(3, 4)
    ref, ref_y = torch.randn(5, 4), torch.tensor([0, 0, 1, 1, 2])
    out = loss(x, torch.zeros(3, dtype=torch.long), ref_emb=ref, ref_labels=ref_y)
    assert torch.isfinite(out) and out.item() > 0


def test_numpy_labels_and_input_errors():
    x, y = make_batch(0)
    loss = TripletMarginLoss()
    assert loss(x, y.numpy()).item() == loss(x, y).item()
    with pytest.raises(DataError, match="labels"):
        loss(x, y[:-1])
    with pytest.raises(DataError, match="labels"):
        loss(x, y.float())
    with pytest.raises(DataError, match="embeddings"):
        loss(x[0], y[:1])
    with pytest.raises(DataError, match="embeddings"):
        loss(x[:0], y[:0])
    with pytest.raises(DataError, match="ref_labels"):
        loss(x, y, ref_emb=x.clone())
    with pytest.raises(DataError, match="ref_emb"):
        loss(x, y, ref_emb=torch.randn(4, 3), ref_labels=torch.arange(4))


def test_ref_emb_identical_object_is_self_mode():
    x, y = make_batch(3)
    loss = TripletMarginLoss()
    assert loss(x, y, ref_emb=x, ref_labels=y).item() == loss(x, y).item()


def test_distance_and_reducer_are_submodules():
    loss = TripletMarginLoss(distance=CosineSimilarity(), reducer=SumReducer())
    names = dict(loss.named_children())
    assert isinstance(names["distance"], CosineSimilarity) and isinstance(names["reducer"], SumReducer)
    assert "margin=0.05" in repr(loss)
