"""Multi-stage methods: how a training method declares stages that :mod:`dmlgen.engine.pipeline` runs.

A method whose result comes from several models trained one after another (Guided DML: master -> targets ->
student; SLADE: teacher -> pseudo labels -> student rounds) sets ``pipeline = True`` on its
:class:`~dmlgen.methods.base.TrainingMethod` subclass and implements ``stages(config) -> list[Stage]``.
``dmlgen train CONFIG`` (:func:`dmlgen.engine.run.train`) then runs the stages in order, each in its own
sub-folder ``<out_dir>/<stage.name>/``, instead of one training run. Methods never import the engine: what a
stage needs from it comes through a :class:`StageContext`.

Two kinds of stage:

- ``Stage(name, kind="train", config=..., run_config=fn)``: a whole engine training run (the ``Trainer``:
  validation, ``best.ckpt`` / ``last.ckpt``, exact resume, ``test_metrics.json``, reports) of the run config
  ``fn(ctx)`` returns as plain data (a dict like a YAML run config; ``out_dir`` is set by the engine). Its
  output is the run's ``best.ckpt``. The last stage of a pipeline is normally of this kind: its test result
  is the pipeline's result.
- ``Stage(name, kind="task", config=..., run=fn)``: custom work, e.g. training a model that does not fit the
  engine's loop, or deriving an artefact (targets, pseudo labels). ``fn(ctx)`` writes its output file inside
  ``ctx.folder`` (with :meth:`StageContext.save`) and returns its path. A task that can be interrupted saves
  its own resumable state with ``ctx.save(state, "last.ckpt")``, polls :meth:`StageContext.interrupted` at
  safe points, and on True saves and raises ``KeyboardInterrupt``; when it is run again it finds that file
  with ``ctx.load("last.ckpt")`` and continues.

Caching (make-like; the engine records ``stage.json`` in each stage folder): a stage is *up to date* when it
completed, the SHA-256 of ``config`` (plain data: the part of the run config the stage depends on) is
unchanged, and every stage in ``inputs`` is up to date with the output hash recorded when this stage ran.
Up-to-date stages are skipped; an interrupted stage is resumed; a stage whose config or inputs changed is
run again from scratch. An input's output *file* is only needed when a dependent stage must run: a derived
artefact (targets) stays usable after the model that produced it (the master) was deleted, because its
record holds the producing checkpoint's hash.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from dmlgen.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class StageContext(Protocol):
    """The engine's side of a stage (implemented by :mod:`dmlgen.engine.pipeline`)."""

    name: str  # the stage's name
    folder: Path  # its own sub-folder of the run folder (exists)
    config: Any  # the whole pipeline's RunConfig (validated)
    device: torch.device  # from train.device
    progress: bool  # show progress bars / lines
    resumed: bool  # True when the folder holds state of an interrupted run of this same stage

    @property
    def splits(self) -> Any:
        """The run's ``DataSplits`` (train / val / test datasets of ``config.data``), built once per pipeline."""

    def input_path(self, stage: str) -> Path:
        """The output file of an earlier stage listed in ``inputs`` (made available before this stage runs)."""

    def input_sha256(self, stage: str) -> str:
        """SHA-256 (hex) of that output file: the hash to store with an artefact derived from it."""

    def save(self, obj: dict[str, Any], name: str) -> Path:
        """Write ``obj`` (tensors and plain data only) atomically to ``folder / name``; returns the path."""

    def load(self, name: str) -> dict[str, Any] | None:
        """Read ``folder / name`` written by :meth:`save`, or None when it does not exist."""

    def load_file(self, path: Path) -> dict[str, Any]:
        """Read any file written by :meth:`save` (e.g. an input's output) without executing code."""

    def load_model(self, path: Path) -> Any:
        """The trained model of a checkpoint (an input train stage's ``best.ckpt``), in eval mode on ``device``."""

    def embed(self, model: Any, dataset: Any, desc: str = "embedding") -> tuple[torch.Tensor, torch.Tensor]:
        """``model`` over ``dataset`` in eval mode without gradients: ``(N, D)`` float32 on the CPU and the
        dataset's labels ``(N,)``, in dataset order (eval batch size, Ctrl-C polled after every batch)."""

    def log(self, event: str, **fields: Any) -> None:
        """A line in ``folder / metrics.jsonl``."""

    def interrupted(self) -> bool:
        """True after Ctrl-C: save the resumable state, then raise ``KeyboardInterrupt``."""


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline method (see the module docstring).

    ``name``: the sub-folder, unique within the pipeline (letters, digits, ``_``, ``-``). ``kind``: ``"train"``
    (an engine training run of ``run_config(ctx)``, output ``best.ckpt``) or ``"task"`` (``run(ctx)`` returns
    its output file). ``config``: plain data the stage's result depends on (hashed; a change re-runs it).
    ``inputs``: names of earlier stages whose outputs it reads. ``description``: one line for logs.
    """

    name: str
    kind: Literal["train", "task"]
    config: Any
    inputs: tuple[str, ...] = ()
    run: Callable[[StageContext], Path] | None = None
    run_config: Callable[[StageContext], dict[str, Any]] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"stage name {self.name!r}: letters, digits, '_' and '-' only")
        if self.kind == "train" and self.run_config is None:
            raise ConfigError(f"stage {self.name!r}: a train stage needs run_config")
        if self.kind == "task" and self.run is None:
            raise ConfigError(f"stage {self.name!r}: a task stage needs run")
        if self.kind not in ("train", "task"):
            raise ConfigError(f"stage {self.name!r}: kind must be 'train' or 'task', got {self.kind!r}")


def check_stages(stages: list[Stage]) -> None:
    """Unique names; every input names an earlier stage."""
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ConfigError(f"stage {stage.name!r} is declared twice")
        missing = [i for i in stage.inputs if i not in seen]
        if missing:
            raise ConfigError(f"stage {stage.name!r}: input(s) {', '.join(missing)} are not earlier stages")
        seen.add(stage.name)
    if not stages:
        raise ConfigError("a pipeline needs at least one stage")


__all__ = ["Stage", "StageContext", "check_stages"]
