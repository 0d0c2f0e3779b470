"""The training engine on tiny Omniglot subsets: outputs, exact resume, Ctrl-C, atomic checkpoints, bad input.

Every run uses a few classes, a 16-d embedding and at most a few steps per epoch, so that a run takes about
a second on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dmlgen.engine.checkpoint as checkpoint_module
from dmlgen.engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from dmlgen.engine.config import RunConfig, config_from_dict, load_config
from dmlgen.engine.run import embed_split, evaluation_config, load_trained_model, train
from dmlgen.engine.setup import build_model_from_config, build_splits
from dmlgen.engine.trainer import BEST, LAST, Trainer, TrainingInterrupted
from dmlgen.errors import CheckpointError, ConfigError, DataError
from _fixtures import one_thread  # noqa: F401  (autouse: every test here runs on one thread)

TINY: dict[str, Any] = {
    "name": "tiny",
    "data": {"dataset": "omniglot", "max_classes": 8, "classes_per_batch": 4, "samples_per_class": 4},
    "model": {"backbone": "convnet4", "embedding_size": 16},
    "loss": {"name": "triplet_margin", "params": {"margin": 0.2},
             "miner": {"name": "triplet_margin", "params": {"margin": 0.2, "type_of_triplets": "semihard"}}},
    "optimizer": {"name": "adam", "lr": 0.001},
    "scheduler": {"name": "cosine"},
    "train": {"epochs": 2, "max_steps_per_epoch": 3, "seed": 0},
    # Augmentations on: resume must reproduce their random draws too.
}
AUGMENT = ["data.train_transforms={rotation_degrees: 10, translate: 0.1}"]
TIMING = ("train_seconds", "images_per_second")



def tiny(out: Path, *overrides: str) -> RunConfig:
    cfg = config_from_dict(TINY, list(overrides))
    cfg.out_dir = str(out)
    return cfg


def run(out: Path, *overrides: str, resume: bool = False) -> dict[str, Any]:
    return Trainer(tiny(out, *overrides), progress=False, pretrained=not resume).fit(resume=resume)


def interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Make the ``call``-th training step (1-based, counted over the whole run) raise KeyboardInterrupt."""
    original = Trainer._train_step
    count = {"n": 0}

    def step(self: Trainer, images: torch.Tensor, labels: torch.Tensor) -> float:
        count["n"] += 1
        if count["n"] == call:
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(Trainer, "_train_step", step)


def assert_same_run(a: Path, b: Path) -> None:
    """Identical final weights, optimizer state, history (timings aside) and test metrics."""
    ca, cb = load_checkpoint(a / LAST), load_checkpoint(b / LAST)
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    strip = [[{k: v for k, v in row.items() if k not in TIMING} for row in c["history"]] for c in (ca, cb)]
    assert strip[0] == strip[1]
    assert ca["scheduler"]["last_epoch"] == cb["scheduler"]["last_epoch"]
    ta, tb = (json.loads((d / "test_metrics.json").read_text()) for d in (a, b))
    assert ta["test"] == tb["test"] and ta["selected_epoch"] == tb["selected_epoch"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-epoch run with augmentation, the reference of the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(out, *AUGMENT)
    finally:
        torch.set_num_threads(before)
    return out


# --------------------------------------------------------------------------- outputs
def test_two_epoch_run_writes_every_output(straight: Path) -> None:
    names = {p.name for p in straight.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "epochs.csv", LAST, BEST, "test_metrics.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    result = json.loads((straight / "test_metrics.json").read_text())
    test = result["test"]
    assert test["num_queries"] == 160 and test["num_lone_queries"] == 0  # 8 classes x 20 drawers
    for key in ("recall@1", "recall@8", "precision@1", "r_precision", "map@r", "nmi", "ami"):
        assert math.isfinite(test[key]), key
    assert 0.0 <= test["map@r"] <= test["r_precision"] <= 1.0 and test["recall@1"] <= test["recall@8"]
    # Selection by validation MAP@R, never by test: the selected epoch is the best validation epoch.
    history = load_checkpoint(straight / LAST)["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    best = max(history, key=lambda row: row["val_map@r"])
    assert result["selected_epoch"] == best["epoch"] and result["val_score"] == best["val_map@r"]
    assert load_checkpoint(straight / BEST)["best_epoch"] == best["epoch"]
    assert result["selection_metric"] == "map@r" and result["splits"]["val_classes"] == 8
    # The stored config reloads into the same run config.
    assert load_config(straight / "config.yaml").to_dict() == tiny(straight, *AUGMENT).to_dict()
    events = [json.loads(line)["event"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events.count("epoch") == 2 and events[-1] == "test"
    csv_lines = (straight / "epochs.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("epoch,train_loss")


def test_train_writes_report(tmp_path: Path) -> None:
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    result = train(cfg_path, ["train.epochs=1"], out_dir=tmp_path / "out", progress=False)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Selected checkpoint: epoch 1 by validation `map@r`" in report
    assert f"| test | {result['test']['recall@1']:.4f} |" in report


def test_without_validation_the_last_epoch_is_reported(tmp_path: Path) -> None:
    result = run(tmp_path, "data.val_alphabets=0")
    assert result["selected_epoch"] == 2 and result["selection_metric"] is None
    assert result["splits"]["val_images"] == 0


# --------------------------------------------------------------------------- resume
def test_resume_after_first_epoch_is_exact(tmp_path: Path, straight: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_at(monkeypatch, 4)  # the first step of epoch 2
    with pytest.raises(TrainingInterrupted, match="epoch 2/2, step 0/3"):
        run(tmp_path, *AUGMENT)
    saved = load_checkpoint(tmp_path / LAST)
    assert (saved["epoch"], saved["step_in_epoch"], len(saved["history"])) == (1, 0, 1)
    assert not (tmp_path / "test_metrics.json").exists()
    monkeypatch.undo()
    run(tmp_path, *AUGMENT, resume=True)
    assert_same_run(straight, tmp_path)


def test_resume_mid_epoch_is_exact(tmp_path: Path, straight: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_at(monkeypatch, 5)  # after one step of epoch 2
    with pytest.raises(TrainingInterrupted, match=r"step 1/3.*--resume"):
        run(tmp_path, *AUGMENT)
    saved = load_checkpoint(tmp_path / LAST)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 1, 4)
    assert saved["sampler"]["epoch"] == 1
    monkeypatch.undo()
    run(tmp_path, *AUGMENT, resume=True)
    assert_same_run(straight, tmp_path)


def test_periodic_checkpoint_resumes_a_crash_exactly(tmp_path: Path, straight: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """train.checkpoint_every_steps: a crash (no chance to save) loses only the steps since the last save."""
    original = Trainer._train_step
    saved_steps: list[int] = []
    save_last = Trainer.save_last

    def crash_at_step_5(self: Trainer, images: torch.Tensor, labels: torch.Tensor) -> float:
        if self.state.global_step == 4:
            raise RuntimeError("simulated crash")
        return original(self, images, labels)

    def recording_save(self: Trainer) -> Path:
        saved_steps.append(self.state.global_step)
        return save_last(self)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_step_5)
    monkeypatch.setattr(Trainer, "save_last", recording_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, *AUGMENT, "train.checkpoint_every_steps=2")
    # Step 2 (mid-epoch), step 3 (the epoch end, not twice), step 4 (mid-epoch); step 5 crashed.
    assert saved_steps == [2, 3, 4]
    saved = load_checkpoint(tmp_path / LAST)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 1, 4)
    monkeypatch.undo()
    run(tmp_path, *AUGMENT, "train.checkpoint_every_steps=2", resume=True)
    assert_same_run(straight, tmp_path)
    with pytest.raises(ConfigError, match="train.checkpoint_every_steps: must be > 0"):
        tiny(tmp_path, "train.checkpoint_every_steps=0")


def test_resume_detects_a_broken_replay(tmp_path: Path, straight: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The equality check is sharp: resuming one step too late gives different weights."""
    interrupt_at(monkeypatch, 5)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, *AUGMENT)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / LAST)
    state["step_in_epoch"] = 2  # skip a batch
    checkpoint_module.atomic_save(state, tmp_path / LAST)
    run(tmp_path, *AUGMENT, resume=True)
    with pytest.raises(AssertionError):
        assert_same_run(straight, tmp_path)


def test_resume_with_loader_workers_is_exact(tmp_path: Path, straight: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Augmentations are seeded per image, so worker processes and pre-fetching change nothing."""
    interrupt_at(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, *AUGMENT, "data.num_workers=2")
    monkeypatch.undo()
    run(tmp_path, *AUGMENT, "data.num_workers=2", resume=True)
    assert_same_run(straight, tmp_path)


def test_ctrl_c_waits_for_the_step_then_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Trainer._train_step
    count = {"n": 0}

    def step(self: Trainer, images: torch.Tensor, labels: torch.Tensor) -> float:
        count["n"] += 1
        if count["n"] == 2:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C in the middle of the step
        return original(self, images, labels)

    monkeypatch.setattr(Trainer, "_train_step", step)
    # whatever was installed before (SIG_IGN when the suite runs in the background under nohup)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="epoch 1/2, step 2/3"):
        run(tmp_path)
    saved = load_checkpoint(tmp_path / LAST)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 2, 2)  # the step finished
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_second_ctrl_c_stops_without_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def step(self: Trainer, images: torch.Tensor, labels: torch.Tensor) -> float:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("the second Ctrl-C must stop at once")

    monkeypatch.setattr(Trainer, "_train_step", step)
    with pytest.raises(TrainingInterrupted, match="without saving"):
        run(tmp_path)
    assert not (tmp_path / LAST).exists()


def test_resume_refuses_a_different_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_at(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"loss\.params\.margin: 0\.2 in the checkpoint, 0\.3 now"):
        run(tmp_path, "loss.params.margin=0.3", resume=True)
    with pytest.raises(CheckpointError, match=f"{LAST} is from another model.*embedding_size 16 != 8"):
        run(tmp_path, "model.embedding_size=8", resume=True)
    # Allowed changes (more epochs) resume.
    result = run(tmp_path, "train.epochs=3", resume=True)
    assert len(load_checkpoint(tmp_path / LAST)["history"]) == 3 and result["test"]["num_queries"] == 160


def test_resume_without_checkpoint_and_restart_over_a_run(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to resume.*does not exist"):
        run(tmp_path, resume=True)
    run(tmp_path, "train.epochs=1")
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        run(tmp_path, "train.epochs=1")
    first = load_checkpoint(tmp_path / LAST)["model"]["head.layers.0.weight"]
    Trainer(tiny(tmp_path, "train.epochs=1", "train.seed=1"), progress=False).fit(overwrite=True)
    assert not torch.equal(first, load_checkpoint(tmp_path / LAST)["model"]["head.layers.0.weight"])
    assert len((tmp_path / "epochs.csv").read_text().splitlines()) == 2  # the old rows are gone


# --------------------------------------------------------------------------- checkpoint atomicity
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, straight: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] <= 2:  # epoch 1: best.ckpt and last.ckpt
            return real_save(obj, handle, *args, **kwargs)
        handle.write(b"half a checkpoint")  # then the disk fills up mid-write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", flaky_save)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*\.ckpt: No space left on device"):
        run(tmp_path, *AUGMENT)
    monkeypatch.undo()
    previous = load_checkpoint(tmp_path / LAST)  # intact and readable
    assert (previous["epoch"], previous["step_in_epoch"]) == (1, 0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith((".ckpt", ".tmp"))) == [BEST, LAST]
    run(tmp_path, *AUGMENT, resume=True)  # and nothing was lost
    assert_same_run(straight, tmp_path)


# --------------------------------------------------------------------------- trained models
def test_load_trained_model_rebuilds_without_pretrained_weights(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "init.pt"
    torch.save(build_model_from_config(tiny(tmp_path).model, 1).backbone.body.state_dict(), weights)
    cfg = tiny(tmp_path / "run", "train.epochs=1", f"model.weights={weights}")
    Trainer(cfg, progress=False).fit()
    weights.unlink()  # a trained model must not need its initialisation any more
    model, loaded_cfg = load_trained_model(tmp_path / "run" / BEST)
    assert not model.training and loaded_cfg.model.weights == str(weights)
    best = load_checkpoint(tmp_path / "run" / BEST)["model"]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    emb, labels, classes = embed_split(tmp_path / "run" / BEST, "test")
    assert emb.shape == (160, 16) and torch.allclose(emb.norm(dim=1), torch.ones(160), atol=1e-5)
    assert labels.tolist() == sorted(labels.tolist()) and classes.min() == 964  # global Omniglot ids


def test_load_trained_model_never_fetches_imagenet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmlgen.models import backbones

    cfg = tiny(tmp_path, "model.backbone=resnet18", "model.imagenet=true", "model.freeze_bn=true")
    model = build_model_from_config(cfg.model, 1, pretrained=False)
    ckpt = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model_description": model.describe(),
            "model": model.state_dict()}
    checkpoint_module.atomic_save(ckpt, tmp_path / "resnet.ckpt")

    def no_download() -> dict[str, torch.Tensor]:
        raise AssertionError("load_trained_model tried to load ImageNet weights")

    monkeypatch.setitem(backbones.BACKBONES, "resnet18",
                        dataclasses.replace(backbones.BACKBONES["resnet18"], imagenet=no_download))
    with pytest.raises(AssertionError, match="tried to load ImageNet"):  # the patch bites when asked
        build_model_from_config(cfg.model, 1)
    loaded, loaded_cfg = load_trained_model(tmp_path / "resnet.ckpt")
    assert loaded_cfg.model.imagenet and loaded_cfg.model.backbone == "resnet18"
    key = "backbone.body.conv1.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])


def test_checkpoint_from_another_model_is_refused(tmp_path: Path, straight: Path) -> None:
    ckpt = load_checkpoint(straight / BEST)
    other = build_model_from_config(tiny(tmp_path, "model.embedding_size=8").model, 1)
    forged = {**ckpt, "model": other.state_dict()}  # weights of another architecture
    checkpoint_module.atomic_save(forged, tmp_path / "forged.ckpt")
    with pytest.raises(CheckpointError, match=r"forged\.ckpt: weights do not fit the model"):
        load_trained_model(tmp_path / "forged.ckpt")
    forged = {**ckpt, "model_description": other.describe(), "model": other.state_dict()}
    checkpoint_module.atomic_save(forged, tmp_path / "forged2.ckpt")
    with pytest.raises(CheckpointError, match=r"forged2\.ckpt: its weights are for another model"):
        load_trained_model(tmp_path / "forged2.ckpt")
    torch.save(other.state_dict(), tmp_path / "plain.pt")  # a plain state dict, not a dmlgen checkpoint
    with pytest.raises(CheckpointError, match=r"plain\.pt is not a dmlgen checkpoint"):
        load_trained_model(tmp_path / "plain.pt")
    config = tmp_path / "resnet.yaml"
    config.write_text(yaml.safe_dump({**TINY, "model": {"backbone": "resnet18", "embedding_size": 16}}))
    with pytest.raises(CheckpointError, match=r"best\.ckpt is from another model than config .*resnet\.yaml: "
                                              r"model\.backbone 'convnet4' in the checkpoint, 'resnet18'"):
        evaluation_config(straight / BEST, config=config)


# --------------------------------------------------------------------------- bad input
def make_folder(root: Path, classes: int = 12, per_class: int = 5, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / f"c{c:02d}" / f"{i}.png")
    return root


def folder_config(out: Path, path: Path, *overrides: str, dataset: str = "image_folder") -> RunConfig:
    data = {"dataset": dataset, "path": str(path), "channels": 1, "image_size": 16, "classes_per_batch": 2,
            "samples_per_class": 2, "val_class_fraction": 0.34}
    raw = {**TINY, "data": data, "eval": {"ks": [1, 2, 4]}, "train": {"epochs": 1, "seed": 0}}
    cfg = config_from_dict(raw, list(overrides))
    cfg.out_dir = str(out)
    return cfg


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_image_folder_run_and_truncated_image_raises_with_its_name(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images")
    result = Trainer(folder_config(tmp_path / "ok", root), progress=False).fit()
    assert result["splits"]["test_classes"] == 6 and result["splits"]["train_classes"] == 4
    bad = root / "c00" / "3.png"  # c00..c05 are the training classes (class order)
    truncate(bad)
    with pytest.raises(DataError, match=f"{bad}.*(corrupt or truncated|not a readable image)"):
        Trainer(folder_config(tmp_path / "bad", root), progress=False).fit()


def test_truncated_image_skipped_and_reported(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images")
    bad = root / "c07" / "1.png"
    truncate(bad)
    with pytest.warns(UserWarning, match="skipped 1 of 60"):
        cfg = folder_config(tmp_path / "run", root, "data.on_corrupt_image=skip")
        result = train(cfg, progress=False)
    assert result["skipped_images"][0]["path"] == str(bad)
    assert result["splits"]["skipped_images"] == 1
    assert result["splits"]["train_images"] + result["splits"]["val_images"] + result["splits"]["test_images"] == 59
    assert str(bad) in (tmp_path / "run" / "report.md").read_text()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "skipped_images" and e["files"][0]["path"] == str(bad) for e in events)


def test_missing_image_files_are_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images")
    os.symlink(root / "gone.png", root / "c03" / "9.png")  # a dangling link: listed, but no file
    with pytest.raises(DataError, match=f"do not exist: {root / 'c03' / '9.png'}"):
        build_splits(folder_config(tmp_path, root).data)
    rows = ["path,label"] + [f"{root}/c{c:02d}/{i}.png,{c}" for c in range(12) for i in range(5)]
    rows.insert(7, f"{root}/c01/missing.png,1")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"list\.csv, line 8: image file .*c01/missing\.png does not exist"):
        build_splits(folder_config(tmp_path, tmp_path / "list.csv", dataset="csv").data)
    with pytest.warns(UserWarning, match="skipped 1 of 61"):
        splits = build_splits(folder_config(tmp_path, tmp_path / "list.csv", "data.on_corrupt_image=skip",
                                            dataset="csv").data)
    assert [p for p, _ in splits.skipped] == [f"{root}/c01/missing.png"]


def test_class_with_one_image(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images")
    name = str(build_splits(folder_config(tmp_path, root).data).train.classes[1])
    for i in range(1, 5):
        (root / name / f"{i}.png").unlink()
    with pytest.raises(DataError, match=rf"1 training class\(es\) have a single image.*{name} \(.*{name}/0\.png\)"
                                        r".*single_image_classes: drop"):
        build_splits(folder_config(tmp_path, root).data)
    splits = build_splits(folder_config(tmp_path, root, "data.single_image_classes=drop").data)
    assert splits.dropped_classes == [name] and name not in [str(c) for c in splits.train.classes]
    assert splits.train.num_classes == 3


def test_empty_splits_are_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images", classes=1)
    with pytest.raises(DataError, match=r"images has 1 class\(es\): .*the train split is empty"):
        build_splits(folder_config(tmp_path, root).data)
    rows = ["path,label,split"] + [f"{root}/c00/{i}.png,0,train" for i in range(5)]
    (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"split\.csv: no rows with split 'test' \(splits found: train\)"):
        build_splits(folder_config(tmp_path, tmp_path / "split.csv", dataset="csv").data)
    with pytest.raises(DataError, match="the val split has 20 image.*in 1 class"):
        Trainer(tiny(tmp_path / "run", "data.max_classes=1", "data.classes_per_batch=2"), progress=False)


def test_config_typos_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({**TINY, "train": {"epochz": 3}}))
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown config key train\.epochz; accepted keys of train"):
        load_config(path)
    path.write_text(yaml.safe_dump(TINY))
    with pytest.raises(ConfigError, match=r"^--set: unknown config key data\.max_clases"):
        load_config(path, ["data.max_clases=3"])
    with pytest.raises(ConfigError, match=r"^--set: train\.epochs: expected an integer, got 'two'"):
        load_config(path, ["train.epochs=two"])
    with pytest.raises(ConfigError, match=r"eval\.select_metric: 'recall@3' is not one of"):
        load_config(path, ["eval.select_metric=recall@3"])
    with pytest.raises(ConfigError, match=r"loss\.miner: .*unknown parameter 'marg'"):
        Trainer(tiny(tmp_path, "loss.miner.params={marg: 0.1}"), progress=False)
    root = make_folder(tmp_path / "images", size=8)
    with pytest.raises(ConfigError, match=r"convnet4' cannot take images of shape \(1, 8, 8\) \(data.image_size=8"):
        Trainer(folder_config(tmp_path, root, "data.image_size=8"), progress=False)


def test_bad_image_mid_epoch_keeps_the_progress(tmp_path: Path, straight: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A data error while training saves the steps done so far; after the fix, resume is exact."""
    from dmlgen.engine import setup

    original = setup.SeededDataset.__getitem__
    count = {"n": 0}

    def getitem(self: Any, item: tuple[int, int]) -> Any:
        count["n"] += 1
        if count["n"] == 3 * 16 + 16 + 5:  # epoch 2, while loading its second batch
            raise DataError("image file /data/x.png cannot be decoded (corrupt or truncated)")
        return original(self, item)

    monkeypatch.setattr(setup.SeededDataset, "__getitem__", getitem)
    with pytest.raises(DataError, match=r"x\.png cannot be decoded.*\(epoch 2, step 1\) saved to .*last\.ckpt, "
                                        r"continue with: .*--resume"):
        run(tmp_path, *AUGMENT)
    saved = load_checkpoint(tmp_path / LAST)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 1)
    monkeypatch.undo()
    run(tmp_path, *AUGMENT, resume=True)
    assert_same_run(straight, tmp_path)


def test_resume_of_a_checkpoint_written_before_newer_config_keys(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A last.ckpt whose config predates keys added later (method, regularizers) holds their defaults, so it
    resumes; a real difference is still refused."""
    interrupt_at(monkeypatch, 4)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path)
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / LAST)
    for key in ("method", "regularizers"):
        ckpt["config"].pop(key, None)
    torch.save(ckpt, tmp_path / LAST)
    run(tmp_path, resume=True)
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 2
    interrupt_at(monkeypatch, 1)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "b")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="different config"):
        run(tmp_path / "b", "loss.params={margin: 0.3}", resume=True)
