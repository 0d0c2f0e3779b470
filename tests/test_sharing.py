"""Sharing Matters with the MIC option (methods.md §5): shared-triplet invariants against loop oracles, the safe
distance-weighted sampler, gradient reversal and decorrelation, β per surrogate id, the stream samplers, and the
method inside the engine (both update modes, exact resume, checkpoints, bad input) on tiny Omniglot runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmlgen.engine.checkpoint import load_checkpoint
from dmlgen.engine.config import config_from_dict
from dmlgen.engine.run import embed_split, load_trained_model
from dmlgen.engine.trainer import LAST, Trainer, TrainingInterrupted
from dmlgen.errors import CheckpointError, ConfigError, DataError
from dmlgen.losses.margin import MarginLoss
from dmlgen.methods.samplers import ClusterBatchSampler, SurrogateGroupBatchSampler
from dmlgen.methods.sharing import (
    Decorrelation,
    SharedTripletSampler,
    SharingMethod,
    TwoHeadModel,
    distance_weighted_probabilities,
    grad_reverse,
    unit_distances,
)
from dmlgen.models import build_model
from dmlgen.models.heads import EmbeddingHead
from _fixtures import one_thread  # noqa: F401  (autouse: one thread per test)


# ----------------------------------------------------------------------------------------------- oracles
def loop_probabilities(x: np.ndarray, allowed: np.ndarray, lower: float, upper: float | None) -> np.ndarray:
    """methods.md §2.2 one entry at a time, in float64: clamped log-weights, cut-off, uniform fall-back."""
    n, dim = x.shape
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = np.zeros((n, n))
    for a in range(n):
        cands = [j for j in range(n) if allowed[a, j]]
        if not cands:
            continue
        d = {j: math.sqrt(max(float(((x[a] - x[j]) ** 2).sum()), 1e-12)) for j in cands}
        kept = [j for j in cands if upper is None or d[j] < upper]
        if not kept:  # the cut-off removed everything: uniform over the label-valid candidates
            for j in cands:
                out[a, j] = 1 / len(cands)
            continue
        logw = {}
        for j in kept:
            dj = max(d[j], lower)
            logw[j] = (2 - dim) * math.log(dj) - (dim - 3) / 2 * math.log(max(1 - dj * dj / 4, 1e-6))
        top = max(logw.values())
        total = sum(math.exp(v - top) for v in logw.values())
        for j in kept:
            out[a, j] = math.exp(logw[j] - top) / total
    return out


def batch(classes: int = 8, per_class: int = 4, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(classes * per_class, dim, generator=gen), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return emb, labels


def random_groups(n: int, group: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A shuffled order of the batch (like the random stream) and surrogate ids per run of ``group`` slots."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ids = torch.arange(n // group).repeat_interleave(group) * 3 + 1  # sparse ids, as from range(num_ids)
    return perm, ids


# ----------------------------------------------------------------------------- shared triplet invariants
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_groups_triplets_are_inter_class_with_group_positives(seed: int) -> None:
    emb, labels = batch(seed=seed)
    perm, ids = random_groups(len(labels), seed=seed)
    emb, labels = emb[perm], labels[perm]  # random images, then groups of 4 consecutive slots
    out = SharedTripletSampler("random_groups", generator=torch.Generator().manual_seed(seed))(emb, labels, ids)
    a, p, n = out.indices
    assert torch.equal(out.loss_labels, ids)  # β is indexed by the surrogate id
    assert len(set(a.tolist())) == len(a)  # one triplet per anchor
    assert (ids[p] == ids[a]).all() and (p != a).all()
    assert (labels[p] != labels[a]).all()  # positive pairs are cross-class
    assert (ids[n] != ids[a]).all() and (labels[n] != labels[a]).all()  # negatives: other group, other class
    # Exactly the anchors a loop finds usable: a cross-class group mate and a negative of another group and class.
    usable = [i for i in range(len(labels))
              if any(ids[j] == ids[i] and labels[j] != labels[i] for j in range(len(labels)) if j != i)
              and any(ids[j] != ids[i] and labels[j] != labels[i] for j in range(len(labels)))]
    assert sorted(a.tolist()) == usable


@pytest.mark.parametrize("variant", ["diva_standard", "diva_full"])
def test_diva_positives_come_from_a_third_class(variant: str) -> None:
    emb, labels = batch(classes=5, per_class=3, seed=4)
    out = SharedTripletSampler(variant, generator=torch.Generator().manual_seed(0))(emb, labels)
    a, p, n = out.indices
    assert torch.equal(a, torch.arange(15))  # every anchor is usable with 5 classes
    assert (labels[n] != labels[a]).all()
    assert (labels[p] != labels[a]).all() and (labels[p] != labels[n]).all()
    assert torch.equal(out.loss_labels, labels)


def test_diva_random_permutes_labels_and_can_filter_same_class_positives() -> None:
    emb, labels = batch(classes=6, per_class=4, seed=5)
    out = SharedTripletSampler("diva_random", generator=torch.Generator().manual_seed(3))(emb, labels)
    a, p, n = out.indices
    perm_labels = out.loss_labels
    assert sorted(perm_labels.tolist()) == sorted(labels.tolist())  # a permutation of the batch's labels
    assert not torch.equal(perm_labels, labels)
    assert (perm_labels[p] == perm_labels[a]).all() and (p != a).all()
    assert (perm_labels[n] != perm_labels[a]).all()
    filtered = SharedTripletSampler("diva_random", cross_class_positives=True,
                                    generator=torch.Generator().manual_seed(3))(emb, labels)
    fa, fp, _ = filtered.indices
    assert (labels[fp] != labels[fa]).all()
    assert torch.equal(filtered.loss_labels, perm_labels)  # same permutation from the same generator


def test_mic_clusters_use_cluster_ids_only() -> None:
    emb, labels = batch(classes=4, per_class=6, seed=6)
    clusters = torch.tensor([0, 1, 2] * 8)
    a, p, n = SharedTripletSampler("mic_clusters", generator=torch.Generator().manual_seed(0))(
        emb, labels, clusters).indices
    assert len(a) == 24
    assert (clusters[p] == clusters[a]).all() and (p != a).all() and (clusters[n] != clusters[a]).all()


def test_negatives_follow_the_distance_weighted_distribution() -> None:
    # Variant B's negative: frequencies over many draws against the loop oracle's probabilities.
    emb, labels = batch(classes=3, per_class=3, dim=4, seed=7)
    sampler = SharedTripletSampler("diva_standard", generator=torch.Generator().manual_seed(1))
    counts = np.zeros((9, 9))
    draws = 2000
    for _ in range(draws):
        a, _, n = sampler(emb, labels).indices
        counts[a.numpy(), n.numpy()] += 1
    allowed = (labels[:, None] != labels[None, :]).numpy()
    expected = loop_probabilities(emb.double().numpy(), allowed, 0.5, None)
    assert np.abs(counts / draws - expected).max() < 0.05  # ~4.5 standard errors at p = 0.5


# ------------------------------------------------------------------------- the safe weighted sampler
@pytest.mark.parametrize("upper", [None, 1.4])
def test_probabilities_match_the_loop_oracle(upper: float | None) -> None:
    emb, labels = batch(classes=4, per_class=5, dim=32, seed=8)
    allowed = labels[:, None] != labels[None, :]
    allowed[0] = False  # a row with no candidate
    got = distance_weighted_probabilities(unit_distances(emb), allowed, 32, lower=0.5, upper=upper)
    want = loop_probabilities(emb.double().numpy(), allowed.numpy(), 0.5, upper)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    assert got[0].sum() == 0


def test_extreme_distances_give_no_nan_where_the_raw_formula_does() -> None:
    dim = 128
    base = F.normalize(torch.randn(4, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    emb = torch.cat([base, -base, base[:1]])  # antipodes (d = 2) and an exact duplicate (d = 0)
    allowed = ~torch.eye(9, dtype=torch.bool)
    dist = unit_distances(emb)
    assert dist.max().item() == pytest.approx(2.0, abs=1e-6)
    # The reference formula without clamps: log(1 - d^2/4) = log(0) at the antipodes, log 0 at d = 0.
    raw = (2 - dim) * torch.log(dist) - (dim - 3) / 2 * torch.log(1 - dist.pow(2) / 4)
    assert not torch.isfinite(raw[allowed]).all()
    probs = distance_weighted_probabilities(dist, allowed, dim)
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(dim=1), torch.ones(9, dtype=torch.float64))
    # No single near-antipodal candidate takes all the mass (the clamp at 1e-6 bounds its weight).
    triplets = SharedTripletSampler("diva_standard", generator=torch.Generator().manual_seed(0))(
        emb, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0]))
    assert len(triplets.anchors) == 9


def test_cut_off_falls_back_to_uniform_over_label_valid_candidates() -> None:
    emb = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 0, -1.0, 0]])  # distances 2 and sqrt(2)
    allowed = torch.tensor([[False, True, True], [True, False, False], [True, False, False]])
    probs = distance_weighted_probabilities(unit_distances(emb), allowed, 4, upper=1.0)
    assert torch.allclose(probs[0], torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))


def test_empty_pools_are_skipped_and_the_loss_stays_in_the_graph() -> None:
    emb, labels = batch(classes=2, per_class=6, seed=9)
    emb = emb.clone().requires_grad_(True)
    loss = MarginLoss(num_classes=2)
    for variant in ("diva_standard", "diva_full"):  # no third class in a 2-class batch: the references crash
        out = SharedTripletSampler(variant)(emb, labels)
        assert out.anchors.numel() == 0
        value = loss(emb, out.loss_labels, out.indices)
        value.backward()
        assert value.item() == 0.0 and emb.grad is not None and torch.count_nonzero(emb.grad) == 0
    # Variant A whose groups are single-class: no cross-class positive, nothing sampled.
    ids = labels.clone()
    assert SharedTripletSampler("random_groups")(emb, labels, ids).anchors.numel() == 0
    # A batch of one class: no negative anywhere.
    assert SharedTripletSampler("diva_random")(emb[:6], labels[:6]).anchors.numel() == 0
    with pytest.raises(DataError, match="needs group ids"):
        SharedTripletSampler("random_groups")(emb, labels)


# ------------------------------------------------------------------------------ GRL and decorrelation
def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.5 * w)


def test_decorrelation_value_and_gradient_directions() -> None:
    torch.manual_seed(0)
    c = F.normalize(torch.randn(6, 8), dim=1)
    s = F.normalize(torch.randn(6, 5), dim=1)
    adv = Decorrelation(8, 5, hidden=7)
    # Value: the formula of methods.md §2.4 with plain loops.
    with torch.no_grad():
        pred = adv.net(s)
    pred = (pred / pred.norm(dim=1, keepdim=True)).numpy()
    want = -sum(sum((float(c[i, k]) * float(pred[i, k])) ** 2 for k in range(8)) / 8 for i in range(6)) / 6
    c1, s1 = c.clone().requires_grad_(True), s.clone().requires_grad_(True)
    value = adv(c1, s1)
    assert value.item() == pytest.approx(want, rel=1e-5)
    value.backward()
    net_grads = [p.grad.clone() for p in adv.net.parameters()]
    # Without reversal: the same value; R's gradients equal, the embeddings' gradients are reversed.
    adv.zero_grad()
    plain = Decorrelation(8, 5, hidden=7, grl_on_source=False, grl_on_target=False)
    plain.load_state_dict(adv.state_dict())
    c2, s2 = c.clone().requires_grad_(True), s.clone().requires_grad_(True)
    plain(c2, s2).backward()
    for g, p in zip(net_grads, plain.net.parameters()):
        assert torch.allclose(g, p.grad)
    assert torch.allclose(c1.grad, -c2.grad) and torch.allclose(s1.grad, -s2.grad)
    assert c1.grad.abs().sum() > 0 and s1.grad.abs().sum() > 0
    # detach_target: no gradient into the class embedding at all.
    c3 = c.clone().requires_grad_(True)
    Decorrelation(8, 5, hidden=7, detach_target=True)(c3, s.clone().requires_grad_(True)).backward()
    assert c3.grad is None


def test_the_decorrelation_network_learns_to_predict_and_the_heads_unlearn() -> None:
    # R descends L_adv (more squared correlation); a head updated through the GRL ascends it.
    torch.manual_seed(1)
    s = F.normalize(torch.randn(64, 8), dim=1)
    c = s.clone()  # perfectly predictable target
    adv = Decorrelation(8, 8, hidden=32)
    opt = torch.optim.Adam(adv.parameters(), lr=1e-2)
    start = adv(c, s).item()
    for _ in range(100):
        opt.zero_grad()
        adv(c, s).backward()
        opt.step()
    trained = adv(c, s).item()
    assert trained < start - 0.02
    head = torch.nn.Parameter(c.clone())
    head_opt = torch.optim.SGD([head], lr=50.0)  # L_adv is O(1/(B D)): tiny raw gradients
    before = adv(F.normalize(head, dim=1), s).item()
    for _ in range(20):
        head_opt.zero_grad()
        adv(F.normalize(head, dim=1), s).backward()
        head_opt.step()
    assert adv(F.normalize(head, dim=1), s).item() > before + 0.02


# ------------------------------------------------------------------------------------- β per surrogate id
def test_shared_margin_loss_indexes_beta_by_surrogate_id() -> None:
    emb, labels = batch(seed=10)
    perm, ids = random_groups(len(labels), seed=10)
    emb, labels = emb[perm], labels[perm]
    loss_fn = MarginLoss(num_classes=int(ids.max()) + 1, margin=0.2, beta=1.2)
    with torch.no_grad():
        loss_fn.beta.copy_(torch.linspace(0.8, 1.4, loss_fn.beta.numel()))
    out = SharedTripletSampler("random_groups", generator=torch.Generator().manual_seed(0))(emb, labels, ids)
    e = emb.clone().requires_grad_(True)
    value = loss_fn(e, out.loss_labels, out.indices)
    value.backward()
    # Oracle: hinge terms per triplet with β of the anchor's surrogate id; divisor = triplets with an active hinge.
    beta = loss_fn.beta.detach().double()
    x = emb.double()
    total, active, grad = 0.0, 0, torch.zeros_like(beta)
    for a, p, n in zip(*out.indices):
        b = float(beta[ids[a]])
        dap = math.sqrt(max(float(((x[a] - x[p]) ** 2).sum()), 1e-12))
        dan = math.sqrt(max(float(((x[a] - x[n]) ** 2).sum()), 1e-12))
        pos, neg = max(dap - b + 0.2, 0.0), max(b - dan + 0.2, 0.0)
        total += pos + neg
        active += (pos > 0) or (neg > 0)
        grad[ids[a]] += -float(pos > 0) + float(neg > 0)
    assert value.item() == pytest.approx(total / active, rel=1e-5)
    assert torch.allclose(loss_fn.beta.grad.double(), grad / active, atol=1e-7)
    unused = torch.ones_like(beta, dtype=torch.bool)
    unused[ids.unique()] = False
    assert (loss_fn.beta.grad[unused] == 0).all()


# ----------------------------------------------------------------------------------------- the model
def test_two_head_model_embeddings() -> None:
    base = build_model("convnet4", 6, in_channels=1)
    shared = EmbeddingHead(base.head.in_features, 4)
    model = TwoHeadModel(base.backbone, base.head, shared).eval()
    x = torch.rand(3, 1, 28, 28)
    c, s = model.forward_heads(x)
    assert torch.allclose(c.norm(dim=1), torch.ones(3)) and torch.allclose(s.norm(dim=1), torch.ones(3))
    assert torch.allclose(model(x), c) and model.embedding_size == 6
    model.eval_embedding, model.eval_weights = "concat", (0.75, 1.25)
    z = model(x)
    want = torch.cat([0.75 * c, 1.25 * s], dim=1) / math.sqrt(0.75**2 + 1.25**2)  # unit heads: a fixed norm
    assert z.shape == (3, 10) and model.embedding_size == 10 and torch.allclose(z, want, atol=1e-6)
    assert model.describe()["shared_embedding_size"] == 4
    with pytest.raises(ConfigError, match="eval_weights"):
        model.eval_weights = (0.0, 0.0)
    with pytest.raises(ConfigError, match="eval_embedding"):
        model.eval_embedding = "shared"


# ------------------------------------------------------------------------------------------- samplers
def test_surrogate_group_sampler_is_a_pure_function_of_seed_epoch_and_batch() -> None:
    sampler = SurrogateGroupBatchSampler(50, 16, 7, group_size=4, num_ids=5, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(full) == 7 and all(len(b) == 16 for b in full)
    sampler.set_epoch(2, start_batch=4)
    assert list(sampler) == full[4:]
    # Consecutive positions of a stream of permutations: the first 48 images of epoch 2 are distinct.
    assert len(set(sum(full[:3], []))) == 48
    for number in range(7):
        ids = sampler.surrogate_ids(2, number)
        assert ids.min() >= 0 and ids.max() < 5
        groups = ids[::4]
        assert all(groups[g] not in groups[max(0, g - 2):g] for g in range(len(groups)))
        assert (ids.reshape(-1, 4) == groups[:, None]).all()
    other = SurrogateGroupBatchSampler(50, 16, 7, group_size=4, num_ids=5, seed=3)
    state = sampler.state_dict()
    other.load_state_dict(state)
    assert list(other) == []  # position 7 of 7: the epoch is done
    with pytest.raises(CheckpointError, match="num_ids"):
        SurrogateGroupBatchSampler(50, 16, 7, num_ids=6, seed=3).load_state_dict(state)
    with pytest.raises(ConfigError, match="num_ids"):
        SurrogateGroupBatchSampler(50, 16, 7, num_ids=2)


def test_cluster_sampler_groups_and_label_noise() -> None:
    clusters = np.repeat(np.arange(10), 8)
    exact = ClusterBatchSampler(clusters, 20, 50, per_cluster=4, random_pick_p=0.0, seed=0)
    for number in range(50):
        indices, slot = exact.batch(0, number)
        assert (clusters[indices] == slot).all()  # without noise every image is from its slot's cluster
        assert len(set(slot[::4].tolist())) == 5  # 5 distinct clusters per batch
    noisy = ClusterBatchSampler(clusters, 20, 400, per_cluster=4, random_pick_p=0.2, seed=0)
    wrong = np.mean([(clusters[i] != s).mean() for i, s in (noisy.batch(0, b) for b in range(400))])
    assert wrong == pytest.approx(0.2 * 0.9, abs=0.02)  # a random cluster is the slot's own 1 time in 10
    with pytest.raises(DataError, match="no cluster labels yet"):
        ClusterBatchSampler(None, 20, 5).batch(0, 0)


# ------------------------------------------------------------------------------------------ the engine
TINY: dict[str, Any] = {
    "name": "tiny-sharing",
    "data": {"dataset": "omniglot", "max_classes": 8, "classes_per_batch": 4, "samples_per_class": 4},
    "model": {"backbone": "convnet4", "embedding_size": 16},
    "loss": {"name": "margin", "params": {"margin": 0.2},
             "miner": {"name": "distance_weighted", "params": {"layout": "one_per_anchor", "upper": None}},
             "lr": 0.0005},
    "method": {"name": "sharing", "params": {"shared_embedding_size": 8, "num_ids": 7, "adv_weight": 50.0,
                                             "adv_lr": 0.001, "num_clusters": 5, "recluster_every": 1}},
    "optimizer": {"name": "adam", "lr": 0.001},
    "train": {"epochs": 2, "max_steps_per_epoch": 3, "seed": 0},
    "eval": {"test_metrics": ["recall", "map@r"]},
}
AUGMENT = "data.train_transforms={rotation_degrees: 10, translate: 0.1}"


def tiny(out: Path, *overrides: str) -> Any:
    cfg = config_from_dict(TINY, list(overrides))
    cfg.out_dir = str(out)
    return cfg


def run(out: Path, *overrides: str, resume: bool = False) -> dict[str, Any]:
    return Trainer(tiny(out, *overrides), progress=False, pretrained=not resume).fit(resume=resume)


def adam_steps(ckpt: dict[str, Any]) -> list[int]:
    return [int(s["step"]) for s in ckpt["optimizer"]["state"].values()]


@pytest.mark.parametrize("variant,mode", [
    ("random_groups", "alternating"), ("random_groups", "summed"), ("diva_standard", "alternating"),
    ("diva_full", "summed"), ("diva_random", "summed"), ("mic_clusters", "alternating"),
    ("mic_clusters", "summed"),
])
def test_every_variant_trains_in_both_modes(tmp_path: Path, variant: str, mode: str) -> None:
    result = run(tmp_path, f"method.params.shared_sampling={variant}", f"method.params.update_mode={mode}",
                 "train.epochs=1", "train.max_steps_per_epoch=2")
    assert math.isfinite(result["test"]["map@r"])
    ckpt = load_checkpoint(tmp_path / LAST)
    row = ckpt["history"][0]
    assert row["train_shared_triplets"] > 0 and math.isfinite(row["train_shared_loss"])
    # Alternating: two optimiser steps per iteration (class batch, shared batch); summed: one.
    backbone_steps = int(ckpt["optimizer"]["state"][0]["step"])
    assert backbone_steps == (4 if mode == "alternating" else 2)
    groups = [g["name"] for g in ckpt["optimizer"]["param_groups"]]
    assert {"shared_head", "shared_beta", "decorrelation"} <= set(groups)
    beta = ckpt["method"]["modules"]["shared_loss.beta"]
    expected = {"random_groups": 7, "mic_clusters": 5}.get(variant, 8)
    assert beta.shape == (expected,) and not torch.all(beta == 1.2)  # β per surrogate id / cluster / class moved
    if variant == "mic_clusters":
        assert ckpt["method"]["cluster_labels"].shape == (160,)


def test_mic_clusters_are_logged_and_recomputed_on_schedule(tmp_path: Path) -> None:
    run(tmp_path, "method.params.shared_sampling=mic_clusters", "train.epochs=3", "train.max_steps_per_epoch=1",
        "method.params.recluster_every=2")
    import json
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    clusters = [e for e in events if e["event"] == "clusters"]
    assert [(e["epoch"], e["source"], e["standardize"]) for e in clusters] == [(1, "backbone", "mean"),
                                                                              (3, "shared", "none")]
    assert all(e["num_clusters"] == 5 and e["largest"] >= e["smallest"] >= 1 for e in clusters)


@pytest.mark.parametrize("variant,call", [
    ("random_groups", 5),  # epoch 2, step 2
    ("mic_clusters", 1),  # the first step, right after the initial clustering
    ("mic_clusters", 4),  # the first step of epoch 2, right after a re-clustering
    ("mic_clusters", 5),  # mid-epoch: the cluster labels come from the checkpoint
])
def test_resume_after_interruption_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str,
                                            call: int) -> None:
    overrides = (f"method.params.shared_sampling={variant}", AUGMENT, "method.params.shared_step_prob=0.7")
    run(tmp_path / "straight", *overrides)
    original = SharingMethod.train_step
    calls = {"n": 0}

    def step(self: SharingMethod, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(SharingMethod, "train_step", step)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "resumed", *overrides)
    monkeypatch.setattr(SharingMethod, "train_step", original)
    run(tmp_path / "resumed", *overrides, resume=True)
    a, b = load_checkpoint(tmp_path / "straight" / LAST), load_checkpoint(tmp_path / "resumed" / LAST)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["method"]["modules"]:
        assert torch.equal(a["method"]["modules"][key], b["method"]["modules"][key]), key
    if variant == "mic_clusters":
        assert torch.equal(a["method"]["cluster_labels"], b["method"]["cluster_labels"])
    assert adam_steps(a) == adam_steps(b)
    strip = [[{k: v for k, v in r.items() if k not in ("train_seconds", "images_per_second")} for r in c["history"]]
             for c in (a, b)]
    assert strip[0] == strip[1]


def test_trained_model_reloads_with_both_heads(tmp_path: Path) -> None:
    run(tmp_path, "method.params.eval_embedding=concat", "method.params.eval_weights=[1.0, 0.5]", "train.epochs=1",
        "train.max_steps_per_epoch=1")
    model, cfg = load_trained_model(tmp_path / "best.ckpt")
    assert isinstance(model, TwoHeadModel) and model.eval_embedding == "concat" and model.eval_weights == (1.0, 0.5)
    emb, labels, _ = embed_split(tmp_path / "best.ckpt", "test")
    assert emb.shape == (160, 24) and torch.allclose(emb.norm(dim=1), torch.ones(160), atol=1e-5)
    images = torch.stack([torch.as_tensor(np.zeros((1, 28, 28), dtype=np.float32))])
    c, s = model.forward_heads(images)
    assert torch.allclose(model(images), F.normalize(torch.cat([c, 0.5 * s], dim=1), dim=1), atol=1e-6)


def test_cub_recipe_builds_two_frozen_bn_heads_and_mic_layer1_features() -> None:
    from dmlgen.engine.config import load_config
    from dmlgen.engine.setup import build_run_model
    from dmlgen.methods.sharing import _Features

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/recipes/cub200_sharing_resnet50.yaml")
    model = build_run_model(cfg.model, cfg.method, cfg.data.channels, pretrained=False)
    assert isinstance(model, TwoHeadModel)
    info = model.describe()
    assert (info["backbone_features"], info["embedding_size"], info["shared_embedding_size"]) == (2048, 128, 128)
    model.train()
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        features = _Features(model, "resnet_layer1").eval()(torch.rand(1, 3, 224, 224))
    assert features.shape == (1, 256 * 4 * 4)  # MIC's 4096-d layer1 pooling at 224 px


def test_standard_is_the_default_method(tmp_path: Path) -> None:
    data = {k: v for k, v in TINY.items() if k != "method"}
    cfg = config_from_dict(data)
    assert cfg.method.name == "standard" and cfg.to_dict()["method"] == {"name": "standard", "params": {}}
    with pytest.raises(ConfigError, match=r"unknown config key method\.params\.x"):
        config_from_dict(data, ["method.params={x: 1}"])


@pytest.mark.parametrize("override,message", [
    ("method.params.shared_weight=0", r"method\.params\.shared_weight: must be > 0"),
    ("method.params.unknown=1", r"unknown config key method\.params\.unknown"),
    ("method.params.shared_sampling=clusters", r"method\.params\.shared_sampling: 'clusters' is not one of"),
    ("method.params.num_ids=2", r"method\.params\.num_ids: must be >= 3"),
    ("method.params.eval_weights=[0, 0]", r"method\.params\.eval_weights"),
    ("method.name=gdml", r"method\.name: 'gdml' is not one of"),
])
def test_bad_method_params_are_named(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path, override)


@pytest.mark.parametrize("overrides,message", [
    (("method.params.shared_sampling=mic_clusters", "method.params.num_clusters=500"),
     r"num_clusters: 500 clusters > 160 training images"),
    (("method.params.shared_sampling=diva_standard", "data.classes_per_batch=2"),
     r"data\.classes_per_batch must be >= 3"),
    (("regularizers=[{name: mdr, weight: 0.1}]",), "regularizers"),
    (("model.normalize=false",), "model.normalize: true"),
    (("method.params.shared_sampling=mic_clusters", "method.params.cluster_features=resnet_layer1"),
     "needs a ResNet backbone"),
])
def test_bad_combinations_fail_before_training(tmp_path: Path, overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(tiny(tmp_path, *overrides), progress=False)
    assert not (tmp_path / LAST).exists()


def test_resume_refuses_a_checkpoint_without_method_state(tmp_path: Path) -> None:
    run(tmp_path, "train.epochs=1", "train.max_steps_per_epoch=1")
    ckpt = load_checkpoint(tmp_path / LAST)
    del ckpt["method"]
    torch.save(ckpt, tmp_path / LAST)
    with pytest.raises(CheckpointError, match="no state of method 'sharing'"):
        Trainer(tiny(tmp_path, "train.epochs=2", "train.max_steps_per_epoch=1"), progress=False,
                pretrained=False).fit(resume=True)
