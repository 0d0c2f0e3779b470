"""Datasets and builders: (image, label, index) items, label remapping, file errors naming the path/line."""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dmlgen.data.datasets import (
    ArrayImageDataset,
    FileImageDataset,
    check_image_file,
    csv_dataset,
    image_folder_dataset,
    npz_dataset,
)
from dmlgen.errors import ConfigError, DataError


def _write_image(path: Path, size: tuple[int, int] = (12, 10), color: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(color)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _truncated_jpeg(path: Path) -> Path:
    _write_image(path, size=(64, 64), color=9)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """root/<class>/...: two classes, PNG and JPEG, a nested folder, and files that must be ignored."""
    root = tmp_path / "images"
    _write_image(root / "cat" / "b.png", color=1)
    _write_image(root / "cat" / "a.JPG", color=2, fmt="JPEG")
    _write_image(root / "cat" / "nested" / "c.png", color=3)
    _write_image(root / "ant" / "x.jpeg", color=4, fmt="JPEG")
    (root / "ant" / "notes.txt").write_text("not an image")
    _write_image(root / "ant" / ".hidden.png", color=5)
    _write_image(root / ".cache" / "z.png", color=6)
    return root


# --------------------------------------------------------------------------- arrays
def test_array_dataset_items_labels_and_classes() -> None:
    images = np.random.default_rng(0).random((6, 5, 4), dtype=np.float32)
    ds = ArrayImageDataset(images, np.array([30, 10, 30, 20, 10, 30]), groups=list("aabbcc"))
    image, label, index = ds[2]
    assert image.shape == (1, 5, 4) and image.dtype == torch.float32
    assert torch.allclose(image[0], torch.from_numpy(images[2]))
    assert (label, index) == (2, 2) and isinstance(label, int) and isinstance(index, int)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [2, 0, 2, 1, 0, 2]
    assert ds.classes.tolist() == [10, 20, 30] and ds.num_classes == 3
    assert ds.class_to_label == {10: 0, 20: 1, 30: 2}
    assert ds.groups is not None and ds.groups.tolist() == list("aabbcc")
    assert ds[-1][2] == 5 and len(ds) == 6
    with pytest.raises(IndexError):
        ds[6]
    # In-place edits of an item never reach the stored array.
    image.zero_()
    assert float(ds[2][0].sum()) > 0


def test_array_dataset_uint8_channels_and_transform() -> None:
    images = np.full((3, 3, 4, 4), 255, dtype=np.uint8)
    seen = []

    def transform(x: torch.Tensor) -> torch.Tensor:
        seen.append((x.dtype, tuple(x.shape)))
        return x * 0.5

    ds = ArrayImageDataset(images, ["b", "a", "b"], transform=transform)
    image, label, _ = ds[0]
    assert seen == [(torch.float32, (3, 4, 4))], "the transform gets a float (C, H, W) tensor in [0, 1]"
    assert torch.allclose(image, torch.full((3, 4, 4), 0.5))
    assert label == 1 and ds.classes.tolist() == ["a", "b"]


def test_array_dataset_rejects_bad_input() -> None:
    with pytest.raises(DataError, match=r"\[0, 1\].*\[0, 255\]"):
        ArrayImageDataset(np.array([[[0.0, 255.0]]]), [0])
    with pytest.raises(DataError, match="NaN"):
        ArrayImageDataset(np.array([[[np.nan]]], dtype=np.float32), [0])
    with pytest.raises(DataError, match="2 images but 3 labels"):
        ArrayImageDataset(np.zeros((2, 3, 3)), [0, 1, 2])
    with pytest.raises(DataError, match=r"\(N, H, W\) or \(N, C, H, W\)"):
        ArrayImageDataset(np.zeros((2, 3)), [0, 1])
    with pytest.raises(DataError, match="channel-last"):
        ArrayImageDataset(np.zeros((2, 8, 8, 3)), [0, 1])
    with pytest.raises(DataError, match="int32"):
        ArrayImageDataset(np.zeros((2, 3, 3), dtype=np.int32), [0, 1])
    with pytest.raises(DataError, match="labels must be integers or strings"):
        ArrayImageDataset(np.zeros((2, 3, 3)), [0.5, 1.0])


def test_subset_remaps_labels_but_keeps_class_names() -> None:
    ds = ArrayImageDataset(np.zeros((6, 2, 2), dtype=np.uint8), [5, 7, 9, 5, 7, 9], groups=list("xyzxyz"))
    sub = ds.subset(np.array([1, 2, 4, 5]), transform=None)
    assert sub.labels.tolist() == [0, 1, 0, 1] and sub.classes.tolist() == [7, 9]
    assert sub.groups is not None and sub.groups.tolist() == list("yzyz")
    assert sub[3][1:] == (1, 3)
    masked = ds.subset(ds.labels == 0)
    assert masked.classes.tolist() == [5] and len(masked) == 2
    with pytest.raises(DataError, match="empty"):
        ds.subset(np.array([], dtype=np.int64))
    with pytest.raises(DataError, match="out of range"):
        ds.subset([7])


def test_from_omniglot_uses_alphabets_as_groups() -> None:
    fake = types.SimpleNamespace(
        images=np.random.default_rng(0).random((4, 28, 28), dtype=np.float32),
        labels=np.array([964, 970, 964, 970], dtype=np.int64),
        alphabets=np.array(["Greek", "Greek", "Latin", "Latin"]),
    )
    ds = ArrayImageDataset.from_omniglot(fake)  # type: ignore[arg-type]
    assert ds.classes.tolist() == [964, 970] and ds.labels.tolist() == [0, 1, 0, 1]
    assert ds.groups is not None and ds.groups.tolist() == ["Greek", "Greek", "Latin", "Latin"]
    assert ds[0][0].shape == (1, 28, 28)


# --------------------------------------------------------------------------- files
def test_file_dataset_reads_png_and_jpeg(tmp_path: Path) -> None:
    png = _write_image(tmp_path / "a.png", size=(12, 10))
    jpg = _write_image(tmp_path / "b.jpg", size=(7, 9), fmt="JPEG")
    ds = FileImageDataset([png, jpg], ["x", "y"])
    image, label, index = ds[0]
    assert image.shape == (3, 10, 12) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert torch.allclose(image, torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1).float() / 255)
    assert (label, index) == (0, 0)
    assert ds[1][0].shape == (3, 9, 7)
    grey = FileImageDataset([png], [0], channels=1)
    assert grey[0][0].shape == (1, 10, 12)
    with_tf = FileImageDataset([png], [0], transform=lambda im: im.resize((4, 4)))
    assert with_tf[0][0].shape == (3, 4, 4), "a transform returning PIL still yields a float tensor"
    with pytest.raises(ConfigError, match="channels"):
        FileImageDataset([png], [0], channels=2)
    with pytest.raises(ConfigError, match="on_error"):
        FileImageDataset([png], [0], on_error="ignore")  # type: ignore[arg-type]


def test_bad_files_raise_data_errors_naming_the_path(tmp_path: Path) -> None:
    good = _write_image(tmp_path / "good.png")
    truncated = _truncated_jpeg(tmp_path / "truncated.jpg")
    text = tmp_path / "text.jpg"
    text.write_text("this is not a JPEG")
    missing = tmp_path / "missing.png"

    with pytest.raises(DataError, match=f"exist: {re.escape(str(missing))}"):
        FileImageDataset([good, missing], [0, 1])
    ds = FileImageDataset([good, truncated, text], [0, 1, 2])
    assert ds[0][1] == 0
    with pytest.raises(DataError, match=f"{re.escape(str(truncated))} cannot be decoded .*truncated"):
        ds[1]
    with pytest.raises(DataError, match=f"{re.escape(str(text))} is not a readable image"):
        ds[2]
    with pytest.raises(DataError, match=f"2 of 3 image file.*{re.escape(str(truncated))}.*{re.escape(str(text))}"):
        ds.verify()
    assert check_image_file(good) is None
    assert check_image_file(missing) == "file does not exist"
    assert "truncated" in (check_image_file(truncated) or "")
    assert check_image_file(truncated, full=False) is None, "the header of a truncated file is intact"


def test_skip_drops_bad_files_up_front_and_lists_them(tmp_path: Path) -> None:
    paths, labels = [], []
    for i in range(70):  # enough files for the threaded check
        paths.append(_write_image(tmp_path / f"img{i:02d}.png", size=(6, 6), color=i))
        labels.append(f"c{i % 3}")
    truncated = _truncated_jpeg(tmp_path / "t.jpg")
    text = tmp_path / "fake.jpg"
    text.write_text("hello")
    missing = tmp_path / "gone.png"
    paths += [truncated, text, missing]
    labels += ["c0", "lost", "c1"]
    with pytest.warns(UserWarning, match="skipped 3 of 73"):
        ds = FileImageDataset(paths, labels, groups=["g"] * 73, on_error="skip")
    assert len(ds) == 70 and ds.groups is not None and len(ds.groups) == 70
    assert [p for p, _ in ds.skipped] == [str(truncated), str(text), str(missing)]
    reasons = dict(ds.skipped)
    assert "truncated" in reasons[str(truncated)] and "not a readable image" in reasons[str(text)]
    assert reasons[str(missing)] == "file does not exist"
    # Class "lost" had only the bad file: labels stay contiguous.
    assert ds.classes.tolist() == ["c0", "c1", "c2"] and set(ds.labels.tolist()) == {0, 1, 2}
    assert all(ds[i][0].shape == (3, 6, 6) for i in range(len(ds)))
    assert ds.subset(np.arange(5)).skipped == [], "a subset does not report its parent's skips again"
    with pytest.raises(DataError, match="all 2 image file"):
        FileImageDataset([text, missing], [0, 1], on_error="skip")


def test_worker_errors_keep_the_data_error_and_the_path(tmp_path: Path) -> None:
    good = _write_image(tmp_path / "ok.png")
    text = tmp_path / "bad.png"
    text.write_text("nope")
    loader = DataLoader(FileImageDataset([good, text], [0, 1]), batch_size=1, num_workers=2)
    it = iter(loader)
    try:
        with pytest.raises(DataError, match="bad.png"):
            list(it)
    finally:
        # Left to the garbage collector, an iterator that re-raised a worker error takes ~10 s to stop.
        it._shutdown_workers()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- builders
def test_image_folder_dataset_is_sorted_and_ignores_non_images(folder: Path) -> None:
    ds = image_folder_dataset(folder)
    assert ds.classes.tolist() == ["ant", "cat"]
    names = [Path(p).relative_to(folder).as_posix() for p in ds.paths]
    assert names == ["ant/x.jpeg", "cat/a.JPG", "cat/b.png", "cat/nested/c.png"]
    assert ds.labels.tolist() == [0, 1, 1, 1] and ds.groups is None
    assert ds[3][0].shape == (3, 10, 12)
    assert image_folder_dataset(folder).paths == ds.paths, "deterministic"


def test_image_folder_dataset_errors(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope"))):
        image_folder_dataset(tmp_path / "nope")
    (folder / "empty").mkdir()
    (folder / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="without images.*empty"):
        image_folder_dataset(folder)
    flat = tmp_path / "flat"
    _write_image(flat / "loose.png")
    with pytest.raises(DataError, match="loose.png"):
        image_folder_dataset(flat)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        image_folder_dataset(tmp_path / "bare")


def test_csv_dataset_paths_labels_splits_and_groups(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("a.png", "b.png", "c.png", "d.png"):
        _write_image(data / "img" / name)
    csv_file = data / "list.csv"
    csv_file.write_text(
        "path,label,split,group\n"
        "img/a.png,10,train,g1\n"
        "img/b.png,9,train,g2\n"
        "\n"
        f"{data / 'img' / 'c.png'},9,test,g1\n"
        "img/d.png,11,test,g2\n"
    )
    ds = csv_dataset(csv_file)
    assert len(ds) == 4 and ds.classes.tolist() == [9, 10, 11], "integer labels sort numerically"
    assert ds.paths[0] == str(data / "img" / "a.png"), "relative paths resolve against the CSV's folder"
    assert ds.groups is not None and ds.groups.tolist() == ["g1", "g2", "g1", "g2"]
    train = csv_dataset(csv_file, split="train")
    assert len(train) == 2 and train.classes.tolist() == [9, 10]
    other_root = tmp_path / "elsewhere.csv"
    other_root.write_text("path,label\na.png,cat\nb.png,dog\n")
    ds2 = csv_dataset(other_root, root=data / "img")
    assert ds2.classes.tolist() == ["cat", "dog"] and ds2.paths[1] == str(data / "img" / "b.png")
    assert ds2[1][1:] == (1, 1)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("", "is empty; expected a header"),
        ("img/a.png,1\n", "line 1: header must name the columns path,label"),
        ("path,label,path\nimg/a.png,1,x\n", "line 1: duplicate column"),
        ("path,label\nimg/a.png,1\nimg/b.png\n", "line 3: expected 2 fields, got 1"),
        ("path,label\nimg/a.png,1\n,2\n", "line 3: empty path"),
        ("path,label\nimg/a.png,\n", "line 2: empty label"),
        ("path,label\nimg/a.png,1\n\nimg/missing.png,2\n", "line 4: image file .*missing.png does not exist"),
        ("path,label\n", "has a header but no rows"),
        ('path,label\n"img/a.png,1\n', "line .*malformed|line 2: expected 2 fields"),
    ],
)
def test_csv_dataset_errors_name_the_file_and_line(tmp_path: Path, content: str, pattern: str) -> None:
    _write_image(tmp_path / "img" / "a.png")
    _write_image(tmp_path / "img" / "b.png")
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text(content)
    with pytest.raises(DataError, match=pattern) as info:
        csv_dataset(csv_file)
    assert str(csv_file) in str(info.value)


def test_csv_dataset_split_errors_and_missing_file(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.png")
    no_split = tmp_path / "nosplit.csv"
    no_split.write_text("path,label\na.png,1\n")
    with pytest.raises(DataError, match="no 'split' column"):
        csv_dataset(no_split, split="train")
    with_split = tmp_path / "split.csv"
    with_split.write_text("path,label,split\na.png,1,train\n")
    with pytest.raises(DataError, match="no rows with split 'test' \\(splits found: train\\)"):
        csv_dataset(with_split, split="test")
    with pytest.raises(DataError, match="CSV file .*absent.csv does not exist"):
        csv_dataset(tmp_path / "absent.csv")


def test_csv_dataset_skip_mode_reports_bad_rows(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.png")
    _write_image(tmp_path / "b.png", color=3)
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("path,label\na.png,1\nb.png,2\nmissing.png,2\n")
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = csv_dataset(csv_file, on_error="skip")
    assert len(ds) == 2 and ds.skipped == [(str(tmp_path / "missing.png"), "file does not exist")]


def test_npz_dataset(tmp_path: Path) -> None:
    path = tmp_path / "arrays.npz"
    np.savez(path, images=np.zeros((4, 1, 5, 5), dtype=np.uint8), labels=np.array([3, 1, 3, 1]),
             groups=np.array(["a", "a", "b", "b"]))
    ds = npz_dataset(path, groups_key="groups")
    assert len(ds) == 4 and ds.classes.tolist() == [1, 3] and ds[0][0].shape == (1, 5, 5)
    assert ds.groups is not None
    with pytest.raises(DataError, match="no array 'x'.*images, labels, groups"):
        npz_dataset(path, images_key="x")
    with pytest.raises(DataError, match="absent.npz does not exist"):
        npz_dataset(tmp_path / "absent.npz")
    broken = tmp_path / "broken.npz"
    broken.write_text("not a zip")
    with pytest.raises(DataError, match="broken.npz cannot be read"):
        npz_dataset(broken)
    mismatched = tmp_path / "mismatch.npz"
    np.savez(mismatched, images=np.zeros((3, 5, 5), dtype=np.uint8), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="mismatch.npz: 3 images but 2 labels"):
        npz_dataset(mismatched)
    out_of_range = tmp_path / "range.npz"
    np.savez(out_of_range, images=np.full((2, 5, 5), 7.0), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"range.npz: .*\[0, 1\]"):
        npz_dataset(out_of_range)


# --------------------------------------------------------------------------- batched reads
def test_get_batch_equals_item_by_item_for_deterministic_transforms() -> None:
    from torchvision.transforms import v2

    from dmlgen.data.datasets import is_deterministic
    from dmlgen.data.transforms import TransformConfig, build_transforms

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(12, 20, 20), dtype=np.uint8)
    cfg = TransformConfig(image_size=16, resize_to=18, normalize_mean=(0.5,), normalize_std=(0.25,))
    transform = build_transforms(cfg, train=False)
    assert is_deterministic(transform)
    ds = ArrayImageDataset(images, np.arange(12) % 4, transform=transform)
    order = [5, 0, 11, 5, 3]
    batch = ds.get_batch(order)
    assert [b[2] for b in batch] == order and [b[1] for b in batch] == [ds[i][1] for i in order]
    for (image, _, i) in batch:
        single = ds[i][0]
        assert image.shape == single.shape == (1, 16, 16)
        assert torch.allclose(image, single, atol=1e-6)
    # augmenting pipelines are not batched: they draw per image
    assert not is_deterministic(build_transforms(TransformConfig(horizontal_flip=True), train=True))
    assert not is_deterministic(v2.Compose([v2.ToImage(), v2.RandomAffine(degrees=5)]))
    assert not is_deterministic(lambda x: x)  # unknown callables are assumed random


def test_seeded_dataset_batches_match_per_item_reads() -> None:
    from dmlgen.data.transforms import TransformConfig, build_transforms
    from dmlgen.engine.setup import SeededDataset

    rng = np.random.default_rng(4)
    images = rng.random((10, 8, 8)).astype(np.float32)
    items = [(3, 11), (7, 12), (3, 13)]
    for train in (False, True):  # eval: batched path; train with flips: per-image seeded path
        ds = ArrayImageDataset(images, np.arange(10) % 5,
                               transform=build_transforms(TransformConfig(horizontal_flip=True), train=train))
        seeded = SeededDataset(ds)
        batch = seeded.__getitems__(items)
        for got, item in zip(batch, items, strict=True):
            want = seeded[item]
            assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
