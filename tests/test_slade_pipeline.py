"""SLADE through the engine: `dmlgen train` on a `method: slade` config runs ssl -> teacher -> pseudo labels ->
student rounds (tiny Omniglot budgets). Stage wiring (which checkpoint initialises what, the pseudo labels'
teacher hash), stage caching (which stages a config change re-runs), exact resume of an interrupted student,
the two SSL views, the unlabeled stream, and bad input that must fail before any training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from dmlgen.engine.checkpoint import load_checkpoint
from dmlgen.engine.config import config_from_dict
from dmlgen.engine.pipeline import stage_record
from dmlgen.engine.run import train
from dmlgen.engine.setup import build_splits
from dmlgen.engine.trainer import LAST, Trainer, TrainingInterrupted
from dmlgen.errors import ConfigError, DataError
from dmlgen.methods.slade import SladeSSLMethod, SladeStudentMethod, load_pseudo_labels
from _fixtures import one_thread  # noqa: F401  (autouse: one thread per test)

TINY: dict[str, Any] = {
    "name": "tiny-slade",
    "data": {"dataset": "omniglot", "max_classes": 6, "classes_per_batch": 3, "samples_per_class": 4,
             "unlabeled": {"source": "train_alphabets", "alphabets": 20, "max_images": 48}},
    "model": {"backbone": "convnet4", "embedding_size": 8},
    "loss": {"name": "multi_similarity"},
    "optimizer": {"name": "adam", "lr": 0.001},
    "train": {"epochs": 1, "max_steps_per_epoch": 3, "seed": 0},
    "eval": {"ks": [1, 2], "test_metrics": ["recall", "map@r"], "val_metrics": ["map@r"]},
    "method": {"name": "slade", "params": {
        "ssl": None, "num_clusters": 4, "rounds": 1, "lambda_unlabeled": 1.0, "lambda_basis": 0.5,
        "sd_margin": 0.5, "basis_warmup_steps": 1, "batch_unlabeled": 8, "unlabeled_sampler": "cluster_balanced",
        "basis_lr": 0.01}},
}
SSL = ("method.params.ssl={epochs: 1, steps_per_epoch: 2, batch_size: 8, head_hidden: [16], "
       "train_transforms: {rotation_degrees: 10, translate: 0.1}}")


def config(*overrides: str) -> Any:
    return config_from_dict(TINY, list(overrides))


def run(out: Path, *overrides: str, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    return train(config(*overrides), out_dir=out, resume=resume, overwrite=overwrite, progress=False)


def ran(result: dict[str, Any]) -> list[str]:
    return [s["name"] for s in result["pipeline"]["stages"] if s["ran_now"]]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_stages_are_wired_checkpoint_to_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inits: list[dict[str, torch.Tensor]] = []
    original = SladeStudentMethod.setup

    def setup(self: SladeStudentMethod, info: Any, model: torch.nn.Module) -> None:
        original(self, info, model)
        inits.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(SladeStudentMethod, "setup", setup)
    out = tmp_path / "run"
    result = run(out, SSL, "method.params.rounds=2")
    assert [s["name"] for s in result["pipeline"]["stages"]] == ["ssl", "teacher", "pseudo1", "student1", "pseudo2",
                                                                 "student2"]
    # The teacher starts from the SSL backbone (its projection head is dropped), without ImageNet weights.
    teacher_cfg = yaml.safe_load((out / "teacher" / "config.yaml").read_text())
    assert teacher_cfg["model"]["weights"] == str((out / "ssl" / "best.ckpt").resolve())
    assert teacher_cfg["method"]["name"] == "standard" and teacher_cfg["loss"]["name"] == "multi_similarity"
    ssl_cfg = yaml.safe_load((out / "ssl" / "config.yaml").read_text())
    assert ssl_cfg["loss"]["name"] == "ntxent" and ssl_cfg["model"]["head_hidden"] == [16]
    assert ssl_cfg["method"]["name"] == "slade_ssl" and ssl_cfg["data"]["train_transforms"]["rotation_degrees"] == 10
    # Each round clusters the previous model's embeddings and stores that checkpoint's hash with the labels.
    for r, source in ((1, "teacher"), (2, "student1")):
        labels, meta = load_pseudo_labels(out / f"pseudo{r}" / "pseudo_labels.pt")
        assert meta["source"] == source and meta["source_sha256"] == sha(out / source / "best.ckpt")
        assert labels.shape == (48,) and set(labels.tolist()) <= set(range(4))
        assert meta["round"] == r and 0.0 <= meta["nmi"] <= 1.0 and meta["hidden_classes"] > 4
        summary = json.loads((out / f"pseudo{r}" / "pseudo_labels.json").read_text())
        assert summary["nmi"] == meta["nmi"]
    # Student r starts as the whole model (backbone and head) of its teacher: the teacher, then student 1.
    for init, source in zip(inits, ("teacher", "student1")):
        weights = load_checkpoint(out / source / "best.ckpt")["model"]
        assert all(torch.equal(init[k], weights[k]) for k in weights)
    student_cfg = yaml.safe_load((out / "student2" / "config.yaml").read_text())
    assert student_cfg["method"]["params"]["pseudo_labels"] == str((out / "pseudo2" / "pseudo_labels.pt").resolve())
    # The pipeline deploys the last student; its rows log the basis statistics and the selection.
    assert sha(out / "best.ckpt") == sha(out / "student2" / "best.ckpt")
    # Every train stage has its report.md; only the deployed one gets the HTML page.
    assert all((out / s / "report.md").is_file() for s in ("ssl", "teacher", "student1", "student2"))
    assert sorted(p.parent.name for p in out.rglob("report.html")) == ["student2"]
    rows = load_checkpoint(out / "student2" / LAST)["history"]
    assert {"train_mu_pos", "train_mu_neg", "train_selected_pos", "train_loss_ce", "train_selected_pos_true"} <= \
        set(rows[0])
    teacher_result = stage_record(out, "teacher")["result"]["test"]
    assert {"recall@1", "map@r"} <= set(teacher_result)


def test_stage_caching_reruns_only_what_a_change_affects(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run(out)
    assert ran(first) == ["teacher", "pseudo1", "student1"]
    finished = {n: stage_record(out, n)["finished"] for n in ("teacher", "pseudo1", "student1")}
    assert ran(run(out, resume=True)) == []
    # Another K: new pseudo labels and a new student; the teacher is reused.
    again = run(out, "method.params.num_clusters=3", resume=True)
    assert ran(again) == ["pseudo1", "student1"] and stage_record(out, "teacher")["finished"] == finished["teacher"]
    assert load_pseudo_labels(out / "pseudo1" / "pseudo_labels.pt")[1]["num_clusters"] == 3
    # A student-only setting: only the student trains again; the cached pseudo labels stay (same teacher hash).
    pseudo_sha = sha(out / "pseudo1" / "pseudo_labels.pt")
    assert ran(run(out, "method.params.num_clusters=3", "method.params.lambda_unlabeled=0.5", resume=True)) == \
        ["student1"]
    assert sha(out / "pseudo1" / "pseudo_labels.pt") == pseudo_sha
    # A change that reaches the teacher re-runs everything after it.
    assert ran(run(out, "method.params.num_clusters=3", "method.params.lambda_unlabeled=0.5",
                   "method.params.teacher_epochs=2", resume=True)) == ["teacher", "pseudo1", "student1"]
    # Settings that do not change results (device, log interval, workers) do not invalidate anything.
    assert ran(run(out, "method.params.num_clusters=3", "method.params.lambda_unlabeled=0.5",
                   "method.params.teacher_epochs=2", "train.log_every=3", "train.device=cpu", resume=True)) == []


def test_interrupted_student_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = ("method.params.student_epochs=2", "method.params.basis_warmup_steps=2",
                 "data.train_transforms={rotation_degrees: 10}")
    run(tmp_path / "ref", *overrides)
    original = SladeStudentMethod.train_step
    calls = {"n": 0}

    def step(self: SladeStudentMethod, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, step 2: after the warm-up, mid-epoch
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(SladeStudentMethod, "train_step", step)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="--resume"):
        run(out, *overrides)
    monkeypatch.setattr(SladeStudentMethod, "train_step", original)
    assert stage_record(out, "student1")["status"] == "running"
    result = run(out, *overrides, resume=True)
    assert ran(result) == ["student1"]
    a, b = load_checkpoint(out / "student1" / LAST), load_checkpoint(tmp_path / "ref" / "student1" / LAST)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["method"]["modules"]:  # the basis and its EMA statistics
        assert torch.equal(a["method"]["modules"][key], b["method"]["modules"][key]), key
    assert a["method"]["stream"] == b["method"]["stream"]
    strip = [[{k: v for k, v in r.items() if k not in ("train_seconds", "images_per_second")} for r in c["history"]]
             for c in (a, b)]
    assert strip[0] == strip[1]


def _trainer(out: Path, method: dict[str, Any], *overrides: str) -> Trainer:
    cfg = config(*overrides)
    cfg = config_from_dict({**cfg.to_dict(), "method": method, "out_dir": str(out)})
    return Trainer(cfg, progress=False)


def test_ssl_views_are_two_augmentations_of_the_same_pool_images(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    original = SladeSSLMethod.train_step

    def step(self: SladeSSLMethod, ctx: Any, batch: Any, extra: Any) -> Any:
        seen.append((extra["view1"], extra["view2"]))
        return original(self, ctx, batch, extra)

    monkeypatch.setattr(SladeSSLMethod, "train_step", step)
    trainer = _trainer(tmp_path, {"name": "slade_ssl", "params": {"batch_size": 30}},
                       "loss={name: ntxent, params: {temperature: 0.2}}", "train.max_steps_per_epoch=4",
                       "data.train_transforms={rotation_degrees: 20, translate: 0.1}")
    trainer.fit()
    n_train, n_unlabeled = len(trainer.splits.train), len(trainer.splits.unlabeled)
    assert len(seen) == 4
    indices = torch.cat([v1[2] for v1, _ in seen])
    for (x1, _, i1), (x2, _, i2) in seen:
        assert torch.equal(i1, i2) and not torch.equal(x1, x2)  # same images, different augmentations
    # The pool is labeled + unlabeled: both parts are drawn, nothing beyond it.
    assert int(indices.max()) < n_train + n_unlabeled
    assert bool((indices < n_train).any()) and bool((indices >= n_train).any())
    history = load_checkpoint(tmp_path / LAST)["history"]
    assert 0.0 <= history[0]["train_view_top1"] <= 1.0


def test_student_stream_reads_the_unlabeled_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run(tmp_path / "run")  # pseudo labels to train with
    seen: list[Any] = []
    original = SladeStudentMethod.train_step

    def step(self: SladeStudentMethod, ctx: Any, batch: Any, extra: Any) -> Any:
        seen.append(extra["unlabeled"])
        return original(self, ctx, batch, extra)

    monkeypatch.setattr(SladeStudentMethod, "train_step", step)
    params = {**TINY["method"]["params"], "pseudo_labels": str(tmp_path / "run" / "pseudo1" / "pseudo_labels.pt")}
    for key in ("ssl", "num_clusters", "rounds"):
        params.pop(key)
    trainer = _trainer(tmp_path / "student", {"name": "slade_student", "params": params})
    trainer.fit()
    unlabeled = trainer.splits.unlabeled
    pseudo, _ = load_pseudo_labels(tmp_path / "run" / "pseudo1" / "pseudo_labels.pt")
    for images, labels, index in seen:
        assert bool((labels == -1).all()) and len(index) == 8
        assert all(torch.equal(images[k], unlabeled[int(i)][0]) for k, i in enumerate(index))  # no augmentation
        groups = pseudo[index.numpy()].reshape(2, 4)  # cluster-balanced: 2 clusters x 4 images
        assert all(len(set(g.tolist())) == 1 for g in groups)


def test_unlabeled_split_of_the_data_config() -> None:
    splits = build_splits(config().data)
    train_alphabets = set(np.asarray(splits.train.groups).tolist())
    unlabeled = splits.unlabeled
    assert len(unlabeled) == 48 and splits.summary()["unlabeled_images"] == 48
    moved = set(np.asarray(unlabeled.source.groups).tolist())
    assert train_alphabets.isdisjoint(moved)  # whole alphabets left the labeled split
    assert set(unlabeled.source.classes.tolist()).isdisjoint(splits.train.classes.tolist())
    cfg = config("data.unlabeled={source: train_classes, class_fraction: 0.5}", "data.max_classes=null")
    classes = build_splits(cfg.data)
    assert len(classes.unlabeled) + len(classes.train) == len(build_splits(config("data.unlabeled=null",
                                                                                  "data.max_classes=null").data).train)


@pytest.mark.parametrize("overrides,error,match", [
    (("method.params.num_clusters=49",), DataError, "num_clusters: K=49 clusters of the 48 unlabeled images"),
    (("method.params.batch_unlabeled=64", "method.params.unlabeled_sampler=random"), ConfigError,
     "batch_unlabeled: 64 > the 48"),
])
def test_unlabeled_set_too_small_fails_before_training(tmp_path: Path, overrides: tuple[str, ...], error: type,
                                                       match: str) -> None:
    with pytest.raises(error, match=match):
        run(tmp_path / "run", *overrides)
    assert not (tmp_path / "run" / "teacher" / "best.ckpt").exists()


@pytest.mark.parametrize("override,match", [
    ("data.unlabeled.alphabets=0", "alphabets: at least one alphabet.*empty unlabeled set"),
    ("data.unlabeled.alphabets=[]", "alphabets: at least one alphabet"),
    ("data.unlabeled=null", "needs unlabeled images; add a data.unlabeled section"),
    ("method.params.num_clusters=null", "num_clusters: required"),
    ("method.params.lambda_basis=null", "lambda_basis: required"),
    ("method.params.pseudo_labels=x.pt", "pseudo_labels: set by the pipeline"),
    ("method.params.student_init=ssl", "student_init: 'ssl' needs the ssl stage"),
    ("loss={name: margin}", "loss 'margin' cannot score the selected unlabeled pairs"),
    ("regularizers=[{name: mdr}]", "regularizers"),
    ("data.unlabeled={source: image_folder}", "data.unlabeled.path: required"),
    ("method.params.ssl={train_transforms: {rotation_degrees: 400}}", "ssl.train_transforms.rotation_degrees"),
])
def test_bad_configs_are_named(tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises((ConfigError, DataError), match=match):
        run(tmp_path / "run", override)
    assert not (tmp_path / "run" / "teacher").exists()


def test_empty_unlabeled_npz_is_an_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 28, 28), np.uint8))
    with pytest.raises(DataError, match="unlabeled set is empty"):
        run(tmp_path / "run", f"data.unlabeled={{source: npz, path: {tmp_path / 'empty.npz'}}}")
