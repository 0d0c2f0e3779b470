"""Builders that turn config sections into datasets, samplers, models, losses and optimisers."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dmlgen.data.datasets import (
    ArrayImageDataset,
    csv_dataset,
    image_folder_dataset,
    is_deterministic,
    npz_dataset,
)
from dmlgen.data.omniglot import omniglot_splits
from dmlgen.data.samplers import ClassBalancedBatchSampler, shard_batch
from dmlgen.data.splits import kfold_classes, split_by_class_order, train_val_split
from dmlgen.data.standard import STANDARD_DATASETS, load_standard
from dmlgen.data.transforms import TransformConfig, build_transforms
from dmlgen.data.unlabeled import cap_images, split_off_classes, split_off_groups, unlabeled_image_folder, unlabeled_npz
from dmlgen.engine.config import (
    DataConfig,
    LossConfig,
    MethodConfig,
    ModelConfig,
    OptimizerConfig,
    RegularizerConfig,
    SchedulerConfig,
)
from dmlgen.errors import ConfigError, DataError
from dmlgen.losses import LOSSES, build_loss, build_miner
from dmlgen.losses._checks import accepted_params
from dmlgen.losses.regularizers import build_regularizer
from dmlgen.methods import TrainingMethod, build_method
from dmlgen.models import EmbeddingModel, build_model


# --------------------------------------------------------------------------- runtime
def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: {name!r} is not a device name (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------- data
@dataclass
class DataSplits:
    """Class-disjoint train / validation / test datasets (validation classes come from training).

    ``skipped`` lists the image files left out under ``data.on_corrupt_image: skip`` as ``(path, reason)``;
    ``dropped_classes`` the training classes left out under ``data.single_image_classes: drop``.
    ``gallery``: for query-vs-gallery benchmarks (In-Shop) the gallery, with ``test`` the queries; the final
    test evaluation then ranks the gallery for each query instead of leave-one-out within ``test``.
    ``unlabeled``: with ``data.unlabeled``, the images without labels (an ``UnlabeledDataset`` with the training
    transform; SLADE), else None.
    """

    train: Any
    val: Any | None
    test: Any
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dropped_classes: list[str] = field(default_factory=list)
    gallery: Any | None = None
    unlabeled: Any | None = None

    def validation_as_test(self, owner: str) -> DataSplits:
        """These splits with the validation classes as the test split (and no gallery): a cross-validation
        fold, scored without touching the test classes. ``owner`` names the run in the error without them."""
        if self.val is None:
            raise DataError(f"{owner} has no validation classes")
        return dataclasses.replace(self, test=self.val, gallery=None)

    def summary(self) -> dict[str, int]:
        out = {}
        for name in ("train", "val", "test") + (("gallery",) if self.gallery is not None else ()):
            ds = getattr(self, name)
            out[f"{name}_images"] = 0 if ds is None else len(ds)
            out[f"{name}_classes"] = 0 if ds is None else int(ds.num_classes)
        if self.unlabeled is not None:
            out["unlabeled_images"] = len(self.unlabeled)
        out["skipped_images"] = len(self.skipped)
        out["dropped_classes"] = len(self.dropped_classes)
        return out


def _sized(cfg: TransformConfig, image_size: int) -> TransformConfig:
    # Image files come in any size; without an explicit transform size they are resized to data.image_size
    # so that batches stack.
    return cfg if cfg.image_size is not None else dataclasses.replace(cfg, image_size=image_size)


def _first_classes(dataset: Any, n: int | None) -> Any:
    """The first ``n`` classes (contiguous labels ``0..n-1``, i.e. sorted original ids) of ``dataset``."""
    if n is None or n >= dataset.num_classes:
        return dataset
    return dataset.subset(np.flatnonzero(dataset.labels < n))


def _fold_split(pooled: Any, cfg: DataConfig, train_tf: Any, eval_tf: Any) -> tuple[Any, Any]:
    """``(train, val)`` of cross-validation fold ``cfg.fold`` of ``cfg.folds`` over the classes of ``pooled``
    (class-disjoint, drawn with ``cfg.split_seed``; the validation groups of all folds partition the classes)."""
    assert cfg.folds is not None
    try:
        folds = kfold_classes(pooled.labels, n_folds=cfg.folds, seed=cfg.split_seed)
    except DataError as exc:
        raise DataError(f"{_source(cfg)}: data.folds={cfg.folds}: {exc} (check data.max_classes)") from None
    train_idx, val_idx = folds[cfg.fold]
    return pooled.subset(train_idx, transform=train_tf), pooled.subset(val_idx, transform=eval_tf)


def _source(cfg: DataConfig) -> str:
    return "the embedded Omniglot" if cfg.dataset == "omniglot" else f"{cfg.dataset} {cfg.path}"


def _check_single_image_classes(train: Any, cfg: DataConfig) -> tuple[Any, list[str]]:
    """Raise (naming the classes and files) or drop training classes that have one image."""
    counts = np.bincount(train.labels, minlength=train.num_classes)
    singles = np.flatnonzero(counts == 1)
    if len(singles) == 0:
        return train, []
    names = [str(train.classes[c]) for c in singles]
    if cfg.single_image_classes == "drop":
        keep = ~np.isin(train.labels, singles)
        if not keep.any():
            raise DataError(f"{_source(cfg)}: every training class has a single image; nothing to train on")
        return train.subset(np.flatnonzero(keep)), names
    paths = getattr(train, "paths", None)
    examples = []
    for c in singles[:5]:
        (i,) = np.flatnonzero(train.labels == c)
        examples.append(f"{train.classes[c]!s} ({paths[i]})" if paths is not None else f"{train.classes[c]!s}")
    more = f" and {len(singles) - 5} more" if len(singles) > 5 else ""
    raise DataError(
        f"{_source(cfg)}: {len(singles)} training class(es) have a single image, so no positive pair: "
        f"{', '.join(examples)}{more}; add images, remove the class, or set data.single_image_classes: drop"
    )


def _split_unlabeled(train: Any, cfg: DataConfig, train_tf: Any) -> tuple[Any, Any, list[tuple[str, str]]]:
    """``(labeled train, unlabeled set or None, skipped files)`` for ``data.unlabeled`` (before max_classes, so
    that whole alphabets / classes move)."""
    ucfg = cfg.unlabeled
    if ucfg is None:
        return train, None, []
    where = "data.unlabeled"
    try:
        skipped: list[tuple[str, str]] = []
        if ucfg.source == "train_alphabets":
            train, unlabeled = split_off_groups(train, ucfg.alphabets, seed=ucfg.seed)
        elif ucfg.source == "train_classes":
            train, unlabeled = split_off_classes(train, ucfg.class_fraction, seed=ucfg.seed)
        elif ucfg.source == "image_folder":
            assert ucfg.path is not None
            unlabeled = unlabeled_image_folder(ucfg.path, channels=cfg.channels, on_error=cfg.on_corrupt_image,
                                               hidden_labels_from_folders=ucfg.hidden_labels_from_folders)
            skipped = list(getattr(unlabeled.source, "skipped", []))
            unlabeled = unlabeled.with_transform(train_tf)
        else:
            assert ucfg.path is not None
            unlabeled = unlabeled_npz(ucfg.path).with_transform(train_tf)
        unlabeled = cap_images(unlabeled, ucfg.max_images, seed=ucfg.seed)
    except (DataError, ConfigError) as exc:
        raise type(exc)(f"{where} ({ucfg.source}): {exc}") from None
    return train, unlabeled, skipped


def closed_set_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train indices, test indices)``: of every class with n >= 3 images, ``min(max(1, round(fraction * n)),
    n - 2)`` images drawn with ``seed`` are test queries; the rest (at least a positive pair) stay for training.
    Classes with fewer than 3 images stay wholly in training. Both sorted."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**63, 11]))
    labels = np.asarray(labels)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 3:
            continue
        k = min(max(1, int(round(fraction * len(members)))), len(members) - 2)
        test.append(rng.choice(members, size=k, replace=False))
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), test_idx), test_idx


def closed_set_splits(cfg: DataConfig) -> DataSplits:
    """``data.protocol: closed_set`` (G-DML's release evaluation, methods.md §6.4): test queries are images of
    the *training* classes, ranked against the training images (``gallery``, with the evaluation transform).

    CIFAR-10/100: the official train / test files (all classes on both sides; no validation). Other datasets:
    the zero-shot splits, whose test classes are set aside; ``closed_set_test_fraction`` of every training
    class's images become the test queries (:func:`closed_set_holdout`), the validation split is unchanged.
    """
    if cfg.dataset in ("cifar10", "cifar100"):
        from dmlgen.data.standard import load_cifar

        assert cfg.path is not None  # DataConfig.validate
        train_tf = build_transforms(_sized(cfg.train_transforms, cfg.image_size), train=True)
        eval_tf = build_transforms(_sized(cfg.eval_transforms, cfg.image_size), train=False)
        std = load_cifar(cfg.path, 10 if cfg.dataset == "cifar10" else 100, protocol="closed_set")
        train = _first_classes(std.train.subset(np.arange(len(std.train)), transform=train_tf), cfg.max_classes)
        test = _first_classes(std.test.subset(np.arange(len(std.test)), transform=eval_tf), cfg.max_classes)
        train, dropped = _check_single_image_classes(train, cfg)
        _check_channels(train, cfg)
        gallery = train.subset(np.arange(len(train)), transform=eval_tf)
        return DataSplits(train=train, val=None, test=test, dropped_classes=dropped, gallery=gallery)
    splits = build_splits(dataclasses.replace(cfg, protocol="zero_shot"))
    eval_tf = getattr(splits.test, "transform", None)
    train_idx, test_idx = closed_set_holdout(splits.train.labels, cfg.closed_set_test_fraction, cfg.split_seed)
    if len(test_idx) == 0:
        raise DataError(f"{_source(cfg)}: no training class has 3 images, so none can give a closed-set test query "
                        "and keep a positive pair for training")
    train = splits.train.subset(train_idx)
    test = splits.train.subset(test_idx, transform=eval_tf)
    gallery = train.subset(np.arange(len(train)), transform=eval_tf)
    return dataclasses.replace(splits, train=train, test=test, gallery=gallery)


def build_splits(cfg: DataConfig) -> DataSplits:
    """Load the configured dataset and make its class-disjoint train / val / test splits.

    Omniglot: background alphabets minus ``val_alphabets`` train, the held-out alphabets validate, the
    evaluation set tests. Other datasets: ``test_path``, a CSV ``split`` column, or the class order
    (``train_class_fraction``) gives train / test; ``val_class_fraction`` of the training classes validate.
    Standard benchmarks (``cub200``, ``cars196``, ``sop``, ``inshop``, ``cifar10``, ``cifar100``): their fixed
    train / test split (:mod:`dmlgen.data.standard`); In-Shop adds the gallery, with ``test`` the queries.
    With ``data.folds`` set, train / val are fold ``data.fold`` of a class-disjoint k-fold split of all the
    training classes (Omniglot: every background alphabet, less those ``data.unlabeled`` takes) instead; test
    is unchanged.
    ``data.protocol: closed_set``: see :func:`closed_set_splits`.
    """
    if cfg.protocol == "closed_set":
        return closed_set_splits(cfg)
    if cfg.dataset == "omniglot":
        train_tf = build_transforms(cfg.train_transforms, train=True)
        eval_tf = build_transforms(cfg.eval_transforms, train=False)
        if cfg.folds is not None:
            # Cross-validation over every background class (no alphabet is held out).
            parts = omniglot_splits(image_size=cfg.image_size, val_alphabets=0, seed=cfg.split_seed)
            background = ArrayImageDataset.from_omniglot(parts["train"], transform=train_tf)
            # Unlabeled alphabets leave before the folds are cut, so no validation class is in the pool.
            background, unlabeled, _ = _split_unlabeled(background, cfg, train_tf)
            train, val = _fold_split(_first_classes(background, cfg.max_classes), cfg, train_tf, eval_tf)
            test = _first_classes(ArrayImageDataset.from_omniglot(parts["test"], transform=eval_tf), cfg.max_classes)
            train, dropped = _check_single_image_classes(train, cfg)
            return DataSplits(train=train, val=val, test=test, dropped_classes=dropped, unlabeled=unlabeled)
        parts = omniglot_splits(image_size=cfg.image_size, val_alphabets=cfg.val_alphabets, seed=cfg.split_seed)
        val_set = parts["val"]
        train = ArrayImageDataset.from_omniglot(parts["train"], transform=train_tf)
        train, unlabeled, _ = _split_unlabeled(train, cfg, train_tf)
        train = _first_classes(train, cfg.max_classes)
        val = None
        if len(val_set.labels):
            val = _first_classes(ArrayImageDataset.from_omniglot(val_set, transform=eval_tf), cfg.max_classes)
        test = _first_classes(ArrayImageDataset.from_omniglot(parts["test"], transform=eval_tf), cfg.max_classes)
        train, dropped = _check_single_image_classes(train, cfg)
        return DataSplits(train=train, val=val, test=test, dropped_classes=dropped, unlabeled=unlabeled)

    train_tf = build_transforms(_sized(cfg.train_transforms, cfg.image_size), train=True)
    eval_tf = build_transforms(_sized(cfg.eval_transforms, cfg.image_size), train=False)

    def load(path: str, split: str | None = None) -> Any:
        if cfg.dataset == "npz":
            return npz_dataset(path)
        kwargs: dict[str, Any] = {"channels": cfg.channels, "on_error": cfg.on_corrupt_image}
        if cfg.dataset == "image_folder":
            return image_folder_dataset(path, **kwargs)
        return csv_dataset(path, split=split, **kwargs)

    assert cfg.path is not None  # DataConfig.validate
    gallery = None
    if cfg.dataset in STANDARD_DATASETS:
        std = load_standard(cfg.dataset, cfg.path, channels=cfg.channels, on_error=cfg.on_corrupt_image)
        full_train, test, gallery, skipped = std.train, std.test, std.gallery, list(std.skipped)
    elif cfg.test_path:
        full_train, test = load(cfg.path), load(cfg.test_path)
        skipped = list(getattr(full_train, "skipped", [])) + list(getattr(test, "skipped", []))
    elif cfg.dataset == "csv" and _csv_has_split_column(cfg.path):
        full_train, test = load(cfg.path, "train"), load(cfg.path, "test")
        skipped = list(getattr(full_train, "skipped", [])) + list(getattr(test, "skipped", []))
    else:
        full = load(cfg.path)
        skipped = list(getattr(full, "skipped", []))
        try:
            train_idx, test_idx = split_by_class_order(full.labels, train_fraction=cfg.train_class_fraction)
        except DataError as exc:
            raise DataError(f"{_source(cfg)} has {full.num_classes} class(es): {exc}") from None
        full_train, test = full.subset(train_idx), full.subset(test_idx)
    if cfg.folds is not None:
        train, val = _fold_split(_first_classes(full_train, cfg.max_classes), cfg, train_tf, eval_tf)
    elif cfg.val_class_fraction > 0:
        try:
            tr_idx, val_idx = train_val_split(full_train.labels, val_fraction=cfg.val_class_fraction,
                                              seed=cfg.split_seed)
        except DataError as exc:
            raise DataError(
                f"{_source(cfg)}: cannot hold out validation classes ({exc}); set data.val_class_fraction: 0 "
                "to train without validation"
            ) from None
        train, val = full_train.subset(tr_idx, transform=train_tf), full_train.subset(val_idx, transform=eval_tf)
        val = _first_classes(val, cfg.max_classes)
    else:
        train, val = full_train.subset(np.arange(len(full_train)), transform=train_tf), None
    train, unlabeled, unlabeled_skipped = _split_unlabeled(train, cfg, train_tf)
    skipped += unlabeled_skipped
    train = _first_classes(train, cfg.max_classes)
    test = _first_classes(test.subset(np.arange(len(test)), transform=eval_tf), cfg.max_classes)
    if gallery is not None:
        # The gallery follows the queries' classes (max_classes cuts both alike); other items stay distractors.
        keep = np.ones(len(gallery), dtype=bool) if cfg.max_classes is None else \
            np.isin(gallery.classes[gallery.labels], test.classes)
        if not keep.any():
            raise DataError(f"{_source(cfg)}: no gallery image of the first {cfg.max_classes} query classes")
        gallery = gallery.subset(np.flatnonzero(keep), transform=eval_tf)
    train, dropped = _check_single_image_classes(train, cfg)
    _check_channels(train, cfg)
    return DataSplits(train=train, val=val, test=test, skipped=skipped, dropped_classes=dropped, gallery=gallery,
                      unlabeled=unlabeled)


def _check_channels(dataset: Any, cfg: DataConfig) -> None:
    """Fail before training when the images' channels disagree with ``data.channels``."""
    with torch.random.fork_rng(devices=[]):  # a random augmentation must not shift the run's RNG
        image = dataset[0][0]
    if image.shape[0] != cfg.channels:
        raise DataError(
            f"{_source(cfg)}: images have {image.shape[0]} channel(s) but data.channels is {cfg.channels}"
        )


def _csv_has_split_column(path: str) -> bool:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = handle.readline().strip().split(",")
    except FileNotFoundError:
        raise DataError(f"CSV file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read CSV file {path}: {exc}") from None
    return "split" in [h.strip().lower() for h in header]


def build_sampler(cfg: DataConfig, labels: np.ndarray, seed: int, world_size: int = 1) -> ClassBalancedBatchSampler:
    """The class-balanced batch sampler of the training split; too few classes name the config keys.

    ``world_size``: the number of processes that share every batch (distributed training): each takes whole
    classes, so ``data.classes_per_batch`` must be a multiple of it.
    """
    if cfg.classes_per_batch % world_size != 0:
        raise ConfigError(
            f"data.classes_per_batch={cfg.classes_per_batch} cannot be shared by {world_size} processes: each "
            f"process takes whole classes of the batch, so it must be a multiple of {world_size} (or start "
            "another number of processes with torchrun --nproc_per_node)"
        )
    num_classes = len(np.unique(labels))
    if num_classes < cfg.classes_per_batch:
        raise DataError(
            f"the training split has {num_classes} classes, fewer than data.classes_per_batch="
            f"{cfg.classes_per_batch}; lower data.classes_per_batch or use more classes"
        )
    with warnings.catch_warnings():
        # Single-image classes are handled (error or drop) by build_splits; nothing left to warn about.
        warnings.simplefilter("ignore")
        return ClassBalancedBatchSampler(
            labels, classes_per_batch=cfg.classes_per_batch, samples_per_class=cfg.samples_per_class, seed=seed
        )


def _sample_seed(seed: int, epoch: int, batch: int) -> int:
    """A 63-bit seed for one batch, a pure function of (seed, epoch, batch index)."""
    state = np.random.SeedSequence([seed % 2**63, epoch, batch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SeededBatches:
    """A batch sampler whose items are ``(index, seed)``: each image's augmentation draws from its own seed.

    Augmentations (torchvision v2) draw from the global torch RNG of whichever process loads the image. With
    per-image seeds that depend only on (seed, epoch, batch, slot), the augmented batches do not depend on
    the number of workers, on pre-fetching, or on where a resumed run restarts: resume stays exact.

    Distributed training (``world_size > 1``): every process iterates the same global batches and yields its
    ``rank``-th part (:func:`dmlgen.data.samplers.shard_batch`: whole classes), seeded by the global slot, so
    the images and their augmentations are those of a single process with the whole batch.
    """

    def __init__(self, sampler: ClassBalancedBatchSampler, *, seed: int, epoch: int, start_batch: int,
                 num_batches: int, rank: int = 0, world_size: int = 1) -> None:
        self.sampler = sampler
        self.seed = seed
        self.epoch = epoch
        self.start_batch = start_batch
        self.num_batches = num_batches
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        self.sampler.set_epoch(self.epoch, start_batch=self.start_batch)
        for number, batch in enumerate(self.sampler, start=self.start_batch):
            if number >= self.num_batches:
                return
            base = _sample_seed(self.seed, self.epoch, number)
            items = [(index, (base + slot) % 2**63) for slot, index in enumerate(batch)]
            if self.world_size > 1:
                items = shard_batch(items, self.rank, self.world_size, self.sampler.samples_per_class)
            yield items


class SeededDataset(Dataset):
    """Reads ``(index, seed)`` items: ``dataset[index]`` with the global torch RNG seeded, then restored."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, items: list[tuple[int, int]]) -> list[Any]:
        """A whole batch (the DataLoader calls this when defined): in-memory arrays whose transform
        draws no random numbers are read and transformed in one call, identical to item by item."""
        get_batch = getattr(self.dataset, "get_batch", None)
        if get_batch is not None and is_deterministic(getattr(self.dataset, "transform", None)):
            return get_batch([index for index, _ in items])
        return [self[item] for item in items]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        # fork_rng restores the caller's RNG state, so loading never shifts the training step's randomness.
        # Only the CPU generator: torch.manual_seed would also queue lazy CUDA/XPU/MTIA seeding calls, each
        # recording a stack trace (about 0.3 ms per image, a third of a convnet4 training step).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C in a terminal reaches the whole process group; the workers must
    keep serving batches until the main process stops at the end of its step (and saves)."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(dataset: Dataset, batch_sampler: Any, num_workers: int, seed: int) -> DataLoader:
    """A loader whose worker seeds are fixed by ``seed`` and whose workers ignore Ctrl-C."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        persistent_workers=False,
        worker_init_fn=ignore_sigint_in_worker if num_workers > 0 else None,
    )


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "embedding",
    should_stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``(N, D)`` float32 on the CPU and labels ``(N,)`` int64, in dataset order, in eval mode.

    ``should_stop`` is polled after every batch; when it returns True a KeyboardInterrupt is raised
    (the trainer's deferred Ctrl-C).
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        worker_init_fn=ignore_sigint_in_worker if num_workers > 0 else None)
    chunks, labels = [], []
    try:
        for images, y, _ in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            chunks.append(model(images.to(device)).float().cpu())
            labels.append(y)
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
    finally:
        model.train(was_training)
    return torch.cat(chunks), torch.cat(labels).long()


# --------------------------------------------------------------------------- model and loss
def build_model_from_config(cfg: ModelConfig, in_channels: int, *, pretrained: bool = True) -> EmbeddingModel:
    """The configured model. ``pretrained=False`` skips ``weights``/``imagenet`` (no file read, no download):
    for a model whose every weight is about to be replaced by a checkpoint's."""
    if not pretrained:
        with warnings.catch_warnings():
            # freeze_bn without pretrained weights warns about initial statistics; the checkpoint brings its own.
            warnings.simplefilter("ignore", UserWarning)
            return build_model(cfg.backbone, cfg.embedding_size, in_channels=in_channels,
                               head_hidden=tuple(cfg.head_hidden), normalize=cfg.normalize, weights=None,
                               imagenet=False, freeze_bn=cfg.freeze_bn,
                               scale_by_mean_distance=cfg.scale_by_mean_distance)
    return build_model(
        cfg.backbone,
        cfg.embedding_size,
        in_channels=in_channels,
        head_hidden=tuple(cfg.head_hidden),
        normalize=cfg.normalize,
        weights=cfg.weights,
        imagenet=cfg.imagenet,
        freeze_bn=cfg.freeze_bn,
        scale_by_mean_distance=cfg.scale_by_mean_distance,
    )


def build_method_from_config(cfg: MethodConfig) -> TrainingMethod:
    """The configured training method (``method:``), its params validated by the method's dataclass."""
    return build_method(cfg.name, cfg.parsed_params())


def build_run_model(model_cfg: ModelConfig, method_cfg: MethodConfig, in_channels: int, *,
                    pretrained: bool = True, method: TrainingMethod | None = None) -> EmbeddingModel:
    """The model a run trains and deploys: the configured one as its method wraps it (Sharing: a second
    head on the same backbone); ``forward`` is the test-time embedding."""
    model = build_model_from_config(model_cfg, in_channels, pretrained=pretrained)
    return (method or build_method_from_config(method_cfg)).wrap_model(model)


class Criterion(nn.Module):
    """A loss and its optional miner: ``criterion(embeddings (N, D), labels (N,)) -> 0-dim tensor``."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, indices)


def _loss_params(cfg: LossConfig, num_classes: int, embedding_size: int | None) -> dict[str, Any]:
    """``loss.params`` plus the training split's ``num_classes`` and the model's ``embedding_size`` for losses
    with per-class parameters (proxies, margin β) that do not set them; a value that disagrees is an error."""
    params = dict(cfg.params)
    factory = LOSSES.get(cfg.name)
    accepted = accepted_params(factory) if factory is not None else []
    injected = {"num_classes": num_classes, "embedding_size": embedding_size}
    for key, actual in injected.items():
        if key not in accepted or actual is None:
            continue
        if key not in params:
            params[key] = actual
        elif params[key] is not None and params[key] != actual:
            # `num_classes: null` is left alone: the margin loss then shares one β across classes.
            source = "the training split has" if key == "num_classes" else "model.embedding_size is"
            raise ConfigError(
                f"loss.params.{key}: {params[key]!r} is configured but {source} {actual}; remove the key "
                "(it is filled in) or make them agree"
            )
    return params


def build_criterion(cfg: LossConfig, num_classes: int, embedding_size: int | None = None) -> Criterion:
    """Loss (and miner) from the registries.

    Losses with per-class parameters (``num_classes``: proxies, margin β; ``embedding_size``: proxies) get
    the training split's number of classes and the model's embedding size unless ``loss.params`` sets them;
    a configured value that differs raises a ConfigError naming both numbers.
    """
    params = _loss_params(cfg, num_classes, embedding_size)
    try:
        loss = build_loss(cfg.name, **params)
    except ConfigError as exc:
        raise ConfigError(f"loss.name / loss.params: {exc}") from None
    try:
        miner = build_miner(cfg.miner.name, **cfg.miner.params) if cfg.miner is not None else None
    except ConfigError as exc:
        raise ConfigError(f"loss.miner: {exc}") from None
    return Criterion(loss, miner)


def build_regularizers(cfgs: list[RegularizerConfig]) -> nn.ModuleDict:
    """The configured regularizers by name (``mdr``, ``lsd``), in config order; a name may appear once."""
    regs = nn.ModuleDict()
    for i, rc in enumerate(cfgs):
        if rc.name in regs:
            raise ConfigError(f"regularizers[{i}].name: {rc.name!r} is listed twice")
        if "weight" in rc.params:
            raise ConfigError(f"regularizers[{i}].params.weight: set regularizers[{i}].weight instead")
        try:
            regs[rc.name] = build_regularizer(rc.name, weight=rc.weight, **dict(rc.params))
        except ConfigError as exc:
            raise ConfigError(f"regularizers[{i}]: {exc}") from None
    return regs


# --------------------------------------------------------------------------- optimisation
def build_optimizer(
    cfg: OptimizerConfig, model: EmbeddingModel, criterion: nn.Module, loss_lr: float | None = None,
    regularizers: nn.Module | None = None,
) -> torch.optim.Optimizer:
    """Parameter groups: backbone (lr × backbone_lr_scale), head (lr), loss parameters (loss_lr, no decay),
    regularizer parameters such as MDR's levels (lr and weight decay of the model, as in the MDR recipe)."""
    groups = []
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    if backbone and cfg.backbone_lr_scale > 0:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale, "name": "backbone"})
    elif cfg.backbone_lr_scale == 0:
        for p in backbone:
            p.requires_grad_(False)
    if head:
        groups.append({"params": head, "lr": cfg.lr, "name": "head"})
    loss_params = [p for p in criterion.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": loss_lr or cfg.lr, "weight_decay": 0.0, "name": "loss"})
    reg_params = [p for p in regularizers.parameters() if p.requires_grad] if regularizers is not None else []
    if reg_params:
        groups.append({"params": reg_params, "lr": cfg.lr, "name": "regularizers"})
    if not groups:
        raise ConfigError("optimizer: nothing to train (every parameter is frozen)")
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


class _EpochLambda:
    """Learning-rate factor per epoch: linear warm-up, then the chosen decay (picklable, no closures)."""

    def __init__(self, cfg: SchedulerConfig, epochs: int, base_lr: float) -> None:
        self.name = cfg.name
        self.warmup = cfg.warmup_epochs
        self.epochs = epochs
        self.step_size = cfg.step_size
        self.milestones = sorted(cfg.milestones)
        self.gamma = cfg.gamma
        self.min_factor = cfg.min_lr / base_lr if base_lr > 0 else 0.0

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup:
            return (epoch + 1) / (self.warmup + 1)
        if self.name == "cosine":
            span = max(self.epochs - self.warmup, 1)
            progress = min((epoch - self.warmup) / span, 1.0)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.name == "step":
            return self.gamma ** (epoch // self.step_size)
        if self.name == "multistep":
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        return 1.0


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, epochs: int) -> Any:
    """An epoch-wise LambdaLR (stepped once per epoch by the trainer).

    Save it with :func:`scheduler_state`: the factor functions come from the config, not the checkpoint.
    """
    if cfg.name == "step" and cfg.step_size <= 0:
        raise ConfigError(f"scheduler.step_size: must be > 0, got {cfg.step_size}")
    if cfg.name == "multistep" and not cfg.milestones:
        raise ConfigError("scheduler.milestones: required for the multistep scheduler")
    base_lr = optimizer.param_groups[0]["lr"]
    fn = _EpochLambda(cfg, epochs, base_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=[fn] * len(optimizer.param_groups))


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """The scheduler's position without its factor functions' settings.

    LambdaLR would store each callable's attributes and restore them on load, which would silently keep
    the old schedule when a resumed run changes ``train.epochs``; the schedule always follows the config.
    """
    state = scheduler.state_dict()
    state["lr_lambdas"] = [None] * len(state.get("lr_lambdas", []))
    return state
