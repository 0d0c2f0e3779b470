"""Guided DML (Gonzalez-Zapata et al., arXiv:2206.02029): methods.md §6.

A multi-branch **master** learns a "reduced hypothesis space" on class-pair episodes; its label-routed
embeddings of every training image (the **targets**) then guide an independent **student** by offline
distillation. Only the student is deployed. Three stages (:mod:`dmlgen.methods.stages`), run by
``dmlgen train`` on ``method: {name: guided, params: {...}}`` (:class:`GuidedMethod`, :class:`GuidedParams`):

1. ``master`` (task): :class:`GuidedMaster` (one small convolutional branch per training class, or per group
   of classes, and one shared head) trained on :class:`PairEpisodes` with :func:`master_loss`; resumable from
   ``master/last.ckpt``; output ``master/master.ckpt``.
2. ``targets`` (task): :func:`compute_targets`, every training image through its own class's branch, in
   chunks, in eval mode, with the evaluation transform; output ``targets/targets.pt`` (a
   :class:`TargetTable` that records the master checkpoint's SHA-256), reused without the master.
3. ``student`` (train): an engine run of the configured model (any registered backbone) with
   ``method: guided_student`` (:class:`GuidedStudentMethod`): regression to the targets
   (:func:`student_loss`: ``l2`` as the paper, ``sum_l2``, ``mse``, ``cosine``, ``gaussian``), optionally plus
   ``dml_weight`` x the configured DML loss. Validation, checkpoint selection and the test evaluation are the
   engine's, on the student alone.

``guided_student`` also works on its own with any targets file (``method.params.targets``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dmlgen.data.datasets import is_deterministic
from dmlgen.errors import CheckpointError, ConfigError, DataError
from dmlgen.models import EmbeddingModel

from .base import Batch, MethodSetup, StepContext, TrainingMethod
from .stages import Stage, StageContext

MASTER_KIND = "dmlgen-guided-master"
TARGETS_KIND = "dmlgen-guided-targets"
STUDENT_LOSSES = ("l2", "sum_l2", "mse", "cosine", "gaussian")
#: Above this many ordered class pairs, enumerating all of them each epoch is refused: set pairs_per_epoch.
MAX_ALL_PAIRS = 10_000_000


# ------------------------------------------------------------------------------------------- the master
class MasterBranch(nn.Module):
    """One branch (methods.md §6.2): Conv(in, c1, k) -> PReLU -> MaxPool 2 -> Conv(c1, c2, k) -> PReLU ->
    MaxPool 2 -> [AdaptiveAvgPool(pool_size), ``pool="adaptive"``] -> flatten: ``(N, C, H, W) -> (N, F)``."""

    def __init__(self, in_channels: int, channels: Sequence[int] = (32, 64), kernel_size: int = 5,
                 pool: str = "flatten", pool_size: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers += [nn.Conv2d(width, c, kernel_size), nn.PReLU(), nn.MaxPool2d(2)]
            width = c
        if pool == "adaptive":
            layers.append(nn.AdaptiveAvgPool2d(pool_size))
        layers.append(nn.Flatten(1))
        self.body = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images)


class GuidedMaster(nn.Module):
    """The master ("GEMINI"): branches routed by label, one shared head (methods.md §6.2).

    ``branch_of_class (C,)``: the branch of every training class (``arange(C)``: one branch per class, the
    reference; fewer branches: classes share them, §6.5). ``image_shape``: ``(channels, H, W)`` of the inputs;
    the local feature size ``flat_dim`` is computed from it. Head: Linear(flat, hidden) -> PReLU ->
    Linear(hidden, hidden) -> PReLU -> Linear(hidden, D), no normalisation (the reference's margin 3.0 acts on
    raw distances). The master cannot embed an image whose label it does not know.
    """

    def __init__(self, branch_of_class: Tensor | np.ndarray, image_shape: Sequence[int], embedding_size: int, *,
                 channels: Sequence[int] = (32, 64), kernel_size: int = 5, hidden: int = 256,
                 pool: str = "flatten", pool_size: int = 5) -> None:
        super().__init__()
        branch = torch.as_tensor(np.asarray(branch_of_class), dtype=torch.long)
        if branch.ndim != 1 or len(branch) < 2 or int(branch.min()) < 0:
            raise ConfigError(f"GuidedMaster: branch_of_class must be (C,) non-negative ids for C >= 2 classes, "
                              f"got shape {tuple(branch.shape)}")
        self.num_branches = int(branch.max()) + 1
        self.register_buffer("branch_of_class", branch, persistent=True)
        self.arch = {"num_classes": len(branch), "num_branches": self.num_branches,
                     "image_shape": [int(s) for s in image_shape], "embedding_size": int(embedding_size),
                     "channels": [int(c) for c in channels], "kernel_size": int(kernel_size), "hidden": int(hidden),
                     "pool": pool, "pool_size": int(pool_size)}
        in_channels, height, width = (int(s) for s in image_shape)
        self.branches = nn.ModuleList(
            MasterBranch(in_channels, channels, kernel_size, pool, pool_size) for _ in range(self.num_branches))
        with torch.no_grad():
            try:
                self.flat_dim = int(self.branches[0](torch.zeros(1, in_channels, height, width)).shape[1])
            except RuntimeError as exc:
                raise ConfigError(f"method.params.master: images of shape {tuple(image_shape)} are too small for "
                                  f"{len(channels)} conv({kernel_size}) + max-pool layers: "
                                  f"{str(exc).splitlines()[0]}") from None
        self.arch["flat_dim"] = self.flat_dim
        self.head = nn.Sequential(nn.Linear(self.flat_dim, hidden), nn.PReLU(), nn.Linear(hidden, hidden), nn.PReLU(),
                                  nn.Linear(hidden, embedding_size))

    def local(self, images: Tensor, labels: Tensor) -> Tensor:
        """Local features ``h (N, F)``: image k through branch ``branch_of_class[labels[k]]`` only."""
        labels = labels.to(self.branch_of_class.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.branch_of_class)):
            raise DataError(f"GuidedMaster: labels must be training classes 0..{len(self.branch_of_class) - 1}, "
                            f"got {int(labels.min())}..{int(labels.max())}")
        branch = self.branch_of_class[labels]
        out: Tensor | None = None
        for b in torch.unique(branch).tolist():
            rows = (branch == b).nonzero().squeeze(1)
            part = self.branches[b](images[rows.to(images.device)])
            if out is None:
                out = part.new_empty(len(images), part.shape[1])
            out = out.index_copy(0, rows.to(part.device), part)
        if out is None:
            return images.new_empty(0, self.flat_dim)
        return out

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, C, H, W)``, labels ``(N,)`` -> global embeddings ``g (N, D)`` and local features ``h (N, F)``."""
        h = self.local(images, labels)
        return self.head(h), h

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], source: str = "the master checkpoint") -> GuidedMaster:
        """Rebuild a master saved by the ``master`` stage (``arch``, ``branch_of_class`` in ``model``)."""
        if ckpt.get("kind") != MASTER_KIND or "arch" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"{source} is not a Guided DML master checkpoint ({MASTER_KIND})")
        arch = ckpt["arch"]
        model = cls(ckpt["model"]["branch_of_class"], arch["image_shape"], arch["embedding_size"],
                    channels=arch["channels"], kernel_size=arch["kernel_size"], hidden=arch["hidden"],
                    pool=arch["pool"], pool_size=arch["pool_size"])
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: weights do not fit its architecture: "
                                  f"{str(exc).splitlines()[0]}") from None
        return model


def branch_assignment(num_classes: int, *, branch_groups: int | None = None, grouping: str = "random",
                      class_groups: Sequence[Any] | None = None, seed: int = 0) -> np.ndarray:
    """The branch of every class ``(C,)`` int64.

    ``branch_groups=None`` and ``grouping="random"``: one branch per class (the reference). ``branch_groups=G``:
    G branches, classes dealt to them in a seeded random order, so every branch holds ``C // G`` or
    ``C // G + 1`` classes (a hash bucket). ``grouping="dataset"``: one branch per dataset group of the
    class (``class_groups (C,)``: the Omniglot alphabet, an SOP super-class, a CIFAR-100 coarse class).
    """
    if num_classes < 2:
        raise DataError(f"Guided DML needs at least 2 training classes, got {num_classes}")
    if grouping == "dataset":
        if class_groups is None:
            raise ConfigError("method.params.master.branch_grouping: 'dataset' needs a dataset with groups "
                              "(Omniglot alphabets, SOP super-classes, CIFAR-100 coarse classes)")
        _, ids = np.unique(np.asarray(class_groups).astype(str), return_inverse=True)
        return ids.reshape(-1).astype(np.int64)
    if branch_groups is None or branch_groups >= num_classes:
        return np.arange(num_classes, dtype=np.int64)
    order = np.random.default_rng(np.random.SeedSequence([seed % 2**63, 7])).permutation(num_classes)
    out = np.empty(num_classes, dtype=np.int64)
    out[order] = np.arange(num_classes) % branch_groups
    return out


def class_groups_of(dataset: Any) -> list[str] | None:
    """The group of every class of ``dataset`` (``groups`` must be constant within a class), or None."""
    groups = getattr(dataset, "groups", None)
    if groups is None:
        return None
    labels = np.asarray(dataset.labels)
    out: list[str] = []
    for c in range(int(dataset.num_classes)):
        names = np.unique(np.asarray(groups)[labels == c].astype(str))
        if len(names) != 1:
            raise DataError(f"class {dataset.classes[c]!s} spans groups {', '.join(names[:3])}: branch_grouping "
                            "'dataset' needs one group per class")
        out.append(str(names[0]))
    return out


# ------------------------------------------------------------------------------------------ episodes
@dataclass(frozen=True)
class Episode:
    """One class-pair episode: anchors and positives of class ``i``, negatives of class ``j`` (dataset
    indices, ``(B_ij,)`` each; anchor k, positive k and negative k form triplet k)."""

    i: int
    j: int
    anchors: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray


class PairEpisodes:
    """Class-pair episodes (methods.md §6.1, §6.5), explicit: step s of epoch e is :meth:`episode` ``(e, s)``.

    Pairs: every ordered (i, j), i != j, in an order shuffled once (``pairs_per_epoch=None``), or a fresh
    uniform sample of ``pairs_per_epoch`` distinct pairs per epoch when that is fewer. Images per pair:
    ``B_ij = min(episode_size, |X_i| // 2, |X_j|)``; 2 B_ij drawn without replacement from class i (anchors,
    then positives) and B_ij from class j. They depend on (seed, pair) only (``resample_episodes=False``:
    the reference's fixed episode set, replayed every epoch) or on (seed, pair, epoch) (``True``). Everything
    is a pure function of its arguments, so a resumed run replays the same episodes.
    """

    def __init__(self, labels: np.ndarray, *, episode_size: int, pairs_per_epoch: int | None = None,
                 resample_episodes: bool = False, seed: int = 0, class_names: Sequence[Any] | None = None) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(labels.max()) + 1 if len(labels) else 0
        names = list(class_names) if class_names is not None else list(range(self.num_classes))
        if self.num_classes < 2:
            raise DataError(f"Guided DML episodes need at least 2 training classes, got {self.num_classes}")
        counts = np.bincount(labels, minlength=self.num_classes)
        poor = np.flatnonzero(counts < 2)
        if len(poor):
            shown = ", ".join(f"{names[c]!s} ({counts[c]} image(s))" for c in poor[:5])
            raise DataError(f"Guided DML episodes: {len(poor)} training class(es) lack images for an anchor-positive "
                            f"pair (2 needed): {shown}{' ...' if len(poor) > 5 else ''}; data.single_image_classes: "
                            "drop removes single-image classes")
        if episode_size < 1:
            raise ConfigError(f"method.params.master.episode_size: must be >= 1, got {episode_size}")
        self.members = [np.flatnonzero(labels == c) for c in range(self.num_classes)]
        self.episode_size = int(episode_size)
        self.total_pairs = self.num_classes * (self.num_classes - 1)
        if pairs_per_epoch is not None and pairs_per_epoch < 1:
            raise ConfigError(f"method.params.master.pairs_per_epoch: must be >= 1 or null, got {pairs_per_epoch}")
        if pairs_per_epoch is None and self.total_pairs > MAX_ALL_PAIRS:
            raise ConfigError(f"method.params.master.pairs_per_epoch: {self.num_classes} classes make "
                              f"{self.total_pairs} ordered pairs per epoch; set a budget (e.g. 10000)")
        self.sample = pairs_per_epoch is not None and pairs_per_epoch < self.total_pairs
        self.steps_per_epoch = self.total_pairs if not self.sample else int(pairs_per_epoch)  # type: ignore[arg-type]
        self.resample = bool(resample_episodes)
        self.seed = int(seed) % 2**63
        self._order: tuple[int, np.ndarray] | None = None

    def pair(self, index: int) -> tuple[int, int]:
        """Ordered pair number ``index`` in ``0..C(C-1)-1`` -> ``(i, j)``, i != j."""
        i, r = divmod(int(index), self.num_classes - 1)
        return i, r + (r >= i)

    def order(self, epoch: int) -> np.ndarray:
        """The pair numbers of epoch ``epoch``, in step order."""
        key = epoch if (self.sample or self.resample) else 0
        if self._order is None or self._order[0] != key:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1, key]))
            if self.sample:
                pairs = rng.choice(self.total_pairs, size=self.steps_per_epoch, replace=False)
            else:
                pairs = rng.permutation(self.total_pairs)
            self._order = (key, pairs.astype(np.int64))
        return self._order[1]

    def episode(self, epoch: int, step: int) -> Episode:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} of an epoch of {self.steps_per_epoch} episodes")
        number = int(self.order(epoch)[step])
        i, j = self.pair(number)
        rng = np.random.default_rng(np.random.SeedSequence(
            [self.seed, 2, number, epoch if self.resample else 0]))
        xi, xj = self.members[i], self.members[j]
        size = min(self.episode_size, len(xi) // 2, len(xj))
        first = rng.choice(xi, size=2 * size, replace=False)
        neg = rng.choice(xj, size=size, replace=False)
        return Episode(i, j, first[:size], first[size:], neg)


# ------------------------------------------------------------------------------------------ losses
def master_loss(g_a: Tensor, g_p: Tensor, g_n: Tensor, h_a: Tensor, h_p: Tensor, *, margin: float = 3.0,
                beta: float = 0.003) -> tuple[Tensor, Tensor, Tensor]:
    """L_M = (1-β) mean_t [|g_a - g_p| - |g_a - g_n| + m]_+ + β mean_t |h_a - h_p| (methods.md §6.2).

    Inputs ``(T, D)`` global and ``(T, F)`` local features of T triplets; non-squared distances, eps 0 (the
    norm's subgradient at 0 is 0). Returns the total and its two unweighted terms (0-dim, fp32).
    """
    g_a, g_p, g_n, h_a, h_p = (x.float() for x in (g_a, g_p, g_n, h_a, h_p))
    d_ap = torch.linalg.vector_norm(g_a - g_p, dim=1)
    d_an = torch.linalg.vector_norm(g_a - g_n, dim=1)
    triplet = F.relu(d_ap - d_an + margin).mean()
    compact = torch.linalg.vector_norm(h_a - h_p, dim=1).mean()
    return (1.0 - beta) * triplet + beta * compact, triplet, compact


def student_loss(student: Tensor, targets: Tensor, kind: str = "l2", *, sigma2: float = 0.125) -> Tensor:
    """Regression of student embeddings ``(B, D)`` to their targets ``(B, D)`` (methods.md §6.4), fp32 0-dim.

    ``l2``: mean_k |s_k - z_k| (non-squared; the paper's); ``sum_l2``: sum_k |s_k - z_k|; ``mse``: mean over
    samples and dimensions of (s - z)^2; ``cosine``: 1 - mean_k cos(s_k, z_k); ``gaussian``:
    sum_k (1 - exp(-|s_k - z_k|^2 / (2 sigma2))), sigma2 = 0.125.
    """
    if student.shape != targets.shape:
        raise DataError(f"student_loss: student embeddings {tuple(student.shape)} and targets "
                        f"{tuple(targets.shape)} differ in shape")
    s, z = student.float(), targets.float()
    if kind == "l2":
        return torch.linalg.vector_norm(s - z, dim=1).mean()
    if kind == "sum_l2":
        return torch.linalg.vector_norm(s - z, dim=1).sum()
    if kind == "mse":
        return F.mse_loss(s, z)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, z, dim=1, eps=1e-12).mean()
    if kind == "gaussian":
        return (1.0 - torch.exp(-(s - z).pow(2).sum(1) / (2.0 * sigma2))).sum()
    raise ConfigError(f"student_loss: {kind!r} is not one of {', '.join(STUDENT_LOSSES)}")


# ------------------------------------------------------------------------------------------ targets
class TargetTable:
    """Per-image targets of the training split, indexed by dataset index (methods.md §2.6 ``TargetTable``).

    ``targets (N, D)`` float32, ``labels (N,)`` int64 (the training split's contiguous labels, to check that a
    student trains on the same images in the same order), ``classes``: the original class ids (str),
    ``normalized``: whether the rows were L2-normalised, ``master_sha256``: the producing master checkpoint.
    """

    def __init__(self, targets: Tensor, labels: Tensor, *, classes: Sequence[str] = (), normalized: bool = False,
                 master_sha256: str = "", source: str = "targets") -> None:
        if targets.ndim != 2 or labels.ndim != 1 or len(targets) != len(labels):
            raise DataError(f"{source}: targets must be (N, D) and labels (N,), got {tuple(targets.shape)} and "
                            f"{tuple(labels.shape)}")
        if not torch.isfinite(targets).all():
            raise DataError(f"{source}: targets contain NaN or infinite values (the master diverged)")
        self.targets = targets.float().contiguous()
        self.labels = labels.long()
        self.classes = [str(c) for c in classes]
        self.normalized = bool(normalized)
        self.master_sha256 = master_sha256
        self.source = source
        self.sha256 = ""
        self._device_copy: Tensor | None = None

    @property
    def embedding_size(self) -> int:
        return int(self.targets.shape[1])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, indices: Tensor) -> Tensor:
        return self.targets[indices.long().cpu()]

    def on(self, device: torch.device) -> Tensor:
        """The whole table on ``device`` (copied once)."""
        if self._device_copy is None or self._device_copy.device != device:
            self._device_copy = self.targets.to(device)
        return self._device_copy

    def to_dict(self) -> dict[str, Any]:
        return {"kind": TARGETS_KIND, "targets": self.targets, "labels": self.labels, "classes": self.classes,
                "normalized": self.normalized, "master_sha256": self.master_sha256,
                "embedding_size": self.embedding_size}

    @classmethod
    def load(cls, path: str | Path) -> TargetTable:
        """Read a targets file written by the ``targets`` stage (``weights_only``: never runs code)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"targets file {path} does not exist (method.params.targets); run the guided pipeline "
                            "first")
        data = path.read_bytes()
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or foreign files
            raise CheckpointError(f"targets file {path} cannot be read: {str(exc).splitlines()[0]}") from None
        if not isinstance(obj, dict) or obj.get("kind") != TARGETS_KIND:
            raise CheckpointError(f"{path} is not a Guided DML targets file ({TARGETS_KIND})")
        try:
            table = cls(obj["targets"], obj["labels"], classes=obj.get("classes", ()),
                        normalized=bool(obj.get("normalized", False)), master_sha256=str(obj.get("master_sha256", "")),
                        source=f"targets file {path}")
        except KeyError as exc:
            raise CheckpointError(f"targets file {path} lacks {exc}") from None
        table.sha256 = hashlib.sha256(data).hexdigest()
        return table

    def check_split(self, labels: np.ndarray, what: str = "the training split") -> None:
        """The table was made for ``labels (N,)``: same length and same label at every index."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(self):
            raise DataError(f"{self.source} holds {len(self)} targets but {what} has {len(labels)} images; the "
                            "targets were made for another data config")
        if not np.array_equal(labels, self.labels.numpy()):
            first = int(np.flatnonzero(labels != self.labels.numpy())[0])
            raise DataError(f"{self.source} does not match {what}: image {first} has label {labels[first]} there "
                            f"and {int(self.labels[first])} in the targets (another data config or order)")


@torch.no_grad()
def compute_targets(master: GuidedMaster, dataset: Any, *, batch_size: int = 512,
                    device: torch.device | str = "cpu", normalize: bool = False, num_workers: int = 0,
                    should_stop: Any = None) -> tuple[Tensor, Tensor]:
    """Targets ``z_k = head(branch_{y_k}(x_k))`` of every image of ``dataset`` ``(N, D)`` float32 (CPU) and
    labels ``(N,)``, in dataset order: in chunks of ``batch_size``, in eval mode, without gradients (§6.3).
    ``normalize``: L2-normalise the rows. ``should_stop()`` is polled after each chunk (Ctrl-C)."""
    was_training = master.training
    master.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out, labels = [], []
    try:
        for images, y, _ in loader:
            g, _ = master(images.to(device), torch.as_tensor(y).to(device))
            g = g.float()
            out.append((F.normalize(g, dim=1, eps=1e-12) if normalize else g).cpu())
            labels.append(torch.as_tensor(y).long())
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
    finally:
        master.train(was_training)
    return torch.cat(out), torch.cat(labels)


# ------------------------------------------------------------------------------------------ the student
def _check_loss_params(prefix: str, student_loss_name: str, target_weight: float, dml_weight: float) -> None:
    if student_loss_name not in STUDENT_LOSSES:  # pragma: no cover - the Literal already checks
        raise ConfigError(f"{prefix}student_loss: {student_loss_name!r}")
    if not (math.isfinite(target_weight) and target_weight > 0):
        raise ConfigError(f"{prefix}target_weight: must be > 0 (a student trained by its DML loss alone is "
                          f"`method: {{name: standard}}` with the same config), got {target_weight}")
    if not (math.isfinite(dml_weight) and dml_weight >= 0):
        raise ConfigError(f"{prefix}dml_weight: must be >= 0, got {dml_weight}")


@dataclass
class GuidedStudentParams:
    """``method.params`` of ``method: {name: guided_student}``: ``targets`` (path of a targets file of the
    guided pipeline, required), ``student_loss`` (``l2`` | ``sum_l2`` | ``mse`` | ``cosine`` | ``gaussian``),
    ``target_weight`` (weight of the regression), ``dml_weight`` (weight of the configured ``loss``; 0: the
    paper's student, regression only)."""

    targets: str = ""
    student_loss: Literal["l2", "sum_l2", "mse", "cosine", "gaussian"] = "l2"
    target_weight: float = 1.0
    dml_weight: float = 0.0

    def validate(self) -> None:
        if not self.targets:
            raise ConfigError("method.params.targets: the path of a targets file (the guided pipeline's "
                              "targets/targets.pt) is required")
        _check_loss_params("method.params.", self.student_loss, self.target_weight, self.dml_weight)


def _regression_needs_free_norm(kind: str) -> bool:
    return kind in ("l2", "sum_l2", "mse", "gaussian")


class GuidedStudentMethod(TrainingMethod):
    """``method: {name: guided_student}``: the student of Guided DML (methods.md §6.4).

    Each step embeds the class-balanced batch with the configured model and minimises
    ``target_weight * student_loss(s, z) + dml_weight * loss(s, y)``, ``z`` the targets of the batch's images
    (by dataset index). The model itself is unchanged: the student alone is validated, tested and deployed.
    """

    name = "guided_student"
    custom_step = True

    def __init__(self, params: GuidedStudentParams) -> None:
        super().__init__(params)
        self.params: GuidedStudentParams = params
        self.table: TargetTable | None = None

    def setup(self, info: MethodSetup, model: EmbeddingModel) -> None:
        p = self.params
        if info.has_regularizers:
            raise ConfigError("method guided_student: regularizers (MDR / LSD) are not combined with it; remove "
                              "the regularizers section")
        table = TargetTable.load(p.targets)
        table.check_split(info.train_labels)
        size = model.embedding_size
        if table.embedding_size != size:
            raise ConfigError(f"model.embedding_size is {size} but the targets in {p.targets} have "
                              f"{table.embedding_size} dimensions (the master's embedding size); make them agree")
        head = model.head
        if head.scale_by_mean_distance:
            raise ConfigError("method guided_student: model.scale_by_mean_distance rescales training batches, so "
                              "the student could not regress fixed targets; set it to false")
        if head.normalize and not table.normalized and _regression_needs_free_norm(p.student_loss):
            raise ConfigError(f"method guided_student: the student's embeddings are L2-normalised "
                              f"(model.normalize: true) but the targets in {p.targets} are not, so the "
                              f"{p.student_loss!r} regression cannot reach them; set model.normalize: false, "
                              "normalize the targets (method guided: normalize_targets: true) or use "
                              "student_loss: cosine")
        self.table = table

    def train_step(self, ctx: StepContext, batch: Batch, extra: dict[str, Batch]) -> tuple[float, dict[str, float]]:
        assert self.table is not None, "setup() was not called"
        p = self.params
        images, labels, indices = batch
        with torch.autocast(device_type=ctx.device.type, dtype=torch.float16, enabled=ctx.use_amp):
            emb = ctx.model(images.to(ctx.device, non_blocking=True))
        emb = emb.float()  # loss maths in fp32 (methods.md §1.2)
        targets = self.table.on(ctx.device)[indices.to(ctx.device).long()]
        regression = student_loss(emb, targets, p.student_loss)
        total = p.target_weight * regression
        logs = {"target_loss": float(regression.detach())}
        if p.dml_weight > 0:
            dml = ctx.criterion(emb, labels.to(ctx.device))
            total = total + p.dml_weight * dml
            logs["dml_loss"] = float(dml.detach())
        ctx.optimizer_step(total)
        return float(total.detach()), logs

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["targets_sha256"] = self.table.sha256 if self.table is not None else ""
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        mine = self.table.sha256 if self.table is not None else ""
        if state.get("targets_sha256", mine) != mine:
            raise CheckpointError(f"the run was trained on other targets than {self.params.targets} (their SHA-256 "
                                  "differs); start the student over")


# ------------------------------------------------------------------------------------------ the pipeline
@dataclass
class MasterParams:
    """``method.params.master`` (methods.md §6.1, §6.2, §6.5; defaults: the CIFAR-10 reference).

    Architecture: ``embedding_size`` (null: ``model.embedding_size``, which the student's must equal),
    ``branch_channels``, ``kernel_size``, ``hidden``, ``branch_pool`` (``flatten`` as the reference, or
    ``adaptive``: average-pool to ``pool_size`` x ``pool_size`` first, for large images). Branches:
    ``branch_groups`` (null: one per class; G: classes share G branches, a seeded random balanced assignment),
    or ``branch_grouping: dataset`` (one branch per dataset group: Omniglot alphabet, ...). Loss: ``margin``
    m, ``beta`` β. Episodes: ``episode_size`` B, ``pairs_per_epoch`` (null: all C(C-1) ordered pairs),
    ``resample_episodes``. Optimiser: ``optimizer`` (``sgd`` | ``adam``), ``lr``, ``momentum`` (SGD),
    ``weight_decay``, ``epochs``.
    """

    embedding_size: int | None = None
    branch_channels: list[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 5
    hidden: int = 256
    branch_pool: Literal["flatten", "adaptive"] = "flatten"
    pool_size: int = 5
    branch_groups: int | None = None
    branch_grouping: Literal["random", "dataset"] = "random"
    margin: float = 3.0
    beta: float = 0.003
    episode_size: int = 64
    pairs_per_epoch: int | None = None
    resample_episodes: bool = False
    epochs: int = 12
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.001
    momentum: float = 0.0
    weight_decay: float = 0.0

    def validate(self) -> None:
        key = "method.params.master."

        def check(name: str, ok: bool, need: str) -> None:
            if not ok:
                raise ConfigError(f"{key}{name}: {need}, got {getattr(self, name)!r}")

        check("embedding_size", self.embedding_size is None or self.embedding_size >= 1, "must be >= 1 or null")
        check("branch_channels", len(self.branch_channels) >= 1 and all(c >= 1 for c in self.branch_channels),
              "must be a non-empty list of positive integers")
        check("kernel_size", self.kernel_size >= 1, "must be >= 1")
        check("hidden", self.hidden >= 1, "must be >= 1")
        check("pool_size", self.pool_size >= 1, "must be >= 1")
        check("branch_groups", self.branch_groups is None or self.branch_groups >= 1, "must be >= 1 or null")
        if self.branch_grouping == "dataset" and self.branch_groups is not None:
            raise ConfigError(f"{key}branch_groups: must be null with branch_grouping: dataset (one branch per "
                              "dataset group)")
        check("margin", math.isfinite(self.margin) and self.margin >= 0, "must be >= 0")
        check("beta", 0.0 <= self.beta <= 1.0, "must be in [0, 1]")
        check("episode_size", self.episode_size >= 1, "must be >= 1")
        check("pairs_per_epoch", self.pairs_per_epoch is None or self.pairs_per_epoch >= 1, "must be >= 1 or null")
        check("epochs", self.epochs >= 1, "must be >= 1")
        check("lr", math.isfinite(self.lr) and self.lr > 0, "must be > 0")
        check("momentum", 0.0 <= self.momentum < 1.0, "must be in [0, 1)")
        check("weight_decay", self.weight_decay >= 0, "must be >= 0")


@dataclass
class GuidedParams:
    """``method.params`` of ``method: {name: guided}``: ``master`` (:class:`MasterParams`), the targets
    (``normalize_targets``: L2-normalise them, [LIB]; the reference does not), the student (``student_loss``,
    ``target_weight``, ``dml_weight`` as :class:`GuidedStudentParams`; the student's model, loss, optimiser,
    schedule and epochs are the run config's ``model``, ``loss``, ``optimizer``, ``scheduler``, ``train``),
    and ``master_checkpoint``: the ``master.ckpt`` of another guided run (same data and seed) to reuse
    instead of training a master (it is copied into this run)."""

    master: MasterParams = field(default_factory=MasterParams)
    normalize_targets: bool = False
    student_loss: Literal["l2", "sum_l2", "mse", "cosine", "gaussian"] = "l2"
    target_weight: float = 1.0
    dml_weight: float = 0.0
    master_checkpoint: str | None = None

    def validate(self) -> None:
        _check_loss_params("method.params.", self.student_loss, self.target_weight, self.dml_weight)


#: Data settings that do not change which images a stage sees or how they look.
_DATA_NOT_HASHED = ("num_workers", "classes_per_batch", "samples_per_class")
#: Run settings that do not change a trained student (the engine's resumable keys).
_RUN_NOT_HASHED = (("name",), ("out_dir",), ("train", "device"), ("train", "log_every"), ("data", "num_workers"),
                   ("eval", "batch_size"))


def _fetch(dataset: Any, indices: np.ndarray, seeds: np.ndarray) -> tuple[Tensor, Tensor]:
    """Images ``(n, C, H, W)`` and labels ``(n,)`` of ``dataset[indices]``, each image's augmentation drawn
    from its own seed (so a resumed master sees the same pixels), restoring the caller's RNG."""
    get_batch = getattr(dataset, "get_batch", None)
    if get_batch is not None and is_deterministic(getattr(dataset, "transform", None)):
        items = get_batch([int(i) for i in indices])
    else:
        items = []
        for index, seed in zip(indices, seeds):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(seed))
                items.append(dataset[int(index)])
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items], dtype=torch.long)


def _step_seeds(seed: int, epoch: int, step: int, n: int) -> np.ndarray:
    state = np.random.SeedSequence([seed % 2**63, epoch, step, 3]).generate_state(2, dtype=np.uint32)
    base = (int(state[0]) << 31) ^ int(state[1])
    return (base + np.arange(n, dtype=np.uint64)) % np.uint64(2**63)


def _same_normalisation(cfg: Any) -> None:
    train, test = cfg.data.train_transforms, cfg.data.eval_transforms
    if (train.normalize_mean, train.normalize_std) != (test.normalize_mean, test.normalize_std):
        raise ConfigError(
            "method guided: data.train_transforms and data.eval_transforms normalise differently "
            f"(mean {train.normalize_mean} / {test.normalize_mean}, std {train.normalize_std} / {test.normalize_std}); "
            "master, targets, student and evaluation must see one input normalisation (methods.md §6.5)")


class GuidedMethod(TrainingMethod):
    """``method: {name: guided}``: the three-stage pipeline of Guided DML (see the module docstring)."""

    name = "guided"
    custom_step = False
    pipeline: ClassVar[bool] = True

    def __init__(self, params: GuidedParams) -> None:
        super().__init__(params)
        self.params: GuidedParams = params

    def setup(self, info: MethodSetup, model: EmbeddingModel) -> None:
        raise ConfigError("method guided has three stages (master, targets, student): run it with `dmlgen train` "
                          "(dmlgen.engine.run.train), not with a single Trainer")

    # ------------------------------------------------------------------ declaration
    def stages(self, cfg: Any) -> list[Stage]:
        """master -> targets -> student for the run config ``cfg`` (checked here, before anything runs)."""
        p = self.params
        size = cfg.model.embedding_size
        if p.master.embedding_size is not None and p.master.embedding_size != size:
            raise ConfigError(f"method.params.master.embedding_size is {p.master.embedding_size} but the student's "
                              f"model.embedding_size is {size}: the student regresses the master's targets, so they "
                              "must agree (or leave master.embedding_size null)")
        if cfg.model.scale_by_mean_distance:
            raise ConfigError("method guided: model.scale_by_mean_distance rescales training batches, so the "
                              "student could not regress fixed targets; set it to false")
        if cfg.model.normalize and not p.normalize_targets and _regression_needs_free_norm(p.student_loss):
            raise ConfigError(f"method guided: the student's embeddings are L2-normalised (model.normalize: true) "
                              f"but the targets are not (method.params.normalize_targets: false), so the "
                              f"{p.student_loss!r} regression cannot reach them; set one of the two, or use "
                              "student_loss: cosine")
        if cfg.regularizers:
            raise ConfigError("method guided: regularizers (MDR / LSD) are not combined with its student; remove "
                              "the regularizers section")
        _same_normalisation(cfg)
        run = cfg.to_dict()
        data = {k: v for k, v in run["data"].items() if k not in _DATA_NOT_HASHED}
        external = None
        if p.master_checkpoint:
            path = Path(p.master_checkpoint)
            if not path.is_file():
                raise DataError(f"method.params.master_checkpoint: {path} does not exist")
            external = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        master_cfg = {"master": dataclasses.asdict(p.master), "embedding_size": size, "data": data,
                      "seed": cfg.train.seed, "external": external}
        targets_cfg = {"data": data, "normalize_targets": p.normalize_targets}
        student_cfg = copy.deepcopy(run)
        for path_keys in _RUN_NOT_HASHED:
            node = student_cfg
            for k in path_keys[:-1]:
                node = node[k]
            node.pop(path_keys[-1], None)
        student_cfg["method"] = {"name": GuidedStudentMethod.name, "params": self._student_params("")}
        student_cfg["method"]["params"].pop("targets")
        what = (f"copy of {p.master_checkpoint}" if external else
                f"{p.master.epochs} epochs of class-pair episodes")
        return [
            Stage("master", "task", master_cfg, run=self._master_stage, description=f"master: {what}"),
            Stage("targets", "task", targets_cfg, inputs=("master",), run=self._targets_stage,
                  description="targets: every training image through its own class's branch"),
            Stage("student", "train", student_cfg, inputs=("targets",), run_config=self._student_config,
                  description=f"student: {cfg.model.backbone} regressing the targets ({p.student_loss}"
                              f"{f' + {p.dml_weight} x {cfg.loss.name}' if p.dml_weight > 0 else ''})"),
        ]

    def _student_params(self, targets: str) -> dict[str, Any]:
        p = self.params
        return {"targets": targets, "student_loss": p.student_loss, "target_weight": p.target_weight,
                "dml_weight": p.dml_weight}

    # ------------------------------------------------------------------ stage 1: the master
    def build_master(self, cfg: Any, train: Any) -> GuidedMaster:
        """A freshly initialised master for the training split ``train`` (seeded by ``train.seed``)."""
        p = self.params.master
        with torch.random.fork_rng(devices=[]):  # the check image's random augmentation must not shift any RNG
            image = train[0][0]
        groups = class_groups_of(train) if p.branch_grouping == "dataset" else None
        branch = branch_assignment(int(train.num_classes), branch_groups=p.branch_groups, grouping=p.branch_grouping,
                                   class_groups=groups, seed=cfg.train.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            return GuidedMaster(branch, tuple(image.shape), p.embedding_size or cfg.model.embedding_size,
                                channels=p.branch_channels, kernel_size=p.kernel_size, hidden=p.hidden,
                                pool=p.branch_pool, pool_size=p.pool_size)

    def _master_stage(self, ctx: StageContext) -> Path:
        if self.params.master_checkpoint:
            return self._copy_master(ctx)
        return train_master(ctx, self)

    def _copy_master(self, ctx: StageContext) -> Path:
        source = Path(self.params.master_checkpoint or "")
        ckpt = ctx.load_file(source)
        master = GuidedMaster.from_checkpoint(ckpt, str(source))
        _check_master_fits(ckpt, master, ctx, str(source))
        ckpt = {k: v for k, v in ckpt.items() if k != "format"}
        ckpt["copied_from"] = str(source)
        ctx.log("master_copied", source=str(source), seconds=ckpt.get("seconds"))
        return ctx.save(ckpt, "master.ckpt")

    # ------------------------------------------------------------------ stage 2: the targets
    def _targets_stage(self, ctx: StageContext) -> Path:
        path = ctx.input_path("master")
        ckpt = ctx.load_file(path)
        master = GuidedMaster.from_checkpoint(ckpt, str(path)).to(ctx.device)
        _check_master_fits(ckpt, master, ctx, str(path))
        train = ctx.splits.train
        # The un-augmented training images, transformed exactly as the student's evaluation sees images.
        plain = train.subset(np.arange(len(train)), transform=getattr(ctx.splits.test, "transform", None))
        start = time.perf_counter()
        targets, labels = compute_targets(master, plain, batch_size=ctx.config.eval.batch_size, device=ctx.device,
                                          normalize=self.params.normalize_targets,
                                          num_workers=ctx.config.data.num_workers, should_stop=ctx.interrupted)
        table = TargetTable(targets, labels, classes=[str(c) for c in train.classes],
                            normalized=self.params.normalize_targets, master_sha256=ctx.input_sha256("master"),
                            source=str(ctx.folder / "targets.pt"))
        norms = targets.norm(dim=1)
        ctx.log("targets", images=len(table), embedding_size=table.embedding_size, seconds=time.perf_counter() - start,
                mean_norm=float(norms.mean()), master_sha256=table.master_sha256)
        return ctx.save(table.to_dict(), "targets.pt")

    # ------------------------------------------------------------------ stage 3: the student
    def _student_config(self, ctx: StageContext) -> dict[str, Any]:
        run = ctx.config.to_dict()
        run["name"] = f"{run['name']}-student"
        run["method"] = {"name": GuidedStudentMethod.name,
                         "params": self._student_params(str(ctx.input_path("targets")))}
        return run


def _check_master_fits(ckpt: dict[str, Any], master: GuidedMaster, ctx: StageContext, source: str) -> None:
    """The master was trained on this run's training classes, at this image shape and embedding size."""
    train = ctx.splits.train
    classes = [str(c) for c in train.classes]
    if list(ckpt.get("classes", [])) != classes:
        raise CheckpointError(f"{source}: the master was trained on {len(ckpt.get('classes', []))} other classes "
                              f"than this run's {len(classes)} training classes (another data config)")
    size = ctx.config.model.embedding_size
    if master.arch["embedding_size"] != size:
        raise ConfigError(f"model.embedding_size is {size} but the master in {source} embeds in "
                          f"{master.arch['embedding_size']} dimensions; the student regresses its targets, so they "
                          "must agree")
    with torch.random.fork_rng(devices=[]):
        shape = list(train[0][0].shape)
    if master.arch["image_shape"] != shape:
        raise CheckpointError(f"{source}: the master takes images of shape {master.arch['image_shape']}, this run's "
                              f"are {shape}")


def train_master(ctx: StageContext, method: GuidedMethod) -> Path:
    """Stage 1: train the master on class-pair episodes; resumable (``last.ckpt`` after every epoch and on
    Ctrl-C); returns ``master.ckpt`` (architecture, weights, training classes, history, seconds)."""
    cfg, p = ctx.config, method.params.master
    train = ctx.splits.train
    episodes = PairEpisodes(np.asarray(train.labels), episode_size=p.episode_size, pairs_per_epoch=p.pairs_per_epoch,
                            resample_episodes=p.resample_episodes, seed=cfg.train.seed, class_names=list(train.classes))
    master = method.build_master(cfg, train).to(ctx.device)
    params = list(master.parameters())
    if p.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum,
                                                           weight_decay=p.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
    epoch, step, history, sums, seconds = 0, 0, [], {"loss": 0.0, "triplet": 0.0, "compact": 0.0, "active": 0.0}, 0.0
    state = ctx.load("last.ckpt")
    if state is not None:
        try:
            master.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{ctx.folder / 'last.ckpt'} does not match this master: "
                                  f"{str(exc).splitlines()[0]}") from None
        epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        sums, seconds = dict(state["sums"]), float(state["seconds"])
    ctx.log("master_start", epoch=epoch + 1, step=step, classes=episodes.num_classes, branches=master.num_branches,
            parameters=sum(q.numel() for q in params), flat_dim=master.flat_dim,
            steps_per_epoch=episodes.steps_per_epoch, resumed=state is not None)

    def snapshot() -> dict[str, Any]:
        return {"model": master.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                "history": history, "sums": sums, "seconds": seconds}

    labels_all = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
    master.train()
    while epoch < p.epochs:
        start = time.perf_counter()
        while step < episodes.steps_per_epoch:
            ep = episodes.episode(epoch, step)
            index = np.concatenate([ep.anchors, ep.positives, ep.negatives])
            images, labels = _fetch(train, index, _step_seeds(cfg.train.seed, epoch, step, len(index)))
            if not torch.equal(labels, labels_all[torch.as_tensor(index)]):
                raise DataError("the training split returned other labels than it lists; the data is inconsistent")
            g, h = master(images.to(ctx.device), labels.to(ctx.device))
            n = len(ep.anchors)
            loss, triplet, compact = master_loss(g[:n], g[n:2 * n], g[2 * n:], h[:n], h[n:2 * n], margin=p.margin,
                                                 beta=p.beta)
            if not torch.isfinite(loss):
                raise DataError(f"the master's loss is {loss.item()} at epoch {epoch + 1}, episode {step + 1}: "
                                "lower method.params.master.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                d_ap = torch.linalg.vector_norm(g[:n] - g[n:2 * n], dim=1)
                d_an = torch.linalg.vector_norm(g[:n] - g[2 * n:], dim=1)
                sums["active"] += float((d_ap - d_an + p.margin > 0).float().mean())
            for key, value in (("loss", loss), ("triplet", triplet), ("compact", compact)):
                sums[key] += float(value.detach())
            step += 1
            if ctx.interrupted():  # Ctrl-C: save after a whole step, so the resumed master continues exactly
                seconds += time.perf_counter() - start
                ctx.save(snapshot(), "last.ckpt")
                ctx.log("master_interrupted", epoch=epoch + 1, step=step)
                raise KeyboardInterrupt
        seconds += time.perf_counter() - start
        row = {"epoch": epoch + 1, **{k: v / max(step, 1) for k, v in sums.items()}, "episodes": step,
               "seconds": seconds}
        history.append(row)
        ctx.log("master_epoch", **row)
        if ctx.progress:
            print(f"master epoch {epoch + 1}/{p.epochs}: loss {row['loss']:.4f} (triplet {row['triplet']:.4f}, "
                  f"compaction {row['compact']:.4f}, active {row['active']:.2f}), {seconds:.0f} s", flush=True)
        epoch, step = epoch + 1, 0
        sums = {k: 0.0 for k in sums}
        ctx.save(snapshot(), "last.ckpt")
    return ctx.save({"kind": MASTER_KIND, "arch": master.arch, "model": master.state_dict(),
                     "classes": [str(c) for c in train.classes], "params": dataclasses.asdict(p),
                     "history": history, "seconds": seconds}, "master.ckpt")


__all__ = [
    "Episode",
    "GuidedMaster",
    "GuidedMethod",
    "GuidedParams",
    "GuidedStudentMethod",
    "GuidedStudentParams",
    "MasterBranch",
    "MasterParams",
    "PairEpisodes",
    "TargetTable",
    "branch_assignment",
    "class_groups_of",
    "compute_targets",
    "master_loss",
    "student_loss",
    "train_master",
]
