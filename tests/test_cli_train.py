"""``dmlgen train``, ``dmlgen evaluate --checkpoint``, ``dmlgen embed`` and ``dmlgen report`` on tiny Omniglot runs."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from dmlgen.cli import main
from dmlgen.engine.checkpoint import load_checkpoint
from dmlgen.engine.trainer import Trainer
from _fixtures import one_thread  # noqa: F401  (autouse: every test here runs on one thread)

TINY: dict[str, Any] = {
    "name": "tiny",
    "out_dir": "runs/should-not-be-used",
    "data": {"dataset": "omniglot", "max_classes": 8, "classes_per_batch": 4, "samples_per_class": 4},
    "model": {"backbone": "convnet4", "embedding_size": 16},
    "loss": {"name": "multi_similarity", "params": {"alpha": 2.0, "beta": 50.0, "base": 0.5},
             "miner": {"name": "multi_similarity", "params": {"epsilon": 0.1}}},
    "train": {"epochs": 2, "max_steps_per_epoch": 3},
}



@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def trained(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(config), "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    return err


def _metrics_from_stdout(out: str) -> dict[str, float]:
    values = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return values


# --------------------------------------------------------------------------- train
def test_help_lists_the_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "evaluate", "embed", "report", "demo"))
    assert main(["train", "--help"]) == 0
    assert "--resume" in capsys.readouterr().out


def test_train_writes_the_run_folder(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = {p.name for p in trained.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "epochs.csv", "last.ckpt", "best.ckpt", "test_metrics.json",
            "report.md"} <= names
    assert not Path("runs/should-not-be-used").exists()  # --out wins over the config's out_dir
    result = json.loads((trained / "test_metrics.json").read_text())
    assert result["test"]["num_queries"] == 160 and 0 < result["test"]["map@r"] <= 1
    assert yaml.safe_load((trained / "config.yaml").read_text())["out_dir"] == str(trained)


def test_train_prints_test_metrics(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--set", "train.epochs=1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "test_metrics.json").read_text())
    assert _metrics_from_stdout(printed)["recall@1"] == pytest.approx(result["test"]["recall@1"], abs=5e-5)
    assert "160 images of 8 unseen classes" in printed and f"wrote {out / 'test_metrics.json'}" in printed


def test_ctrl_c_exits_130_with_a_resume_command_that_works(config: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    original = Trainer._train_step
    count = {"n": 0}

    def step(self: Trainer, images: torch.Tensor, labels: torch.Tensor) -> float:
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(Trainer, "_train_step", step)
    out = tmp_path / "run"
    args = ["train", str(config), "--set", "train.seed=3", "--out", str(out), "--no-progress"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted at epoch 1/2, step 1/3" in err and f"state saved to {out / 'last.ckpt'}" in err
    command = err.split("continue with: ")[1].strip()
    assert command == shlex.join(["dmlgen", "train", str(config), "--set", "train.seed=3", "--out", str(out),
                                  "--resume"])
    assert not (out / "test_metrics.json").exists()
    monkeypatch.undo()
    assert main(shlex.split(command)[1:] + ["--no-progress"]) == 0
    assert load_checkpoint(out / "last.ckpt")["global_step"] == 6
    # evaluate --checkpoint defaults to the run's seed (3), so k-means gives the run's NMI and AMI.
    assert main(["evaluate", "--checkpoint", str(out / "best.ckpt"), "--metrics", "nmi,ami", "--json",
                 str(tmp_path / "e.json"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "e.json").read_text())
    expected = json.loads((out / "test_metrics.json").read_text())["test"]
    assert saved["settings"]["seed"] == 3
    assert saved["metrics"]["nmi"] == pytest.approx(expected["nmi"], abs=1e-9)


def test_train_input_errors(config: Path, trained: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({**TINY, "model": {"backbone": "convnet4", "embeding_size": 16}}))
    assert main(["train", str(typo), "--out", str(tmp_path / "a")]) == 2
    assert f"{typo}: unknown config key model.embeding_size" in _error(capsys)
    cases = [
        (["--set", "train.epochz=1"], "--set: unknown config key train.epochz; accepted keys of train"),
        (["--set", "train.epochs=1.5"], "--set: train.epochs: expected an integer, got 1.5"),
        (["--set", "data.on_corrupt_image=ignore"], "data.on_corrupt_image: 'ignore' is not one of 'raise', 'skip'"),
        (["--set", "train.epochs"], "--set 'train.epochs': expected key=value"),
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
        (["--set", "model.backbone=resnet1"], "unknown backbone 'resnet1'"),
    ]
    for extra, message in cases:
        assert main(["train", str(config), "--out", str(tmp_path / "b"), *extra]) == 2, extra
        assert message in _error(capsys), extra
    assert main(["train", str(config), "--out", str(trained)]) == 2
    assert f"{trained} already holds a run (last.ckpt); continue it with --resume" in _error(capsys)
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read config file" in _error(capsys)


# --------------------------------------------------------------------------- evaluate / embed
def test_evaluate_checkpoint_reproduces_the_test_metrics(trained: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(trained / "best.ckpt"), "--json", str(out_json),
                 "--no-progress"]) == 0
    assert "omniglot test split, 160 images (16-d, 8 classes)" in capsys.readouterr().out
    saved = json.loads(out_json.read_text())
    expected = json.loads((trained / "test_metrics.json").read_text())["test"]
    assert saved["metrics"].keys() == expected.keys()
    for key, value in expected.items():
        assert saved["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert saved["inputs"]["split"] == "test" and saved["settings"]["ks"] == [1, 2, 4, 8]


def test_evaluate_checkpoint_options(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(trained / "last.ckpt"), "--split", "val", "--dataset", "omniglot",
                 "--set", "data.max_classes=4", "--k", "1,3", "--metrics", "recall,map@r", "--distance", "cosine",
                 "--json", str(out_json), "--no-progress"]) == 0
    saved = json.loads(out_json.read_text())
    assert set(saved["metrics"]) == {"num_queries", "recall@1", "recall@3", "map@r", "num_lone_queries"}
    assert saved["metrics"]["num_queries"] == 80 and saved["settings"]["distance"] == "cosine"


def test_embed_writes_npz_that_evaluate_reads(trained: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    npz = tmp_path / "sub" / "test.npz"
    assert main(["embed", "--checkpoint", str(trained / "best.ckpt"), "--out", str(npz), "--no-progress"]) == 0
    assert f"wrote {npz}: 160 embeddings (16-d)" in capsys.readouterr().out
    with np.load(npz, allow_pickle=False) as data:
        assert data["embeddings"].shape == (160, 16) and data["embeddings"].dtype == np.float32
        assert data["labels"].shape == (160,) and set(data["labels"].tolist()) == set(range(8))
        assert data["classes"].min() == 964 and len(set(data["classes"].tolist())) == 8  # global Omniglot ids
    out_json = tmp_path / "files.json"
    assert main(["evaluate", str(npz), str(npz), "--embeddings-key", "embeddings", "--labels-key", "labels",
                 "--json", str(out_json)]) == 0
    expected = json.loads((trained / "test_metrics.json").read_text())["test"]
    assert json.loads(out_json.read_text())["metrics"]["map@r"] == pytest.approx(expected["map@r"], abs=1e-6)


def test_checkpoint_errors(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    best = str(trained / "best.ckpt")
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "model": {"backbone": "convnet4", "embedding_size": 32}}))
    assert main(["evaluate", "--checkpoint", best, "--config", str(other)]) == 2
    assert (f"checkpoint {best} is from another model than config {other}: model.embedding_size 16 in the "
            "checkpoint, 32 in the config") in _error(capsys)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert main(["embed", "--checkpoint", str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "e.npz")]) == 2
    assert f"{tmp_path / 'foreign.pt'} is not a dmlgen checkpoint" in _error(capsys)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt does not exist" in _error(capsys)
    assert main(["evaluate", "emb.npy", "labels.npy", "--checkpoint", best]) == 2
    assert "give no EMBEDDINGS / LABELS files" in _error(capsys)
    assert main(["evaluate", "--set", "data.max_classes=3"]) == 2
    assert "--set need --checkpoint" in _error(capsys)
    assert main(["evaluate", "--checkpoint", best, "--set", "data.max_clases=3"]) == 2
    assert "--set: unknown config key data.max_clases" in _error(capsys)
    assert main(["embed", "--checkpoint", best]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err


def test_report_rebuilds_report_md(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (trained / "report.md").read_text()
    (trained / "report.md").unlink()
    assert main(["report", str(trained)]) == 0
    assert (trained / "report.md").read_text() == before
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a finished training run" in _error(capsys)


# --------------------------------------------------------------------------- the installed command
@pytest.mark.slow
def test_installed_train_command_survives_a_real_ctrl_c(config: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "dmlgen"
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(script), "train", str(config), "--out", str(out), "--no-progress", "--set", "train.epochs=200",
            "--set", "data.num_workers=2"]
    # A session of its own: Ctrl-C in a terminal signals the whole process group, loader workers included.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.ckpt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.2)
        time.sleep(0.5)  # into the next epoch, with its workers running
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "continue with: " in err
    saved = load_checkpoint(out / "last.ckpt")
    command = shlex.split(err.split("continue with: ")[1].strip())
    assert command[-1] == "--resume"
    # Resume, finishing one epoch later (train.epochs may change on resume).
    done = subprocess.run([str(script), *command[1:], "--set", f"train.epochs={saved['epoch'] + 1}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "recall@1" in done.stdout and (out / "test_metrics.json").exists()
    assert len(load_checkpoint(out / "last.ckpt")["history"]) == saved["epoch"] + 1
