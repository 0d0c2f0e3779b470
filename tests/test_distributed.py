"""Distributed training on CPU (gloo): sharding, the differentiable gather, SyncBatchNorm, equivalence of one process
with batch B and two processes with B/2 each, failures (a dying rank, another world size on resume), torchrun.

Multi-process tests start their ranks with the ``spawn`` method (fresh interpreters, as torchrun does) on a small
synthetic ``.npz`` data set, so that no rank spends seconds loading Omniglot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from dmlgen.data.samplers import ClassBalancedBatchSampler, ShardedBatchSampler, shard_batch
from dmlgen.engine.checkpoint import atomic_save, load_checkpoint
from dmlgen.engine.config import config_from_dict
from dmlgen.engine.setup import SeededBatches, build_sampler
from dmlgen.errors import CheckpointError, ConfigError
from _dist_ranks import WORKER_TIMEOUT, collectives_case, collectives_data, on_rank1, run_ranks, train_and_record
from _fixtures import one_thread  # noqa: F401  (autouse: every test here runs on one thread)

REPO = Path(__file__).resolve().parents[1]
PYTHON_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- helpers
def make_npz(path: Path, classes: int = 32, per_class: int = 12, seed: int = 0) -> Path:
    """Synthetic 28 x 28 grey images: a random blob pattern per class plus noise (loads in milliseconds)."""
    rng = np.random.default_rng(seed)
    protos = rng.random((classes, 28, 28)) > 0.7
    images = np.repeat(protos, per_class, axis=0).astype(np.float32)
    images = np.clip(images * 0.8 + rng.random(images.shape) * 0.3, 0, 1)
    labels = np.repeat(np.arange(classes), per_class)
    np.savez(path, images=(images * 255).astype(np.uint8), labels=labels)
    return path


def base_config(npz: Path) -> dict[str, Any]:
    """16 training, 4 validation and 16 test classes; batches of 4 classes x 4 images."""
    return {
        "name": "dist",
        "data": {"dataset": "npz", "path": str(npz), "train_class_fraction": 0.5, "val_class_fraction": 0.25,
                 "classes_per_batch": 4, "samples_per_class": 4,
                 "train_transforms": {"rotation_degrees": 10, "translate": 0.1}},
        "model": {"backbone": "convnet4", "embedding_size": 16},
        "loss": {"name": "triplet_margin", "params": {"margin": 0.2},
                 "miner": {"name": "triplet_margin", "params": {"margin": 0.2, "type_of_triplets": "semihard"}}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "scheduler": {"name": "cosine"},
        "train": {"epochs": 2, "max_steps_per_epoch": 2, "seed": 0, "device": "cpu"},
        "eval": {"batch_size": 64},
    }


def rich_config(npz: Path) -> dict[str, Any]:
    """Everything whose distributed version needs care: BatchNorm in backbone and head, MDR's mean-distance
    scaling of the batch, a loss with learnable per-class β, a random miner, MDR (learnable levels, running
    statistics) and LSD (teacher embeddings, from epoch 2), per-image augmentation. No validation split: the
    last epoch is selected, so that a flipped near-tie in validation cannot select another epoch."""
    cfg = base_config(npz)
    cfg["data"]["val_class_fraction"] = 0.0
    cfg["model"] = {"backbone": "convnet4", "embedding_size": 16, "head_hidden": [32], "normalize": False,
                    "scale_by_mean_distance": True}
    cfg["loss"] = {"name": "margin", "params": {"margin": 0.2, "beta": 1.2, "learn_beta": True},
                   "miner": {"name": "distance_weighted", "params": {"lower": 0.5, "upper": 1.4}}, "lr": 0.01}
    cfg["regularizers"] = [{"name": "mdr", "weight": 0.2}, {"name": "lsd", "weight": 5.0}]
    return cfg


def assert_close_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, what: str) -> None:
    """Every float tensor close to ``rtol`` relative to its own scale and to the largest value in ``b``: a conv
    bias before BatchNorm has a gradient that is 0 in exact arithmetic and only rounding noise (~1e-6) here."""
    assert a.keys() == b.keys(), what
    scale = max(float(v.abs().max()) for v in b.values() if v.is_floating_point() and v.numel())
    for key in a:
        if not a[key].is_floating_point():
            assert torch.equal(a[key], b[key]), f"{what} {key}"
        else:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=rtol * scale,
                                       msg=lambda m: f"{what} {key}: {m}")


# --------------------------------------------------------------------------- sharding (one process)
def test_shard_batch_gives_each_rank_whole_classes_in_order() -> None:
    labels = np.repeat(np.arange(10), 6)
    sampler = ClassBalancedBatchSampler(labels, classes_per_batch=4, samples_per_class=3, seed=1)
    for batch in sampler.batches(0):
        parts = [shard_batch(batch, r, 2, 3) for r in range(2)]
        assert parts[0] + parts[1] == batch  # rank order is the global batch order
        classes = [set(labels[p].tolist()) for p in parts]
        assert len(classes[0]) == len(classes[1]) == 2 and not classes[0] & classes[1]
        for part in parts:  # m images of each of its classes
            assert sorted(np.bincount(labels[part]).tolist())[-2:] == [3, 3]


def test_shard_batch_refuses_to_split_a_class() -> None:
    with pytest.raises(ConfigError, match=r"12 images \(4 classes x 3\).*3 parts.*multiple"):
        shard_batch(list(range(12)), 0, 3, 3)


def test_sharded_batch_sampler_ranks_see_disjoint_parts_and_share_state() -> None:
    labels = np.repeat(np.arange(12), 5)
    shards = [ShardedBatchSampler(ClassBalancedBatchSampler(labels, 4, 2, seed=3), r, 2) for r in range(2)]
    whole = ClassBalancedBatchSampler(labels, 4, 2, seed=3)
    for s in shards:
        s.set_epoch(1)
    whole.set_epoch(1)
    got = [list(s) for s in shards]
    assert len(got[0]) == len(got[1]) == len(whole)
    for a, b, batch in zip(got[0], got[1], whole):
        assert a + b == batch and not set(a) & set(b)
    assert shards[0].state_dict() == whole.state_dict()  # the position counts global batches
    with pytest.raises(ConfigError, match="classes_per_batch=4 is not a multiple of the 3 processes"):
        ShardedBatchSampler(whole, 0, 3)


def test_build_sampler_names_the_key_when_the_batch_cannot_be_shared(tmp_path: Path) -> None:
    cfg = config_from_dict(base_config(tmp_path / "x.npz"), ["data.classes_per_batch=6"])
    with pytest.raises(ConfigError, match=r"data.classes_per_batch=6 cannot be shared by 4 processes"):
        build_sampler(cfg.data, np.repeat(np.arange(10), 4), seed=0, world_size=4)


def test_seeded_batches_shards_keep_the_global_images_and_seeds() -> None:
    labels = np.repeat(np.arange(8), 4)
    sampler = ClassBalancedBatchSampler(labels, 4, 2, seed=0)
    whole = list(SeededBatches(sampler, seed=5, epoch=2, start_batch=1, num_batches=3))
    parts = [list(SeededBatches(sampler, seed=5, epoch=2, start_batch=1, num_batches=3, rank=r, world_size=2))
             for r in range(2)]
    assert len(whole) == 2
    assert [a + b for a, b in zip(*parts)] == whole  # same (index, augmentation seed) pairs, split in two


# --------------------------------------------------------------------------- failures caught in one process
def test_resume_with_another_world_size_is_a_clear_error(tmp_path: Path) -> None:
    from dmlgen.engine.trainer import LAST, Trainer

    cfg = config_from_dict(base_config(make_npz(tmp_path / "d.npz")), ["train.epochs=1", "train.max_steps_per_epoch=1"])
    cfg.out_dir = str(tmp_path / "run")
    Trainer(cfg, progress=False).fit()
    ckpt = load_checkpoint(tmp_path / "run" / LAST)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 2  # as if written by `torchrun --nproc_per_node=2`
    atomic_save(ckpt, tmp_path / "run" / LAST)
    with pytest.raises(CheckpointError, match=r"last.ckpt was written by a run of 2 process\(es\) and this run has "
                                              r"1; resume with the same number \(torchrun --nproc_per_node=2\)"):
        Trainer(cfg, progress=False, pretrained=False).fit(resume=True)


def test_distributed_training_refuses_a_method_with_its_own_step(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import dmlgen.engine.trainer as trainer_module
    from dmlgen.engine.distributed import DistContext

    # Rank 0 of 2 without a real group: the check comes before any collective but main_first's barrier.
    monkeypatch.setattr(trainer_module, "init_distributed",
                        lambda name: (DistContext(rank=0, world_size=2, backend="gloo"), torch.device("cpu")))
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    cfg = config_from_dict(base_config(make_npz(tmp_path / "d.npz")), ["method.name=sharing"])
    cfg.out_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="method.name 'sharing' has its own training step, which distributed "
                                          "training does not support yet"):
        trainer_module.Trainer(cfg, progress=False)


def test_multi_stage_methods_are_refused_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dmlgen.engine.pipeline as pipeline
    from dmlgen.engine.run import train

    monkeypatch.setattr(pipeline, "is_pipeline", lambda cfg: True)  # as for Guided DML or SLADE
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets
    cfg = config_from_dict(base_config(tmp_path / "d.npz"))
    with pytest.raises(ConfigError, match="trains in several stages, which distributed training does not support"):
        train(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- collectives (two processes)
def test_gather_with_grad_and_sync_batchnorm_match_one_process(tmp_path: Path) -> None:
    from torch import nn

    x, weight = collectives_data()
    x = x.clone().requires_grad_(True)
    bn = nn.BatchNorm2d(2)
    loss = (bn(x).mean(dim=(2, 3)) * weight).pow(2).sum()
    loss.backward()
    ranks = run_ranks(tmp_path, collectives_case, ())
    for r, got in enumerate(ranks):
        assert got["exitcode"] == 0, got.get("error")
        value = got["value"]
        torch.testing.assert_close(value["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        # Each rank's input gradient is its rows of the single-process gradient, W times: DDP divides by W.
        torch.testing.assert_close(value["x_grad"], 2 * x.grad[r * 3: (r + 1) * 3], rtol=1e-4, atol=1e-6)
        for mine, single in zip(value["bn_grad"], bn.parameters()):
            torch.testing.assert_close(mine, single.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(value["running"][0], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(value["running"][1], bn.running_var, rtol=1e-5, atol=1e-6)
        assert value["rows"].tolist() == [0, 1, 0, 1, 2]  # 2 rows from rank 0, 3 from rank 1, in rank order
        assert value["any"] == (True, False)


# --------------------------------------------------------------------------- training: 1 x B vs 2 x B/2
# Weights, losses and gradients agree to ~1e-7 relative (summation order). Retrieval metrics are step functions
# of neighbour ranks, and in these tiny embedding spaces neighbour distances come within 1e-7 of each other, so
# across the two trainings a metric may move by a flipped near-tie: METRIC_TOL is a few flips of 1 / queries.
METRIC_TOL = 0.02
@pytest.fixture(scope="module")
def equivalence(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The rich config trained by one process (batch 16) and by two gloo processes (8 each)."""
    tmp = tmp_path_factory.mktemp("equivalence")
    cfg = rich_config(make_npz(tmp / "d.npz"))
    single = train_and_record(cfg, tmp / "single")
    ranks = run_ranks(tmp, train_and_record, (cfg, tmp / "dist"))
    for got in ranks:
        assert got["exitcode"] == 0, got.get("error")
    return {"tmp": tmp, "cfg": cfg, "single": single, "ranks": [r["value"] for r in ranks]}


@pytest.mark.slow
def test_two_processes_with_half_batches_equal_one_process(equivalence: dict[str, Any]) -> None:
    single, (rank0, rank1) = equivalence["single"], equivalence["ranks"]
    assert single["world_size"] == 1 and rank0["world_size"] == rank1["world_size"] == 2
    # The replicas stay identical (DDP average, SyncBatchNorm, averaged loss and regularizer gradients).
    for part in ("model", "criterion", "regularizers"):
        for key in rank0[part]:
            assert torch.equal(rank0[part][key], rank1[part][key]), f"{part}.{key} differs between the ranks"
    # Same first-step gradients: backbone, head (BatchNorm), margin β and MDR levels.
    assert any(k.startswith("criterion.") for k in single["grads"]) and "regularizers.mdr.levels" in single["grads"]
    assert_close_dicts(rank0["grads"], single["grads"], rtol=1e-4, what="first-step gradient")
    # Same losses per epoch (epoch 2 includes LSD with the gathered teacher embeddings).
    assert len(single["history"]) == len(rank0["history"]) == 2
    for mine, theirs in zip(rank0["history"], single["history"]):
        assert mine["train_lsd"] > 0 if mine["epoch"] == 2 else "train_lsd" not in mine
        assert mine["images_per_second"] > 0 and mine["train_steps"] == theirs["train_steps"] == 2
        for key in ("train_loss", "train_mdr", "train_lsd"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    # Same weights after 4 SGD steps, MDR running statistics and β.
    assert_close_dicts(rank0["model"], single["model"], rtol=1e-4, what="final weights")
    assert_close_dicts(rank0["criterion"], single["criterion"], rtol=1e-4, what="criterion")
    assert_close_dicts(rank0["regularizers"], single["regularizers"], rtol=1e-4, what="regularizers")
    # Same test metrics, up to near-ties; every rank returns rank 0's result.
    assert rank0["result"]["test"] == pytest.approx(single["result"]["test"], abs=METRIC_TOL)
    assert rank0["result"]["selected_epoch"] == single["result"]["selected_epoch"] == 2
    assert rank1["result"] == rank0["result"]
    assert rank0["result"]["test"]["num_queries"] == 192


@pytest.mark.slow
def test_distributed_evaluation_equals_one_process_on_the_same_weights(equivalence: dict[str, Any]) -> None:
    """The ranks embed halves of the test split, gather them in order, rank 0 scores them: the metrics are those
    of one process embedding the whole split with the same weights."""
    from dmlgen.engine.run import embed_split
    from dmlgen.evaluation.evaluate import evaluate_embeddings

    run = equivalence["tmp"] / "dist"
    emb, labels, _ = embed_split(run / "best.ckpt", "test")
    cfg = config_from_dict(equivalence["cfg"])
    expected = evaluate_embeddings(emb, labels, metrics=cfg.eval.test_metrics, ks=tuple(cfg.eval.ks),
                                   metric=cfg.eval.distance, seed=cfg.train.seed)
    assert equivalence["ranks"][0]["result"]["test"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_only_rank_zero_writes_and_checkpoints_store_the_world_size(equivalence: dict[str, Any]) -> None:
    run = equivalence["tmp"] / "dist"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2  # one writer, not one per rank
    assert len([e for e in events if e["event"] == "epoch"]) == 2
    assert load_checkpoint(run / "last.ckpt")["world_size"] == 2
    # The saved weights are plain BatchNorm keys: a single process loads the model without any distributed setup.
    from dmlgen.engine.run import load_trained_model

    model, _ = load_trained_model(run / "best.ckpt")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.slow
def test_a_stop_on_one_rank_or_a_dying_rank_stops_the_job_cleanly_and_the_run_resumes(
        equivalence: dict[str, Any]) -> None:
    tmp, cfg = equivalence["tmp"], equivalence["cfg"]
    out, ranks_dir = tmp / "failures", tmp / "failure_ranks"
    ranks_dir.mkdir()
    # 1. Ctrl-C (or torchrun's SIGTERM) reaches rank 1 only, during global step 3: both ranks stop after that
    #    step, rank 0 saves it, neither waits for the other.
    ranks = run_ranks(ranks_dir, on_rank1, (cfg, out, False, "stop", 3))
    assert [r["exitcode"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["error"].startswith("TrainingInterrupted: interrupted at epoch 2/2, step 1/2; state saved to "), r
    assert load_checkpoint(out / "last.ckpt")["global_step"] == 3
    # 2. Resumed, rank 1 dies when step 4 starts: rank 0 stops with a clear error instead of hanging, and
    #    last.ckpt stays as saved.
    ranks = run_ranks(ranks_dir, on_rank1, (cfg, out, True, "die", 4))
    assert ranks[1]["exitcode"] == 17  # killed mid-step, no cleanup
    assert ranks[0]["exitcode"] == 2
    message = ranks[0]["error"]
    assert message.startswith("RankFailure: process 0 of 2: a collective failed at epoch 2, step 2"), message
    assert "last.ckpt holds the state of the last save (global step 3)" in message and "RESUME" in message
    assert load_checkpoint(out / "last.ckpt")["global_step"] == 3
    # 3. Both ranks resume from the same last.ckpt; the run ends exactly as the uninterrupted two-process run.
    resumed = run_ranks(ranks_dir, train_and_record, (cfg, out, True))
    assert [r["exitcode"] for r in resumed] == [0, 0], [r.get("error") for r in resumed]
    reference, got = equivalence["ranks"][0], resumed[0]["value"]
    assert got["result"]["test"] == reference["result"]["test"]
    for key in reference["model"]:
        assert torch.equal(got["model"][key], reference["model"][key]), key


# --------------------------------------------------------------------------- torchrun + CLI
@pytest.mark.slow
@pytest.mark.skipif(not (PYTHON_BIN / "torchrun").exists(), reason="torchrun is not installed next to python")
def test_torchrun_cli_trains_like_one_process(tmp_path: Path) -> None:
    from dmlgen.engine.run import train

    cfg = base_config(make_npz(tmp_path / "d.npz"))
    cfg["train"]["epochs"] = 1  # the selected epoch is 1 in both runs, whatever near-ties do in validation
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [str(PYTHON_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "dmlgen.cli", "train",
               str(config), "--out", str(tmp_path / "dist"), "--no-progress"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test: ") == 1  # only rank 0 prints
    dist_result = json.loads((tmp_path / "dist" / "test_metrics.json").read_text())
    assert (tmp_path / "dist" / "report.md").is_file()
    single = train(config, out_dir=tmp_path / "single", progress=False)
    assert dist_result["selected_epoch"] == single["selected_epoch"] == 1
    assert dist_result["val_score"] == pytest.approx(single["val_score"], abs=METRIC_TOL)
    assert dist_result["test"] == pytest.approx(single["test"], abs=METRIC_TOL)
