"""ClassBalancedBatchSampler: batch composition, coverage, determinism, resume, DataLoader workers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dmlgen.data.datasets import ArrayImageDataset
from dmlgen.data.samplers import ClassBalancedBatchSampler
from dmlgen.errors import CheckpointError, ConfigError, DataError


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    """Class ids 10, 20, ... with the given counts, in shuffled order."""
    labels = np.repeat((np.arange(len(counts)) + 1) * 10, counts)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _check_batches(sampler: ClassBalancedBatchSampler, labels: np.ndarray, batches: list[list[int]]) -> None:
    p, m = sampler.classes_per_batch, sampler.samples_per_class
    assert len(batches) == len(sampler)
    for i, batch in enumerate(batches):
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert np.all(counts == m), f"batch {i}: every class must give exactly m images"
        if i < sampler.num_full_batches:
            assert len(classes) == p and len(batch) == p * m, f"batch {i} is not P distinct classes x m"
        else:
            assert 1 <= len(classes) <= p


def test_balanced_batches_cover_every_image_once_per_epoch() -> None:
    labels = _labels([8] * 12)  # 12 classes x 2 chunks of 4 -> 24 chunks -> 6 batches of 4 classes
    sampler = ClassBalancedBatchSampler(labels, classes_per_batch=4, samples_per_class=4, seed=3)
    assert len(sampler) == 6 and sampler.batch_size == 16 and sampler.num_repeated == 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        _check_batches(sampler, labels, batches)
        flat = np.concatenate(batches)
        assert np.array_equal(np.sort(flat), np.arange(len(labels))), "every image exactly once"
        assert sampler.epoch_stats() == {
            "epoch": epoch, "batches": 6, "images": 96, "repeated": 0, "dropped_chunks": 0, "unseen_images": 0,
        }


def test_top_up_repeats_images_of_the_same_class_only() -> None:
    # Class sizes 5 and 2 with m = 4: chunks [4 | 1+3 top-ups] and [2+2 top-ups].
    labels = _labels([5, 5, 2, 6, 4, 3])
    sampler = ClassBalancedBatchSampler(labels, classes_per_batch=3, samples_per_class=4, seed=0, drop_last=False)
    chunks = 2 + 2 + 1 + 2 + 1 + 1
    assert sampler.num_repeated == chunks * 4 - len(labels)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        _check_batches(sampler, labels, batches)
        flat = np.concatenate(batches)
        assert set(flat.tolist()) == set(range(len(labels))), "every image at least once"
        assert len(flat) - len(labels) == sampler.num_repeated
        for batch in batches:
            for c in np.unique(labels[batch]):
                chunk = np.asarray(batch)[labels[batch] == c]
                n_c = int((labels == c).sum())
                # A topped-up chunk holds distinct images when its class has >= m of them.
                assert len(np.unique(chunk)) == min(4, n_c)


def test_invariants_hold_on_random_imbalanced_label_sets() -> None:
    rng = np.random.default_rng(1)
    for trial in range(60):
        n_classes = int(rng.integers(2, 15))
        p = int(rng.integers(2, min(n_classes, 6) + 1))
        m = int(rng.integers(1, 5))
        counts = rng.integers(1, 15, size=n_classes)
        if trial % 3 == 0:
            counts[0] = int(rng.integers(40, 90))  # one dominant class
        labels = _labels(counts.tolist(), seed=trial)
        for drop_last in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sampler = ClassBalancedBatchSampler(labels, p, m, seed=trial, drop_last=drop_last)
            batches = list(sampler)
            _check_batches(sampler, labels, batches)
            stats = sampler.epoch_stats()
            seen = np.unique(np.concatenate(batches))
            assert stats["unseen_images"] == len(labels) - len(seen)
            if not drop_last:
                assert len(seen) == len(labels), "drop_last=False must show every image"


def test_drop_last_leftover_is_dropped_and_counted() -> None:
    labels = _labels([4] * 7)  # 7 chunks, P = 3 -> 2 full batches, 1 chunk left over
    dropping = ClassBalancedBatchSampler(labels, 3, 4, seed=0, drop_last=True)
    keeping = ClassBalancedBatchSampler(labels, 3, 4, seed=0, drop_last=False)
    assert len(dropping) == 2 and len(keeping) == 3
    assert len(list(dropping)) == 2
    assert dropping.epoch_stats()["dropped_chunks"] == 1 and dropping.epoch_stats()["unseen_images"] == 4
    last = list(keeping)[-1]
    assert len(last) == 4 and len(np.unique(labels[last])) == 1


def test_dominant_class_never_repeats_within_a_batch() -> None:
    labels = _labels([40, 4, 4, 4])  # 10 chunks of one class, 3 others: at most 3 full batches of P = 2
    sampler = ClassBalancedBatchSampler(labels, 2, 4, seed=0)
    assert len(sampler) == 3
    _check_batches(sampler, labels, list(sampler))
    keeping = ClassBalancedBatchSampler(labels, 2, 4, seed=0, drop_last=False)
    assert len(keeping) == 10  # the 10 chunks of the big class need 10 batches
    batches = list(keeping)
    _check_batches(keeping, labels, batches)
    assert set(np.concatenate(batches).tolist()) == set(range(len(labels)))


def test_deterministic_per_seed_and_epoch_and_independent_of_global_rng() -> None:
    labels = _labels([6, 7, 8, 9, 10, 5, 6, 7], seed=2)
    a = ClassBalancedBatchSampler(labels, 4, 3, seed=11)
    b = ClassBalancedBatchSampler(labels, 4, 3, seed=11)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(123)  # the global RNG must not matter
    assert list(b) == first
    state = torch.random.get_rng_state()
    a.set_epoch(1)
    second = list(a)
    assert torch.equal(state, torch.random.get_rng_state()), "the sampler must not draw from the global RNG"
    assert second != first, "epochs must differ"
    a.set_epoch(0)
    assert list(a) == first, "an epoch is a fixed function of (seed, epoch)"
    assert list(ClassBalancedBatchSampler(labels, 4, 3, seed=12)) != first, "seeds must differ"
    assert a.batches(1) == second


def test_iterating_twice_without_set_epoch_replays_the_epoch() -> None:
    sampler = ClassBalancedBatchSampler(_labels([4] * 6), 3, 2, seed=0)
    assert list(sampler) == list(sampler)


def test_resume_mid_epoch_gives_the_identical_remaining_batches() -> None:
    labels = _labels([9, 7, 8, 12, 5, 6, 10, 4], seed=5)
    sampler = ClassBalancedBatchSampler(labels, 4, 2, seed=7)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2)
    it = iter(sampler)
    consumed = [next(it) for _ in range(3)]
    assert consumed == full[:3]
    state = sampler.state_dict()
    assert (state["seed"], state["epoch"], state["position"]) == (7, 2, 3)

    resumed = ClassBalancedBatchSampler(labels, 4, 2, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    assert list(resumed) == full[3:]
    assert list(resumed) == full, "after the resumed pass, a new pass starts at batch 0"

    # A trainer that counts its own steps resumes with set_epoch(start_batch=...).
    again = ClassBalancedBatchSampler(labels, 4, 2, seed=7)
    again.set_epoch(2, start_batch=5)
    assert list(again) == full[5:]


def test_load_state_dict_rejects_another_run() -> None:
    labels = _labels([4] * 6)
    state = ClassBalancedBatchSampler(labels, 3, 2, seed=0).state_dict()
    with pytest.raises(CheckpointError, match="samples_per_class"):
        ClassBalancedBatchSampler(labels, 3, 4, seed=0).load_state_dict(state)
    with pytest.raises(CheckpointError, match="different training labels"):
        ClassBalancedBatchSampler(np.where(labels == 10, 70, labels), 3, 2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="lacks"):
        ClassBalancedBatchSampler(labels, 3, 2).load_state_dict({"seed": 0})


def test_dataloader_with_two_workers_yields_the_sampler_batches() -> None:
    labels = _labels([6] * 8, seed=4)
    images = np.random.default_rng(0).random((len(labels), 4, 4), dtype=np.float32)
    dataset = ArrayImageDataset(images, labels)
    sampler = ClassBalancedBatchSampler(dataset.labels, 4, 3, seed=1)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        expected = sampler.batches(epoch)
        got = [(x.shape, y.tolist(), idx.tolist()) for x, y, idx in loader]
        assert len(got) == len(sampler) == len(loader)
        for (shape, y, idx), batch in zip(got, expected):
            assert idx == batch
            assert y == dataset.labels[batch].tolist()
            assert shape == (12, 1, 4, 4)


def test_invalid_settings_and_too_few_classes() -> None:
    labels = _labels([4] * 3)
    with pytest.raises(ConfigError, match="classes_per_batch"):
        ClassBalancedBatchSampler(labels, 1, 4)
    with pytest.raises(ConfigError, match="samples_per_class"):
        ClassBalancedBatchSampler(labels, 2, 0)
    with pytest.raises(ConfigError, match="samples_per_class"):
        ClassBalancedBatchSampler(labels, 2, 2.5)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="3 classes, fewer than classes_per_batch=4"):
        ClassBalancedBatchSampler(labels, 4, 2)
    with pytest.raises(DataError, match="non-empty 1-D"):
        ClassBalancedBatchSampler(np.zeros((2, 2)), 2, 2)
    sampler = ClassBalancedBatchSampler(labels, 2, 2)
    with pytest.raises(ConfigError, match="start_batch"):
        sampler.set_epoch(0, start_batch=len(sampler) + 1)


def test_single_image_class_warns_but_is_usable() -> None:
    labels = _labels([1, 4, 4, 4])
    with pytest.warns(UserWarning, match="single image"):
        sampler = ClassBalancedBatchSampler(labels, 2, 3, drop_last=False)
    batches = list(sampler)
    _check_batches(sampler, labels, batches)
    lone = int(np.flatnonzero(labels == 10)[0])
    assert any(batch.count(lone) == 3 for batch in batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClassBalancedBatchSampler(labels, 2, 1)  # m = 1: nothing to repeat, no warning


def test_string_and_object_labels_and_their_state() -> None:
    labels = np.array(["b", "a", "c", "a", "b", "c", "a", "b", "c"], dtype=object)
    sampler = ClassBalancedBatchSampler(labels, 3, 1, seed=4)
    batches = list(sampler)
    assert len(batches) == 3 and all(sorted(labels[b].tolist()) == ["a", "b", "c"] for b in batches)
    copy = ClassBalancedBatchSampler(np.array(labels.tolist(), dtype=object), 3, 1, seed=4)
    copy.load_state_dict(sampler.state_dict())  # the fingerprint does not depend on object identities
    assert copy.batches() == batches
