"""The training loop: class-balanced batches, validation-based selection, one test evaluation.

Resumable and exact: ``last.ckpt`` holds the model, optimizer, scheduler, loss state, sampler position,
RNG states, epoch, step and the running epoch statistics. It is rewritten atomically after every epoch,
on Ctrl-C and when a data error stops training mid-epoch. Every random draw of a step is a function of
``(train.seed, epoch, step)`` (augmentations per image, the model's own randomness per step), so a
resumed run gives the same weights as an uninterrupted one.

Ctrl-C is deferred to the end of the current step (or of the current evaluation batch), so the saved
state is never half an optimizer step; a second Ctrl-C stops at once without saving.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from dmlgen.data.standard import shared_class_codes
from dmlgen.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from dmlgen.engine.config import RunConfig, config_from_dict
from dmlgen.engine.distributed import (
    NullLogger,
    RankFailure,
    convert_sync_batchnorm,
    defer_batch_scaling,
    embed_sharded,
    gather_with_grad,
    init_distributed,
    is_peer_failure,
)
from dmlgen.engine.logging import RunLogger
from dmlgen.engine.teacher import EpochSnapshotTeacher
from dmlgen.engine.setup import (
    Criterion,
    DataSplits,
    SeededBatches,
    SeededDataset,
    build_criterion,
    build_loader,
    build_method_from_config,
    build_optimizer,
    build_regularizers,
    build_run_model,
    build_sampler,
    build_scheduler,
    build_splits,
    embed_dataset,
    scheduler_state,
    seed_everything,
)
from dmlgen.errors import CheckpointError, ConfigError, DataError, DmlgenError
from dmlgen.evaluation.evaluate import evaluate_embeddings
from dmlgen.losses.distances import shared_gram_matrices
from dmlgen.methods import MethodSetup
from dmlgen.models.heads import scale_by_mean_distance

LAST = "last.ckpt"
BEST = "best.ckpt"
# Files a run writes into its folder; --overwrite removes exactly these.
RUN_FILES = (LAST, BEST, "config.yaml", "metrics.jsonl", "epochs.csv", "test_metrics.json", "report.md")

# Config keys a resumed run may change; any other difference from the checkpoint's config is refused,
# because it would silently make a different experiment out of the same run folder.
RESUME_MAY_CHANGE = (
    "name",
    "out_dir",
    "train.epochs",
    "train.device",
    "train.log_every",
    "train.checkpoint_every_steps",
    "data.num_workers",
    "eval.batch_size",
    "eval.test_metrics",
)


def _no_buffer_broadcast() -> dict[str, bool]:
    """DDP's option to skip the buffer broadcast of every forward (renamed in torch 2.14; buffers still start
    equal): SyncBatchNorm keeps the running statistics equal on every rank."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class TrainingInterrupted(DmlgenError):
    """Raised after Ctrl-C once the state is saved; the message says how to resume."""


class TrainingDiverged(DmlgenError):
    """The loss became NaN or infinite; the last checkpoint is left as it was."""


class _ForcedStop(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, without saving a possibly half-updated state."""


class _DeferredInterrupt:
    """While active, the first Ctrl-C only sets :attr:`requested`; the trainer stops at the next safe point.

    ``sigterm``: SIGTERM also requests a stop (never a forced one). Distributed training sets it: torchrun
    forwards a stop to its workers as SIGTERM, and a scheduler's pre-emption arrives that way too.
    """

    def __init__(self, verbose: bool = True, sigterm: bool = False) -> None:
        self.requested = False
        self.verbose = verbose
        self.sigterm = sigterm
        self._previous: Any = None
        self._previous_term: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise _ForcedStop
        self.requested = True
        if self.verbose:
            print("\nCtrl-C: saving after the current step (press Ctrl-C again to stop at once, without saving)",
                  file=sys.stderr, flush=True)

    def _term_handler(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested and self.verbose:
            print("\nSIGTERM: saving after the current step", file=sys.stderr, flush=True)
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        self.requested = False
        # Signal handlers can only be set from the main thread; elsewhere Ctrl-C is not delivered anyway.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            if self.sigterm:
                self._previous_term = signal.signal(signal.SIGTERM, self._term_handler)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            if self.sigterm:
                signal.signal(signal.SIGTERM, self._previous_term)
            self._installed = False

    def check(self) -> None:
        """Raise KeyboardInterrupt at a safe point when Ctrl-C was pressed."""
        if self.requested:
            raise KeyboardInterrupt


@dataclass
class TrainState:
    """Counters and running statistics that a checkpoint carries besides the tensors."""

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # optimisation steps already taken in that epoch
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1  # 1-based number of the selected epoch; -1 before the first
    history: list[dict[str, Any]] = field(default_factory=list)
    # Sums over the steps of the epoch in progress, so an epoch split by a resume reports the same mean loss.
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    epoch_regularizer_sums: dict[str, float] = field(default_factory=dict)  # unweighted values, by name


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every leaf that differs between two config dicts."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with the defaults of keys added since it was written (e.g. ``method``,
    ``regularizers``), so that only real differences block a resume; as saved if it no longer validates."""
    try:
        return config_from_dict(saved).to_dict()
    except ConfigError:
        return saved


def _step_seed(seed: int, epoch: int, step: int) -> int:
    state = np.random.SeedSequence([seed % 2**63, epoch, step, 1]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _clean_worker_message(exc: BaseException) -> str:
    """The original message of an error re-raised by a DataLoader worker (which wraps it in a traceback)."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _check_eval_split(name: str, dataset: Any, ks: list[int]) -> None:
    """Fail before training when a validation or test split cannot be scored."""
    counts = np.bincount(dataset.labels)
    if dataset.num_classes < 2 or counts.max() < 2:
        raise DataError(
            f"the {name} split has {len(dataset)} image(s) in {dataset.num_classes} class(es); retrieval needs at "
            "least 2 classes and a class with 2 images (check data.max_classes, data.val_class_fraction, "
            "data.val_alphabets)"
        )
    if len(dataset) - 1 < max(ks):
        raise DataError(
            f"the {name} split has {len(dataset)} images, too few for Recall@{max(ks)} (eval.ks={ks})"
        )


def _check_query_gallery(query: Any, gallery: Any, ks: list[int]) -> None:
    """Fail before training when queries vs gallery (In-Shop) cannot be scored."""
    q_codes, g_codes = shared_class_codes(query, gallery)
    if not np.isin(q_codes, g_codes).any():
        raise DataError(
            f"no test query class has a gallery image ({len(query)} queries, {len(gallery)} gallery images); "
            "check data.max_classes"
        )
    if len(gallery) < max(ks):
        raise DataError(f"the gallery has {len(gallery)} images, too few for Recall@{max(ks)} (eval.ks={ks})")


class _MethodContext:
    """The trainer's side of a training method's step (:class:`dmlgen.methods.base.StepContext`)."""

    def __init__(self, trainer: Trainer, logger: RunLogger) -> None:
        self._trainer = trainer
        self._logger = logger
        self.device = trainer.device
        self.use_amp = trainer.use_amp
        self.model = trainer.model
        self.criterion = trainer.criterion

    @property
    def epoch(self) -> int:
        return self._trainer.state.epoch

    @property
    def step(self) -> int:
        return self._trainer.state.step_in_epoch

    def optimizer_step(self, loss: torch.Tensor) -> None:
        self._trainer._optimizer_step(loss)

    def embed_train(self, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self._trainer._embed_train(module)

    def log(self, event: str, **fields: Any) -> None:
        self._logger.event(event, **fields)


class Trainer:
    """Trains one :class:`RunConfig`; :meth:`fit` returns the test result of the selected checkpoint.

    Args:
        cfg: the run configuration; ``cfg.out_dir`` receives checkpoints, logs and metrics.
        progress: show progress bars and one line per epoch.
        splits: prepared datasets (default: built from ``cfg.data``).
        pretrained: load ``model.weights`` / ImageNet weights; a resumed run passes False since the
            checkpoint replaces every weight.
        resume_command: the command printed after Ctrl-C to continue the run.

    Started by ``torchrun`` with several processes (or inside an initialised process group), the trainer runs
    DistributedDataParallel: every process takes its share of each global batch and the loss is computed on
    the embeddings of all of them (:mod:`dmlgen.engine.distributed`); only rank 0 writes files.
    """

    def __init__(self, cfg: RunConfig, *, progress: bool = True, splits: DataSplits | None = None,
                 pretrained: bool = True, resume_command: str | None = None) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.resume_command = resume_command or f"dmlgen train CONFIG --out {self.out_dir} --resume"
        # torchrun (WORLD_SIZE > 1) or an initialised process group: DDP; else one process, as always.
        self.dist, self.device = init_distributed(cfg.train.device)
        self.progress = progress and self.dist.is_main
        seed_everything(cfg.train.seed, deterministic=cfg.train.deterministic)
        with self.dist.main_first():  # rank 0 fills dataset caches before the others read them
            self.splits = splits if splits is not None else build_splits(cfg.data)
        self.gallery = getattr(self.splits, "gallery", None)
        for name in ("val", "test"):
            if name == "test" and self.gallery is not None:
                _check_query_gallery(self.splits.test, self.gallery, cfg.eval.ks)
            elif getattr(self.splits, name) is not None:
                _check_eval_split(name, getattr(self.splits, name), cfg.eval.ks)
        # The training method (method: standard | sharing) may wrap the model (Sharing: a second head).
        self.method = build_method_from_config(cfg.method)
        if self.dist.enabled and self.method.custom_step:
            raise ConfigError(
                f"method.name {self.method.name!r} has its own training step, which distributed training does not "
                f"support yet; train it in one process (this job has {self.dist.world_size})"
            )
        with self.dist.main_first():  # ImageNet weights: one download
            self.model = build_run_model(cfg.model, cfg.method, cfg.data.channels, pretrained=pretrained,
                                         method=self.method)
        self.model.to(self.device)
        self._probe_model()
        if self.dist.enabled:
            # Batch statistics of the global batch, as one process with the whole batch computes them.
            convert_sync_batchnorm(self.model, self.device)
        self.criterion: Criterion = build_criterion(cfg.loss, num_classes=self.splits.train.num_classes,
                                                    embedding_size=cfg.model.embedding_size)
        self.criterion.to(self.device)
        self.regularizers = build_regularizers(cfg.regularizers).to(self.device)
        # LSD's teacher: the model as it was at the end of the previous epoch (invalid during epoch 0).
        self.teacher: EpochSnapshotTeacher | None = None
        if any(reg.needs_teacher for reg in self.regularizers.values()):
            self.teacher = EpochSnapshotTeacher(self.model).to(self.device)
        self.sampler = build_sampler(cfg.data, self.splits.train.labels, seed=cfg.train.seed,
                                     world_size=self.dist.world_size)
        self.steps_per_epoch = len(self.sampler)
        if cfg.train.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        self.method.setup(MethodSetup(
            train_labels=np.asarray(self.splits.train.labels), num_classes=int(self.splits.train.num_classes),
            classes_per_batch=cfg.data.classes_per_batch, samples_per_class=cfg.data.samples_per_class,
            batch_size=cfg.data.classes_per_batch * cfg.data.samples_per_class,
            steps_per_epoch=self.steps_per_epoch, seed=cfg.train.seed, has_regularizers=len(self.regularizers) > 0,
            splits=self.splits,
        ), self.model)
        self.method.modules().to(self.device)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, self.criterion, loss_lr=cfg.loss.lr,
                                         regularizers=self.regularizers)
        for group in self.method.param_groups(self.model):  # e.g. Sharing's shared head, β, decorrelation MLP
            if group["params"]:
                self.optimizer.add_param_group(group)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, epochs=cfg.train.epochs)
        self.use_amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        # The module the training step runs: the model, or DDP around it (which averages its gradients).
        self.train_module: torch.nn.Module = self.model
        if self.dist.enabled:
            self.train_module = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **_no_buffer_broadcast())
        # Trainable parameters outside DDP (loss and regularizer parameters), averaged over the ranks by hand.
        self._replicated_params = [p for module in (self.criterion, self.regularizers)
                                   for p in module.parameters() if p.requires_grad]
        self.state = TrainState()
        self._saved_step = 0  # global_step of the last saved last.ckpt
        self._guard = _DeferredInterrupt(verbose=self.progress, sigterm=self.dist.enabled)

    def _probe_model(self) -> None:
        """One forward pass on a test image, so that a size or channel mismatch fails now, named."""
        image = self.splits.test[0][0].unsqueeze(0).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(image)
        except RuntimeError as exc:
            raise ConfigError(
                f"model.backbone {self.cfg.model.backbone!r} cannot take images of shape {tuple(image.shape[1:])} "
                f"(data.image_size={self.cfg.data.image_size}, data.channels={self.cfg.data.channels}): "
                f"{str(exc).splitlines()[0]}"
            ) from None
        finally:
            self.model.train(was_training)

    # ----------------------------------------------------------------- checkpoints
    def _checkpoint(self, *, full: bool) -> dict[str, Any]:
        s = self.state
        ckpt: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "model_description": self.model.describe(),
            # Processes that shared each batch; exact resume needs the same number (see resume()).
            "world_size": self.dist.world_size,
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),
            "regularizers": self.regularizers.state_dict(),
            "epoch": s.epoch,
            "step_in_epoch": s.step_in_epoch,
            "global_step": s.global_step,
            "best_score": s.best_score,
            "best_epoch": s.best_epoch,
            "history": s.history,
            "class_names": [str(c) for c in self.splits.train.classes],
        }
        if full:
            if self.teacher is not None:
                ckpt["teacher"] = self.teacher.state_dict()
            if self.method.custom_step:
                ckpt["method"] = self.method.state_dict()
            ckpt.update(
                epoch_regularizer_sums=dict(s.epoch_regularizer_sums),
                optimizer=self.optimizer.state_dict(),
                scheduler=scheduler_state(self.scheduler),
                scaler=self.scaler.state_dict(),
                sampler=self.sampler.state_dict(),
                rng=rng_state(),
                epoch_loss_sum=s.epoch_loss_sum,
                epoch_images=s.epoch_images,
                epoch_seconds=s.epoch_seconds,
            )
        return ckpt

    def _save(self, obj: dict[str, Any], name: str) -> Path:
        path = self.out_dir / name
        if not self.dist.is_main:
            return path  # every rank holds the same state; rank 0 writes it
        try:
            atomic_save(obj, path)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write checkpoint {path}: {exc.strerror or exc}; the previous {name} (if any) is intact"
            ) from None
        return path

    def save_last(self) -> Path:
        """Write ``last.ckpt`` (everything needed to resume) atomically."""
        path = self._save(self._checkpoint(full=True), LAST)
        self._saved_step = self.state.global_step
        return path

    def resume(self, path: str | Path | None = None) -> None:
        """Restore everything from ``last.ckpt`` (or ``path``) so the run continues exactly."""
        path = Path(path) if path is not None else self.out_dir / LAST
        if not path.exists():
            raise CheckpointError(f"nothing to resume: {path} does not exist; start the run without --resume")
        ckpt = load_checkpoint(path, map_location="cpu")
        if "optimizer" not in ckpt:
            raise CheckpointError(f"checkpoint {path} holds weights only; resume needs {LAST}")
        saved_world = int(ckpt.get("world_size", 1))  # checkpoints from before distributed training: 1
        if saved_world != self.dist.world_size:
            how = f"torchrun --nproc_per_node={saved_world}" if saved_world > 1 else "one process, without torchrun"
            raise CheckpointError(
                f"checkpoint {path} was written by a run of {saved_world} process(es) and this run has "
                f"{self.dist.world_size}; resume with the same number ({how}): the split of every batch over the "
                "processes is part of the exact continuation"
            )
        mine = self.model.describe()
        if ckpt.get("model_description") != mine:
            theirs = ckpt.get("model_description") or {}
            diff = [f"{k} {theirs.get(k)!r} != {mine.get(k)!r}" for k in sorted(set(theirs) | set(mine))
                    if theirs.get(k) != mine.get(k)]
            raise CheckpointError(f"checkpoint {path} is from another model ({'; '.join(diff[:4])})")
        diffs = [d for d in config_differences(_with_defaults(ckpt["config"]), self.cfg.to_dict())
                 if d[0] not in RESUME_MAY_CHANGE]
        if diffs:
            shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diffs[:5])
            raise CheckpointError(
                f"checkpoint {path} was made with a different config ({shown}); resume with the same config "
                f"and --set overrides (only {', '.join(RESUME_MAY_CHANGE)} may change)"
            )
        try:
            self.model.load_state_dict(ckpt["model"])
            self.criterion.load_state_dict(ckpt["criterion"])
            self.regularizers.load_state_dict(ckpt.get("regularizers", {}))
            if self.teacher is not None:
                if "teacher" not in ckpt:
                    raise KeyError("the checkpoint holds no teacher snapshot")
                self.teacher.load_state_dict(ckpt["teacher"])
            if self.method.custom_step:
                if "method" not in ckpt:
                    raise KeyError(f"the checkpoint holds no state of method {self.method.name!r}")
                self.method.load_state_dict(ckpt["method"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.sampler.load_state_dict(ckpt["sampler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this run: {exc}".split("\n")[0]) from None
        if self.use_amp and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.state = TrainState(
            epoch=int(ckpt["epoch"]),
            step_in_epoch=int(ckpt["step_in_epoch"]),
            global_step=int(ckpt["global_step"]),
            best_score=float(ckpt["best_score"]),
            best_epoch=int(ckpt["best_epoch"]),
            history=list(ckpt["history"]),
            epoch_loss_sum=float(ckpt.get("epoch_loss_sum", 0.0)),
            epoch_images=int(ckpt.get("epoch_images", 0)),
            epoch_seconds=float(ckpt.get("epoch_seconds", 0.0)),
            epoch_regularizer_sums={k: float(v) for k, v in ckpt.get("epoch_regularizer_sums", {}).items()},
        )
        if self.state.step_in_epoch > self.steps_per_epoch:
            raise CheckpointError(
                f"checkpoint {path} stopped at step {self.state.step_in_epoch} of epoch {self.state.epoch + 1}, "
                f"beyond the {self.steps_per_epoch} steps per epoch of this config"
            )
        self._saved_step = self.state.global_step

    # ----------------------------------------------------------------- evaluation
    def _evaluate(self, model: torch.nn.Module, split: str, metrics: list[str] | None) -> dict[str, float]:
        """Leave-one-out within ``split``; the test split with a gallery (In-Shop): queries vs gallery."""
        dataset = getattr(self.splits, split)

        def embed(ds: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
            kwargs: dict[str, Any] = dict(
                batch_size=self.cfg.eval.batch_size, device=self.device, num_workers=self.cfg.data.num_workers,
                progress=self.progress, desc=f"embedding {name}", should_stop=lambda: self._guard.requested,
            )
            if self.dist.enabled:  # each rank embeds a part, then all parts are gathered in order
                return embed_sharded(model, ds, self.dist, **kwargs)
            return embed_dataset(model, ds, **kwargs)

        emb, labels = embed(dataset, split)
        gallery_emb = gallery_labels = None
        if split == "test" and self.gallery is not None:
            gallery_emb, gallery_labels = embed(self.gallery, "gallery")
            # Each split numbers its classes 0..C-1 on its own: map both onto codes of the original ids.
            q_codes, g_codes = shared_class_codes(dataset, self.gallery)
            labels, gallery_labels = torch.from_numpy(q_codes)[labels], torch.from_numpy(g_codes)[gallery_labels]
        result = None
        if self.dist.is_main:  # rank 0 scores, the others receive its metrics: every rank selects alike
            result = evaluate_embeddings(
                emb, labels, gallery_emb, gallery_labels, metrics=metrics, ks=tuple(self.cfg.eval.ks),
                metric=self.cfg.eval.distance, seed=self.cfg.train.seed,
            )
        return self.dist.broadcast_object(result)

    # ----------------------------------------------------------------- training
    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, float]]:
        """One optimisation step on a batch ``images (B, C, H, W)``, ``labels (B,)``.

        Returns the total loss and each active regularizer's unweighted value.
        """
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.dist.enabled:
            embeddings, labels = self._global_embeddings(images, labels)
        else:
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
                embeddings = self.model(images)
            # Loss maths in fp32 even under AMP (methods.md §1.2).
            embeddings = embeddings.float()
        loss = self.criterion(embeddings, labels)
        reg_values: dict[str, torch.Tensor] = {}
        teacher_embeddings = None
        for name, reg in self.regularizers.items():
            weight = reg.weight_at(self.state.epoch, cfg.train.epochs)
            if weight == 0:
                continue  # LSD in epoch 0 (no valid teacher yet), or a switched-off regularizer
            if reg.needs_teacher:
                if teacher_embeddings is None:
                    assert self.teacher is not None
                    if not bool(self.teacher.valid):
                        raise CheckpointError("the LSD teacher has no snapshot after epoch 1; the run is broken")
                    with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
                        teacher_embeddings = self.dist.gather(self.teacher(images).float())
            value = reg(embeddings, labels, teacher_embeddings)
            reg_values[name] = value.detach()
            loss = loss + weight * value
            penalty = reg.penalty()
            if penalty is not None:
                loss = loss + penalty
        self._optimizer_step(loss)
        return float(loss.detach()), {k: float(v) for k, v in reg_values.items()}

    def _global_embeddings(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distributed: the embeddings ``(B, D)`` and labels ``(B,)`` of the global batch, every rank's part in rank
        order, differentiable w.r.t. this rank's part (:func:`gather_with_grad`)."""
        with self.dist.rank_rng(self.device), defer_batch_scaling(self.model) as deferred, \
                torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            local = self.train_module(images)
        embeddings = gather_with_grad(local.float())
        if deferred:  # MDR's mean-distance scaling over the global batch, as in one process
            embeddings = scale_by_mean_distance(embeddings)
        return embeddings, self.dist.gather(labels)

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward and one optimiser step (scaled under AMP, optional clipping); a non-finite loss raises."""
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at epoch {self.state.epoch + 1}, step {self.state.step_in_epoch + 1}: "
                f"lower optimizer.lr or check the data; {self.out_dir / LAST} is left as it was"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.dist.average_gradients(self._replicated_params)
        if self.cfg.train.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._trainable_params(), self.cfg.train.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _embed_train(self, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``module`` over the training images without augmentation (the test split's eval transform)."""
        train = self.splits.train
        plain = train.subset(np.arange(len(train)), transform=getattr(self.splits.test, "transform", None))
        return embed_dataset(
            module, plain, batch_size=self.cfg.eval.batch_size, device=self.device,
            num_workers=self.cfg.data.num_workers, progress=self.progress, desc="embedding train",
            should_stop=lambda: self._guard.requested,
        )

    def _train_epoch(self, logger: RunLogger) -> None:
        """Train the remaining steps of the epoch in progress (all of them, or those after a resume point)."""
        cfg, state = self.cfg, self.state
        epoch = state.epoch
        if state.step_in_epoch >= self.steps_per_epoch:
            return  # trained before an interruption during validation
        self.model.train()
        self.criterion.train()
        self.regularizers.train()
        self.method.modules().train()
        context = _MethodContext(self, logger)
        if self.method.custom_step and state.step_in_epoch == 0:
            self.method.on_epoch_start(context)  # e.g. MIC's (re-)clustering; a mid-epoch resume has its state
        batches = SeededBatches(self.sampler, seed=cfg.train.seed, epoch=epoch, start_batch=state.step_in_epoch,
                                num_batches=self.steps_per_epoch, rank=self.dist.rank,
                                world_size=self.dist.world_size)
        loader = build_loader(SeededDataset(self.splits.train), batches, cfg.data.num_workers,
                              seed=cfg.train.seed + epoch)
        # A method's extra streams (Sharing's shared batches), aligned with the class stream step by step; their
        # augmentation seeds come from a seed of their own. A stream indexes the training split unless it names
        # its own dataset (``stream.dataset``: SLADE's unlabeled images).
        extra_loaders = {
            name: build_loader(
                SeededDataset(self.splits.train if getattr(sampler, "dataset", None) is None else sampler.dataset),
                SeededBatches(sampler, seed=cfg.train.seed + 1_000_003 * (i + 1), epoch=epoch,
                              start_batch=state.step_in_epoch, num_batches=self.steps_per_epoch),
                cfg.data.num_workers, seed=cfg.train.seed + epoch + 1_000_003 * (i + 1))
            for i, (name, sampler) in enumerate(self.method.streams().items())
        }
        bar = tqdm(total=self.steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/"
                   f"{cfg.train.epochs}", disable=not self.progress, leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        try:
            iterator = iter(loader)
            extra_iterators = {name: iter(extra) for name, extra in extra_loaders.items()}
            while True:
                failure: DataError | None = None
                try:
                    images, labels, indices = next(iterator)
                    extra_batches = {name: next(it) for name, it in extra_iterators.items()}
                except StopIteration:
                    break
                except DataError as exc:
                    failure = exc
                if self.dist.enabled:  # every rank must stop at the same step, or the others wait forever
                    failure = self._agree_on_batch(failure)
                if failure is not None:
                    self._stop_on_data_error(failure, logger)
                # The step's own randomness (dropout, random miners) depends on (seed, epoch, step) only.
                torch.manual_seed(_step_seed(cfg.train.seed, epoch, state.step_in_epoch))
                # One batch-by-batch product for the head's scaling, the miner, the loss and the regularizers.
                with shared_gram_matrices():
                    if self.method.custom_step:
                        value, reg_values = self.method.train_step(context, (images, labels, indices),
                                                                   extra_batches)
                    else:
                        value, reg_values = self._train_step(images, labels)
                state.epoch_loss_sum += value
                for name, reg_value in reg_values.items():
                    state.epoch_regularizer_sums[name] = state.epoch_regularizer_sums.get(name, 0.0) + reg_value
                state.epoch_images += int(images.shape[0]) * self.dist.world_size
                state.step_in_epoch += 1
                state.global_step += 1
                if state.global_step % cfg.train.log_every == 0:
                    lr = self.optimizer.param_groups[0]["lr"]
                    logger.event("step", epoch=epoch + 1, step=state.global_step, loss=value, lr=lr, **reg_values)
                    logger.scalars("train", {"loss": value, "lr": lr, **reg_values}, state.global_step)
                bar.set_postfix(loss=f"{value:.4f}")
                bar.update(1)
                self._check_stop()
                every = cfg.train.checkpoint_every_steps
                if every and state.global_step % every == 0 and state.step_in_epoch < self.steps_per_epoch:
                    self.save_last()  # the state a stop would save here; the epoch's last step saves at its end
        finally:
            state.epoch_seconds += time.perf_counter() - start
            bar.close()

    def _check_stop(self) -> None:
        """Raise KeyboardInterrupt at a safe point when a stop was requested (on any rank: all stop together)."""
        if self.dist.enabled:
            (requested,) = self.dist.any(self._guard.requested)
            if requested:
                raise KeyboardInterrupt
        else:
            self._guard.check()

    def _agree_on_batch(self, failure: DataError | None) -> DataError | None:
        """Distributed: a data error on any rank stops every rank, each with the failing rank's message."""
        (failed,) = self.dist.any(failure is not None)
        if not failed:
            return None
        messages = self.dist.gather_objects(None if failure is None else _clean_worker_message(failure))
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        return failure if failure is not None else DataError(f"process {rank}: {message}")

    def _stop_on_data_error(self, exc: DataError, logger: RunLogger) -> None:
        """A bad image mid-epoch: keep the progress made so far, then stop with the file's name."""
        message = _clean_worker_message(exc)
        saved = ""
        if self.state.global_step > self._saved_step:
            path = self.save_last()
            saved = (f"; training state (epoch {self.state.epoch + 1}, step {self.state.step_in_epoch}) saved to "
                     f"{path}, continue with: {self.resume_command}")
        logger.event("data_error", message=message, epoch=self.state.epoch + 1, step=self.state.step_in_epoch)
        raise DataError(f"{message}{saved}") from None

    def _trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _end_epoch(self, logger: RunLogger) -> None:
        """Validate, record the epoch, keep the best checkpoint, step the schedule, save ``last.ckpt``."""
        cfg, state = self.cfg, self.state
        val = self._evaluate(self.model, "val", cfg.eval.val_metrics) if self.splits.val is not None else {}
        steps = state.step_in_epoch
        row: dict[str, Any] = {
            "epoch": state.epoch + 1,
            "train_loss": state.epoch_loss_sum / max(steps, 1),
            "train_steps": steps,
            **{f"train_{k}": v / max(steps, 1) for k, v in state.epoch_regularizer_sums.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_seconds": state.epoch_seconds,
            "images_per_second": state.epoch_images / state.epoch_seconds if state.epoch_seconds > 0 else 0.0,
            **{f"val_{k}": v for k, v in val.items()},
        }
        # Without a validation split the latest epoch is reported: test data never selects a checkpoint.
        score = val[cfg.eval.select_metric] if val else None
        improved = score is None or score > state.best_score
        state.history.append(row)
        if improved:
            state.best_score = score if score is not None else -math.inf
            state.best_epoch = state.epoch + 1
        if self.teacher is not None:
            self.teacher.refresh(self.model)  # the next epoch distils from this epoch's final weights
        self.scheduler.step()
        state.epoch += 1
        state.step_in_epoch = 0
        state.epoch_loss_sum, state.epoch_images, state.epoch_seconds = 0.0, 0, 0.0
        state.epoch_regularizer_sums = {}
        if improved:
            self._save(self._checkpoint(full=False), BEST)
        self.save_last()
        logger.write_epochs(state.history)
        logger.event("epoch", **row, selected=improved)
        logger.scalars("val", val, state.epoch)
        if self.progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if not k.startswith("num_"))
            tqdm.write(f"epoch {state.epoch}/{cfg.train.epochs}: loss {row['train_loss']:.4f}"
                       f"{', val ' + shown if shown else ''}{' *' if improved and score is not None else ''}")

    def fit(self, *, resume: bool = False, resume_path: str | Path | None = None,
            overwrite: bool = False) -> dict[str, Any]:
        """Train, validate every epoch, keep the best checkpoint by validation, test it once.

        Returns the content of ``test_metrics.json``. Raises :class:`TrainingInterrupted` after Ctrl-C
        (state saved), ConfigError when ``out_dir`` already holds a run and neither ``resume`` nor
        ``overwrite`` is set.
        """
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume(resume_path)
        elif (self.out_dir / LAST).exists():
            if not overwrite:
                raise ConfigError(
                    f"{self.out_dir} already holds a run ({LAST}); continue it with --resume, or start over "
                    "with --overwrite, or choose another folder with --out"
                )
            if self.dist.is_main:
                for name in RUN_FILES:
                    (self.out_dir / name).unlink(missing_ok=True)
                shutil.rmtree(self.out_dir / "tb", ignore_errors=True)
        logger: RunLogger = NullLogger()
        if self.dist.is_main:
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            logger = RunLogger(self.out_dir)
        self.dist.barrier()  # no rank trains before rank 0 has cleared the folder of an overwritten run
        try:
            logger.event("start", resumed=resume, epoch=self.state.epoch + 1, step_in_epoch=self.state.step_in_epoch,
                         steps_per_epoch=self.steps_per_epoch, device=str(self.device), seed=cfg.train.seed,
                         **({"world_size": self.dist.world_size} if self.dist.enabled else {}),
                         **self.splits.summary())
            if self.splits.skipped:
                logger.event("skipped_images", files=[{"path": p, "reason": r} for p, r in self.splits.skipped])
            if self.splits.dropped_classes:
                logger.event("dropped_classes", classes=self.splits.dropped_classes)
            with self._guard:
                try:
                    while self.state.epoch < cfg.train.epochs:
                        self._train_epoch(logger)
                        self._end_epoch(logger)
                    return self._final_test(logger)
                except _ForcedStop:
                    logger.event("aborted", epoch=self.state.epoch + 1, step_in_epoch=self.state.step_in_epoch)
                    raise TrainingInterrupted(
                        f"stopped at once without saving; {self.out_dir / LAST} holds the state of the last save "
                        f"(global step {self._saved_step}); continue with: {self.resume_command}"
                    ) from None
                except KeyboardInterrupt:
                    path = self.save_last()
                    logger.event("interrupted", epoch=self.state.epoch + 1, step_in_epoch=self.state.step_in_epoch)
                    raise TrainingInterrupted(
                        f"interrupted at epoch {self.state.epoch + 1}/{cfg.train.epochs}, step "
                        f"{self.state.step_in_epoch}/{self.steps_per_epoch}; state saved to {path}; "
                        f"continue with: {self.resume_command}"
                    ) from None
                except RuntimeError as exc:
                    if not (self.dist.enabled and is_peer_failure(exc)):
                        raise
                    # Another process died or hung; this state may be mid-step, so nothing is saved.
                    logger.event("rank_failure", rank=self.dist.rank, epoch=self.state.epoch + 1,
                                 step_in_epoch=self.state.step_in_epoch, message=str(exc).splitlines()[0])
                    saved = (f"{self.out_dir / LAST} holds the state of the last save (global step {self._saved_step})"
                             if self._saved_step > 0 or resume else "nothing was saved yet")
                    raise RankFailure(
                        f"process {self.dist.rank} of {self.dist.world_size}: a collective failed at epoch "
                        f"{self.state.epoch + 1}, step {self.state.step_in_epoch + 1}, most likely because another "
                        f"process stopped (its own error is above): {str(exc).splitlines()[0]}; {saved}; continue "
                        f"with: {self.resume_command}"
                    ) from None
        finally:
            logger.close()

    def _final_test(self, logger: RunLogger) -> dict[str, Any]:
        """Evaluate the selected checkpoint once on the test split; write ``test_metrics.json``."""
        self.dist.barrier()  # rank 0 has written best.ckpt
        best = load_checkpoint(self.out_dir / BEST, map_location=self.device)
        # A copy: the live model keeps the last epoch's weights, which a save after Ctrl-C must store.
        model = copy.deepcopy(self.model)
        model.load_state_dict(best["model"])
        test = self._evaluate(model, "test", self.cfg.eval.test_metrics)
        has_val = self.splits.val is not None
        result = {
            "selected_epoch": best["best_epoch"],
            "selection": f"best validation {self.cfg.eval.select_metric}" if has_val else "last epoch (no validation)",
            "selection_metric": self.cfg.eval.select_metric if has_val else None,
            "val_score": best["best_score"] if has_val else None,
            "test": test,
            "splits": self.splits.summary(),
            "skipped_images": [{"path": p, "reason": r} for p, r in self.splits.skipped],
            "dropped_classes": list(self.splits.dropped_classes),
        }
        if self.dist.is_main:
            (self.out_dir / "test_metrics.json").write_text(json.dumps(result, indent=2))
        logger.event("test", epoch=best["best_epoch"], **test)
        return result
