"""BatchHardMiner: invariants, a naive per-anchor loop, and equality with pytorch-metric-learning's miner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmlgen.losses import BatchHardMiner, CosineSimilarity, LpDistance, TripletMarginLoss
from _batches import make_batch

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")


def as_set(t):
    return set(zip(*(v.tolist() for v in t)))


def naive_batch_hard(x, y, kind, ref=None, ref_y=None):
    """For every anchor with a positive and a negative: (a, farthest positive, closest negative), by loops."""
    self_ref = ref is None
    q = F.normalize(x.double(), dim=1)
    r = q if self_ref else F.normalize(ref.double(), dim=1)
    ry = y if self_ref else ref_y
    out = set()
    for a in range(len(q)):
        pos = [j for j in range(len(r)) if ry[j] == y[a] and not (self_ref and j == a)]
        neg = [j for j in range(len(r)) if ry[j] != y[a]]
        if not pos or not neg:
            continue
        if kind == "lp":
            far = lambda j: float((q[a] - r[j]).norm())  # noqa: E731
        else:
            far = lambda j: -float(q[a] @ r[j])  # noqa: E731  (less similar = farther)
        out.add((a, max(pos, key=far), min(neg, key=far)))
    return out


@pytest.mark.parametrize("kind", ["lp", "cosine"])
@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_invariants_naive_loop_and_pml_equality(kind, use_ref, dtype):
    for seed in range(3):
        big = seed == 2  # > 25 rows: torch.cdist (used by PML) switches to its matmul path
        x, y = make_batch(seed, n_classes=8 if big else 5, m=5 if big else 4, dtype=dtype)
        ref, ref_y = make_batch(seed + 20, n_classes=6, m=3, dtype=dtype) if use_ref else (None, None)
        d_o, d_p = ((LpDistance(), pml_distances.LpDistance()) if kind == "lp"
                    else (CosineSimilarity(), pml_distances.CosineSimilarity()))
        got = BatchHardMiner(distance=d_o)(x, y, ref, ref_y)
        want = pml_miners.BatchHardMiner(distance=d_p)(x, y, ref, None if ref_y is None else ref_y.clone())
        assert all(t.dtype == torch.int64 and not t.requires_grad for t in got)
        assert as_set(got) == as_set(want) == naive_batch_hard(x, y, kind, ref, ref_y)
        a, p, n = got
        ry = y if ref is None else ref_y
        assert (y[a] == ry[p]).all() and (y[a] != ry[n]).all()
        if ref is None:
            assert (a != p).all()
            assert len(a) == len(y)  # every anchor has a positive and a negative here
        assert len(set(a.tolist())) == len(a)  # one triplet per anchor


def test_anchors_without_positive_or_negative_are_left_out():
    x = torch.randn(5, 3)
    y = torch.tensor([0, 0, 1, 2, 2])  # sample 2 has no positive
    a, p, n = BatchHardMiner()(x, y)
    assert a.tolist() == [0, 1, 3, 4]
    # Query of one class against a reference without negatives for some anchors.
    ref, ref_y = torch.randn(3, 3), torch.tensor([0, 0, 0])
    out = BatchHardMiner()(x, y, ref, ref_y)
    assert all(t.numel() == 0 for t in out)  # class-0 anchors have no negative, others no positive


@pytest.mark.parametrize("rowwise", [False, True], ids=["matrix", "rowwise"])
def test_loss_with_batch_hard_matches_pml(rowwise, monkeypatch):
    monkeypatch.setattr("dmlgen.losses.base.ROWWISE_FRACTION", 0 if rowwise else 10**9)
    for dtype in (torch.float32, torch.float64):
        x, y = make_batch(3, n_classes=8, m=5, dtype=dtype)
        xo, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        vo = TripletMarginLoss(margin=0.2)(xo, y, BatchHardMiner()(xo, y))
        vp = pml_losses.TripletMarginLoss(margin=0.2)(xp, y, pml_miners.BatchHardMiner()(xp, y))
        vo.backward()
        vp.backward()
        torch.testing.assert_close(vo.detach(), vp.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xo.grad, xp.grad, atol=1e-5, rtol=1e-5)


def test_degenerate_and_half_precision():
    for x, y in [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), (torch.randn(1, 4), torch.tensor([3]))]:
        out = BatchHardMiner()(x, y)
        assert len(out) == 3 and all(t.numel() == 0 and t.dtype == torch.int64 for t in out)
    x, y = make_batch(0)
    want = as_set(BatchHardMiner()(x, y))
    got = as_set(BatchHardMiner()(x.to(torch.bfloat16).requires_grad_(True), y))
    assert len(got) == len(want) and len(got & want) >= len(want) * 0.7  # rounding may change a few picks
