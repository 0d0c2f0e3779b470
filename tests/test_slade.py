"""SLADE's pieces (methods.md §7): EMA statistics and thresholds against hand-computed values, confident pair
masks against a naive loop, NT-Xent against a loop and PML, the unlabeled data and its sampler, and the
student step's warm-up gating on a hand-made step context (no engine run; see test_slade_pipeline.py)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dmlgen.data.datasets import ArrayImageDataset
from dmlgen.data.omniglot import omniglot_splits
from dmlgen.data.unlabeled import (
    NO_LABEL,
    PooledDataset,
    RandomBatchSampler,
    UnlabeledDataset,
    cap_images,
    split_off_classes,
    split_off_groups,
    unlabeled_image_folder,
    unlabeled_npz,
)
from dmlgen.engine.setup import Criterion
from dmlgen.errors import CheckpointError, ConfigError, DataError
from dmlgen.losses import DegenerateBatchWarning, MultiSimilarityLoss, NTXentLoss, build_loss
from dmlgen.losses.ntxent import ntxent_views
from dmlgen.methods import MethodSetup
from dmlgen.methods.slade import (
    FeatureBasis,
    SladeStudentMethod,
    SladeStudentParams,
    cluster_unlabeled,
    ema_value,
    load_pseudo_labels,
    save_pseudo_labels,
    select_confident_pairs,
    symmetric_pairs,
    upper_pairs,
)
from dmlgen.models import build_model
from _batches import make_batch
from _fixtures import one_thread  # noqa: F401  (autouse: one thread per test)


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_value_first_observation_literal_and_full_gradients() -> None:
    stored = torch.tensor(0.5)
    for mode, weight in (("literal", 0.01), ("full", 1.0)):
        batch = torch.tensor(0.9, requires_grad=True)
        value = ema_value(stored, batch, 0.99, True, mode)  # type: ignore[arg-type]
        assert value.item() == pytest.approx(0.01 * 0.9 + 0.99 * 0.5)  # 0.504 in both modes
        (grad,) = torch.autograd.grad(value, batch)
        assert grad.item() == pytest.approx(weight)
    batch = torch.tensor(0.9, requires_grad=True)
    first = ema_value(stored, batch, 0.99, False, "literal")
    assert first.item() == pytest.approx(0.9)  # the first observation initialises
    assert torch.autograd.grad(first, batch)[0].item() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="ema_grad_mode"):
        ema_value(stored, batch, 0.99, True, "half")  # type: ignore[arg-type]


def _basis(beta: float = 0.9, margin: float = 1.0, mode: str = "literal") -> FeatureBasis:
    return FeatureBasis(4, 3, ema_beta=beta, sd_margin=margin, ema_grad_mode=mode)  # type: ignore[arg-type]


def test_sd_loss_and_thresholds_follow_hand_computed_ema() -> None:
    basis = _basis().train()
    # Batch 1: positives 0.9, 0.7 -> mu+ 0.8, var+ ((0.1)^2 + (0.1)^2) / 2 = 0.01;
    # negatives 0.1, -0.1, 0.3 -> mu- 0.1, var- (0 + 0.04 + 0.04) / 3 = 0.08 / 3 (first observation: copied).
    s1 = torch.tensor([0.9, 0.7, 0.1, -0.1, 0.3], requires_grad=True)
    same1 = torch.tensor([True, True, False, False, False])
    loss1, stats1 = basis.sd_loss(s1, same1)
    var_n = 0.08 / 3
    assert stats1["mu_pos"] == pytest.approx(0.8) and stats1["var_pos"] == pytest.approx(0.01)
    assert stats1["mu_neg"] == pytest.approx(0.1) and stats1["var_neg"] == pytest.approx(var_n)
    # [mu- - mu+ + m]_+ + var+ + var- = [0.1 - 0.8 + 1.0]_+ + 0.01 + 0.08/3
    assert loss1.item() == pytest.approx(0.3 + 0.01 + var_n)
    assert basis.thresholds() == pytest.approx((0.8, 0.1))
    # Batch 2: one positive pair 0.6 and no negative: mu+ = 0.1 * 0.6 + 0.9 * 0.8 = 0.78, var+ = 0.9 * 0.01;
    # the negative side keeps its stored, gradient-free values.
    s2 = torch.tensor([0.6], requires_grad=True)
    loss2, stats2 = basis.sd_loss(s2, torch.tensor([True]))
    assert stats2["mu_pos"] == pytest.approx(0.78) and stats2["var_pos"] == pytest.approx(0.009)
    assert stats2["mu_neg"] == pytest.approx(0.1) and stats2["var_neg"] == pytest.approx(var_n)
    assert loss2.item() == pytest.approx((0.1 - 0.78 + 1.0) + 0.009 + var_n)
    # Literal mode: the batch mean enters with weight 1 - beta = 0.1, through -mu+ in the hinge.
    (grad,) = torch.autograd.grad(loss2, s2)
    assert grad.item() == pytest.approx(-0.1)
    assert float(basis.mu_pos) == pytest.approx(0.78) and basis.thresholds() == pytest.approx((0.78, 0.1))


def test_full_gradient_mode_has_the_same_values_and_an_undamped_gradient() -> None:
    literal, full = _basis(mode="literal").train(), _basis(mode="full").train()
    s1 = torch.tensor([0.9, 0.7, 0.1, -0.1, 0.3])
    same1 = torch.tensor([True, True, False, False, False])
    for basis in (literal, full):
        basis.sd_loss(s1, same1)
    values, grads = [], []
    for basis in (literal, full):
        s2 = torch.tensor([0.6, 0.2], requires_grad=True)
        loss, _ = basis.sd_loss(s2, torch.tensor([True, False]))
        values.append(loss.item())
        grads.append(torch.autograd.grad(loss, s2)[0])
    assert values[0] == pytest.approx(values[1])
    # d/ds of [mu- - mu+ + m]_+ : -w for the positive, +w for the negative (their variances have zero gradient
    # at a single pair); w = 1 - beta = 0.1 in literal mode, 1 in full mode.
    assert torch.allclose(grads[0], torch.tensor([-0.1, 0.1]))
    assert torch.allclose(grads[1], torch.tensor([-1.0, 1.0]))


def test_statistics_wait_for_both_sides_and_freeze_outside_training() -> None:
    basis = _basis().train()
    s = torch.tensor([0.2, 0.4], requires_grad=True)
    loss, _ = basis.sd_loss(s, torch.tensor([False, False]))  # negatives only
    assert loss.item() == 0.0 and loss.requires_grad  # zero, in the graph
    assert bool(basis.seen_neg) and not bool(basis.seen_pos) and basis.thresholds() is None
    basis.eval()
    basis.sd_loss(torch.tensor([0.9, 0.5]), torch.tensor([True, False]))
    assert not bool(basis.seen_pos) and float(basis.mu_neg) == pytest.approx(0.3)  # eval: nothing stored
    state = basis.state_dict()
    assert {"mu_pos", "var_pos", "mu_neg", "var_neg", "seen_pos", "seen_neg", "weight"} <= set(state)
    assert all(state[k].shape == () for k in state if k != "weight")  # 0-dim buffers (methods.md §1.2.5)


def test_overlapping_bands_select_nothing() -> None:
    basis = _basis().train()
    basis.sd_loss(torch.tensor([0.2, 0.5]), torch.tensor([True, False]))  # mu+ 0.2 <= mu- 0.5
    assert basis.thresholds() is None
    s = torch.linspace(-1, 1, 10)
    pos, neg = select_confident_pairs(s, torch.ones(10, dtype=torch.bool), basis.thresholds())
    assert not pos.any() and not neg.any()
    with pytest.raises(ConfigError, match="ema_beta"):
        FeatureBasis(4, 3, ema_beta=1.0)


# ------------------------------------------------------------------------------------- pair selection
@pytest.mark.parametrize("agree", [False, True])
def test_confident_pair_masks_match_a_loop(agree: bool) -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.rand(40, generator=g) * 2 - 1
    same = torch.rand(40, generator=g) < 0.4
    t1, t2 = 0.3, -0.2
    pos, neg = select_confident_pairs(s, same, (t1, t2), require_cluster_agreement=agree)
    for k in range(40):
        want_pos = s[k].item() >= t1 and (same[k].item() or not agree)
        want_neg = s[k].item() <= t2 and (not same[k].item() or not agree)
        assert pos[k].item() == want_pos and neg[k].item() == want_neg
    assert not (pos & neg).any()
    if agree:  # agreement removes exactly the high-similarity cross-cluster and low-similarity same-cluster pairs
        free_pos, free_neg = select_confident_pairs(s, same, (t1, t2))
        assert torch.equal(pos, free_pos & same) and torch.equal(neg, free_neg & ~same)


def test_symmetric_pairs_list_each_selected_pair_in_both_orders() -> None:
    i, j = upper_pairs(4)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    pos = torch.tensor([True, False, False, False, False, True])
    neg = torch.tensor([False, True, False, False, False, False])
    a1, p, a2, n = symmetric_pairs(i, j, pos, neg)
    assert sorted(zip(a1.tolist(), p.tolist())) == [(0, 1), (1, 0), (2, 3), (3, 2)]
    assert sorted(zip(a2.tolist(), n.tolist())) == [(0, 2), (2, 0)]


def test_basis_similarities_match_a_loop_over_pairs() -> None:
    torch.manual_seed(0)
    basis = FeatureBasis(5, 3)
    f = torch.randn(6, 5)
    s, i, j = basis.similarities(f)
    w = basis.weight.detach()
    for k in range(len(s)):
        ri, rj = w @ f[i[k]], w @ f[j[k]]
        assert s[k].item() == pytest.approx(float(ri @ rj / (ri.norm() * rj.norm())), abs=1e-6)
    assert len(s) == 15 and bool((i < j).all())
    # The CE logits are the basis representation r = W_a f (a bias-free classifier).
    assert torch.allclose(basis(f), f @ w.T)


# ------------------------------------------------------------------------------------------- NT-Xent
def naive_ntxent(x: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """Mean over positive pairs (a, p) of -log(e^{s_ap/t} / (e^{s_ap/t} + sum_{y_n != y_a} e^{s_an/t}))."""
    z = F.normalize(x.double(), dim=1)
    n, terms = len(y), []
    for a in range(n):
        for p in range(n):
            if p == a or y[p] != y[a]:
                continue
            num = math.exp(float(z[a] @ z[p]) / tau)
            den = num + sum(math.exp(float(z[a] @ z[k]) / tau) for k in range(n) if y[k] != y[a])
            terms.append(-math.log(num / den))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_ntxent_matches_a_loop_and_pml(tau: float) -> None:
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = make_batch(1, n_classes=4, m=3, d=6, dtype=torch.float64)
    ours = NTXentLoss(temperature=tau)(x, y)
    assert ours.item() == pytest.approx(naive_ntxent(x, y, tau), rel=1e-9)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    NTXentLoss(temperature=tau)(xa, y).backward()
    theirs = pml_losses.NTXentLoss(temperature=tau)(xb, y)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-8)  # type: ignore[arg-type]


def test_ntxent_two_views_is_simclr_and_stays_finite() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    emb, labels = ntxent_views(z1, z2)
    assert labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    value = NTXentLoss(temperature=0.5)(emb, labels)
    # SimCLR: row i's softmax over the 2B - 1 other views, target its partner.
    z = F.normalize(emb, dim=1)
    sim = (z @ z.T / 0.5).fill_diagonal_(-math.inf)
    partner = torch.cat([torch.arange(5, 10), torch.arange(5)])
    assert value.item() == pytest.approx(F.cross_entropy(sim, partner).item(), rel=1e-5)
    # A tiny temperature and an anchor without negatives: finite value and gradient.
    x = torch.randn(4, 3, generator=g, requires_grad=True)
    loss = NTXentLoss(temperature=1e-3)(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()  # type: ignore[arg-type]
    lone = torch.randn(3, 3, generator=g, requires_grad=True)
    with pytest.warns(DegenerateBatchWarning):  # single class: the guarded zero
        only_pos = NTXentLoss()(lone, torch.tensor([0, 0, 0]))
    assert only_pos.item() == 0.0
    with pytest.raises(ConfigError, match="temperature"):
        build_loss("ntxent", temperature=0)


# ----------------------------------------------------------------------------------------------- data
def test_split_off_alphabets_hides_labels_and_keeps_classes_disjoint() -> None:
    parts = omniglot_splits(image_size=28, val_alphabets=5, seed=0)
    train = ArrayImageDataset.from_omniglot(parts["train"])
    labeled, unlabeled = split_off_groups(train, 15, seed=0)
    moved = set(np.unique(np.asarray(train.groups)).tolist()) - set(np.unique(labeled.groups).tolist())
    assert len(moved) == 15 and len(labeled) + len(unlabeled) == len(train)
    assert set(labeled.groups.tolist()).isdisjoint(moved)
    image, label, index = unlabeled[3]
    assert label == NO_LABEL and index == 3 and image.shape == (1, 28, 28)
    assert not hasattr(unlabeled, "labels")
    # Hidden labels: one code per original class of the moved alphabets (20 drawers each).
    counts = np.bincount(unlabeled.hidden_labels)
    assert (counts == 20).all() and len(counts) == len(unlabeled) // 20
    # Same seed, same alphabets; names work too.
    again = split_off_groups(train, 15, seed=0)[1]
    assert np.array_equal(again.hidden_labels, unlabeled.hidden_labels)
    named = split_off_groups(train, [sorted(moved)[0]], seed=5)[1]
    assert named.origin.endswith(sorted(moved)[0])
    with pytest.raises(ConfigError, match="1..24"):
        split_off_groups(train, 25)
    with pytest.raises(ConfigError, match="not groups"):
        split_off_groups(train, ["Klingon"])
    with pytest.raises(ConfigError, match="empty"):
        split_off_groups(train, [])


def test_split_off_classes_capping_and_pooling() -> None:
    x = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
    data = ArrayImageDataset(x, np.repeat(np.arange(10), 4))
    labeled, unlabeled = split_off_classes(data, 0.3, seed=1)
    assert labeled.num_classes == 7 and len(unlabeled) == 12
    assert len(np.unique(unlabeled.hidden_labels)) == 3
    capped = cap_images(unlabeled, 5, seed=0)
    assert len(capped) == 5 and cap_images(unlabeled, None) is unlabeled
    # The capped rows are a subset of the pool, in order, with their hidden labels.
    rows = [next(k for k in range(12) if torch.equal(unlabeled[k][0], capped[c][0])) for c in range(5)]
    assert rows == sorted(rows) and np.array_equal(capped.hidden_labels, unlabeled.hidden_labels[rows])
    pool = PooledDataset([labeled, unlabeled])
    assert len(pool) == 40
    assert torch.equal(pool[27][0], labeled[27][0]) and torch.equal(pool[29][0], unlabeled[1][0])
    assert pool[29][1:] == (NO_LABEL, 29) and pool[3][1:] == (NO_LABEL, 3)
    with pytest.raises(ConfigError, match="class_fraction"):
        split_off_classes(data, 1.0)


def test_unlabeled_folder_and_npz(tmp_path: Path) -> None:
    for species, count in (("a", 2), ("b", 3)):
        (tmp_path / "pool" / species).mkdir(parents=True)
        for k in range(count):
            Image.new("L", (10, 12), color=40 * k).save(tmp_path / "pool" / species / f"{k}.png")
    folder = unlabeled_image_folder(tmp_path / "pool", channels=1, hidden_labels_from_folders=True)
    assert len(folder) == 5 and folder.hidden_labels.tolist() == [0, 0, 1, 1, 1]
    assert folder[4][1] == NO_LABEL and folder[4][0].shape == (1, 12, 10)
    assert unlabeled_image_folder(tmp_path / "pool", channels=1).hidden_labels is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="unlabeled set is empty"):
        unlabeled_image_folder(tmp_path / "empty")
    np.savez(tmp_path / "u.npz", images=np.zeros((3, 6, 6), np.uint8), labels=np.array([7, 7, 9]))
    arr = unlabeled_npz(tmp_path / "u.npz")
    assert len(arr) == 3 and arr.hidden_labels.tolist() == [0, 0, 1]
    np.savez(tmp_path / "none.npz", images=np.zeros((0, 6, 6), np.uint8))
    with pytest.raises(DataError, match="unlabeled set is empty"):
        unlabeled_npz(tmp_path / "none.npz")


def test_random_batch_sampler_draws_each_image_once_per_pass_and_resumes() -> None:
    sampler = RandomBatchSampler(10, 3, num_batches=7, seed=4)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert len(batches) == 7 and all(len(set(b)) == 3 for b in batches)
    first_pass = [i for b in batches[:3] for i in b]  # 3 whole batches fit in one permutation of 10
    assert len(set(first_pass)) == 9
    assert batches == [sampler.batch(2, k).tolist() for k in range(7)]  # a pure function of (seed, epoch, b)
    other = RandomBatchSampler(10, 3, num_batches=7, seed=4)
    other.set_epoch(2, start_batch=4)
    assert list(other) == batches[4:]
    state = other.state_dict()
    resumed = RandomBatchSampler(10, 3, num_batches=7, seed=0)
    resumed.load_state_dict({**state, "position": 5})
    assert list(resumed) == batches[5:]
    with pytest.raises(CheckpointError, match="batch_size"):
        RandomBatchSampler(10, 2, num_batches=7).load_state_dict(state)
    with pytest.raises(ConfigError, match="distinct"):
        RandomBatchSampler(3, 4, num_batches=1)


def test_cluster_unlabeled_refuses_k_beyond_the_set_and_empty_sets() -> None:
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    labels = cluster_unlabeled(x, 3, backend="sklearn")
    assert labels.shape == (12,) and set(labels.tolist()) <= {0, 1, 2}
    with pytest.raises(DataError, match="num_clusters=13.*12 images"):
        cluster_unlabeled(x, 13)
    with pytest.raises(DataError, match="empty"):
        cluster_unlabeled(torch.empty(0, 4), 2)


# ----------------------------------------------------------------------------- the student step
class FakeContext:
    """The engine's side of a step, reduced to what the student uses; SGD on the given parameters."""

    def __init__(self, model: torch.nn.Module, criterion: torch.nn.Module, params: list[Any]) -> None:
        self.device = torch.device("cpu")
        self.use_amp = False
        self.epoch = 0
        self.step = 0
        self.model = model
        self.criterion = criterion
        self.optimizer = torch.optim.SGD(params, lr=0.5)
        self.events: list[tuple[str, dict[str, Any]]] = []

    def optimizer_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def embed_train(self, module: torch.nn.Module) -> Any:
        raise AssertionError("not used by the student")

    def log(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def _student(tmp_path: Path, hidden: np.ndarray | None = None,
             **overrides: Any) -> tuple[SladeStudentMethod, FakeContext, Any]:
    g = np.random.default_rng(0)
    unlabeled = UnlabeledDataset(ArrayImageDataset(g.random((24, 28, 28)).astype(np.float32), np.zeros(24)),
                                 hidden)
    pseudo = torch.arange(24) % 4
    path = save_pseudo_labels(tmp_path / "pseudo.pt", pseudo, {"num_clusters": 4})
    params = {"pseudo_labels": str(path), "lambda_unlabeled": 1.0, "lambda_basis": 0.5, "sd_margin": 0.5,
              "basis_warmup_steps": 2, "batch_unlabeled": 8, **overrides}
    method = SladeStudentMethod(SladeStudentParams(**params))
    torch.manual_seed(0)
    model = build_model("convnet4", 8, in_channels=1)
    info = MethodSetup(train_labels=np.repeat(np.arange(4), 4), num_classes=4, classes_per_batch=4,
                       samples_per_class=4, batch_size=16, steps_per_epoch=10, seed=0, has_regularizers=False,
                       splits=SimpleNamespace(unlabeled=unlabeled))
    method.setup(info, model)
    basis = method.modules()["basis"]
    ctx = FakeContext(model, Criterion(MultiSimilarityLoss(), None), [*model.parameters(), *basis.parameters()])
    return method, ctx, unlabeled


def _batches(unlabeled: UnlabeledDataset, step: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(step)
    images = torch.rand(16, 1, 28, 28, generator=g)
    labels = torch.arange(4).repeat_interleave(4)
    idx = torch.arange(8) + 8 * (step % 3)
    u = torch.stack([unlabeled[int(k)][0] for k in idx])
    return (images, labels, torch.arange(16)), {"unlabeled": (u, torch.full((8,), -1), idx)}


def test_warmup_trains_the_basis_alone_then_the_whole_objective(tmp_path: Path) -> None:
    method, ctx, unlabeled = _student(tmp_path, hidden=np.arange(24) // 3)
    model, basis = ctx.model, method.modules()["basis"]
    before = [p.detach().clone() for p in model.parameters()]
    keys = []
    for step in range(3):
        ctx.step = step
        w_before = basis.weight.detach().clone()
        batch, extra = _batches(unlabeled, step)
        total, logs = method.train_step(ctx, batch, extra)
        keys.append(set(logs))
        assert not torch.equal(basis.weight, w_before)  # the basis trains in every step
        moved = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        if step < 2:
            # Warm-up: only lambda_basis * L_basis, on detached embeddings: no model parameter moves.
            assert logs["warmup"] == 1.0 and not moved
            assert total == pytest.approx(0.5 * (logs["loss_ce"] + logs["loss_sd"]), rel=1e-6)
            assert logs["selected_pos"] == logs["selected_neg"] == 0.0
        else:
            assert logs["warmup"] == 0.0 and moved
            expected = logs["loss_labeled"] + logs["loss_unlabeled"] + 0.5 * (logs["loss_ce"] + logs["loss_sd"])
            assert total == pytest.approx(expected, rel=1e-5)
    # Warm-up and later steps log the same values, so the trainer's epoch means cover every step alike.
    assert keys[0] == keys[2] and {"loss_labeled", "selected_pos_true"} <= keys[0]
    # Logged once, at the end of the warm-up (random pseudo labels here may also log an overlap later).
    assert [e for e, _ in ctx.events][:1] == ["slade_warmup_done"] and ctx.events[0][1]["step"] == 2
    # The warm-up counts optimiser steps of the stage, across epochs: epoch 1, step 0 is global step 10.
    ctx.epoch, ctx.step = 1, 0
    method.params.basis_warmup_steps = 11
    assert method.in_warmup(ctx)
    method.params.basis_warmup_steps = 10
    assert not method.in_warmup(ctx)


@pytest.mark.parametrize("agree", [False, True])
def test_student_scores_exactly_the_selected_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   agree: bool) -> None:
    # beta ~ 1: the thresholds stay where they are set (up to 1e-6), between two observed similarities.
    hidden = np.arange(24) // 2  # hidden classes of 2 images: index 2k and 2k + 1
    method, ctx, unlabeled = _student(tmp_path, hidden=hidden, basis_warmup_steps=0,
                                      require_cluster_agreement=agree, ema_beta=0.999999)
    basis = method.modules()["basis"]
    batch, extra = _batches(unlabeled, 0)
    with torch.no_grad():  # the step's own forward: train-mode BN over the same mixed batch
        f_u = ctx.model(torch.cat([batch[0], extra["unlabeled"][0]]))[16:]
        r = F.normalize(f_u @ basis.weight.T, dim=1)
    pairs = [(a, b) for a in range(8) for b in range(a + 1, 8)]
    sims = [float(r[a] @ r[b]) for a, b in pairs]
    ordered = sorted(sims)
    t1, t2 = (ordered[19] + ordered[20]) / 2, (ordered[7] + ordered[8]) / 2  # 8 pairs above, 8 below
    with torch.no_grad():
        basis.mu_pos.fill_(t1)
        basis.mu_neg.fill_(t2)
        basis.seen_pos.fill_(True)
        basis.seen_neg.fill_(True)
    seen: list[Any] = []
    loss = ctx.criterion.loss
    original = type(loss).forward

    def spy(self: Any, emb: torch.Tensor, labels: torch.Tensor, indices: Any = None, *a: Any) -> Any:
        if indices is not None:
            seen.append(indices)
        return original(self, emb, labels, indices, *a)

    monkeypatch.setattr(type(loss), "forward", spy)
    _, logs = method.train_step(ctx, batch, extra)
    pseudo = (extra["unlabeled"][2] % 4).tolist()
    want_pos = {(a, b) for (a, b), v in zip(pairs, sims) if v >= t1 and (pseudo[a] == pseudo[b] or not agree)}
    want_neg = {(a, b) for (a, b), v in zip(pairs, sims) if v <= t2 and (pseudo[a] != pseudo[b] or not agree)}
    a1, p, a2, n = (t.tolist() for t in seen[-1])
    assert set(zip(a1, p)) == want_pos | {(b, a) for a, b in want_pos} and len(a1) == 2 * len(want_pos)
    assert set(zip(a2, n)) == want_neg | {(b, a) for a, b in want_neg} and len(a2) == 2 * len(want_neg)
    assert logs["selected_pos"] == len(want_pos) and logs["selected_neg"] == len(want_neg)
    # Diagnostics against the hidden labels (never in the objective): pairs they confirm.
    idx = extra["unlabeled"][2].tolist()
    assert logs["selected_pos_true"] == sum(hidden[idx[a]] == hidden[idx[b]] for a, b in want_pos)
    assert logs["selected_neg_true"] == sum(hidden[idx[a]] != hidden[idx[b]] for a, b in want_neg)
    if not agree:
        assert len(want_pos) == 8 and len(want_neg) == 8


def test_copies_of_one_image_are_no_pair(tmp_path: Path) -> None:
    method, ctx, unlabeled = _student(tmp_path, basis_warmup_steps=0)
    basis = method.modules()["basis"]
    batch, extra = _batches(unlabeled, 0)
    labels = extra["unlabeled"][1]
    index = torch.tensor([0, 0, 0, 4, 5, 6, 7, 4])  # image 0 three times, image 4 twice (a tiny cluster)
    images = torch.stack([unlabeled[int(k)][0] for k in index])
    with torch.no_grad():  # the step's forward (train-mode BN over the same mixed batch), before it updates
        f_u = ctx.model(torch.cat([batch[0], images]))[16:]
        r = F.normalize(f_u @ basis.weight.T, dim=1)
    pos, neg = [], []
    for a in range(8):
        for b in range(a + 1, 8):
            if index[a] == index[b]:
                continue  # copies: no pair
            (pos if int(index[a]) % 4 == int(index[b]) % 4 else neg).append(float(r[a] @ r[b]))
    assert len(pos) + len(neg) == 24 and len(pos) == 6  # 0-4 (3 x 2 copies) ... distinct pairs only
    method.train_step(ctx, batch, {"unlabeled": (images, labels, index)})
    # First observation: the stored statistics are this batch's, over the distinct pairs alone (with the
    # copies, mu+ would include four similarities of exactly 1).
    assert float(basis.mu_pos) == pytest.approx(float(np.mean(pos)), abs=1e-5)
    assert float(basis.mu_neg) == pytest.approx(float(np.mean(neg)), abs=1e-5)
    assert float(basis.var_pos) == pytest.approx(float(np.var(pos)), abs=1e-5)


def test_overlap_is_logged_once_and_selects_nothing(tmp_path: Path) -> None:
    method, ctx, unlabeled = _student(tmp_path, basis_warmup_steps=0, ema_beta=0.999999)
    basis = method.modules()["basis"]
    with torch.no_grad():  # bands stored upside down: mu+ far below mu-; beta ~1 keeps them there
        basis.mu_pos.fill_(-0.9)
        basis.mu_neg.fill_(0.9)
        basis.seen_pos.fill_(True)
        basis.seen_neg.fill_(True)
    for step in range(2):
        ctx.step = step
        batch, extra = _batches(unlabeled, step)
        _, logs = method.train_step(ctx, batch, extra)
        assert logs["overlap"] == 1.0 and logs["selected_pos"] == logs["selected_neg"] == 0.0
        assert logs["loss_unlabeled"] == 0.0
    assert [e for e, _ in ctx.events] == ["slade_overlap"]


def test_student_params_and_setup_errors(tmp_path: Path) -> None:
    from dmlgen.engine.config_schema import from_dict

    with pytest.raises(ConfigError, match="lambda_unlabeled: required"):
        from_dict(SladeStudentParams, {"lambda_basis": 1.0, "sd_margin": 0.5, "basis_warmup_steps": 0},
                  prefix="method.params")
    with pytest.raises(ConfigError, match="lambda_basis: must be > 0"):
        SladeStudentParams(lambda_unlabeled=1.0, lambda_basis=0.0, sd_margin=0.5, basis_warmup_steps=0).validate()
    with pytest.raises(ConfigError, match="batch_unlabeled.*25 > the 24"):
        _student(tmp_path, batch_unlabeled=25)
    save_pseudo_labels(tmp_path / "short.pt", torch.zeros(5, dtype=torch.long), {})
    with pytest.raises(CheckpointError, match="labels 5 images"):
        _student(tmp_path / "x", pseudo_labels=str(tmp_path / "short.pt"))
    labels, meta = load_pseudo_labels(tmp_path / "short.pt")
    assert labels.tolist() == [0] * 5 and meta == {}
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a SLADE pseudo-label file"):
        load_pseudo_labels(tmp_path / "foreign.pt")
    method = SladeStudentMethod(SladeStudentParams(pseudo_labels=str(tmp_path / "short.pt"), lambda_unlabeled=1.0,
                                                   lambda_basis=1.0, sd_margin=0.5, basis_warmup_steps=0))
    info = MethodSetup(np.zeros(4, dtype=np.int64), 2, 2, 2, 4, 1, 0, False, splits=SimpleNamespace(unlabeled=None))
    with pytest.raises(ConfigError, match="data.unlabeled"):
        method.setup(info, build_model("convnet4", 8, in_channels=1))


def test_student_state_restores_basis_stream_and_refuses_other_pseudo_labels(tmp_path: Path) -> None:
    method, ctx, unlabeled = _student(tmp_path, basis_warmup_steps=0)
    batch, extra = _batches(unlabeled, 0)
    method.train_step(ctx, batch, extra)
    method.stream.set_epoch(0, start_batch=3)  # type: ignore[union-attr]
    state = method.state_dict()
    fresh, _, _ = _student(tmp_path / "b", basis_warmup_steps=0)
    fresh.load_state_dict(state)
    for key, value in method.modules().state_dict().items():
        assert torch.equal(fresh.modules().state_dict()[key], value), key
    assert fresh.stream.state_dict() == method.stream.state_dict()  # type: ignore[union-attr]
    save_pseudo_labels(tmp_path / "other.pt", (torch.arange(24) + 1) % 4, {})
    other, _, _ = _student(tmp_path / "c", basis_warmup_steps=0, pseudo_labels=str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="other pseudo labels"):
        other.load_state_dict(state)
