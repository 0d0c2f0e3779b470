"""Unlabeled images for semi-supervised training (SLADE, methods.md §7): datasets, splits and batch streams.

- :class:`UnlabeledDataset` wraps an image dataset and hides its labels: items are ``(image, -1, index)``.
  Where the source had labels (Omniglot alphabets or training classes moved to the unlabeled pool) they are
  kept as :attr:`UnlabeledDataset.hidden_labels`, which training never reads; only the purity report of the
  pseudo labels (NMI against them) does.
- Pools: :func:`split_off_groups` (whole Omniglot alphabets), :func:`split_off_classes` (a fraction of the
  training classes, methods.md §7.4's stand-in when no external pool exists), :func:`unlabeled_image_folder`
  (every image under a folder, e.g. NABirds for CUB), :func:`unlabeled_npz`, and :func:`cap_images`.
- :class:`PooledDataset` joins several datasets (labeled ∪ unlabeled, the SSL pool) as one unlabeled set.
- :class:`RandomBatchSampler`: random batches without replacement, each a pure function of
  ``(seed, epoch, batch)``; :class:`DatasetStream` tells the engine which dataset a method's extra stream
  indexes (the default is the training split).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from dmlgen.data.datasets import IMAGE_EXTENSIONS, ArrayImageDataset, FileImageDataset, OnError, _as_index_array
from dmlgen.errors import CheckpointError, ConfigError, DataError

#: The label every unlabeled item carries (training code must never read a real one).
NO_LABEL = -1
_KEEP: Any = object()


class UnlabeledDataset(Dataset):
    """Images without labels: ``dataset[i] -> (image (C, H, W) float32, -1, i)``.

    Args:
        source: an image dataset (``ArrayImageDataset`` / ``FileImageDataset``: ``subset``, ``transform``).
        hidden_labels: ``(N,)`` int64 class codes of the images where known (for purity reports only), or None.
        origin: where the images come from, for logs (``"omniglot alphabets: ..."``).
    """

    def __init__(self, source: Any, hidden_labels: np.ndarray | None = None, origin: str = "") -> None:
        n = len(source)
        if n == 0:
            raise DataError(f"the unlabeled set is empty ({origin or 'no images'})")
        if hidden_labels is not None:
            hidden_labels = np.asarray(hidden_labels, dtype=np.int64)
            if hidden_labels.shape != (n,):
                raise DataError(f"UnlabeledDataset: {n} images but hidden labels of shape {hidden_labels.shape}")
        self.source = source
        self.hidden_labels = hidden_labels
        self.origin = origin

    def __len__(self) -> int:
        return len(self.source)

    @property
    def transform(self) -> Any:
        return getattr(self.source, "transform", None)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, _, i = self.source[index]
        return image, NO_LABEL, int(i)

    @property
    def get_batch(self) -> Any:
        """``get_batch(indices)``: ``[self[i] for i in indices]`` through the source's batched path (valid for
        deterministic transforms only, as the engine uses it), or None when the source has none."""
        source_batch = getattr(self.source, "get_batch", None)
        if source_batch is None:
            return None

        def get_batch(indices: Sequence[int]) -> list[tuple[Any, int, int]]:
            return [(image, NO_LABEL, int(i)) for image, _, i in source_batch(indices)]

        return get_batch

    def subset(self, indices: Any, transform: Any = _KEEP) -> UnlabeledDataset:
        """Rows ``indices`` (int array or boolean mask), optionally with another transform."""
        idx = _as_index_array(indices, len(self), "UnlabeledDataset.subset")
        if len(idx) == 0:
            raise DataError(f"the unlabeled set is empty after selecting rows ({self.origin})")
        source = self.source.subset(idx) if transform is _KEEP else self.source.subset(idx, transform=transform)
        hidden = None if self.hidden_labels is None else self.hidden_labels[idx]
        return UnlabeledDataset(source, hidden, self.origin)

    def with_transform(self, transform: Any) -> UnlabeledDataset:
        """The same images with another transform (e.g. the eval transform to embed them)."""
        return self.subset(np.arange(len(self)), transform=transform)

    def describe(self) -> dict[str, Any]:
        return {"images": len(self), "origin": self.origin, "hidden_labels": self.hidden_labels is not None}


def _hidden_codes(dataset: Any, idx: np.ndarray) -> np.ndarray:
    """Hidden labels of rows ``idx``: codes of the original class ids (comparable across subsets)."""
    original = np.asarray(dataset.classes)[dataset.labels[idx]]
    _, codes = np.unique(original, return_inverse=True)
    return codes.reshape(-1).astype(np.int64)


def choose_groups(names: Sequence[str], pick: int | Sequence[str], seed: int, what: str) -> list[str]:
    """``pick`` names (a count drawn with ``seed``, or explicit names) among ``names``; at least one must stay."""
    names = list(names)
    if isinstance(pick, (int, np.integer)) and not isinstance(pick, bool):
        n = int(pick)
        if not 1 <= n < len(names):
            raise ConfigError(f"{what}: must be in 1..{len(names) - 1} (the training split has {len(names)} groups; "
                              f"at least one stays labeled), got {n}")
        chosen = np.random.default_rng(seed).choice(len(names), size=n, replace=False)
        return [names[i] for i in sorted(chosen)]
    chosen_names = [pick] if isinstance(pick, str) else list(pick)
    unknown = [a for a in chosen_names if a not in names]
    if unknown:
        raise ConfigError(f"{what}: {unknown} are not groups of the training split; valid: {', '.join(names)}")
    if len(set(chosen_names)) != len(chosen_names):
        raise ConfigError(f"{what}: a group is listed twice: {chosen_names}")
    if not chosen_names:
        raise ConfigError(f"{what}: the list is empty; the unlabeled set would be empty")
    if len(set(chosen_names)) == len(names):
        raise ConfigError(f"{what}: every group of the training split would become unlabeled; keep at least one")
    return chosen_names


def split_off_groups(dataset: Any, pick: int | Sequence[str], seed: int = 0) -> tuple[Any, UnlabeledDataset]:
    """Move whole groups (Omniglot alphabets) of ``dataset`` to an unlabeled set.

    Returns ``(labeled dataset, UnlabeledDataset)``; the moved images keep their classes as hidden labels.
    """
    groups = getattr(dataset, "groups", None)
    if groups is None:
        raise ConfigError("data.unlabeled.source 'train_alphabets' needs a dataset with groups (Omniglot alphabets)")
    names = list(dict.fromkeys(np.asarray(groups).tolist()))
    chosen = choose_groups(names, pick, seed, "data.unlabeled.alphabets")
    moved = np.isin(groups, chosen)
    idx = np.flatnonzero(moved)
    labeled = dataset.subset(np.flatnonzero(~moved))
    unlabeled = UnlabeledDataset(dataset.subset(idx), _hidden_codes(dataset, idx),
                                 f"{len(chosen)} training alphabet(s) without labels: {', '.join(chosen)}")
    return labeled, unlabeled


def split_off_classes(dataset: Any, fraction: float, seed: int = 0) -> tuple[Any, UnlabeledDataset]:
    """Move a ``fraction`` of the classes of ``dataset`` (drawn with ``seed``) to an unlabeled set."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.unlabeled.class_fraction: must be in (0, 1), got {fraction}")
    classes = np.unique(dataset.labels)
    n = int(round(fraction * len(classes)))
    if not 1 <= n < len(classes):
        raise ConfigError(f"data.unlabeled.class_fraction: {fraction} of {len(classes)} training classes moves {n}; "
                          "at least one class must move and one stay")
    chosen = np.random.default_rng(seed).choice(classes, size=n, replace=False)
    moved = np.isin(dataset.labels, chosen)
    idx = np.flatnonzero(moved)
    labeled = dataset.subset(np.flatnonzero(~moved))
    return labeled, UnlabeledDataset(dataset.subset(idx), _hidden_codes(dataset, idx),
                                     f"{n} training class(es) without labels")


def unlabeled_image_folder(root: str | os.PathLike[str], *, channels: int = 3, on_error: OnError = "raise",
                           hidden_labels_from_folders: bool = False,
                           extensions: Sequence[str] = IMAGE_EXTENSIONS) -> UnlabeledDataset:
    """Every image file under ``root`` (recursively, sorted; hidden files and folders ignored).

    ``hidden_labels_from_folders``: the first-level sub-folder of each image is its hidden label (e.g. a
    species folder of NABirds), for purity reports only; images directly in ``root`` then are an error.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"unlabeled image folder {base} does not exist or is not a folder")
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and f.lower().endswith(tuple(e.lower() for e in extensions)))
    if not paths:
        raise DataError(f"the unlabeled set is empty: no image files ({', '.join(extensions)}) under {base}")
    hidden = None
    if hidden_labels_from_folders:
        tops = [Path(p).relative_to(base).parts for p in paths]
        loose = [p for p, parts in zip(paths, tops) if len(parts) < 2]
        if loose:
            raise DataError(f"unlabeled image folder {base}: hidden_labels_from_folders needs one sub-folder per "
                            f"class, but {len(loose)} image(s) lie directly in it (e.g. {loose[0]})")
        _, hidden = np.unique(np.array([parts[0] for parts in tops]), return_inverse=True)
    source = FileImageDataset(paths, np.zeros(len(paths), dtype=np.int64), channels=channels, on_error=on_error)
    if len(source) != len(paths):  # on_error="skip" dropped unreadable files
        kept = set(source.paths)
        keep = np.array([p in kept for p in paths])
        hidden = None if hidden is None else hidden[keep]
    return UnlabeledDataset(source, hidden, f"image folder {base}")


def unlabeled_npz(path: str | os.PathLike[str], images_key: str = "images",
                  labels_key: str | None = "labels") -> UnlabeledDataset:
    """An ``.npz`` with ``images`` (N, H, W) / (N, C, H, W) and, optionally, hidden ``labels`` (N,)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"unlabeled npz file {file} does not exist")
    try:
        with np.load(file, allow_pickle=False) as archive:
            if images_key not in archive.files:
                raise DataError(f"unlabeled npz file {file} has no array {images_key!r}; it holds: "
                                f"{', '.join(archive.files) or 'nothing'}")
            images = archive[images_key]
            hidden = archive[labels_key] if labels_key and labels_key in archive.files else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"unlabeled npz file {file} cannot be read: {type(exc).__name__}: {exc}") from None
    if len(images) == 0:
        raise DataError(f"the unlabeled set is empty: {file} holds no images")
    codes = None
    if hidden is not None:
        if hidden.shape != (len(images),):
            raise DataError(f"unlabeled npz file {file}: {len(images)} images but labels of shape {hidden.shape}")
        _, codes = np.unique(hidden, return_inverse=True)
    try:
        source = ArrayImageDataset(images, np.zeros(len(images), dtype=np.int64))
    except DataError as exc:
        raise DataError(f"unlabeled npz file {file}: {exc}") from None
    return UnlabeledDataset(source, codes, f"npz file {file}")


def cap_images(unlabeled: UnlabeledDataset, max_images: int | None, seed: int = 0) -> UnlabeledDataset:
    """At most ``max_images`` images, a random subset drawn with ``seed`` (kept in their original order)."""
    if max_images is None or max_images >= len(unlabeled):
        return unlabeled
    if max_images < 1:
        raise ConfigError(f"data.unlabeled.max_images: must be >= 1 or null, got {max_images}")
    keep = np.sort(np.random.default_rng(seed).choice(len(unlabeled), size=max_images, replace=False))
    return unlabeled.subset(keep)


class PooledDataset(Dataset):
    """Several image datasets as one unlabeled set: item ``i`` of the pool is ``(image, -1, i)``.

    Used for self-supervised training on labeled ∪ unlabeled images; each part keeps its own transform.
    """

    def __init__(self, parts: Sequence[Any]) -> None:
        parts = [p for p in parts if p is not None]
        if not parts or sum(len(p) for p in parts) == 0:
            raise DataError("PooledDataset: no images")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for a pool of {len(self)} images")
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        image = self.parts[part][i - int(self.offsets[part])][0]
        return image, NO_LABEL, i


class RandomBatchSampler(Sampler[list[int]]):
    """``num_batches`` random batches of ``batch_size`` distinct indices of ``0..num_images-1`` per epoch.

    The indices of an epoch are successive random permutations of all images (a new one when one is used
    up), so every image is drawn once before any is drawn twice. Batch ``b`` of epoch ``e`` is a pure
    function of ``(seed, e, b)``: a resumed run needs only the position. Interface as
    :class:`~dmlgen.data.samplers.ClassBalancedBatchSampler` (``set_epoch``, ``state_dict``).
    """

    def __init__(self, num_images: int, batch_size: int, num_batches: int, seed: int = 0) -> None:
        for name, value, low in (("num_images", num_images, 1), ("batch_size", batch_size, 1),
                                 ("num_batches", num_batches, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"RandomBatchSampler: {name} must be an integer >= {low}, got {value!r}")
        if batch_size > num_images:
            raise ConfigError(f"RandomBatchSampler: batches of {batch_size} distinct images from {num_images} images; "
                              "lower the batch size")
        self.num_images, self.batch_size, self.num_batches = int(num_images), int(batch_size), int(num_batches)
        self.seed = int(seed)
        self._epoch = self._start = self._position = 0
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise DataError(f"RandomBatchSampler: start_batch {start_batch} outside 0..{self.num_batches}")
        self._epoch, self._start, self._position = int(epoch), int(start_batch), int(start_batch)

    def _permutation(self, epoch: int, cycle: int) -> np.ndarray:
        key = (epoch, cycle)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            seq = np.random.SeedSequence([self.seed % 2**63, epoch, cycle, 17])
            self._perms[key] = np.random.default_rng(seq).permutation(self.num_images)
        return self._perms[key]

    def batch(self, epoch: int, number: int) -> np.ndarray:
        """Indices ``(batch_size,)`` int64 of batch ``number`` of ``epoch`` (no side effect)."""
        # Whole batches per permutation: a batch never straddles two permutations, so its indices are distinct.
        per_cycle = self.num_images // self.batch_size
        cycle, slot = divmod(number, per_cycle)
        return self._permutation(epoch, cycle)[slot * self.batch_size:(slot + 1) * self.batch_size].astype(np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        for number in range(start, self.num_batches):
            self._position = number + 1
            yield self.batch(self._epoch, number).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self._epoch, "position": self._position, "num_images": self.num_images,
                "batch_size": self.batch_size, "num_batches": self.num_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_images", "batch_size", "num_batches"):
            if state.get(key) != getattr(self, key):
                raise CheckpointError(f"RandomBatchSampler state has {key}={state.get(key)!r}, this sampler "
                                      f"{getattr(self, key)!r}")
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]), start_batch=int(state["position"]))


class DatasetStream:
    """A method's extra batch stream over ``dataset`` rather than the training split.

    Wraps a batch sampler (``len``, ``set_epoch``, iteration, ``state_dict``); the engine reads
    :attr:`dataset` to load the stream's images (with per-image augmentation seeds of the stream's own).
    """

    def __init__(self, sampler: Any, dataset: Any) -> None:
        self.sampler = sampler
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.sampler)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


__all__ = [
    "NO_LABEL",
    "DatasetStream",
    "PooledDataset",
    "RandomBatchSampler",
    "UnlabeledDataset",
    "cap_images",
    "choose_groups",
    "split_off_classes",
    "split_off_groups",
    "unlabeled_image_folder",
    "unlabeled_npz",
]
