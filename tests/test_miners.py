"""Miner invariants, and equality (as sets) with pytorch-metric-learning's miners (test-only oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmlgen.errors import ConfigError, DataError
from dmlgen.losses import CosineSimilarity, LpDistance, MultiSimilarityMiner, TripletMarginMiner
from _batches import make_batch

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")




def triplet_set(t):
    return set(zip(*(v.tolist() for v in t)))


def pair_sets(t):
    a1, p, a2, n = (v.tolist() for v in t)
    return set(zip(a1, p)), set(zip(a2, n))


def distances(kind):
    if kind == "lp":
        return LpDistance(), pml_distances.LpDistance()
    return CosineSimilarity(), pml_distances.CosineSimilarity()


def reference_values(x, y, ref, ref_y, kind):
    """Float64 distance/similarity matrix computed directly (for checking the mining conditions)."""
    q = F.normalize(x.double(), dim=1)
    r = q if ref is None else F.normalize(ref.double(), dim=1)
    return torch.cdist(q, r) if kind == "lp" else q @ r.T


# ---------------------------------------------------------------------------------------------------------
# TripletMarginMiner


@pytest.mark.parametrize("kind", ["lp", "cosine"])
@pytest.mark.parametrize("type_of_triplets", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("use_ref", [False, True])
def test_triplet_miner_invariants_and_pml_equality(kind, type_of_triplets, use_ref):
    margin = 0.2 if kind == "lp" else 0.1
    sizes = {"all": 0, "hard": 0, "semihard": 0, "easy": 0}
    for seed in range(3):
        big = seed == 2  # > 25 rows: torch.cdist (used by PML) switches to its matmul path
        x, y = make_batch(seed, n_classes=8 if big else 5, m=5 if big else 4, normalized=seed == 1)
        ref, ref_y = make_batch(seed + 20, n_classes=6, m=3) if use_ref else (None, None)
        d_o, d_p = distances(kind)
        got = TripletMarginMiner(margin, type_of_triplets, distance=d_o)(x, y, ref, ref_y)
        want = pml_miners.TripletMarginMiner(margin, type_of_triplets, distance=d_p)(
            x, y, ref, None if ref_y is None else ref_y.clone()
        )
        assert all(t.dtype == torch.int64 and not t.requires_grad for t in got)
        assert triplet_set(got) == triplet_set(want)
        a, p, n = got
        sizes[type_of_triplets] += len(a)
        ry = y if ref is None else ref_y
        assert (y[a] == ry[p]).all() and (y[a] != ry[n]).all()
        if ref is None:
            assert (a != p).all()
        mat = reference_values(x, y, ref, ref_y, kind)
        m = mat[a, n] - mat[a, p] if kind == "lp" else mat[a, p] - mat[a, n]
        tol = 1e-5
        if type_of_triplets == "easy":
            assert (m > margin - tol).all()
        else:
            assert (m <= margin + tol).all()
        if type_of_triplets == "semihard":
            assert (m > -tol).all()  # the negative is farther than the positive ...
            assert (m <= margin + tol).all()  # ... but within the margin
        if type_of_triplets == "hard":
            assert (m <= tol).all()
    assert sizes[type_of_triplets] > 0  # the test exercised a non-empty selection


def test_triplet_miner_types_partition_all_triplets():
    x, y = make_batch(4)
    sets = {t: triplet_set(TripletMarginMiner(0.2, t)(x, y)) for t in TripletMarginMiner.TYPES}
    assert sets["hard"] | sets["semihard"] == sets["all"] and not sets["hard"] & sets["semihard"]
    assert not sets["all"] & sets["easy"]
    n_valid = sum(((y[:, None] == y[None]).sum(1) - 1) * (y[:, None] != y[None]).sum(1)).item()
    assert len(sets["all"]) + len(sets["easy"]) == n_valid


# ---------------------------------------------------------------------------------------------------------
# MultiSimilarityMiner


@pytest.mark.parametrize("kind", ["cosine", "lp"])
@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_similarity_miner_invariants_and_pml_equality(kind, use_ref, dtype):
    eps = 0.1
    total_pos = total_neg = 0
    for seed in range(3):
        x, y = make_batch(seed, dtype=dtype, normalized=seed == 2)
        ref, ref_y = make_batch(seed + 20, n_classes=6, m=3, dtype=dtype) if use_ref else (None, None)
        d_o, d_p = distances(kind)
        got = MultiSimilarityMiner(eps, distance=d_o)(x, y, ref, ref_y)
        want = pml_miners.MultiSimilarityMiner(eps, distance=d_p)(
            x, y, ref, None if ref_y is None else ref_y.clone()
        )
        assert pair_sets(got) == pair_sets(want)
        a1, p, a2, n = got
        total_pos, total_neg = total_pos + len(a1), total_neg + len(a2)
        ry = y if ref is None else ref_y
        assert (y[a1] == ry[p]).all() and (y[a2] != ry[n]).all()
        if ref is None:
            assert (a1 != p).all()
        mat = reference_values(x, y, ref, ref_y, kind)
        pos = y[:, None] == ry[None]
        if ref is None:
            pos.fill_diagonal_(False)
        neg = y[:, None] != ry[None]
        s = mat if kind == "cosine" else -mat  # larger = closer in both cases below
        hardest_neg = torch.where(neg, s, -torch.inf).amax(1)
        easiest_pos = torch.where(pos, s, torch.inf).amin(1)
        tol = 1e-5
        assert (s[a1, p] - eps < hardest_neg[a1] + tol).all()
        assert (s[a2, n] + eps > easiest_pos[a2] - tol).all()
    assert total_pos > 0 and total_neg > 0


def test_multi_similarity_miner_epsilon_monotone():
    x, y = make_batch(1)
    small = pair_sets(MultiSimilarityMiner(0.05)(x, y))
    large = pair_sets(MultiSimilarityMiner(0.5)(x, y))
    assert small[0] <= large[0] and small[1] <= large[1]


# ---------------------------------------------------------------------------------------------------------
# edge cases and validation


@pytest.mark.parametrize("miner", [TripletMarginMiner(0.2, "all"), MultiSimilarityMiner()])
def test_degenerate_batches_give_empty_int64_indices(miner):
    for x, y in [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), (torch.randn(1, 4), torch.tensor([3]))]:
        out = miner(x, y)
        assert len(out) == miner.output_size
        assert all(t.dtype == torch.int64 and t.numel() == 0 for t in out)


@pytest.mark.parametrize("miner", [TripletMarginMiner(0.2, "semihard"), MultiSimilarityMiner()])
def test_miners_accept_half_precision_and_never_track_gradients(miner):
    x, y = make_batch(0)
    ref_out = miner(x, y)
    for dtype in (torch.float16, torch.bfloat16):
        xx = x.to(dtype).requires_grad_(True)
        out = miner(xx, y)
        assert all(not t.requires_grad for t in out)
        # Same selection up to the rounding of the inputs: compare sizes loosely, the sets exactly on fp32.
        assert abs(len(out[0]) - len(ref_out[0])) <= max(3, len(ref_out[0]) // 5)


def test_all_identical_embeddings():
    x = torch.ones(8, 4)
    y = torch.arange(4).repeat(2)
    a, p, n = TripletMarginMiner(0.2, "hard")(x, y)
    assert len(a) == sum(1 for i in range(8) for j in range(8) for k in range(8)
                         if i != j and y[i] == y[j] and y[i] != y[k])
    assert len(TripletMarginMiner(0.2, "semihard")(x, y)[0]) == 0


def test_miner_validation():
    with pytest.raises(ConfigError, match="type_of_triplets"):
        TripletMarginMiner(type_of_triplets="medium")
    with pytest.raises(ConfigError, match="margin"):
        TripletMarginMiner(margin="0.2")
    with pytest.raises(ConfigError, match="epsilon"):
        MultiSimilarityMiner(epsilon=float("inf"))
    with pytest.raises(DataError, match="labels"):
        TripletMarginMiner()(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(DataError, match="ref_labels"):
        MultiSimilarityMiner()(torch.randn(4, 3), torch.arange(4), torch.randn(6, 3))
