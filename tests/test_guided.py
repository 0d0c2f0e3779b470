"""Guided DML (methods.md §6): label routing through the master's branches, class-pair episodes, the master and
student losses against naive loops, the targets cache (master hash, invalidation, reuse without the master), the
pipeline end to end with exact resume of an interrupted master, the zero-shot and closed-set protocols, and bad
input. Tiny Omniglot runs and a fabricated CIFAR-10 copy in its python-pickle format."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dmlgen.engine.checkpoint import load_checkpoint
from dmlgen.engine.config import RunConfig, config_from_dict, load_config
from dmlgen.engine.pipeline import stage_record
from dmlgen.engine.run import load_trained_model, train
from dmlgen.engine.setup import build_splits, closed_set_holdout
from dmlgen.engine.trainer import Trainer, TrainingInterrupted
from dmlgen.errors import CheckpointError, ConfigError, DataError
from dmlgen.methods.guided import (
    GuidedMaster,
    PairEpisodes,
    TargetTable,
    branch_assignment,
    compute_targets,
    master_loss,
    student_loss,
)
from _fixtures import one_thread  # noqa: F401  (autouse: one thread per test)
from test_standard_datasets import make_cifar, quiet

REPO = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "name": "guided-tiny",
    "data": {"dataset": "omniglot", "max_classes": 6, "classes_per_batch": 3, "samples_per_class": 4},
    "model": {"backbone": "convnet4", "embedding_size": 8, "normalize": False},
    "loss": {"name": "triplet_margin", "params": {"margin": 0.2}},
    "method": {"name": "guided", "params": {
        "master": {"branch_channels": [4, 8], "hidden": 16, "epochs": 2, "pairs_per_epoch": 5, "episode_size": 4,
                   "branch_groups": 3, "resample_episodes": True, "optimizer": "adam", "lr": 0.01},
        "normalize_targets": False}},
    "eval": {"ks": [1, 2], "test_metrics": ["recall", "map@r"]},
    "train": {"epochs": 1, "max_steps_per_epoch": 2, "seed": 0},
}


def tiny(out: Path, *overrides: str) -> RunConfig:
    cfg = config_from_dict(TINY, list(overrides))
    cfg.out_dir = str(out)
    return cfg


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ran(result: dict[str, Any]) -> list[str]:
    return [s["name"] for s in result["pipeline"]["stages"] if s["ran_now"]]


def small_master(num_classes: int = 4, branches: np.ndarray | None = None, seed: int = 0) -> GuidedMaster:
    torch.manual_seed(seed)
    branch = np.arange(num_classes) if branches is None else branches
    return GuidedMaster(branch, (1, 16, 16), 5, channels=(3, 4), kernel_size=3, hidden=8)


# ----------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("branches", [None, np.array([0, 1, 0, 2, 1, 2])])
def test_each_image_goes_through_its_own_class_branch_only(branches: np.ndarray | None) -> None:
    """Outputs equal the naive per-image computation through branch_of_class[y]; forward hooks see only
    images of the branch's classes; a loss on one class's images gives gradients to that branch alone."""
    num_classes = 6
    master = small_master(num_classes, branches)
    branch_of = np.arange(num_classes) if branches is None else branches
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(18, 1, 16, 16, generator=gen)
    labels = torch.tensor([c for c in range(num_classes) for _ in range(3)])[torch.randperm(18, generator=gen)]
    seen: dict[int, list[torch.Tensor]] = {b: [] for b in range(master.num_branches)}
    hooks = [br.register_forward_hook(lambda m, inp, out, b=b: seen[b].append(inp[0].detach().clone()))
             for b, br in enumerate(master.branches)]
    g, h = master(images, labels)
    for hook in hooks:
        hook.remove()
    for b, batches in seen.items():
        got = torch.cat(batches) if batches else torch.empty(0, 1, 16, 16)
        mine = images[torch.tensor([branch_of[int(y)] == b for y in labels])]
        assert got.shape == mine.shape and torch.equal(got, mine), b  # exactly its classes' images, once
    with torch.no_grad():
        for k in range(18):
            hk = master.branches[int(branch_of[int(labels[k])])](images[k:k + 1])
            assert torch.allclose(h[k], hk[0], atol=1e-6) and torch.allclose(g[k], master.head(hk)[0], atol=1e-6)
    # Gradients: only the branch of class 2 (and the head) learn from class-2 images.
    master.zero_grad(set_to_none=True)
    rows = labels == 2
    out, _ = master(images[rows], labels[rows])
    out.pow(2).sum().backward()
    for b, br in enumerate(master.branches):
        touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in br.parameters())
        assert touched == (b == branch_of[2]), b
    assert all(p.grad is not None for p in master.head.parameters())


def test_targets_route_every_image_through_its_own_branch() -> None:
    """compute_targets (chunked, eval mode) equals naive per-image routing, also normalised."""
    from dmlgen.data.datasets import ArrayImageDataset

    master = small_master(3, np.array([1, 0, 1]))
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(11, 16, 16, generator=gen).numpy()
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 0])
    ds = ArrayImageDataset(images, labels)
    z, y = compute_targets(master, ds, batch_size=4)
    zn, _ = compute_targets(master, ds, batch_size=3, normalize=True)
    assert torch.equal(y, torch.as_tensor(labels))
    with torch.no_grad():
        for k in range(11):
            x = torch.as_tensor(images[k]).view(1, 1, 16, 16)
            ref = master.head(master.branches[[1, 0, 1][labels[k]]](x))[0]
            assert torch.allclose(z[k], ref, atol=1e-6)
            assert torch.allclose(zn[k], ref / ref.norm(), atol=1e-6)
    with pytest.raises(DataError, match="labels must be training classes 0..2"):
        master(torch.rand(2, 1, 16, 16), torch.tensor([0, 3]))


def test_branch_assignment() -> None:
    assert branch_assignment(5).tolist() == [0, 1, 2, 3, 4]
    a = branch_assignment(10, branch_groups=3, seed=4)
    assert sorted(np.bincount(a).tolist()) == [3, 3, 4] and a.tolist() == branch_assignment(10, branch_groups=3,
                                                                                              seed=4).tolist()
    assert a.tolist() != branch_assignment(10, branch_groups=3, seed=5).tolist()
    d = branch_assignment(4, grouping="dataset", class_groups=["b", "a", "b", "c"])
    assert d.tolist() == [1, 0, 1, 2]
    with pytest.raises(ConfigError, match="needs a dataset with groups"):
        branch_assignment(4, grouping="dataset")


# ----------------------------------------------------------------------------------------------- episodes
def uneven_labels() -> np.ndarray:
    return np.repeat(np.arange(4), [7, 2, 5, 3])[np.random.default_rng(0).permutation(17)]


def test_episodes_cover_all_pairs_with_the_right_sizes() -> None:
    labels = uneven_labels()
    counts = np.bincount(labels)
    ep = PairEpisodes(labels, episode_size=3, seed=1)
    assert ep.steps_per_epoch == 12
    pairs = []
    for step in range(12):
        e = ep.episode(0, step)
        pairs.append((e.i, e.j))
        size = min(3, counts[e.i] // 2, counts[e.j])  # B_ij of methods.md §6.5
        assert len(e.anchors) == len(e.positives) == len(e.negatives) == size
        assert (labels[e.anchors] == e.i).all() and (labels[e.positives] == e.i).all()
        assert (labels[e.negatives] == e.j).all()
        both = np.concatenate([e.anchors, e.positives])
        assert len(set(both.tolist())) == 2 * size and len(set(e.negatives.tolist())) == size  # no replacement
    assert sorted(pairs) == [(i, j) for i, j in itertools.product(range(4), repeat=2) if i != j]
    # Faithful: the episode set is built once and replayed every epoch; resample_episodes draws fresh images.
    assert all(np.array_equal(ep.episode(0, s).anchors, ep.episode(3, s).anchors) for s in range(12))
    fresh = PairEpisodes(labels, episode_size=3, seed=1, resample_episodes=True)
    assert any(not np.array_equal(fresh.episode(0, s).anchors, fresh.episode(1, s).anchors) for s in range(12))


def test_episode_budget_samples_distinct_pairs_per_epoch() -> None:
    labels = np.repeat(np.arange(30), 2)
    ep = PairEpisodes(labels, episode_size=5, pairs_per_epoch=40, seed=0)
    assert ep.steps_per_epoch == 40
    e0 = [(ep.episode(0, s).i, ep.episode(0, s).j) for s in range(40)]
    e1 = [(ep.episode(1, s).i, ep.episode(1, s).j) for s in range(40)]
    assert len(set(e0)) == 40 and all(i != j for i, j in e0) and set(e0) != set(e1)
    assert all(len(ep.episode(0, s).anchors) == 1 for s in range(40))  # 2 images: one anchor-positive pair
    assert [ep.pair(p) for p in range(3)] == [(0, 1), (0, 2), (0, 3)] and ep.pair(29) == (1, 0)
    with pytest.raises(IndexError):
        ep.episode(0, 40)


def test_episodes_bad_input() -> None:
    labels = np.array([0, 0, 1, 2, 2])
    with pytest.raises(DataError, match=r"1 training class\(es\) lack images .* b \(1 image\(s\)\)"):
        PairEpisodes(labels, episode_size=2, class_names=["a", "b", "c"])
    with pytest.raises(DataError, match="at least 2 training classes"):
        PairEpisodes(np.zeros(4, dtype=np.int64), episode_size=2)
    with pytest.raises(ConfigError, match="pairs_per_epoch: 4000 classes make 15996000 ordered pairs"):
        PairEpisodes(np.repeat(np.arange(4000), 2), episode_size=2)


# ----------------------------------------------------------------------------------------------- losses
def test_master_loss_matches_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    h = [torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(2)]
    g[1][2] = g[0][2]  # a zero distance: finite value and gradient (eps 0, subgradient 0)
    m, beta = 1.5, 0.2
    trip, comp = 0.0, 0.0
    for t in range(5):
        dap = math.sqrt(sum((float(g[0][t, k]) - float(g[1][t, k])) ** 2 for k in range(4)))
        dan = math.sqrt(sum((float(g[0][t, k]) - float(g[2][t, k])) ** 2 for k in range(4)))
        trip += max(dap - dan + m, 0.0) / 5
        comp += math.sqrt(sum((float(h[0][t, k]) - float(h[1][t, k])) ** 2 for k in range(7))) / 5
    leaves = [x.clone().requires_grad_(True) for x in (*g, *h)]
    total, t_val, c_val = master_loss(*leaves, margin=m, beta=beta)
    assert t_val.item() == pytest.approx(trip, rel=1e-6) and c_val.item() == pytest.approx(comp, rel=1e-6)
    assert total.item() == pytest.approx((1 - beta) * trip + beta * comp, rel=1e-6)
    total.backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


@pytest.mark.parametrize("kind", ["l2", "sum_l2", "mse", "cosine", "gaussian"])
def test_student_losses_match_naive_loops(kind: str) -> None:
    gen = torch.Generator().manual_seed(4)
    s, z = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    rows = [(s[k].tolist(), z[k].tolist()) for k in range(6)]
    d = [math.sqrt(sum((a - b) ** 2 for a, b in zip(x, y))) for x, y in rows]
    if kind == "l2":
        ref = sum(d) / 6
    elif kind == "sum_l2":
        ref = sum(d)
    elif kind == "mse":
        ref = sum((a - b) ** 2 for x, y in rows for a, b in zip(x, y)) / 18
    elif kind == "cosine":
        cos = [sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))
               for x, y in rows]
        ref = 1 - sum(cos) / 6
    else:
        ref = sum(1 - math.exp(-di * di / (2 * 0.125)) for di in d)
    assert float(student_loss(s, z, kind)) == pytest.approx(ref, rel=1e-5)
    assert float(student_loss(z, z, kind)) == pytest.approx(0.0, abs=1e-6)


def test_student_loss_bad_input() -> None:
    with pytest.raises(DataError, match=r"student embeddings \(2, 3\) and targets \(2, 4\) differ"):
        student_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="is not one of"):
        student_loss(torch.zeros(2, 3), torch.zeros(2, 3), "huber")


# ----------------------------------------------------------------------------------------------- pipeline
def test_pipeline_targets_cache_and_invalidation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(tiny(out), progress=False)
    assert ran(result) == ["master", "targets", "student"] and "recall@1" in result["test"]
    master_ckpt, targets = out / "master" / "master.ckpt", out / "targets" / "targets.pt"
    # The targets carry the master checkpoint's hash and equal the master's routed embeddings.
    table = TargetTable.load(targets)
    assert table.master_sha256 == sha(master_ckpt) == stage_record(out, "master")["output_sha256"]
    assert stage_record(out, "targets")["inputs"] == {"master": sha(master_ckpt)}
    cfg = tiny(out)
    splits = build_splits(cfg.data)
    master = GuidedMaster.from_checkpoint(load_checkpoint(master_ckpt))
    plain = splits.train.subset(np.arange(len(splits.train)), transform=splits.test.transform)
    z, _ = compute_targets(master, plain, batch_size=7)
    assert torch.allclose(table.targets, z, atol=1e-6) and table.check_split(splits.train.labels) is None
    # The student alone is deployed: its checkpoint holds a plain embedding model with the student method.
    model, student_cfg = load_trained_model(out / "best.ckpt")
    assert student_cfg.method.name == "guided_student" and model.embedding_size == 8
    assert sha(out / "best.ckpt") == sha(out / "student" / "best.ckpt")
    history = load_checkpoint(master_ckpt)["history"]
    assert [r["epoch"] for r in history] == [1, 2] and all(r["episodes"] == 5 for r in history)
    assert result["pipeline"]["stages"][0]["seconds"] > 0  # the master's training time is reported

    # A student change reruns the student only: the targets file is untouched.
    before = sha(targets)
    again = train(tiny(out, "method.params.dml_weight=0.5"), progress=False, resume=True)
    assert ran(again) == ["student"] and sha(targets) == before
    # Without the master (deleted), the student still reruns from the cached targets.
    master_ckpt.unlink()
    (out / "master" / "last.ckpt").unlink()
    third = train(tiny(out, "method.params.student_loss=cosine"), progress=False, resume=True)
    assert ran(third) == ["student"] and sha(targets) == before
    # Targets settings changed: targets must be recomputed, which needs the master: it is trained again.
    fourth = train(tiny(out, "method.params.normalize_targets=true", "method.params.student_loss=cosine"),
                   progress=False, resume=True)
    assert ran(fourth) == ["master", "targets", "student"]
    assert TargetTable.load(targets).normalized and TargetTable.load(targets).master_sha256 == sha(master_ckpt)
    # A master change (margin) invalidates everything after it; the new targets record the new master.
    fifth = train(tiny(out, "method.params.master.margin=1.0", "method.params.normalize_targets=true",
                       "method.params.student_loss=cosine"), progress=False, resume=True)
    assert ran(fifth) == ["master", "targets", "student"]
    assert TargetTable.load(targets).master_sha256 == sha(master_ckpt) != table.master_sha256


def test_interrupted_master_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmlgen.engine import pipeline

    ref = train(tiny(tmp_path / "ref"), progress=False)
    calls = {"n": 0}

    def interrupted(self: Any) -> bool:
        calls["n"] += 1
        return self.name == "master" and calls["n"] == 7  # mid epoch 2 (5 episodes per epoch)

    monkeypatch.setattr(pipeline._Context, "interrupted", interrupted)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="continue with"):
        train(tiny(out), progress=False)
    state = load_checkpoint(out / "master" / "last.ckpt")
    assert (state["epoch"], state["step"]) == (1, 2) and stage_record(out, "master")["status"] == "running"
    result = train(tiny(out), progress=False, resume=True)
    a, b = load_checkpoint(out / "master" / "master.ckpt"), load_checkpoint(tmp_path / "ref" / "master" / "master.ckpt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["loss"] for r in a["history"]] == pytest.approx([r["loss"] for r in b["history"]], rel=1e-6)
    assert torch.equal(TargetTable.load(out / "targets" / "targets.pt").targets,
                       TargetTable.load(tmp_path / "ref" / "targets" / "targets.pt").targets)
    assert result["test"] == ref["test"]


def test_master_checkpoint_is_reused(tmp_path: Path) -> None:
    first = tmp_path / "first"
    train(tiny(first), progress=False)
    master = first / "master" / "master.ckpt"
    result = train(tiny(tmp_path / "second", f"method.params.master_checkpoint={master}"), progress=False)
    assert ran(result) == ["master", "targets", "student"]
    copied = load_checkpoint(tmp_path / "second" / "master" / "master.ckpt")
    assert copied["copied_from"] == str(master)
    assert torch.equal(TargetTable.load(tmp_path / "second" / "targets" / "targets.pt").targets,
                       TargetTable.load(first / "targets" / "targets.pt").targets)
    # A master of other classes or another embedding size is refused, named.
    with pytest.raises(CheckpointError, match="trained on 6 other classes than this run's 5 training classes"):
        train(tiny(tmp_path / "third", f"method.params.master_checkpoint={master}", "data.max_classes=5"),
              progress=False)
    with pytest.raises(ConfigError, match="model.embedding_size is 4 but the master in .* embeds in 8 dimensions"):
        train(tiny(tmp_path / "fourth", f"method.params.master_checkpoint={master}", "model.embedding_size=4"),
              progress=False)


def test_bad_student_configs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny(out), progress=False)
    targets = out / "targets" / "targets.pt"
    student = {**TINY, "method": {"name": "guided_student", "params": {"targets": str(targets)}}}

    def trainer(*overrides: str) -> Trainer:
        cfg = config_from_dict(student, list(overrides))
        cfg.out_dir = str(tmp_path / "student")
        return Trainer(cfg, progress=False)

    with pytest.raises(ConfigError, match=r"model.embedding_size is 16 but the targets in .* have 8 dimensions"):
        trainer("model.embedding_size=16")
    with pytest.raises(DataError, match="holds 120 targets but the training split has 100 images"):
        trainer("data.max_classes=5")
    with pytest.raises(ConfigError, match="L2-normalised .* but the targets in .* are not"):
        trainer("model.normalize=true")
    trainer("model.normalize=true", "method.params.student_loss=cosine")  # cosine ignores the scale
    with pytest.raises(DataError, match="targets file .* does not exist"):
        trainer(f"method.params.targets={tmp_path / 'none.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="targets file .*junk.pt cannot be read"):
        trainer(f"method.params.targets={tmp_path / 'junk.pt'}")
    with pytest.raises(ConfigError, match="method.params.targets: the path of a targets file"):
        config_from_dict({**TINY, "method": {"name": "guided_student"}})
    with pytest.raises(ConfigError, match="target_weight: must be > 0"):
        config_from_dict(TINY, ["method.params.target_weight=0"])
    # The pipeline checks the sizes before anything runs.
    with pytest.raises(ConfigError, match="master.embedding_size is 16 but the student's model.embedding_size is 8"):
        train(tiny(tmp_path / "x", "method.params.master.embedding_size=16"), progress=False)
    with pytest.raises(ConfigError, match="normalise differently"):
        train(tiny(tmp_path / "y", "data.train_transforms={normalize_mean: [0.5], normalize_std: [0.5]}"),
              progress=False)
    with pytest.raises(ConfigError, match="L2-normalised .*normalize_targets: false"):
        train(tiny(tmp_path / "z", "model.normalize=true"), progress=False)
    # Method guided is a pipeline: a single Trainer refuses it.
    with pytest.raises(ConfigError, match="has three stages"):
        Trainer(tiny(tmp_path / "w"), progress=False)
    # A resumed student whose targets changed is refused.
    cfg = config_from_dict(student)
    cfg.out_dir = str(tmp_path / "s2")
    Trainer(cfg, progress=False).fit()
    table = TargetTable.load(targets)
    table.targets = table.targets + 1
    torch.save({"format": 1, **table.to_dict()}, targets)
    with pytest.raises(CheckpointError, match="trained on other targets"):
        Trainer(cfg, progress=False, pretrained=False).fit(resume=True)


# ----------------------------------------------------------------------------------------------- protocols
def test_zero_shot_and_closed_set_splits_on_omniglot() -> None:
    zs = build_splits(tiny(Path("unused")).data)
    cs = build_splits(tiny(Path("unused"), "data.protocol=closed_set").data)
    assert not set(zs.test.classes.tolist()) & set(zs.train.classes.tolist()) and zs.gallery is None
    # Closed set: test queries are held-out images of the training classes; the gallery is the training set.
    assert set(cs.test.classes.tolist()) == set(zs.train.classes.tolist()) == set(cs.train.classes.tolist())
    train_idx, test_idx = closed_set_holdout(zs.train.labels, 0.25, seed=0)
    assert len(cs.test) == len(test_idx) == 6 * 5 and len(cs.train) == len(train_idx) == 6 * 15
    assert np.array_equal(cs.train.images, zs.train.images[train_idx])
    assert np.array_equal(cs.test.images, zs.train.images[test_idx])
    assert np.array_equal(cs.gallery.images, cs.train.images) and cs.gallery.transform is cs.test.transform
    assert cs.val.classes.tolist() == zs.val.classes.tolist()  # validation unchanged (held-out classes)


def test_closed_set_holdout_sizes() -> None:
    labels = np.repeat(np.arange(4), [2, 3, 8, 20])
    train_idx, test_idx = closed_set_holdout(labels, 0.25, seed=3)
    assert np.bincount(labels[test_idx], minlength=4).tolist() == [0, 1, 2, 5]
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(33))


def cifar_guided(tmp_path: Path, *overrides: str) -> RunConfig:
    cfg = load_config(REPO / "configs" / "cifar10" / "guided.yaml", [
        f"data.path={tmp_path / 'cifar'}", "data.classes_per_batch=2", "data.samples_per_class=2",
        "model.embedding_size=4", "method.params.master.epochs=1", "method.params.master.pairs_per_epoch=4",
        "method.params.master.branch_channels=[4, 8]", "method.params.master.hidden=8", "train.epochs=1",
        "train.max_steps_per_epoch=2", "eval.ks=[1, 2]", "eval.test_metrics=[recall, precision@1]",
        "model.backbone=convnet4", "train.device=cpu", "data.num_workers=0", *overrides])
    cfg.out_dir = str(tmp_path / "run")
    return cfg


def test_cifar10_closed_set_protocol_end_to_end(tmp_path: Path) -> None:
    """The paper's CIFAR-10 setting on a fabricated copy: master on the 10 classes at 32x32, student, and the test
    queries (official test file) ranked against the training images, checked by a naive loop."""
    make_cifar(tmp_path / "cifar", 10)
    cfg = cifar_guided(tmp_path)
    assert cfg.data.protocol == "closed_set" and cfg.method.name == "guided"
    splits = quiet(build_splits, cfg.data)
    assert splits.train.classes.tolist() == splits.test.classes.tolist() == list(range(10))
    assert len(splits.train) == 50 and len(splits.test) == 10 and len(splits.gallery) == 50 and splits.val is None
    result = quiet(train, cfg, progress=False)
    master = load_checkpoint(tmp_path / "run" / "master" / "master.ckpt")
    assert master["arch"]["flat_dim"] == 8 * 5 * 5 and master["arch"]["num_branches"] == 10  # 32x32 -> 5x5
    test = result["test"]
    assert test["num_queries"] == 10 and result["splits"]["gallery_images"] == 50
    model, _ = load_trained_model(tmp_path / "run" / "best.ckpt")
    with torch.no_grad():
        q = model(torch.stack([splits.test[i][0] for i in range(10)]))
        g = model(torch.stack([splits.gallery[i][0] for i in range(50)]))
    q_ids = [int(splits.test.classes[y]) for y in splits.test.labels]
    g_ids = [int(splits.gallery.classes[y]) for y in splits.gallery.labels]
    hits1, hits2 = [], []
    for i in range(10):
        d = [float(torch.linalg.vector_norm(q[i] - g[j])) for j in range(50)]
        order = sorted(range(50), key=lambda j: (d[j], j))
        hits1.append(g_ids[order[0]] == q_ids[i])
        hits2.append(q_ids[i] in (g_ids[order[0]], g_ids[order[1]]))
    assert test["recall@1"] == pytest.approx(np.mean(hits1), abs=1e-6)
    assert test["recall@2"] == pytest.approx(np.mean(hits2), abs=1e-6)


def test_cifar10_zero_shot_protocol_and_bad_closed_set(tmp_path: Path) -> None:
    make_cifar(tmp_path / "cifar", 10)
    zs = quiet(build_splits, cifar_guided(tmp_path, "data.protocol=zero_shot").data)
    assert zs.train.classes.tolist() == [0, 1, 2, 3, 4] and zs.test.classes.tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(ConfigError, match="data.val_class_fraction: must be 0 with data.protocol: closed_set"):
        cifar_guided(tmp_path, "data.val_class_fraction=0.2")


def test_shipped_configs_load() -> None:
    omni = load_config(REPO / "configs" / "omniglot" / "guided.yaml")
    assert omni.method.name == "guided" and omni.data.protocol == "zero_shot"
    params = omni.method.parsed_params()
    assert params.master.branch_groups is not None and params.master.pairs_per_epoch is not None
    recipes = sorted((REPO / "configs" / "recipes").glob("cifar10_guided*.yaml"))
    paths = [REPO / "configs" / "cifar10" / "guided.yaml", *recipes]
    assert len(paths) == 2
    for path in paths:
        cfg = load_config(path)
        assert cfg.method.name == "guided" and cfg.data.dataset == "cifar10", path
    json.dumps(omni.to_dict())
