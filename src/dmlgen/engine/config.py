"""The run configuration: validated dataclasses loaded from YAML.

A config names things (a dataset kind, a backbone, a loss) from fixed registries; it never
names Python objects. ``load_config(path, overrides)`` is the one way in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dmlgen.data.transforms import TransformConfig
from dmlgen.engine.config_schema import apply_overrides, from_dict, load_yaml, to_dict
from dmlgen.errors import ConfigError


def _positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class UnlabeledConfig:
    """Images without labels for semi-supervised methods (SLADE, docs/slade.md), ``data.unlabeled``.

    ``source``: ``train_alphabets`` (Omniglot: whole training alphabets, ``alphabets`` of them drawn with
    ``seed`` or their names, leave the labeled training split and become the unlabeled pool),
    ``train_classes`` (any dataset: a ``class_fraction`` of the training classes), ``image_folder`` (every
    image under ``path``, e.g. NABirds next to CUB) or ``npz`` (array ``images``, optional ``labels``).
    Labels of moved images are kept hidden: only the pseudo-label purity report reads them
    (``image_folder`` with ``hidden_labels_from_folders``: the first sub-folder's name). ``max_images``: a
    random subset of at most that many images (drawn with ``seed``).
    """

    source: Literal["train_alphabets", "train_classes", "image_folder", "npz"] = "train_alphabets"
    alphabets: int | list[str] = 15
    class_fraction: float = 0.5
    path: str | None = None
    hidden_labels_from_folders: bool = False
    max_images: int | None = None
    seed: int = 0

    def check(self) -> None:
        """Cross-field checks, run by :meth:`DataConfig.validate` (an error raised while the optional section is
        converted would be reported only as "not a valid UnlabeledConfig | None")."""
        if self.source in ("image_folder", "npz") and not self.path:
            raise ConfigError(f"data.unlabeled.path: required for source {self.source!r}")
        if self.source not in ("image_folder", "npz") and self.path:
            raise ConfigError(f"data.unlabeled.path: not used by source {self.source!r}; remove it")
        if not 0.0 < self.class_fraction < 1.0:
            raise ConfigError(f"data.unlabeled.class_fraction: must be in (0, 1), got {self.class_fraction}")
        if isinstance(self.alphabets, int) and self.alphabets < 1 or isinstance(self.alphabets, list) \
                and not self.alphabets:
            raise ConfigError(f"data.unlabeled.alphabets: at least one alphabet must lose its labels, got "
                              f"{self.alphabets!r} (an empty unlabeled set)")
        _positive("data.unlabeled.max_images", self.max_images)


@dataclass
class DataConfig:
    """Where the images come from and how the class-disjoint splits are made.

    ``dataset``: ``omniglot`` (embedded), ``image_folder`` (one sub-folder per class), ``csv``
    (``path,label[,split]``) or ``npz`` (arrays ``images``, ``labels``). Without ``test_path`` (and
    without a ``split`` column) the classes are split by order: the first ``train_class_fraction``
    train, the rest test. Validation classes are always taken from the training classes.
    ``cub200``, ``cars196``, ``sop``, ``inshop``, ``cifar10``, ``cifar100``: the benchmark's original files
    under ``path`` with its standard class-disjoint train / test split (In-Shop: test = query, plus a
    gallery); see docs/datasets.md.
    """

    dataset: Literal["omniglot", "image_folder", "csv", "npz",
                     "cub200", "cars196", "sop", "inshop", "cifar10", "cifar100"] = "omniglot"
    path: str | None = None
    test_path: str | None = None
    train_class_fraction: float = 0.5
    image_size: int = 28
    channels: int = 1
    # Omniglot: number of background alphabets held out for validation, or their names.
    val_alphabets: int | list[str] = 5
    # Other datasets: fraction of the training classes held out for validation (0 disables).
    val_class_fraction: float = 0.2
    split_seed: int = 0
    # Keep only the first N classes (sorted) of each split: quick runs, smoke tests, CPU budgets.
    max_classes: int | None = None
    # Class-disjoint cross-validation (dmlgen compare): the training classes (for Omniglot every background
    # alphabet; after max_classes) are shuffled with split_seed and cut into `folds` near-equal groups; group
    # `fold` (0-based) validates and the others train. Replaces val_alphabets / val_class_fraction; the test
    # split is unchanged. None: the usual single hold-out.
    folds: int | None = None
    fold: int = 0
    # Image files that are missing, unreadable or truncated: stop with an error naming them ("raise"), or
    # drop them before training and list them in the run's log and report ("skip").
    on_corrupt_image: Literal["raise", "skip"] = "raise"
    # A training class with one image has no positive pair: stop with an error naming it, or drop it.
    single_image_classes: Literal["raise", "drop"] = "raise"
    classes_per_batch: int = 32
    samples_per_class: int = 4
    num_workers: int = 0
    train_transforms: TransformConfig = field(default_factory=TransformConfig)
    eval_transforms: TransformConfig = field(default_factory=TransformConfig)
    # Images without labels (SLADE): None, or where they come from (UnlabeledConfig).
    unlabeled: UnlabeledConfig | None = None
    # Evaluation protocol. zero_shot: test classes are unseen in training (everything above). closed_set (the
    # G-DML paper's release evaluation): test queries are held-out images of the *training* classes, ranked
    # against the training images (the gallery); CIFAR uses its official train / test files, other datasets
    # hold out closed_set_test_fraction of every training class's images (classes with fewer than 3 images
    # stay in training). Validation stays as configured (held-out classes; CIFAR: none).
    protocol: Literal["zero_shot", "closed_set"] = "zero_shot"
    closed_set_test_fraction: float = 0.25

    def validate(self) -> None:
        if self.protocol == "closed_set":
            if not 0.0 < self.closed_set_test_fraction < 1.0:
                raise ConfigError(f"data.closed_set_test_fraction: must be in (0, 1), got "
                                  f"{self.closed_set_test_fraction}")
            if self.folds is not None:
                raise ConfigError("data.protocol: closed_set is not combined with data.folds (cross-validation)")
            if self.dataset in ("cifar10", "cifar100") and self.val_class_fraction > 0:
                raise ConfigError("data.val_class_fraction: must be 0 with data.protocol: closed_set on CIFAR (the "
                                  "official test files hold every class, so held-out validation classes would be "
                                  "tested without being trained)")
        if self.unlabeled is not None:
            self.unlabeled.check()
            if self.unlabeled.source == "train_alphabets" and self.dataset != "omniglot":
                raise ConfigError("data.unlabeled.source: 'train_alphabets' needs dataset omniglot; use "
                                  "train_classes, image_folder or npz")
        if self.dataset != "omniglot" and not self.path:
            raise ConfigError(f"data.path: required for dataset {self.dataset!r}")
        if self.test_path and self.dataset not in ("omniglot", "image_folder", "csv", "npz"):
            raise ConfigError(f"data.test_path: not used by dataset {self.dataset!r}, whose test split is fixed; "
                              "remove it")
        if not 0.0 < self.train_class_fraction < 1.0:
            raise ConfigError(f"data.train_class_fraction: must be in (0, 1), got {self.train_class_fraction}")
        if not 0.0 <= self.val_class_fraction < 1.0:
            raise ConfigError(f"data.val_class_fraction: must be in [0, 1), got {self.val_class_fraction}")
        _positive("data.image_size", self.image_size)
        _positive("data.max_classes", self.max_classes)
        if self.folds is not None and self.folds < 2:
            raise ConfigError(f"data.folds: must be >= 2 (or null for no cross-validation), got {self.folds}")
        if self.folds is None and self.fold != 0:
            raise ConfigError(f"data.fold: {self.fold} needs data.folds (the number of folds)")
        if self.folds is not None and not 0 <= self.fold < self.folds:
            raise ConfigError(f"data.fold: must be in 0..{self.folds - 1} (data.folds={self.folds}), got {self.fold}")
        if self.dataset == "omniglot":
            if self.channels != 1:
                raise ConfigError(f"data.channels: Omniglot images have 1 channel, got {self.channels}")
            if self.image_size > 105:
                raise ConfigError(f"data.image_size: Omniglot images are at most 105 pixels, got {self.image_size}")
        if self.classes_per_batch < 2:
            raise ConfigError(f"data.classes_per_batch: must be >= 2 (negatives come from other classes), "
                              f"got {self.classes_per_batch}")
        _positive("data.samples_per_class", self.samples_per_class)
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        if self.channels not in (1, 3):
            raise ConfigError(f"data.channels: must be 1 or 3, got {self.channels}")


@dataclass
class ModelConfig:
    backbone: str = "convnet4"
    embedding_size: int = 128
    head_hidden: list[int] = field(default_factory=list)
    normalize: bool = True
    weights: str | None = None
    imagenet: bool = False
    freeze_bn: bool = False
    # MDR's "learning without L2 norm": in training, divide the embeddings by the batch's mean pairwise
    # distance (gradients flow through it); evaluation returns them unscaled. Needs normalize: false.
    scale_by_mean_distance: bool = False

    def validate(self) -> None:
        _positive("model.embedding_size", self.embedding_size)
        if self.scale_by_mean_distance and self.normalize:
            raise ConfigError("model.scale_by_mean_distance: true replaces the L2 normalisation; "
                              "set model.normalize: false as well")


@dataclass
class MinerConfig:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    name: str = "triplet_margin"
    params: dict[str, Any] = field(default_factory=dict)
    miner: MinerConfig | None = None
    # Learning rate of the loss's own parameters (proxies, margin beta); None = the model's.
    lr: float | None = None


@dataclass
class RegularizerConfig:
    """One regularizer added to the loss: ``weight * value`` (plus its own penalty), e.g. MDR or LSD.

    ``weight`` is MDR's λ or LSD's α (LSD ramps it up as ``(e / E) * α * τ²``); ``params`` go to the
    regularizer (see ``dmlgen.losses.regularizers``).
    """

    name: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _positive("regularizers[].weight", self.weight, allow_zero=True)


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    # Multiplier of the learning rate for the backbone (e.g. 0.1 for a pretrained one).
    backbone_lr_scale: float = 1.0

    def validate(self) -> None:
        _positive("optimizer.lr", self.lr)
        _positive("optimizer.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optimizer.backbone_lr_scale", self.backbone_lr_scale, allow_zero=True)


@dataclass
class SchedulerConfig:
    name: Literal["none", "cosine", "step", "multistep"] = "none"
    step_size: int = 10
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    # Cap on optimisation steps per epoch (None: one pass of the sampler over the training set).
    max_steps_per_epoch: int | None = None
    grad_clip_norm: float | None = None
    amp: bool = True
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    log_every: int = 10
    # Also write last.ckpt every this many steps inside an epoch (None: at epoch ends and on a stop only), so a
    # crash or a killed job loses at most that many steps.
    checkpoint_every_steps: int | None = None

    def validate(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.max_steps_per_epoch", self.max_steps_per_epoch)
        _positive("train.grad_clip_norm", self.grad_clip_norm)
        _positive("train.log_every", self.log_every)
        _positive("train.checkpoint_every_steps", self.checkpoint_every_steps)


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 512
    # Model selection metric on the validation split (never on test).
    select_metric: str = "map@r"
    # Metrics of the final test evaluation (None = all).
    test_metrics: list[str] | None = None
    val_metrics: list[str] = field(default_factory=lambda: ["recall", "precision@1", "r_precision", "map@r"])
    distance: Literal["euclidean", "cosine"] = "euclidean"

    def validate(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"eval.ks: must be positive integers, got {self.ks}")
        _positive("eval.batch_size", self.batch_size)
        selectable = ["map@r", "r_precision", "precision@1", "nmi", "ami", *(f"recall@{k}" for k in self.ks)]
        if self.select_metric not in selectable:
            raise ConfigError(
                f"eval.select_metric: {self.select_metric!r} is not one of {', '.join(selectable)}"
            )
        family = "recall" if self.select_metric.startswith("recall@") else self.select_metric
        if family not in self.val_metrics:
            raise ConfigError(
                f"eval.val_metrics: must include {family!r} to select checkpoints by "
                f"eval.select_metric={self.select_metric!r}, got {self.val_metrics}"
            )


@dataclass
class MethodConfig:
    """The training method (``dmlgen.methods``): ``standard`` (the loss and regularizers, one step per batch)
    or ``sharing`` (Sharing Matters / MIC, methods.md §5); ``slade`` (the SLADE pipeline, methods.md §7) with
    its stage methods ``slade_ssl`` and ``slade_student``; ``guided`` (the Guided DML pipeline, methods.md §6)
    with its student stage method ``guided_student``. ``params`` are checked by the method's own
    dataclass (e.g. ``dmlgen.methods.sharing.SharingParams``); errors name ``method.params.<key>``."""

    name: Literal["standard", "sharing", "slade", "slade_ssl", "slade_student", "guided",
                  "guided_student"] = "standard"
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        self.parsed_params()

    def parsed_params(self) -> Any:
        """``params`` as the method's validated dataclass."""
        from dmlgen.methods import method_params_class  # methods sit below the engine; imported on use

        return from_dict(method_params_class(self.name), copy.deepcopy(self.params), prefix="method.params")


@dataclass
class RunConfig:
    """A whole training run. ``out_dir`` receives checkpoints, logs, metrics and the report."""

    name: str = "run"
    out_dir: str = "runs/run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Added to the loss, each with its weight: e.g. [{name: mdr, weight: 0.1}, {name: lsd, weight: 50}].
    regularizers: list[RegularizerConfig] = field(default_factory=list)
    # How the model is trained: {name: standard} (default) or {name: sharing, params: {...}}.
    method: MethodConfig = field(default_factory=MethodConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate raw data (and ``key=value`` overrides) into a :class:`RunConfig`."""
    data = apply_overrides(copy.deepcopy(data), list(overrides or []))
    return from_dict(RunConfig, data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config and apply ``--set key=value`` overrides.

    Errors name the key and where it came from: the file (``path: ...``) or an override (``--set: ...``).
    """
    data = load_yaml(path)
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        if overrides:
            try:
                from_dict(RunConfig, copy.deepcopy(data))
            except ConfigError:
                pass  # the file itself is wrong: report it as such
            else:
                raise ConfigError(f"--set: {exc}") from None
        raise ConfigError(f"{path}: {exc}") from None
