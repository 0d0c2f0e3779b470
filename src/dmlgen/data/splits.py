"""Class-disjoint ("zero-shot") splits on label arrays (methods.md §1.3, §8).

Every function takes labels ``(N,)`` (ints or strings), returns sorted int64 index arrays into
them, and checks that the parts share no class. An empty part is a DataError naming it.
:func:`as_mask` turns an index array into a boolean mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dmlgen.errors import ConfigError, DataError

__all__ = ["as_mask", "kfold_classes", "split_by_class_order", "split_by_group", "train_val_split"]


def _labels(labels: Any, what: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"{what}: labels must be 1-D, got shape {arr.shape}")
    if len(arr) == 0:
        raise DataError(f"{what}: no labels")
    return arr


def _indices_of(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(labels, classes)).astype(np.int64)


def _check_parts(what: str, labels: np.ndarray, parts: dict[str, np.ndarray]) -> None:
    """Non-empty parts with no class in common (cheap; run on every split)."""
    seen: dict[Any, str] = {}
    for name, idx in parts.items():
        if len(idx) == 0:
            raise DataError(f"{what}: the {name} split is empty")
        for c in np.unique(labels[idx]).tolist():
            if c in seen:
                raise DataError(f"{what}: class {c!r} is in both the {seen[c]} and the {name} split")
            seen[c] = name


def as_mask(indices: np.ndarray, n: int) -> np.ndarray:
    """Index array -> boolean mask ``(n,)``."""
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(indices, dtype=np.int64)] = True
    return mask


def _count_from_fraction(fraction: float, total: int, field: str) -> int:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ConfigError(f"{field}: must be a number in (0, 1), got {fraction!r}")
    # The epsilon keeps 0.29 * 100 at 29 despite float rounding.
    return int(math.floor(fraction * total + 1e-9))


def split_by_class_order(labels: Any, train_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The first ``train_fraction`` of the sorted classes train, the rest test (as CUB 1-100 / 101-200).

    Returns ``(train_idx, test_idx)``; raises DataError when either side would have no class.
    """
    y = _labels(labels, "split_by_class_order")
    classes = np.unique(y)
    n_train = _count_from_fraction(train_fraction, len(classes), "split_by_class_order.train_fraction")
    if n_train == 0 or n_train == len(classes):
        side = "train" if n_train == 0 else "test"
        raise DataError(
            f"split_by_class_order: the {side} split is empty (train_fraction={train_fraction} of "
            f"{len(classes)} classes)"
        )
    train_idx, test_idx = _indices_of(y, classes[:n_train]), _indices_of(y, classes[n_train:])
    _check_parts("split_by_class_order", y, {"train": train_idx, "test": test_idx})
    return train_idx, test_idx


def split_by_group(labels: Any, groups: Any, held_out_groups: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole groups (e.g. Omniglot alphabets): returns ``(kept_idx, held_out_idx)``.

    Unknown group names and classes that span a kept and a held-out group are DataErrors.
    """
    y = _labels(labels, "split_by_group")
    g = np.asarray(groups).astype(str)
    if g.shape != y.shape:
        raise DataError(f"split_by_group: groups must have shape {y.shape} like the labels, got {g.shape}")
    held = [str(h) for h in held_out_groups]
    unknown = sorted(set(held) - set(g.tolist()))
    if unknown:
        raise DataError(f"split_by_group: unknown group(s) {', '.join(map(repr, unknown))}")
    is_held = np.isin(g, held)
    kept_idx, held_idx = np.flatnonzero(~is_held).astype(np.int64), np.flatnonzero(is_held).astype(np.int64)
    _check_parts("split_by_group", y, {"kept": kept_idx, "held-out": held_idx})
    return kept_idx, held_idx


def kfold_classes(labels: Any, n_folds: int = 4, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class-disjoint k-fold cross-validation (MLRC preset): ``[(train_idx, val_idx)] * n_folds``.

    The classes are shuffled with ``seed`` and cut into ``n_folds`` near-equal groups; fold ``i``
    validates on group ``i`` and trains on the others, so the validation classes partition the classes.
    """
    y = _labels(labels, "kfold_classes")
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ConfigError(f"kfold_classes.n_folds: must be an integer >= 2, got {n_folds!r}")
    classes = np.unique(y)
    if len(classes) < n_folds:
        raise DataError(f"kfold_classes: {len(classes)} classes cannot make {n_folds} folds")
    rng = np.random.default_rng(seed)
    shuffled = classes[rng.permutation(len(classes))]
    folds = []
    for i, val_classes in enumerate(np.array_split(shuffled, n_folds)):
        val_idx = _indices_of(y, val_classes)
        train_idx = np.setdiff1d(np.arange(len(y)), val_idx).astype(np.int64)
        _check_parts(f"kfold_classes (fold {i})", y, {"train": train_idx, "val": val_idx})
        folds.append((train_idx, val_idx))
    return folds


def train_val_split(
    labels: Any,
    *,
    val_fraction: float | None = None,
    val_classes: int | Sequence[Any] | None = None,
    seed: int = 0,
    groups: Any = None,
    indices: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out validation classes from the **training** images (test images are never passed in).

    Args:
        labels: ``(N,)`` labels of the training images only.
        val_fraction: fraction of the classes to hold out (at least one class, never all).
        val_classes: instead, the number of classes to hold out, or their label values.
        seed: seed of the class (or group) draw.
        groups: optional ``(N,)`` group names; whole groups are then held out, drawn with ``seed``
            until they hold at least the requested number of classes (Omniglot: whole alphabets).
        indices: optional ``(N,)`` ids of these images in a larger dataset; the result is then made
            of these ids instead of positions in ``labels``.

    Returns:
        ``(train, val)`` int64 arrays, sorted, with no class in common (checked).
    """
    y = _labels(labels, "train_val_split")
    if (val_fraction is None) == (val_classes is None):
        raise ConfigError("train_val_split: give exactly one of val_fraction and val_classes")
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(
            f"train_val_split: the training images have {len(classes)} class; validation needs at least 2 classes"
        )
    rng = np.random.default_rng(seed)
    explicit: np.ndarray | None = None
    if val_classes is not None and not isinstance(val_classes, (int, np.integer)):
        explicit = np.unique(np.asarray(list(val_classes)))
        unknown = np.setdiff1d(explicit, classes)
        if len(unknown):
            raise DataError(f"train_val_split: val_classes {unknown.tolist()[:5]} are not training classes")
        if len(explicit) == 0:
            raise DataError("train_val_split: the val split is empty (val_classes is an empty list)")
        n_val = len(explicit)
    elif val_classes is not None:
        if isinstance(val_classes, bool) or not 0 < int(val_classes) < len(classes):
            raise ConfigError(f"train_val_split.val_classes: must be in 1..{len(classes) - 1}, got {val_classes!r}")
        n_val = int(val_classes)
    else:
        assert val_fraction is not None
        n_val = min(max(1, round(_check_fraction(val_fraction) * len(classes))), len(classes) - 1)
    if groups is not None:
        chosen = _whole_groups(y, groups, n_val, rng, explicit)
    elif explicit is not None:
        chosen = explicit
    else:
        chosen = classes[rng.permutation(len(classes))[:n_val]]
    if len(chosen) == len(classes):
        raise DataError("train_val_split: the train split is empty (the validation split holds every class)")
    val_pos = _indices_of(y, chosen)
    train_pos = np.setdiff1d(np.arange(len(y)), val_pos).astype(np.int64)
    _check_parts("train_val_split", y, {"train": train_pos, "val": val_pos})
    if indices is None:
        return train_pos, val_pos
    ids = np.asarray(indices, dtype=np.int64)
    if ids.shape != y.shape:
        raise DataError(f"train_val_split: indices must have shape {y.shape} like the labels, got {ids.shape}")
    return np.sort(ids[train_pos]), np.sort(ids[val_pos])


def _check_fraction(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ConfigError(f"train_val_split.val_fraction: must be a number in (0, 1), got {value!r}")
    return float(value)


def _whole_groups(
    y: np.ndarray, groups: Any, n_val: int, rng: np.random.Generator, explicit: np.ndarray | None
) -> np.ndarray:
    """Classes of whole groups: shuffled groups are taken until they hold ``n_val`` classes."""
    g = np.asarray(groups).astype(str)
    if g.shape != y.shape:
        raise DataError(f"train_val_split: groups must have shape {y.shape} like the labels, got {g.shape}")
    names = np.unique(g)
    if len(names) < 2:
        raise DataError(f"train_val_split: {len(names)} group; holding out whole groups needs at least 2")
    if explicit is not None:
        # Explicit classes: hold out the groups they belong to, so no group is cut in two.
        held = np.unique(g[np.isin(y, explicit)])
    else:
        held_list: list[str] = []
        count = 0
        for name in names[rng.permutation(len(names))]:
            if count >= n_val or len(held_list) == len(names) - 1:
                break
            held_list.append(str(name))
            count += len(np.unique(y[g == name]))
        held = np.array(held_list)
    if len(held) == len(names):
        raise DataError("train_val_split: the train split is empty (the validation classes cover every group)")
    return np.unique(y[np.isin(g, held)])
