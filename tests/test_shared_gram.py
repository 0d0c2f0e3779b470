"""The step-scoped Gram matrix shared by the head's mean-distance scaling, the distance-weighted miner and MDR."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import dmlgen.losses as dl
from dmlgen.losses.distances import (
    distances_and_active,
    euclidean_distance_matrix,
    gram_matrix,
    share_scaled_batch,
    shared_distance_matrix,
    shared_gram_matrices,
)
from dmlgen.losses.base import ROWWISE_FRACTION
from dmlgen.losses.regularizers import MDRRegularizer
from dmlgen.models.heads import scale_by_mean_distance


def _batch(n: int = 32, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3, torch.arange(n // 4).repeat_interleave(4)


def test_gram_matrix_is_computed_once_per_tensor_version_inside_a_block_only() -> None:
    x, _ = _batch()
    outside = gram_matrix(x)
    torch.testing.assert_close(outside, x @ x.T)
    assert gram_matrix(x) is not outside  # nothing kept outside a block
    with shared_gram_matrices():
        first = gram_matrix(x)
        assert gram_matrix(x) is first
        assert gram_matrix(x.detach()) is first  # the same storage and version
        other = x.clone()
        assert gram_matrix(other) is not first
        x.mul_(2.0)  # an in-place write bumps the version: the old product is stale
        doubled = gram_matrix(x)
        assert doubled is not first
        torch.testing.assert_close(doubled, x @ x.T)
        assert gram_matrix(x[:8]) is not doubled  # a view of another shape is another matrix
    assert gram_matrix(x) is not doubled  # the block's matrices are dropped when it closes


def test_scaled_gram_is_the_scaled_rows_product() -> None:
    x, _ = _batch()
    factor = torch.tensor(0.37)
    scaled = x * factor
    share_scaled_batch(scaled, x, factor)  # outside a block: nothing is recorded
    with shared_gram_matrices():
        share_scaled_batch(scaled, x, factor)
        shared = gram_matrix(scaled)
        assert gram_matrix(scaled) is shared
        torch.testing.assert_close(shared, scaled @ scaled.T)


def test_distance_matrix_with_a_graph_is_shared_by_identity_and_version() -> None:
    x, _ = _batch()
    emb = x.clone().requires_grad_(True)
    assert shared_distance_matrix(emb) is None  # outside a block
    euclidean_distance_matrix(emb)
    with shared_gram_matrices():
        assert shared_distance_matrix(emb) is None  # the one built outside is not kept
        with torch.no_grad():
            euclidean_distance_matrix(emb)
        assert shared_distance_matrix(emb) is None  # no graph, nothing to share
        dist = euclidean_distance_matrix(emb)
        assert shared_distance_matrix(emb) is dist
        assert shared_distance_matrix(emb.detach()) is None  # same storage, another node: its gradient is elsewhere
        assert shared_distance_matrix(emb * 1.0) is None
        euclidean_distance_matrix(emb, emb)
        assert shared_distance_matrix(emb) is dist  # a cross-comparison is not recorded
        with torch.no_grad():
            dist.mul_(2.0)  # a consumer wrote into it: stale
        assert shared_distance_matrix(emb) is None
        fresh = euclidean_distance_matrix(emb)
        assert shared_distance_matrix(emb) is fresh
        with torch.no_grad():
            emb.add_(1.0)  # the batch itself changed
        assert shared_distance_matrix(emb) is None
    assert shared_distance_matrix(emb) is None  # dropped when the block closes


def test_scaled_batch_distances_carry_the_gradient_of_both_factors() -> None:
    """A scaled batch's matrix is derived from the source's; values and gradients (through the factor as
    well) match building it from the scaled rows."""
    x, _ = _batch(48, 12)
    x[3] = x[9]  # a duplicate pair: clamped in both
    weights = torch.rand(48, 48, generator=torch.Generator().manual_seed(1))
    grads = {}
    for shared in (False, True):
        source = x.clone().requires_grad_(True)
        with shared_gram_matrices() if shared else contextlib.nullcontext():
            source_dist = euclidean_distance_matrix(source)
            factor = 1.0 / source_dist.mean()
            scaled = source * factor
            share_scaled_batch(scaled, source, factor)
            dist = shared_distance_matrix(scaled) if shared else euclidean_distance_matrix(scaled)
            assert dist is not None
            if shared:
                assert shared_distance_matrix(scaled) is dist  # derived once
                assert shared_distance_matrix(scaled.detach()) is None
            total = (dist * weights).sum() + source_dist.sum()
        total.backward()
        grads[shared] = (dist.detach(), source.grad)
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=1e-4, atol=1e-6)


def test_normalised_distances_match_normalising_first() -> None:
    x, _ = _batch()
    x[5] = 0.0  # F.normalize keeps an all-zero row zero
    ref = torch.randn(20, 16)
    for shared in (False, True):
        with shared_gram_matrices() if shared else torch.no_grad():
            dist, active = distances_and_active(x, normalize=True)
            expected, expected_active = distances_and_active(F.normalize(x, dim=1))
            torch.testing.assert_close(dist, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(active, expected_active)
            cross, _ = distances_and_active(x, ref, normalize=True)
            torch.testing.assert_close(cross, euclidean_distance_matrix(F.normalize(x, dim=1), F.normalize(ref, dim=1)))


def _matrix_products(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")


def test_one_product_serves_scaling_miner_and_mdr_in_a_block() -> None:
    features, labels = _batch(64, 32)
    loss = dl.TripletMarginLoss(margin=0.2, distance={"name": "lp", "normalize_embeddings": False})
    mdr = MDRRegularizer(weight=0.6)
    results = {}

    def forward(shared: bool) -> None:
        miner = dl.DistanceWeightedMiner(layout="all_pos_pairs", generator=torch.Generator().manual_seed(0))
        with shared_gram_matrices() if shared else torch.enable_grad():
            emb = scale_by_mean_distance(features)
            triplets = miner(emb, labels)
            results[shared] = (triplets, loss(emb, labels, triplets) + mdr(emb))

    # Unshared: the scaling, the miner, the loss (its 192 triplets of 64 rows read the full matrix) and MDR.
    assert _matrix_products(lambda: forward(False)) == 4
    assert _matrix_products(lambda: forward(True)) == 1
    for got, expected in zip(results[True][0], results[False][0]):
        assert torch.equal(got, expected)  # the same draws from the same probabilities
    torch.testing.assert_close(results[True][1], results[False][1])


def test_mdr_recipe_step_runs_one_product_each_way_in_a_block() -> None:
    """Scaling, DW miner, row-wise triplets and MDR with gradients: outside a block the scaling, the miner
    and MDR each multiply the batch by itself and the scaling and MDR each run a backward product (5);
    inside it one forward product, and MDR's gradient meets the scaling's in one backward product (2).
    The gradient is the same."""
    features, labels = _batch(256, 16)
    loss = dl.TripletMarginLoss(margin=0.2, distance={"name": "lp", "normalize_embeddings": False})
    grads = {}

    def step(shared: bool) -> None:
        mdr = MDRRegularizer(weight=0.6)
        miner = dl.DistanceWeightedMiner(layout="all_pos_pairs", generator=torch.Generator().manual_seed(0))
        f = features.clone().requires_grad_(True)
        with shared_gram_matrices() if shared else contextlib.nullcontext():
            emb = scale_by_mean_distance(f)
            triplets = miner(emb, labels)
            # Few triplets: the loss computes them row by row, without a matrix of its own.
            assert 2 * len(triplets[0]) * ROWWISE_FRACTION <= 256 * 256
            total = loss(emb, labels, triplets) + mdr.weight * mdr(emb) + mdr.penalty()
        total.backward()
        grads[shared] = (f.grad, mdr.levels.grad)

    assert _matrix_products(lambda: step(False)) == 5
    assert _matrix_products(lambda: step(True)) == 2
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[True][1], grads[False][1])


def test_trainer_steps_hand_mdr_the_product_the_head_recorded(tmp_path, monkeypatch) -> None:
    """MDR's recipe through the trainer: inside every step MDR finds its batch's product and the head's
    differentiable distance matrix already shared."""
    from dmlgen.engine.config import config_from_dict
    from dmlgen.engine.trainer import Trainer
    from dmlgen.losses import distances

    found: list[tuple[bool, bool]] = []
    original = MDRRegularizer.forward

    def spy(self, embeddings, labels=None, teacher_embeddings=None):
        share = distances._SHARED.get()
        gram_shared = share is not None and distances._gram_key(embeddings.detach()) in share.grams
        found.append((gram_shared, shared_distance_matrix(embeddings) is not None))
        return original(self, embeddings, labels, teacher_embeddings)

    monkeypatch.setattr(MDRRegularizer, "forward", spy)
    cfg = config_from_dict({
        "name": "tiny-shared-product",
        "data": {"dataset": "omniglot", "max_classes": 8, "classes_per_batch": 4, "samples_per_class": 4},
        "model": {"backbone": "convnet4", "embedding_size": 16, "normalize": False, "scale_by_mean_distance": True},
        "loss": {"name": "triplet_margin",
                 "params": {"margin": 0.2, "distance": {"name": "lp", "normalize_embeddings": False}},
                 "miner": {"name": "distance_weighted", "params": {"layout": "all_pos_pairs"}}},
        "regularizers": [{"name": "mdr", "weight": 0.6}],
        "optimizer": {"name": "adam", "lr": 0.001},
        "train": {"epochs": 1, "max_steps_per_epoch": 3, "seed": 0},
    }, [])
    cfg.out_dir = str(tmp_path)
    Trainer(cfg, progress=False).fit()
    assert found == [(True, True)] * 3
