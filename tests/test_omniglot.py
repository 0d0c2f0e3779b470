"""Omniglot loader: checksums, pixel convention, labels against classes.csv, class-disjoint splits."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from dmlgen.data.omniglot import (
    OmniglotSet,
    load_omniglot,
    omniglot_alphabets,
    omniglot_root,
    omniglot_splits,
    subset_omniglot,
)
from dmlgen.errors import ConfigError, DataError

ASSETS = omniglot_root()


@pytest.fixture(scope="module")
def evaluation() -> OmniglotSet:
    return load_omniglot("evaluation")


@pytest.fixture(scope="module")
def splits() -> dict[str, OmniglotSet]:
    return omniglot_splits()


@pytest.fixture(scope="module")
def classes_csv() -> list[dict[str, str]]:
    with open(ASSETS / "classes.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def raw_evaluation() -> np.ndarray:
    with np.load(ASSETS / "images_evaluation.npz") as npz:
        return npz["images"]


def _copy_assets(dst: Path) -> Path:
    shutil.copytree(ASSETS, dst)
    return dst


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    # Make the edit visible to the (mtime, size)-keyed cache even on coarse-mtime file systems.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


# --------------------------------------------------------------------------- load_omniglot
def test_evaluation_shapes_dtypes_and_ranges(evaluation: OmniglotSet) -> None:
    assert evaluation.images.shape == (13180, 28, 28)
    assert evaluation.images.dtype == np.float32
    assert evaluation.images.min() >= 0.0 and evaluation.images.max() <= 1.0
    assert evaluation.labels.dtype == np.int64
    assert evaluation.labels.min() == 964 and evaluation.labels.max() == 1622
    assert np.array_equal(np.bincount(evaluation.labels - 964), np.full(659, 20))
    assert len(np.unique(evaluation.alphabets)) == 20
    assert np.array_equal(evaluation.drawers, np.tile(np.arange(20), 659))
    assert evaluation.num_classes == 659 and len(evaluation) == 13180 and evaluation.split == "evaluation"


def test_stroke_is_one(evaluation: OmniglotSet, raw_evaluation: np.ndarray) -> None:
    # Strokes cover a minority of each image; with the wrong polarity the mean would be ~0.9.
    assert 0.02 < evaluation.images.mean() < 0.2
    # Corners are background in every drawing.
    assert evaluation.images[:, 0, 0].max() == 0.0
    # Area resizing preserves the ink fraction (up to window overlap at a non-integer ratio).
    ink = (~raw_evaluation[:3]).reshape(60, -1).mean(axis=1)
    assert np.allclose(evaluation.images[:60].reshape(60, -1).mean(axis=1), ink, atol=0.01)


def test_area_resize_matches_block_mean(raw_evaluation: np.ndarray) -> None:
    # 105 = 3 * 35: area resizing is then exactly the mean of 3x3 blocks of the inverted image.
    small = load_omniglot("evaluation", image_size=35)
    idx = [0, 37, 13179]
    flat = raw_evaluation.reshape(-1, 105, 105)
    for i in idx:
        expected = (~flat[i]).astype(np.float64).reshape(35, 3, 35, 3).mean(axis=(1, 3))
        np.testing.assert_allclose(small.images[i], expected, atol=1e-6)


def test_labels_and_names_follow_classes_csv(evaluation: OmniglotSet, splits: dict[str, OmniglotSet],
                                             classes_csv: list[dict[str, str]]) -> None:
    by_id = {int(r["class_id"]): r for r in classes_csv}
    for data, split in ((evaluation, "evaluation"), (load_omniglot("background"), "background")):
        for i in range(0, len(data), 997):
            row = by_id[int(data.labels[i]) + 1]
            assert row["split"] == split
            assert row["alphabet"] == data.alphabets[i]
            assert row["character"] == data.characters[i]
    # Image order is character-major: image c*20 + d is character c, drawer d.
    assert evaluation.labels[41] == 964 + 2 and evaluation.drawers[41] == 1


def test_repeated_load_is_cached_and_returns_independent_copies(evaluation: OmniglotSet) -> None:
    start = time.perf_counter()
    again = load_omniglot("evaluation")
    assert time.perf_counter() - start < 0.5  # a copy, not a decode + resize (~1 s)
    assert again is not evaluation and again.images.flags.writeable
    assert np.array_equal(again.images, evaluation.images)
    again.images[0] = 1.0
    again.labels[0] = -1
    third = load_omniglot("evaluation")
    assert np.array_equal(third.images[0], evaluation.images[0]) and third.labels[0] == 964
    assert load_omniglot("evaluation", image_size=14).images.shape == (13180, 14, 14)


@pytest.mark.parametrize("kwargs, exc", [
    ({"split": "training"}, ConfigError),
    ({"split": "evaluation", "image_size": 0}, ConfigError),
    ({"split": "evaluation", "image_size": 106}, ConfigError),
    ({"split": "evaluation", "image_size": 28.0}, ConfigError),
])
def test_bad_arguments(kwargs: dict, exc: type) -> None:
    with pytest.raises(exc):
        load_omniglot(**kwargs)


def test_missing_root_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_omniglot("evaluation", root=tmp_path / "nowhere")
    root = _copy_assets(tmp_path / "omniglot")
    (root / "images_evaluation.npz").unlink()
    with pytest.raises(DataError, match="images_evaluation.npz"):
        load_omniglot("evaluation", root=root)


def test_tampered_array_is_rejected(tmp_path: Path) -> None:
    root = _copy_assets(tmp_path / "omniglot")
    # The untouched copy loads (and lands in the cache) ...
    assert len(load_omniglot("evaluation", image_size=7, root=root)) == 13180
    target = root / "images_evaluation.npz"
    # ... a flipped byte in the zip header that np.load alone would not notice is caught by the hash,
    # and the edited file is not served from the cache.
    _flip_byte(target, 10)
    actual = hashlib.sha256(target.read_bytes()).hexdigest()
    expected = (root / "SHA256SUMS").read_text().split()[2]
    with pytest.raises(DataError) as info:
        load_omniglot("evaluation", image_size=7, root=root)
    message = str(info.value)
    assert "images_evaluation.npz" in message and actual in message and expected in message


def test_truncated_array_is_rejected(tmp_path: Path) -> None:
    root = _copy_assets(tmp_path / "omniglot")
    target = root / "images_background.npz"
    target.write_bytes(target.read_bytes()[:100_000])
    with pytest.raises(DataError, match="images_background.npz.*SHA-256"):
        load_omniglot("background", image_size=7, root=root)
    # Without the hash check the damaged archive still fails with a DataError, not a zlib/zip traceback.
    with pytest.raises(DataError, match="images_background.npz"):
        load_omniglot("background", image_size=7, root=root, verify=False)


def test_edited_checksum_file_does_not_launder_a_tampered_array(tmp_path: Path) -> None:
    root = _copy_assets(tmp_path / "omniglot")
    target = root / "images_evaluation.npz"
    _flip_byte(target, 10)
    actual = hashlib.sha256(target.read_bytes()).hexdigest()
    sums = (root / "SHA256SUMS").read_text().splitlines()
    (root / "SHA256SUMS").write_text(sums[0] + "\n" + f"{actual}  images_evaluation.npz\n")
    with pytest.raises(DataError, match="SHA256SUMS"):
        load_omniglot("evaluation", image_size=7, root=root)
    (root / "SHA256SUMS").write_text(sums[0] + "\n")
    with pytest.raises(DataError, match="no entry for images_evaluation.npz"):
        load_omniglot("evaluation", image_size=7, root=root)


# --------------------------------------------------------------------------- splits
def test_splits_are_class_disjoint_and_complete(splits: dict[str, OmniglotSet]) -> None:
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert set(splits) == {"train", "val", "test"}
    assert (train.split, val.split, test.split) == ("train", "val", "test")
    assert len(test) == 13180 and test.num_classes == 659
    assert len(train) + len(val) == 19280 and train.num_classes + val.num_classes == 964
    tr, va, te = (set(s.labels.tolist()) for s in (train, val, test))
    assert not (tr & va) and not (tr & te) and not (va & te)
    # Whole alphabets are held out.
    assert len(set(val.alphabets)) == 5
    assert not set(val.alphabets) & set(train.alphabets)
    # Split arrays are fresh copies, safe to modify.
    assert train.images.flags.writeable and test.images.flags.writeable


def test_val_alphabets_by_seed_are_reproducible() -> None:
    a = omniglot_splits(val_alphabets=3, seed=0)["val"]
    b = omniglot_splits(val_alphabets=3, seed=0)["val"]
    c = omniglot_splits(val_alphabets=3, seed=1)["val"]
    assert set(a.alphabets) == set(b.alphabets)
    assert set(a.alphabets) != set(c.alphabets)
    assert set(a.alphabets) <= set(omniglot_alphabets("background"))


def test_val_alphabets_by_name() -> None:
    parts = omniglot_splits(val_alphabets=["Latin", "Greek"])
    assert sorted(set(parts["val"].alphabets)) == ["Greek", "Latin"]
    assert len(parts["val"]) == 20 * (26 + 24)
    assert "Latin" not in set(parts["train"].alphabets)
    assert set(omniglot_splits(val_alphabets="Latin")["val"].alphabets) == {"Latin"}


def test_val_alphabets_zero_gives_empty_val() -> None:
    parts = omniglot_splits(val_alphabets=0)
    assert len(parts["val"]) == 0 and parts["val"].images.shape == (0, 28, 28)
    assert parts["train"].num_classes == 964


def test_unknown_alphabet_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        omniglot_splits(val_alphabets=["Latin", "Klingon"])
    assert "Klingon" in str(info.value) and "Tifinagh" in str(info.value)
    # Evaluation alphabets are not background alphabets.
    with pytest.raises(ConfigError, match="Angelic"):
        omniglot_splits(val_alphabets=["Angelic"])


@pytest.mark.parametrize("value", [-1, 30, True, ["Latin", "Latin"], 2.5])
def test_bad_val_alphabets(value: object) -> None:
    with pytest.raises(ConfigError):
        omniglot_splits(val_alphabets=value)  # type: ignore[arg-type]


def test_alphabet_lists() -> None:
    background, evaluation = omniglot_alphabets("background"), omniglot_alphabets("evaluation")
    assert len(background) == 30 and len(evaluation) == 20
    assert not set(background) & set(evaluation)


# --------------------------------------------------------------------------- subset
def test_subset_by_mask(evaluation: OmniglotSet) -> None:
    mask = evaluation.alphabets == evaluation.alphabets[0]
    sub = subset_omniglot(evaluation, mask, split="one-alphabet")
    assert len(sub) == int(mask.sum()) and set(sub.alphabets) == {evaluation.alphabets[0]}
    assert np.array_equal(sub.images, evaluation.images[mask]) and sub.split == "one-alphabet"
    assert evaluation.subset(mask).split == "evaluation"
    with pytest.raises(DataError, match="boolean"):
        subset_omniglot(evaluation, np.arange(10))
    with pytest.raises(DataError, match="shape"):
        subset_omniglot(evaluation, mask[:-1])


def test_inconsistent_set_is_rejected() -> None:
    with pytest.raises(DataError, match="alphabets"):
        OmniglotSet(np.zeros((2, 4, 4), np.float32), np.zeros(2, np.int64), np.array(["a"]),
                    np.array(["c", "c"]), np.zeros(2, np.int64))
