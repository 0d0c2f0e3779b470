"""The interface between the training engine and a training method (``method:`` in a run config).

The engine owns the loop: data, the class-balanced stream, optimiser and schedule, validation, checkpoints,
exact resume, Ctrl-C. A :class:`TrainingMethod` changes only what a method needs:

- :meth:`~TrainingMethod.wrap_model`: the model (e.g. a second head on the same backbone); its ``forward``
  stays the test-time embedding, so evaluation, export and ``dmlgen embed`` need no change;
- :meth:`~TrainingMethod.setup` and :meth:`~TrainingMethod.modules`: its own stateful modules (a margin
  loss's β, a decorrelation network), moved to the device, saved and restored with the run;
- :meth:`~TrainingMethod.param_groups`: extra optimiser groups with their own lr / weight decay;
- :meth:`~TrainingMethod.streams`: extra data streams (batch samplers over the training set), loaded by the
  engine with the same per-image augmentation seeds as the class stream;
- :meth:`~TrainingMethod.on_epoch_start`: e.g. re-clustering;
- :meth:`~TrainingMethod.train_step`: one iteration, which may take one or several optimiser steps through
  :meth:`StepContext.optimizer_step`;
- :meth:`~TrainingMethod.state_dict`: whatever else resume needs (cluster labels, stream positions).

``standard`` (:class:`StandardMethod`) is the engine's own step (one loss + optional regularizers); its
``custom_step`` is False and the engine does not call :meth:`~TrainingMethod.train_step`.

Methods sit below the engine: they never import it. What a step needs from the engine comes through a
:class:`StepContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from dmlgen.errors import CheckpointError
from dmlgen.models import EmbeddingModel

#: A training batch as the engine's loaders yield it: images (B, C, H, W), labels (B,), dataset indices (B,).
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MethodSetup:
    """What a method may know about the run when it builds its modules and streams.

    ``train_labels``: ``(N,)`` contiguous class label of every training image; ``batch_size`` =
    ``classes_per_batch * samples_per_class``; ``steps_per_epoch``: batches of every stream per epoch.
    ``splits``: the run's datasets (the engine's ``DataSplits``: ``train``, ``val``, ``test`` and, with
    ``data.unlabeled``, ``unlabeled``) for methods that stream other images than the training split (SLADE);
    None where a method is set up without them.
    """

    train_labels: np.ndarray
    num_classes: int
    classes_per_batch: int
    samples_per_class: int
    batch_size: int
    steps_per_epoch: int
    seed: int
    has_regularizers: bool
    splits: Any = None


class StepContext(Protocol):
    """The engine's side of a step (implemented by the trainer)."""

    device: torch.device
    use_amp: bool
    epoch: int  # 0-based epoch in progress
    step: int  # 0-based step within the epoch
    model: nn.Module
    criterion: nn.Module  # the configured loss (and miner): criterion(embeddings, labels) -> 0-dim

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """zero_grad, backward (scaled under AMP), optional gradient clipping, step; a non-finite loss raises."""

    def embed_train(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``module`` (eval mode, no grad) over the un-augmented training set: ``(N, F)`` float32 on the CPU and
        labels ``(N,)``, in dataset order."""

    def log(self, event: str, **fields: Any) -> None:
        """A line in ``metrics.jsonl``."""


class TrainingMethod:
    """Base class; the defaults are the standard behaviour (nothing added)."""

    name: ClassVar[str] = "standard"
    #: Whether the engine calls :meth:`train_step` (else it runs its own standard step).
    custom_step: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        self.params = params
        self._modules = nn.ModuleDict()

    def wrap_model(self, model: EmbeddingModel) -> EmbeddingModel:
        """The model the run trains, built around the configured one (default: unchanged)."""
        return model

    def setup(self, info: MethodSetup, model: EmbeddingModel) -> None:
        """Build modules and samplers once the splits and the model exist."""

    def modules(self) -> nn.ModuleDict:
        """The method's stateful modules (moved to the device, switched to train mode, checkpointed)."""
        return self._modules

    def param_groups(self, model: EmbeddingModel) -> list[dict[str, Any]]:
        """Optimiser groups added after the engine's (backbone, head, loss, regularizers)."""
        return []

    def streams(self) -> dict[str, Any]:
        """Extra batch samplers by name, each with ``set_epoch(epoch, start_batch)``, yielding index lists of
        the training split, or of the sampler's own ``dataset`` attribute when it has one."""
        return {}

    def on_epoch_start(self, ctx: StepContext) -> None:
        """Called before the first step of every epoch (not when a run resumes mid-epoch)."""

    def train_step(self, ctx: StepContext, batch: Batch, extra: dict[str, Batch]) -> tuple[float, dict[str, float]]:
        """One iteration; returns the total objective and named values to log (averaged per epoch)."""
        raise NotImplementedError(f"method {self.name!r} uses the engine's standard step")

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model and the optimiser that resume needs (tensors and plain data only)."""
        return {"modules": self._modules.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "modules" not in state:
            raise CheckpointError(f"the checkpoint's method state lacks its modules (method {self.name!r})")
        self._modules.load_state_dict(state["modules"])


@dataclass
class StandardParams:
    """``method: {name: standard}`` takes no parameters."""


class StandardMethod(TrainingMethod):
    """Today's training: the configured loss (with its miner) and regularizers, one step per batch."""

    name = "standard"
    custom_step = False


__all__ = ["Batch", "MethodSetup", "StandardMethod", "StandardParams", "StepContext", "TrainingMethod"]
