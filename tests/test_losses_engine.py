"""The losses in the training engine: num_classes / embedding_size injection, the loss's own parameter group,
proxies and beta across checkpoint/resume, and every shipped Omniglot config building and training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dmlgen.engine.checkpoint import load_checkpoint
from dmlgen.engine.config import LossConfig, MinerConfig, OptimizerConfig, config_from_dict, load_config
from dmlgen.engine.setup import build_criterion, build_model_from_config, build_optimizer, build_regularizers
from dmlgen.engine.trainer import LAST, Trainer, TrainingInterrupted
from dmlgen.errors import ConfigError
from dmlgen.losses import (
    DistanceWeightedMiner,
    MarginLoss,
    NormalizedSoftmaxLoss,
    ProxyAnchorLoss,
    TripletMarginLoss,
)
from _fixtures import one_thread  # noqa: F401  (autouse: every test here runs on one thread)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "omniglot").glob("*.yaml"))

# Small enough for about a second per run on 2 CPU cores (the pattern of tests/test_trainer.py).
TINY_OVERRIDES = [
    "data.max_classes=8", "data.classes_per_batch=4", "data.samples_per_class=4", "model.embedding_size=16",
    "train.epochs=1", "train.max_steps_per_epoch=2",
]


# --------------------------------------------------------------------------- build_criterion
def test_per_class_parameters_are_filled_in() -> None:
    pa = build_criterion(LossConfig(name="proxy_anchor", params={"margin": 0.2}), num_classes=11, embedding_size=24)
    assert isinstance(pa.loss, ProxyAnchorLoss) and pa.loss.proxies.shape == (11, 24) and pa.loss.margin == 0.2
    ns = build_criterion(LossConfig(name="normalized_softmax"), num_classes=5, embedding_size=8)
    assert isinstance(ns.loss, NormalizedSoftmaxLoss) and ns.loss.proxies.shape == (5, 8)
    margin = build_criterion(
        LossConfig(name="margin", miner=MinerConfig("distance_weighted", {"layout": "one_per_anchor"})),
        num_classes=7, embedding_size=16,
    )
    assert isinstance(margin.loss, MarginLoss) and margin.loss.beta.shape == (7,)
    assert isinstance(margin.miner, DistanceWeightedMiner) and margin.miner.layout == "one_per_anchor"
    # `num_classes: null` keeps one shared beta; a matching value is accepted; losses without the
    # parameters are untouched.
    shared = build_criterion(LossConfig(name="margin", params={"num_classes": None}), num_classes=7)
    assert shared.loss.beta.shape == (1,)
    same = build_criterion(LossConfig(name="proxy_anchor", params={"num_classes": 7, "embedding_size": 16}),
                           num_classes=7, embedding_size=16)
    assert same.loss.proxies.shape == (7, 16)
    assert isinstance(build_criterion(LossConfig(), num_classes=7, embedding_size=16).loss, TripletMarginLoss)


@pytest.mark.parametrize("name", ["proxy_anchor", "normalized_softmax", "margin"])
def test_configured_num_classes_that_differs_names_both_numbers(name: str) -> None:
    with pytest.raises(ConfigError, match=r"loss\.params\.num_classes: 100 is configured but the training split "
                                          r"has 824"):
        build_criterion(LossConfig(name=name, params={"num_classes": 100}), num_classes=824, embedding_size=128)


def test_configured_embedding_size_that_differs_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"loss\.params\.embedding_size: 64 .* model\.embedding_size is 128"):
        build_criterion(LossConfig(name="proxy_anchor", params={"embedding_size": 64}), num_classes=5,
                        embedding_size=128)


def test_without_an_embedding_size_a_proxy_loss_asks_for_one() -> None:
    with pytest.raises(ConfigError, match="embedding_size"):
        build_criterion(LossConfig(name="proxy_anchor"), num_classes=5)


# --------------------------------------------------------------------------- optimizer groups
def _model() -> Any:
    cfg = config_from_dict({"model": {"backbone": "convnet4", "embedding_size": 16}}).model
    return build_model_from_config(cfg, in_channels=1)


@pytest.mark.parametrize("loss_cfg,shape", [
    (LossConfig(name="proxy_anchor", lr=0.05), (6, 16)),
    (LossConfig(name="normalized_softmax", lr=0.05), (6, 16)),
    (LossConfig(name="margin", lr=0.05), (6,)),
])
def test_loss_parameters_get_their_own_lr_and_no_weight_decay(loss_cfg: LossConfig, shape: tuple[int, ...]) -> None:
    model = _model()
    criterion = build_criterion(loss_cfg, num_classes=6, embedding_size=16)
    for name in ("adam", "adamw", "sgd"):
        opt = build_optimizer(OptimizerConfig(name=name, lr=1e-3, weight_decay=1e-4), model, criterion,
                              loss_lr=loss_cfg.lr)
        groups = {g["name"]: g for g in opt.param_groups}
        loss_group = groups["loss"]
        assert loss_group["lr"] == 0.05 and loss_group["weight_decay"] == 0.0
        assert [tuple(p.shape) for p in loss_group["params"]] == [shape]
        assert groups["head"]["lr"] == 1e-3 and groups["head"]["weight_decay"] == 1e-4
        loss_ids = {id(p) for p in loss_group["params"]}
        assert all(id(p) not in loss_ids for g in opt.param_groups if g["name"] != "loss" for p in g["params"])
    # Without loss.lr: the model's learning rate, still no weight decay.
    opt = build_optimizer(OptimizerConfig(lr=2e-3, weight_decay=1e-4), model, criterion, loss_lr=None)
    group = next(g for g in opt.param_groups if g["name"] == "loss")
    assert group["lr"] == 2e-3 and group["weight_decay"] == 0.0


def test_fixed_beta_is_not_optimised() -> None:
    criterion = build_criterion(LossConfig(name="margin", params={"learn_beta": False}), num_classes=6)
    opt = build_optimizer(OptimizerConfig(), _model(), criterion, loss_lr=0.1)
    assert "loss" not in {g["name"] for g in opt.param_groups}


# --------------------------------------------------------------------------- resume
def _tiny(out: Path, loss: dict[str, Any], *overrides: str) -> Any:
    data = {
        "name": "tiny",
        "data": {"dataset": "omniglot", "max_classes": 8, "classes_per_batch": 4, "samples_per_class": 4},
        "model": {"backbone": "convnet4", "embedding_size": 16},
        "loss": loss,
        "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0001},
        "scheduler": {"name": "cosine"},
        "train": {"epochs": 2, "max_steps_per_epoch": 3, "seed": 0},
    }
    cfg = config_from_dict(data, list(overrides))
    cfg.out_dir = str(out)
    return cfg


LOSSES_WITH_STATE = {
    "proxy_anchor": ({"name": "proxy_anchor", "lr": 0.01}, "loss.proxies"),
    "margin": ({"name": "margin", "lr": 0.01,
                "miner": {"name": "distance_weighted", "params": {"layout": "one_per_anchor"}}}, "loss.beta"),
}


@pytest.mark.parametrize("which", sorted(LOSSES_WITH_STATE))
def test_proxies_and_beta_survive_resume(which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loss, key = LOSSES_WITH_STATE[which]
    straight = tmp_path / "straight"
    trainer = Trainer(_tiny(straight, loss), progress=False)
    initial = trainer.criterion.state_dict()[key].clone()
    trainer.fit()
    resumed = tmp_path / "resumed"
    original = Trainer._train_step
    count = {"n": 0}

    def step(self: Trainer, images: torch.Tensor, labels: torch.Tensor) -> Any:
        count["n"] += 1
        if count["n"] == 5:  # after one step of epoch 2
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(Trainer, "_train_step", step)
    with pytest.raises(TrainingInterrupted):
        Trainer(_tiny(resumed, loss), progress=False).fit()
    monkeypatch.undo()
    saved = load_checkpoint(resumed / LAST)["criterion"][key]
    assert not torch.equal(saved, initial)  # the interrupted run had trained them
    Trainer(_tiny(resumed, loss), progress=False, pretrained=False).fit(resume=True)
    a, b = load_checkpoint(straight / LAST), load_checkpoint(resumed / LAST)
    assert a["criterion"].keys() == b["criterion"].keys()
    assert torch.equal(a["criterion"][key], b["criterion"][key])
    assert not torch.equal(a["criterion"][key], initial)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    # The loss group's optimiser state came back too (its Adam moments).
    loss_index = [g["name"] for g in a["optimizer"]["param_groups"]].index("loss")
    pid = a["optimizer"]["param_groups"][loss_index]["params"][0]
    assert torch.equal(a["optimizer"]["state"][pid]["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"])


def test_resume_with_a_different_num_classes_is_refused(tmp_path: Path) -> None:
    loss = {"name": "proxy_anchor", "lr": 0.01}
    Trainer(_tiny(tmp_path, loss, "train.epochs=1"), progress=False).fit()
    with pytest.raises(Exception, match="max_classes|num_classes|size mismatch"):
        Trainer(_tiny(tmp_path, loss, "train.epochs=2", "data.max_classes=6"), progress=False,
                pretrained=False).fit(resume=True)


# --------------------------------------------------------------------------- shipped configs
def test_every_new_loss_has_a_config() -> None:
    names = {path.stem for path in CONFIGS}
    assert {"contrastive", "triplet_batch_hard", "triplet_distance_weighted", "margin", "proxy_anchor",
            "normalized_softmax", "triplet_semihard", "multi_similarity"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_criterion_and_trains_two_steps(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.loss.name == raw["loss"]["name"]
    # The full-size criterion, as the trainer builds it for Omniglot's 824 training classes.
    criterion = build_criterion(cfg.loss, num_classes=824, embedding_size=cfg.model.embedding_size)
    build_regularizers(cfg.regularizers)
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(128, cfg.model.embedding_size, generator=g), dim=1)
    emb.requires_grad_(True)
    labels = torch.arange(32).repeat_interleave(4) * 25  # 32 of the 824 classes
    value = criterion(emb, labels)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0 and emb.grad.abs().sum() > 0
    # Two tiny training steps through the real engine.
    tiny = load_config(path, TINY_OVERRIDES)
    tiny.out_dir = str(tmp_path)
    from dmlgen.engine.pipeline import is_pipeline

    if is_pipeline(tiny):  # a multi-stage method (guided, slade) trains stage by stage: its own test file
        return
    result = Trainer(tiny, progress=False).fit()
    assert 0.0 <= result["test"]["recall@1"] <= 1.0
    history = load_checkpoint(tmp_path / LAST)["history"]
    assert len(history) == 1 and history[0]["train_steps"] == 2
