"""Class-disjoint splits: disjointness, coverage, determinism and errors naming the empty split."""

from __future__ import annotations

import numpy as np
import pytest

from dmlgen.data.splits import as_mask, kfold_classes, split_by_class_order, split_by_group, train_val_split
from dmlgen.errors import ConfigError, DataError


def _labels(n_classes: int = 10, per_class: int = 3, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(n_classes) * 3 + 100, per_class)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _assert_partition(labels: np.ndarray, *parts: np.ndarray) -> None:
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(labels))), "parts must cover every image once"
    for i, a in enumerate(parts):
        assert np.all(np.diff(a) > 0), "indices are sorted"
        for b in parts[i + 1 :]:
            assert not set(labels[a].tolist()) & set(labels[b].tolist()), "parts must share no class"


def test_split_by_class_order_takes_the_first_classes_for_training() -> None:
    labels = _labels(10)
    train, test = split_by_class_order(labels, train_fraction=0.5)
    _assert_partition(labels, train, test)
    assert sorted(set(labels[train].tolist())) == [100, 103, 106, 109, 112]
    # CUB-like: 200 classes -> 1..100 / 101..200; Cars-like: 196 -> 98 / 98; 0.29 of 100 stays 29.
    assert len(np.unique(split_by_class_order(np.arange(1, 201))[0])) == 100
    assert len(split_by_class_order(np.arange(196))[0]) == 98
    assert len(split_by_class_order(np.arange(100), train_fraction=0.29)[0]) == 29
    mask = as_mask(train, len(labels))
    assert mask.dtype == bool and mask.sum() == len(train) and np.all(mask[train])


def test_split_by_class_order_errors_name_the_empty_split() -> None:
    with pytest.raises(DataError, match="the train split is empty"):
        split_by_class_order(np.arange(3), train_fraction=0.2)
    with pytest.raises(DataError, match="the train split is empty .*of 1 classes"):
        split_by_class_order(np.array([5, 5, 5]), train_fraction=0.5)
    with pytest.raises(ConfigError, match="train_fraction"):
        split_by_class_order(np.arange(4), train_fraction=1.5)


def test_split_by_group_holds_out_whole_groups() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    groups = np.array(["a", "a", "a", "a", "b", "b", "c", "c"])
    kept, held = split_by_group(labels, groups, ["b"])
    _assert_partition(labels, kept, held)
    assert held.tolist() == [4, 5]
    with pytest.raises(DataError, match="unknown group.*'z'"):
        split_by_group(labels, groups, ["z"])
    with pytest.raises(DataError, match="the held-out split is empty"):
        split_by_group(labels, groups, [])
    with pytest.raises(DataError, match="the kept split is empty"):
        split_by_group(labels, groups, ["a", "b", "c"])
    spanning = np.array(["a", "a", "a", "b", "b", "b", "c", "c"])  # class 1 is in a and b
    with pytest.raises(DataError, match="class 1 is in both"):
        split_by_group(labels, spanning, ["b"])


def test_kfold_classes_partition_the_classes() -> None:
    labels = _labels(10, per_class=2)
    folds = kfold_classes(labels, n_folds=4, seed=0)
    assert len(folds) == 4
    val_classes = []
    for train, val in folds:
        _assert_partition(labels, train, val)
        val_classes.append(set(labels[val].tolist()))
    assert sorted(len(v) for v in val_classes) == [2, 2, 3, 3]
    assert set().union(*val_classes) == set(labels.tolist())
    assert sum(len(v) for v in val_classes) == 10, "each class validates in exactly one fold"
    again = kfold_classes(labels, n_folds=4, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = kfold_classes(labels, n_folds=4, seed=1)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))
    with pytest.raises(ConfigError, match="n_folds"):
        kfold_classes(labels, n_folds=1)
    with pytest.raises(DataError, match="3 classes cannot make 4 folds"):
        kfold_classes(np.arange(3), n_folds=4)


def test_train_val_split_takes_validation_classes_from_training_only() -> None:
    labels = _labels(10)
    train, val = train_val_split(labels, val_fraction=0.2, seed=0)
    _assert_partition(labels, train, val)
    assert len(np.unique(labels[val])) == 2
    same = train_val_split(labels, val_fraction=0.2, seed=0)
    assert np.array_equal(same[1], val)
    draws = {tuple(train_val_split(labels, val_fraction=0.2, seed=s)[1]) for s in range(5)}
    assert len(draws) > 1, "the seed picks the classes"
    # A tiny fraction still holds out one class; a count and explicit classes work too.
    assert len(np.unique(labels[train_val_split(labels, val_fraction=0.01)[1]])) == 1
    assert len(np.unique(labels[train_val_split(labels, val_classes=3)[1]])) == 3
    t, v = train_val_split(labels, val_classes=[100, 127])
    assert set(labels[v].tolist()) == {100, 127}
    _assert_partition(labels, t, v)


def test_train_val_split_maps_back_to_dataset_indices() -> None:
    full = _labels(8)
    train_idx, test_idx = split_by_class_order(full, 0.5)
    tr, va = train_val_split(full[train_idx], val_classes=1, indices=train_idx, seed=3)
    _assert_partition(full, tr, va, test_idx)


def test_train_val_split_with_groups_holds_out_whole_groups() -> None:
    labels = np.repeat(np.arange(12), 2)
    groups = np.repeat(np.array(["g0", "g1", "g2", "g3"]), 6)  # 3 classes per group
    train, val = train_val_split(labels, val_fraction=0.3, groups=groups, seed=1)
    _assert_partition(labels, train, val)
    held = set(groups[val].tolist())
    assert not held & set(groups[train].tolist()), "groups are never cut"
    assert len(np.unique(labels[val])) >= 4 and len(held) == 2


def test_train_val_split_errors() -> None:
    labels = _labels(4)
    with pytest.raises(ConfigError, match="exactly one of val_fraction and val_classes"):
        train_val_split(labels)
    with pytest.raises(ConfigError, match="val_fraction"):
        train_val_split(labels, val_fraction=1.0)
    with pytest.raises(ConfigError, match="val_classes"):
        train_val_split(labels, val_classes=4)
    with pytest.raises(DataError, match="not training classes"):
        train_val_split(labels, val_classes=[999])
    with pytest.raises(DataError, match="the val split is empty"):
        train_val_split(labels, val_classes=[])
    with pytest.raises(DataError, match="the train split is empty"):
        train_val_split(labels, val_classes=[100, 103, 106, 109])
    with pytest.raises(DataError, match="at least 2 classes"):
        train_val_split(np.array([1, 1, 1]), val_fraction=0.5)
    with pytest.raises(DataError, match="at least 2"):
        train_val_split(np.array([0, 1, 2, 3]), val_classes=1, groups=np.array(["a"] * 4))
    with pytest.raises(DataError, match="the train split is empty"):
        train_val_split(np.array([0, 1, 2, 3]), val_classes=[0, 2], groups=np.array(["a", "a", "b", "b"]))
