"""The multi-stage runner (dmlgen.engine.pipeline): stage order, skipping, make-like invalidation by config and
output hashes, derived artefacts that outlive their producer, resume of interrupted task and train stages,
and the top-level run folder. Toy task stages around one tiny Omniglot training stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dmlgen.engine.checkpoint import load_checkpoint
from dmlgen.engine.config import RunConfig, config_from_dict
from dmlgen.engine.pipeline import PIPELINE_FILE, STAGE_FILE, config_sha256, is_pipeline, run_stages, stage_record
from dmlgen.engine.trainer import LAST, Trainer, TrainingInterrupted
from dmlgen.errors import CheckpointError, ConfigError
from dmlgen.methods.stages import Stage, StageContext, check_stages
from _fixtures import one_thread  # noqa: F401  (autouse: one thread per test)

TINY: dict[str, Any] = {
    "name": "pipe",
    "data": {"dataset": "omniglot", "max_classes": 6, "classes_per_batch": 3, "samples_per_class": 4},
    "model": {"backbone": "convnet4", "embedding_size": 8},
    "loss": {"name": "triplet_margin", "params": {"margin": 0.2}},
    "eval": {"ks": [1, 2], "test_metrics": ["recall", "map@r"]},
    "train": {"epochs": 1, "max_steps_per_epoch": 2, "seed": 0},
}


def tiny(out: Path, *overrides: str) -> RunConfig:
    cfg = config_from_dict(TINY, list(overrides))
    cfg.out_dir = str(out)
    return cfg


class Toy:
    """Three stages: task ``a`` (a number), task ``b`` (a derived artefact storing a's hash), train ``c``.

    ``calls`` counts how often each stage's function ran; ``interrupt_a`` makes ``a`` save a partial state
    and raise KeyboardInterrupt once (as after Ctrl-C at a safe point)."""

    def __init__(self, a: int = 1, b: int = 10, c_epochs: int = 1) -> None:
        self.a, self.b, self.c_epochs = a, b, c_epochs
        self.calls = {"a": 0, "b": 0, "c": 0}
        self.interrupt_a = False
        self.resumed_a: list[bool] = []

    def run_a(self, ctx: StageContext) -> Path:
        self.calls["a"] += 1
        self.resumed_a.append(ctx.resumed)
        state = ctx.load("last.ckpt") or {"done": 0}
        if self.interrupt_a:
            self.interrupt_a = False
            ctx.save({"done": 1}, "last.ckpt")
            raise KeyboardInterrupt
        return ctx.save({"value": torch.tensor(float(self.a)), "done_before": state["done"]}, "a.pt")

    def run_b(self, ctx: StageContext) -> Path:
        self.calls["b"] += 1
        a = ctx.load_file(ctx.input_path("a"))
        return ctx.save({"value": a["value"] * self.b, "a_sha256": ctx.input_sha256("a")}, "b.pt")

    def config_c(self, ctx: StageContext) -> dict[str, Any]:
        self.calls["c"] += 1
        raw = ctx.config.to_dict()
        raw["train"]["epochs"] = self.c_epochs
        return raw

    def stages(self) -> list[Stage]:
        return [
            Stage("a", "task", {"a": self.a}, run=self.run_a, description="number"),
            Stage("b", "task", {"b": self.b}, inputs=("a",), run=self.run_b),
            Stage("c", "train", {"epochs": self.c_epochs}, inputs=("b",), run_config=self.config_c),
        ]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ran(result: dict[str, Any]) -> list[str]:
    return [s["name"] for s in result["pipeline"]["stages"] if s["ran_now"]]


def test_first_run_then_skip_then_invalidate(tmp_path: Path) -> None:
    out = tmp_path / "run"
    toy = Toy()
    result = run_stages(tiny(out), toy.stages(), progress=False)
    assert ran(result) == ["a", "b", "c"] and toy.calls == {"a": 1, "b": 1, "c": 1}
    # Layout: stage folders with records; the last stage is a full run folder; its result is the pipeline's.
    for name in "abc":
        rec = stage_record(out, name)
        assert rec["status"] == "complete" and rec["seconds"] > 0
    assert (out / "c" / "best.ckpt").is_file() and (out / "c" / "test_metrics.json").is_file()
    c_result = json.loads((out / "c" / "test_metrics.json").read_text())
    assert result["test"] == c_result["test"] and {"recall@1", "map@r"} <= set(result["test"])
    assert json.loads((out / "test_metrics.json").read_text())["test"] == c_result["test"]
    assert sha(out / "best.ckpt") == sha(out / "c" / "best.ckpt")
    assert (out / "report.md").is_file() and (out / "config.yaml").is_file()
    pipe = json.loads((out / PIPELINE_FILE).read_text())
    assert [s["name"] for s in pipe["stages"]] == ["a", "b", "c"]
    # The records chain the hashes: b holds a's output hash, c holds b's; the artefact stores it too.
    rec_a, rec_b, rec_c = (stage_record(out, n) for n in "abc")
    assert rec_a["output_sha256"] == sha(out / "a" / "a.pt")
    assert rec_b["inputs"] == {"a": rec_a["output_sha256"]} and rec_c["inputs"] == {"b": rec_b["output_sha256"]}
    assert load_checkpoint(out / "b" / "b.pt")["a_sha256"] == rec_a["output_sha256"]
    assert rec_b["config_sha256"] == config_sha256({"b": 10})
    assert float(load_checkpoint(out / "b" / "b.pt")["value"]) == 10.0

    # Resume with nothing changed: nothing runs, same result.
    again = run_stages(tiny(out), toy.stages(), resume=True, progress=False)
    assert ran(again) == [] and toy.calls == {"a": 1, "b": 1, "c": 1} and again["test"] == result["test"]

    # A fresh start on a folder that holds a run is refused; --overwrite starts over.
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        run_stages(tiny(out), toy.stages(), progress=False)

    # b's config changes: b and everything after it run again, a does not.
    toy2 = Toy(b=3)
    result2 = run_stages(tiny(out), toy2.stages(), resume=True, progress=False)
    assert ran(result2) == ["b", "c"] and toy2.calls == {"a": 0, "b": 1, "c": 1}
    assert float(load_checkpoint(out / "b" / "b.pt")["value"]) == 3.0

    # A modified output of a is noticed by hash: a runs again (b's input changed only if a's bytes change).
    (out / "a" / "a.pt").write_bytes(b"tampered")
    toy3 = Toy(b=3)
    result3 = run_stages(tiny(out), toy3.stages(), resume=True, progress=False)
    # a is rerun because a dependent... no dependent must run, and a itself is up to date by its record:
    # the modified file is only checked when it is needed.
    assert ran(result3) == []
    toy4 = Toy(b=4)  # now b must run, which needs a's output: the tampered file makes a run again
    result4 = run_stages(tiny(out), toy4.stages(), resume=True, progress=False)
    assert ran(result4) == ["a", "b", "c"] and toy4.calls == {"a": 1, "b": 1, "c": 1}

    # Overwrite removes the stage folders and starts over.
    toy5 = Toy(b=4)
    result5 = run_stages(tiny(out), toy5.stages(), overwrite=True, progress=False)
    assert ran(result5) == ["a", "b", "c"]


def test_derived_artefact_outlives_its_producer(tmp_path: Path) -> None:
    """Once b holds the artefact, a's output can go: c reruns from b alone; only when b must run is a needed."""
    out = tmp_path / "run"
    run_stages(tiny(out), Toy().stages(), progress=False)
    (out / "a" / "a.pt").unlink()
    toy = Toy(c_epochs=2)  # only the last stage's config changes
    result = run_stages(tiny(out), toy.stages(), resume=True, progress=False)
    assert ran(result) == ["c"] and toy.calls == {"a": 0, "b": 0, "c": 1}
    assert len(json.loads((out / "c" / "test_metrics.json").read_text())["splits"]) > 0
    toy2 = Toy(b=7, c_epochs=2)  # b must run: it needs a's output, which is gone, so a runs first
    result2 = run_stages(tiny(out), toy2.stages(), resume=True, progress=False)
    assert ran(result2) == ["a", "b", "c"]


def test_interrupted_task_stage_resumes_from_its_state(tmp_path: Path) -> None:
    out = tmp_path / "run"
    toy = Toy()
    toy.interrupt_a = True
    with pytest.raises(TrainingInterrupted, match="continue with: dmlgen train X --resume"):
        run_stages(tiny(out), toy.stages(), progress=False, resume_command="dmlgen train X --resume")
    rec = stage_record(out, "a")
    assert rec["status"] == "running" and (out / "a" / "last.ckpt").is_file()
    result = run_stages(tiny(out), toy.stages(), resume=True, progress=False)
    assert toy.resumed_a == [False, True] and ran(result) == ["a", "b", "c"]
    assert load_checkpoint(out / "a" / "a.pt")["done_before"] == 1  # it continued from the saved state


def test_interrupted_train_stage_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C inside the train stage: the Trainer saves last.ckpt; the resumed pipeline finishes the same run."""
    ref = run_stages(tiny(tmp_path / "ref", "train.epochs=2"), Toy(c_epochs=2).stages(), progress=False)
    original = Trainer._train_step
    count = {"n": 0}

    def step(self: Trainer, images: torch.Tensor, labels: torch.Tensor) -> Any:
        count["n"] += 1
        if count["n"] == 3:
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(Trainer, "_train_step", step)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="continue with"):
        run_stages(tiny(out, "train.epochs=2"), Toy(c_epochs=2).stages(), progress=False)
    assert stage_record(out, "c")["status"] == "running" and (out / "c" / LAST).is_file()
    toy = Toy(c_epochs=2)
    result = run_stages(tiny(out, "train.epochs=2"), toy.stages(), resume=True, progress=False)
    assert ran(result) == ["c"] and toy.calls["a"] == toy.calls["b"] == 0
    a, b = load_checkpoint(out / "c" / LAST), load_checkpoint(tmp_path / "ref" / "c" / LAST)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert result["test"] == ref["test"]


def test_bad_pipelines_and_folders(tmp_path: Path) -> None:
    toy = Toy()
    a, b, c = toy.stages()
    with pytest.raises(ConfigError, match="stage 'a' is declared twice"):
        check_stages([a, a, c])
    with pytest.raises(ConfigError, match="input\\(s\\) a are not earlier stages"):
        check_stages([b, a, c])
    with pytest.raises(ConfigError, match="must be a train stage"):
        run_stages(tiny(tmp_path / "x"), [a, b], progress=False)
    with pytest.raises(ConfigError, match="letters, digits"):
        Stage("../up", "task", {}, run=toy.run_a)
    with pytest.raises(ConfigError, match="a task stage needs run"):
        Stage("a", "task", {})
    with pytest.raises(CheckpointError, match="nothing to resume"):
        run_stages(tiny(tmp_path / "empty"), toy.stages(), resume=True, progress=False)

    def sneaky(ctx: StageContext) -> Path:
        ctx.input_path("a")  # not declared as an input
        return ctx.folder / "x"

    last = Stage("c", "train", {}, run_config=toy.config_c)
    with pytest.raises(ConfigError, match="reads stage 'a', which is not among its inputs"):
        run_stages(tiny(tmp_path / "y"), [a, Stage("s", "task", {}, run=sneaky), last], progress=False)

    def outside(ctx: StageContext) -> Path:
        return tmp_path / "elsewhere.pt"

    (tmp_path / "elsewhere.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a file inside"):
        run_stages(tiny(tmp_path / "z"), [Stage("o", "task", {}, run=outside), last], progress=False)
    assert not is_pipeline(tiny(tmp_path))
    assert json.loads((tmp_path / "z" / "o" / STAGE_FILE).read_text())["status"] == "running"
