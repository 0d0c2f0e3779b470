"""Loaders of CUB-200-2011, Cars196, SOP, In-Shop and CIFAR-10/100 on tiny fabricated copies (methods.md §8).

Each copy is written in the original file formats (text lists, a MATLAB v5 struct array, python-pickle
batches) with a few classes of 2-4 tiny images, using the real class ids of each side of the standard split
(e.g. CUB classes 1-3 and 101-103), so that the split rule itself is exercised. The expected splits and labels
are computed here from the fabricated rows, independently of the loaders.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dmlgen.data.standard as standard
from dmlgen.data.datasets import ArrayImageDataset, FileImageDataset
from dmlgen.data.standard import (
    STANDARD_DATASETS,
    load_cars196,
    load_cifar,
    load_cub200,
    load_inshop,
    load_sop,
    load_standard,
    shared_class_codes,
)
from dmlgen.engine.checkpoint import load_checkpoint
from dmlgen.engine.config import config_from_dict, load_config
from dmlgen.engine.setup import build_criterion, build_regularizers, build_splits
from dmlgen.engine.trainer import BEST, Trainer
from dmlgen.errors import ConfigError, DataError
from _fixtures import one_thread  # noqa: F401  (autouse: every test here runs on one thread)

REPO = Path(__file__).resolve().parents[1]


def esc(value: Any) -> str:
    return re.escape(str(value))


def write_png(path: Path, seed: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path)


def pixels_of(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255


# --------------------------------------------------------------------------- fabricated copies
CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross",
               101: "101.White_Pelican", 102: "102.Western_Wood_Pewee", 103: "103.Sayornis"}


def make_cub(parent: Path, per_class: int = 3) -> Path:
    """``parent/CUB_200_2011`` with the classes above; returns the CUB_200_2011 folder."""
    root = parent / "CUB_200_2011"
    root.mkdir(parents=True)
    images, labels, seed = [], [], 0
    for cid, name in CUB_CLASSES.items():
        for k in range(per_class):
            seed += 1
            rel = f"{name}/{name.split('.')[1]}_{k:04d}_{seed}.jpg".replace(".jpg", ".png")
            write_png(root / "images" / rel, seed)
            images.append(f"{seed} {rel}")
            labels.append(f"{seed} {cid}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{c} {n}" for c, n in CUB_CLASSES.items()) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(f"{i + 1} {i % 2}" for i in range(len(images))) + "\n")
    return root


CARS_CLASSES = [1, 2, 3, 99, 100, 101]
CARS_FIELDS = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]


def cars_annotations(rows: list[tuple[str, Any]], fields: list[str] = CARS_FIELDS) -> np.ndarray:
    """A 1×N MATLAB struct array as ``loadmat`` gives it: strings in (1,) arrays, numbers in (1, 1) arrays."""
    annos = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for k, (rel, cls) in enumerate(rows):
        values = {"relative_im_path": np.array([rel]), "class": np.array([[cls]], dtype=np.uint8),
                  "test": np.array([[k % 2]], dtype=np.uint8)}
        for f in fields:
            annos[0, k][f] = values.get(f, np.array([[10 + k]], dtype=np.uint16))
    return annos


def make_cars(root: Path, per_class: int = 3, fields: list[str] = CARS_FIELDS) -> Path:
    from scipy.io import savemat

    rows, n = [], 0
    for cid in CARS_CLASSES:
        for _ in range(per_class):
            n += 1
            rel = f"car_ims/{n:06d}.png"
            write_png(root / rel, 100 + n)
            rows.append((rel, cid))
    names = np.empty((1, 196), dtype=object)
    for k in range(196):
        names[0, k] = np.array([f"Make Model {k + 1}"])
    savemat(str(root / "cars_annos.mat"), {"annotations": cars_annotations(rows, fields), "class_names": names})
    return root


SOP_TRAIN = {1: 1, 2: 1, 3: 2}  # class_id -> super_class_id
SOP_TEST = {11319: 2, 11320: 12}
SOP_SUPER = {1: "bicycle", 2: "cabinet", 12: "toaster"}


def make_sop(parent: Path, per_class: int = 2) -> Path:
    root = parent / "Stanford_Online_Products"
    n = 0
    for name, classes in (("Ebay_train.txt", SOP_TRAIN), ("Ebay_test.txt", SOP_TEST)):
        lines = ["image_id class_id super_class_id path"]
        for cid, sid in classes.items():
            for k in range(per_class):
                n += 1
                rel = f"{SOP_SUPER[sid]}_final/{cid}_{k}.png"
                write_png(root / rel, 200 + n)
                lines.append(f"{n} {cid} {sid} {rel}")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n".join(lines) + "\n")
    (root / "Ebay_info.txt").write_text("image_id class_id super_class_id path\n")
    return root


INSHOP_TRAIN = ["id_00000001", "id_00000002", "id_00000003", "id_00000004"]
INSHOP_TEST = ["id_00000005", "id_00000006", "id_00000007"]


def inshop_rows() -> list[tuple[str, str, str]]:
    """``(image_name, item_id, status)``: 3 train images per train item; 2 query + 2 gallery per test item,
    except the first test item, which has queries but no gallery image (lone queries). So the query and the
    gallery number their items differently (query: 5, 6, 7 -> 0, 1, 2; gallery: 6, 7 -> 0, 1)."""
    rows = []
    for k, item in enumerate(INSHOP_TRAIN):
        category = "WOMEN/Dresses" if k % 2 else "MEN/Denim"
        rows += [(f"img/{category}/{item}/0{v}_1_front.png", item, "train") for v in range(1, 4)]
    for k, item in enumerate(INSHOP_TEST):
        category = "WOMEN/Blouses_Shirts"
        rows += [(f"img/{category}/{item}/0{v}_2_side.png", item, "query") for v in range(1, 3)]
        if k > 0:
            rows += [(f"img/{category}/{item}/0{v}_4_full.png", item, "gallery") for v in range(1, 3)]
    return rows


def write_inshop_list(root: Path, lines: list[str]) -> Path:
    path = root / "Eval" / "list_eval_partition.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def make_inshop(root: Path) -> Path:
    rows = inshop_rows()
    for k, (name, _, _) in enumerate(rows):
        write_png(root / name, 300 + k)
    # Columns are padded with spaces in the original file; any whitespace separates fields.
    write_inshop_list(root, [str(len(rows)), "image_name item_id evaluation_status"]
                      + [f"{n:<60}{i:<20}{s}" for n, i, s in rows])
    return root


def cifar_pickle(path: Path, data: dict[bytes, Any], protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data, protocol=protocol))


def make_cifar(parent: Path, which: int = 10) -> tuple[Path, np.ndarray, np.ndarray]:
    """Tiny CIFAR batches; returns (folder, all images (N, 3, 32, 32) in train-then-test file order, labels).

    CIFAR-10: one image per class in each of data_batch_1..5 and in test_batch (6 per class).
    CIFAR-100: two images per class in train and in test (4 per class).
    """
    rng = np.random.default_rng(which)
    if which == 10:
        root = parent / "cifar-10-batches-py"
        files = [(f"data_batch_{k}", np.arange(10)) for k in range(1, 6)] + [("test_batch", np.arange(10))]
    else:
        root = parent / "cifar-100-python"
        files = [("train", np.repeat(np.arange(100), 2)), ("test", np.repeat(np.arange(100), 2))]
    all_images, all_labels = [], []
    for name, labels in files:
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        entry: dict[bytes, Any] = {b"batch_label": name.encode(), b"data": data,
                                   b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}
        if which == 10:
            entry[b"labels"] = [int(v) for v in labels]
            cifar_pickle(root / name, entry)  # protocol 2, as the original files
        else:
            entry[b"fine_labels"] = [int(v) for v in labels]
            entry[b"coarse_labels"] = [int(v) // 5 for v in labels]
            cifar_pickle(root / name, entry, protocol=5)  # a file re-saved by Python 3 loads too
        all_images.append(data.reshape(-1, 3, 32, 32))
        all_labels.append(labels)
    if which == 10:
        cifar_pickle(root / "batches.meta", {b"label_names": [f"name{k}".encode() for k in range(10)],
                                             b"num_vis": 3072})
    else:
        cifar_pickle(root / "meta", {b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
                                     b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]})
    return root, np.concatenate(all_images), np.concatenate(all_labels)


def original_ids(ds: Any) -> list[Any]:
    """The original class id of every image, from the dataset's labels and classes."""
    return [ds.classes[y].item() if isinstance(ds.classes[y], np.generic) else ds.classes[y] for y in ds.labels]


def quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a loader on a tiny copy, whose counts differ from the standard copy (a warning we test apart)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*differs from the standard one")
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- CUB-200-2011
def test_cub200_split_labels_and_ids(tmp_path: Path) -> None:
    root = make_cub(tmp_path)
    for where in (root, tmp_path):  # the dataset folder or the one above it
        out = load_cub200(where, counts="ignore")
        assert isinstance(out.train, FileImageDataset) and out.gallery is None
        assert out.summary() == {"train_images": 9, "train_classes": 3, "test_images": 9, "test_classes": 3}
        assert out.train.classes.tolist() == [1, 2, 3] and out.test.classes.tolist() == [101, 102, 103]
    # Each image's label is the class of its row in image_class_labels.txt, i.e. its folder here.
    lines = (root / "images.txt").read_text().split("\n")[:-1]
    expected = {str(root / "images" / rel): int(rel[:3]) for rel in (ln.split()[1] for ln in lines)}
    for ds in (out.train, out.test):
        assert [expected[p] for p in ds.paths] == original_ids(ds)
        assert ds.labels.tolist() == sorted(ds.labels.tolist())  # file order, classes in blocks
    assert set(out.train.paths).isdisjoint(out.test.paths)
    assert out.class_names[101] == "101.White_Pelican"
    image, label, index = out.test[4]
    assert image.shape == (3, 8, 8) and (label, index) == (1, 4)
    assert torch.equal(image, pixels_of(out.test.paths[4]))


def test_cub200_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"CUB-200-2011: dataset folder .*nowhere does not exist"):
        load_cub200(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"has no images\.txt \(nor CUB_200_2011/images\.txt\); expected layout"):
        load_cub200(tmp_path)
    root = make_cub(tmp_path)
    labels_file, images_file, classes_file = (root / "image_class_labels.txt", root / "images.txt",
                                              root / "classes.txt")
    good_labels, good_images = labels_file.read_text(), images_file.read_text()

    labels_file.unlink()
    with pytest.raises(DataError, match=f"CUB-200-2011: file {esc(labels_file)} does not exist"):
        load_cub200(root)
    labels_file.write_text(good_labels.replace("4 2\n", "4 2 x\n"))
    with pytest.raises(DataError, match=f"{esc(labels_file)}, line 4: expected 2 fields \\(image_id class_id\\), "
                                        "got 3"):
        load_cub200(root)
    labels_file.write_text(good_labels.replace("5 2\n", "5 201\n"))
    with pytest.raises(DataError, match=f"{esc(labels_file)}, line 5: class_id 201 is out of range 1..200"):
        load_cub200(root)
    labels_file.write_text(good_labels.replace("5 2\n", "5 two\n"))
    with pytest.raises(DataError, match=f"{esc(labels_file)}, line 5: class_id must be an integer, got 'two'"):
        load_cub200(root)
    labels_file.write_text(good_labels.replace("5 2\n", "5 3\n"))
    with pytest.raises(DataError, match=f"{esc(images_file)}, line 5: 002.Laysan_Albatross/.* lies in folder "
                                        "'002.Laysan_Albatross' but image_class_labels.txt gives it class 3"):
        load_cub200(root)
    labels_file.write_text(good_labels.replace("5 2\n", "5 150\n"))
    with pytest.raises(DataError, match=f"{esc(labels_file)}, line 5: class_id 150 is not in classes.txt"):
        load_cub200(root)
    labels_file.write_text(good_labels.replace("5 2\n", ""))
    with pytest.raises(DataError, match=f"{esc(images_file)}, line 5: image_id 5 has no label"):
        load_cub200(root)
    labels_file.write_text(good_labels + "99 1\n")
    with pytest.raises(DataError, match=f"{esc(labels_file)}, line 19: image_id 99 is not in images.txt"):
        load_cub200(root)
    labels_file.write_text(good_labels)

    images_file.write_text(good_images.replace("7 ", "6 ", 1))
    with pytest.raises(DataError, match=f"{esc(images_file)}, line 7: image_id 6 is listed twice"):
        load_cub200(root)
    images_file.write_text("")
    with pytest.raises(DataError, match="lists no images"):
        load_cub200(root)
    images_file.write_text(good_images)
    classes_file.write_text(classes_file.read_text() + "0 000.Nothing\n")
    with pytest.raises(DataError, match=f"{esc(classes_file)}, line 7: class_id 0 is out of range 1..200"):
        load_cub200(root)
    classes_file.write_text("\n".join(f"{c} {n}" for c, n in CUB_CLASSES.items()) + "\n")

    # An image listed but absent: named with the line that lists it; "skip" drops it with a warning.
    rel = good_images.split("\n")[10].split()[1]
    (root / "images" / rel).unlink()
    with pytest.raises(DataError, match=f"{esc(images_file)}, line 11: image file {esc(root / 'images' / rel)} "
                                        "does not exist"):
        load_cub200(root)
    with pytest.warns(UserWarning, match="skipped 1 of 18"):
        out = load_cub200(root, on_error="skip", counts="ignore")
    assert len(out.test) == 8 and out.skipped[0][0] == str(root / "images" / rel)
    # A class left without images by the split rule.
    labels_file.write_text("\n".join(f"{i} {1 + (i - 1) // 3}" for i in range(1, 10)) + "\n")
    images_file.write_text("\n".join(good_images.split("\n")[:9]) + "\n")
    with pytest.raises(DataError, match="no image of the test classes 101-200"):
        load_cub200(root)


# --------------------------------------------------------------------------- Cars196
def test_cars196_split_labels_and_ids(tmp_path: Path) -> None:
    root = make_cars(tmp_path)
    out = load_cars196(root, counts="ignore")
    assert out.summary() == {"train_images": 9, "train_classes": 3, "test_images": 9, "test_classes": 3}
    assert out.train.classes.tolist() == [1, 2, 3] and out.test.classes.tolist() == [99, 100, 101]
    # Row k of the struct array is car_ims/<k>.png with class CARS_CLASSES[(k - 1) // 3].
    for ds in (out.train, out.test):
        rows = [int(Path(p).stem) for p in ds.paths]
        assert [CARS_CLASSES[(k - 1) // 3] for k in rows] == original_ids(ds)
    assert set(out.train.paths).isdisjoint(out.test.paths)
    assert out.class_names[99] == "Make Model 99" and len(out.class_names) == 196
    assert torch.equal(out.train[0][0], pixels_of(str(root / "car_ims" / "000001.png")))


def test_cars196_fields_are_read_by_name(tmp_path: Path) -> None:
    """Another field order (e.g. a re-saved file) gives the same split: fields are read by name."""
    shuffled = ["class", "test", "bbox_y2", "relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2"]
    a = load_cars196(make_cars(tmp_path / "a"), counts="ignore")
    b = load_cars196(make_cars(tmp_path / "b", fields=shuffled), counts="ignore")
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert [Path(p).name for p in x.paths] == [Path(p).name for p in y.paths]
        assert x.labels.tolist() == y.labels.tolist() and x.classes.tolist() == y.classes.tolist()


def test_cars196_bad_input(tmp_path: Path) -> None:
    from scipy.io import savemat

    tmp_path.joinpath("devkit").mkdir()
    savemat(str(tmp_path / "cars_train_annos.mat"), {"annotations": np.zeros((1, 1))})
    with pytest.raises(DataError, match=r"cars_annos\.mat does not exist; .* holds the devkit layout "
                                        r"\(cars_train_annos\.mat, devkit\), whose train/test split is the "
                                        "classification one"):
        load_cars196(tmp_path)
    root = make_cars(tmp_path / "cars")
    mat = root / "cars_annos.mat"
    rows = [(f"car_ims/{k + 1:06d}.png", CARS_CLASSES[k // 3]) for k in range(18)]

    mat.write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match=f"{esc(mat)} cannot be read as a MATLAB v5 file"):
        load_cars196(root)
    savemat(str(mat), {"annos": cars_annotations(rows)})
    with pytest.raises(DataError, match=f"{esc(mat)} has no 'annotations' variable; it holds: annos"):
        load_cars196(root)
    savemat(str(mat), {"annotations": cars_annotations(rows, [f for f in CARS_FIELDS if f != "class"])})
    with pytest.raises(DataError, match=f"{esc(mat)}: 'annotations' lacks the field\\(s\\) class; it has: "
                                        "relative_im_path, bbox_x1"):
        load_cars196(root)
    bad = list(rows)
    bad[4] = (bad[4][0], 197)
    savemat(str(mat), {"annotations": cars_annotations(bad)})
    with pytest.raises(DataError, match=f"{esc(mat)}, annotation 5: class 197 is out of range 1..196"):
        load_cars196(root)
    bad[4] = ("car_ims/missing.png", 2)
    savemat(str(mat), {"annotations": cars_annotations(bad)})
    with pytest.raises(DataError, match=f"{esc(mat)}, annotation 5: image file {esc(root / 'car_ims/missing.png')} "
                                        "does not exist"):
        load_cars196(root)
    with pytest.warns(UserWarning, match="skipped 1 of 18"):
        assert len(load_cars196(root, on_error="skip", counts="ignore").train) == 8
    savemat(str(mat), {"annotations": cars_annotations(rows[:9])})
    with pytest.raises(DataError, match="no image of the test classes 99-196"):
        load_cars196(root)


# --------------------------------------------------------------------------- Stanford Online Products
def test_sop_split_labels_groups(tmp_path: Path) -> None:
    root = make_sop(tmp_path)
    out = load_sop(tmp_path, counts="ignore")
    assert out.summary() == {"train_images": 6, "train_classes": 3, "test_images": 4, "test_classes": 2}
    assert out.train.classes.tolist() == [1, 2, 3] and out.test.classes.tolist() == [11319, 11320]
    for ds, classes in ((out.train, SOP_TRAIN), (out.test, SOP_TEST)):
        from_path = [int(Path(p).name.split("_")[0]) for p in ds.paths]
        assert from_path == original_ids(ds)
        assert ds.groups.tolist() == [str(classes[c]) for c in from_path]
    assert out.test.paths[0] == str(root / "cabinet_final" / "11319_0.png")


def test_sop_bad_input(tmp_path: Path) -> None:
    root = make_sop(tmp_path)
    train_file, test_file = root / "Ebay_train.txt", root / "Ebay_test.txt"
    good = test_file.read_text()
    test_file.write_text(good.replace("image_id class_id super_class_id path", "image_id class_id path"))
    with pytest.raises(DataError, match=f"{esc(test_file)}, line 1: expected the header 'image_id class_id "
                                        "super_class_id path', got 'image_id class_id path'"):
        load_sop(root)
    lines = good.split("\n")
    test_file.write_text("\n".join(lines[:2] + [lines[2] + " extra"] + lines[3:]))
    with pytest.raises(DataError, match=f"{esc(test_file)}, line 3: expected 4 fields .*, got 5"):
        load_sop(root)
    test_file.write_text(good.replace(" 11320 12 ", " 11320 13 "))
    with pytest.raises(DataError, match=f"{esc(test_file)}, line 4: super_class_id 13 is out of range 1..12"):
        load_sop(root)
    test_file.write_text(good.replace(" 11320 12 ", " 22635 12 "))
    with pytest.raises(DataError, match=f"{esc(test_file)}, line 4: class_id 22635 is out of range 1..22634"):
        load_sop(root)
    test_file.write_text(good.replace(" 11320 12 ", " 3 12 "))
    with pytest.raises(DataError, match=f"{esc(test_file)}, line 4: class_id 3 is also a training class in "
                                        r"Ebay_train.txt; the standard split is class-disjoint \(1 shared"):
        load_sop(root)
    test_file.write_text(good)
    (root / "bicycle_final" / "2_1.png").unlink()
    with pytest.raises(DataError, match=f"{esc(train_file)}, line 5: image file .*bicycle_final/2_1.png does not"):
        load_sop(root)
    train_file.unlink()
    with pytest.raises(DataError, match=r"has no Ebay_train\.txt \(nor Stanford_Online_Products/Ebay_train\.txt\)"):
        load_sop(root)


# --------------------------------------------------------------------------- In-Shop
def test_inshop_train_query_gallery(tmp_path: Path) -> None:
    root = make_inshop(tmp_path)
    out = load_inshop(root, counts="ignore")
    rows = inshop_rows()
    expected = {s: [(str(root / n), i) for n, i, st in rows if st == s] for s in ("train", "query", "gallery")}
    assert out.query is out.test
    for part, ds in out.parts().items():
        assert list(zip(ds.paths, original_ids(ds))) == expected[part]
    assert out.summary() == {"train_images": 12, "train_classes": 4, "query_images": 6, "query_classes": 3,
                             "gallery_images": 4, "gallery_classes": 2}
    assert out.train.groups.tolist()[:4] == ["MEN/Denim"] * 3 + ["WOMEN/Dresses"]
    # Query and gallery number their items apart; the shared codes agree on the item id strings.
    q_codes, g_codes = shared_class_codes(out.query, out.gallery)
    q_items, g_items = np.array(original_ids(out.query)), np.array(original_ids(out.gallery))
    yq, yg = q_codes[out.query.labels], g_codes[out.gallery.labels]
    assert ((yq[:, None] == yg[None, :]) == (q_items[:, None] == g_items[None, :])).all()
    assert out.query.labels.tolist() == [0, 0, 1, 1, 2, 2] and out.gallery.labels.tolist() == [0, 0, 1, 1]


def test_inshop_bad_input(tmp_path: Path) -> None:
    root = make_inshop(tmp_path)
    path = root / "Eval" / "list_eval_partition.txt"
    lines = path.read_text().split("\n")[:-1]
    write_inshop_list(root, ["52712"] + lines[1:])
    with pytest.raises(DataError, match=f"{esc(path)}, line 1: says 52712 images but the file lists 22"):
        load_inshop(root)
    write_inshop_list(root, ["many"] + lines[1:])
    with pytest.raises(DataError, match=f"{esc(path)}, line 1: expected the number of images, got 'many'"):
        load_inshop(root)
    write_inshop_list(root, [lines[0], "image_name item_id status"] + lines[2:])
    with pytest.raises(DataError, match=f"{esc(path)}, line 2: expected the header 'image_name item_id "
                                        "evaluation_status'"):
        load_inshop(root)
    write_inshop_list(root, lines[:5] + [lines[5].replace("train", "val")] + lines[6:])
    with pytest.raises(DataError, match=f"{esc(path)}, line 6: evaluation_status must be train, query or gallery, "
                                        "got 'val'"):
        load_inshop(root)
    write_inshop_list(root, lines[:5] + [lines[5] + " x"] + lines[6:])
    with pytest.raises(DataError, match=f"{esc(path)}, line 6: expected 3 fields"):
        load_inshop(root)
    query_line = next(k for k, ln in enumerate(lines) if ln.endswith("query"))
    moved = lines[query_line].replace("id_00000005", "id_00000001")
    write_inshop_list(root, lines[:query_line] + [moved] + lines[query_line + 1:])
    with pytest.raises(DataError, match=f"{esc(path)}, line {query_line + 1}: item id_00000001 is a query item and "
                                        "also a training item"):
        load_inshop(root)
    write_inshop_list(root, [str(int(lines[0]) + 1)] + lines[1:] + [lines[3]])
    with pytest.raises(DataError, match=f"{esc(path)}, line 25: img/.* is already listed on line 4"):
        load_inshop(root)
    write_inshop_list(root, [str(int(lines[0]) - 4)] + [ln for ln in lines[1:] if not ln.endswith("gallery")])
    with pytest.raises(DataError, match=f"{esc(path)}: no gallery image"):
        load_inshop(root)
    write_inshop_list(root, lines)
    gone = root / inshop_rows()[15][0]
    gone.unlink()
    with pytest.raises(DataError, match=f"{esc(path)}, line 18: image file {esc(gone)} does not exist"):
        load_inshop(root)
    with pytest.warns(UserWarning, match="skipped 1 of 22"):
        out = load_inshop(root, on_error="skip", counts="ignore")
    assert len(out.query) + len(out.gallery) == 9 and str(gone) not in out.query.paths + out.gallery.paths
    path.unlink()
    with pytest.raises(DataError, match=r"has no Eval/list_eval_partition\.txt"):
        load_inshop(root)


# --------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("which", [10, 100])
def test_cifar_class_disjoint_split(tmp_path: Path, which: int) -> None:
    folder, images, labels = make_cifar(tmp_path, which)
    if which == 10:
        # The original files come from NumPy 1, whose pickles name numpy.core (numpy._core since NumPy 2).
        first = folder / "data_batch_1"
        old = first.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert old != first.read_bytes()
        first.write_bytes(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no import of the numpy.core shim
        out = load_cifar(tmp_path, which, counts="ignore")
    half = which // 2
    assert isinstance(out.train, ArrayImageDataset)
    assert out.train.classes.tolist() == list(range(half)) and out.test.classes.tolist() == list(range(half, which))
    # Pooled train-then-test files, cut by class: the same rows in the same order.
    for ds, mask in ((out.train, labels < half), (out.test, labels >= half)):
        assert len(ds) == int(mask.sum())
        assert original_ids(ds) == labels[mask].tolist()
        assert np.array_equal(ds.images, images[mask])
        first = int(np.flatnonzero(mask)[0])
        image, label, index = ds[0]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32) and index == 0
        assert torch.equal(image, torch.from_numpy(images[first]).float() / 255)
    assert out.class_names[3] == ("name3" if which == 10 else "fine3")
    if which == 100:
        assert out.train.groups.tolist() == [f"coarse{c // 5}" for c in labels[labels < half]]
    closed = load_cifar(folder, which, protocol="closed_set")
    n_train = 5 * 10 if which == 10 else 2 * 100
    assert len(closed.train) == n_train and closed.train.num_classes == closed.test.num_classes == which


def test_cifar_bad_input(tmp_path: Path) -> None:
    root, _, _ = make_cifar(tmp_path, 10)
    batch = root / "data_batch_3"
    good = batch.read_bytes()
    entry = pickle.loads(good, encoding="bytes")

    cifar_pickle(batch, {**entry, b"labels": entry[b"labels"][:-1]})
    with pytest.raises(DataError, match=f"{esc(batch)}: 10 images but 9 entries in 'labels'"):
        load_cifar(root)
    cifar_pickle(batch, {**entry, b"labels": [10] + entry[b"labels"][1:]})
    with pytest.raises(DataError, match=f"{esc(batch)}: 'labels'\\[0\\] = 10 is out of range 0..9"):
        load_cifar(root)
    cifar_pickle(batch, {**entry, b"data": entry[b"data"][:, :3071]})
    with pytest.raises(DataError, match=f"{esc(batch)}: 'data' must be an array \\(N, 3072\\) of 3x32x32 images, "
                                        r"got \(10, 3071\)"):
        load_cifar(root)
    cifar_pickle(batch, {b"data": entry[b"data"]})
    with pytest.raises(DataError, match=f"{esc(batch)}: no 'labels' entry; it holds: data"):
        load_cifar(root)
    batch.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=f"CIFAR-10: {esc(batch)} is not a CIFAR python batch"):
        load_cifar(root)
    batch.unlink()
    with pytest.raises(DataError, match=f"CIFAR-10: file {esc(batch)} does not exist"):
        load_cifar(root)
    with pytest.raises(DataError, match=r"has no train \(nor cifar-100-python/train\)"):
        load_cifar(tmp_path, 100)
    with pytest.raises(ConfigError, match="which: must be 10 or 100, got 20"):
        load_cifar(root, 20)


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    """A batch whose pickle calls a function (here os.system) is refused before anything runs."""
    root, _, _ = make_cifar(tmp_path, 10)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.system, (f"touch {marker}",))

    (root / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"not a CIFAR python batch: UnpicklingError: refusing to load "
                                        r"(posix|os)\.system"):
        load_cifar(root)
    assert not marker.exists()


# --------------------------------------------------------------------------- counts
def test_counts_against_the_standard_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_cub(tmp_path)
    with pytest.warns(UserWarning, match=r"cub200: this copy differs from the standard one \(train 9 images / 3 "
                                         r"classes; standard: train 5864 / 100\)"):
        load_cub200(root)
    with pytest.raises(DataError, match="cub200: this copy differs from the standard one"):
        load_cub200(root, counts="raise")
    with pytest.raises(ConfigError, match="counts: must be 'warn', 'raise' or 'ignore', got 'loud'"):
        load_cub200(root, counts="loud")  # type: ignore[arg-type]
    # With the standard numbers set to this copy's, the check passes in "raise" mode.
    monkeypatch.setitem(standard.STANDARD_COUNTS, "cub200", {"train": (9, 3), "test": (9, 3)})
    load_cub200(root, counts="raise")
    inshop = make_inshop(tmp_path / "inshop")
    monkeypatch.setitem(standard.STANDARD_COUNTS, "inshop",
                        {"train": (12, 4), "query": (6, None), "gallery": (4, None)})
    with pytest.raises(DataError, match=r"3 query/gallery items; standard: .*3985 items"):
        load_inshop(inshop, counts="raise")
    monkeypatch.setattr(standard, "_INSHOP_TEST_ITEMS", 3)
    load_inshop(inshop, counts="raise")


def test_load_standard_dispatches(tmp_path: Path) -> None:
    make_sop(tmp_path)
    assert quiet(load_standard, "sop", tmp_path).summary() == quiet(load_sop, tmp_path).summary()
    with pytest.raises(ConfigError, match="unknown standard dataset 'mnist'; choose cub200, cars196"):
        load_standard("mnist", tmp_path)
    with pytest.raises(ConfigError, match="on_error: must be 'raise' or 'skip', got 'ignore'"):
        load_sop(tmp_path, on_error="ignore")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- engine
def data_config(dataset: str, path: Path, *overrides: str, **extra: Any) -> Any:
    data = {"dataset": dataset, "path": str(path), "channels": 3, "image_size": 16, "classes_per_batch": 2,
            "samples_per_class": 2, "val_class_fraction": 0.0, **extra}
    return config_from_dict({"data": data}, list(overrides)).data


def test_build_splits_standard_kinds(tmp_path: Path) -> None:
    make_cub(tmp_path / "cub")
    make_cars(tmp_path / "cars")
    make_sop(tmp_path / "sop")
    make_cifar(tmp_path / "cifar", 10)
    expected = {"cub200": ("cub", [1, 2, 3], [101, 102, 103]), "cars196": ("cars", [1, 2, 3], [99, 100, 101]),
                "sop": ("sop", [1, 2, 3], [11319, 11320]), "cifar10": ("cifar", [0, 1, 2, 3, 4], [5, 6, 7, 8, 9])}
    for kind, (folder, train_ids, test_ids) in expected.items():
        splits = quiet(build_splits, data_config(kind, tmp_path / folder))
        assert splits.train.classes.tolist() == train_ids and splits.test.classes.tolist() == test_ids, kind
        assert splits.val is None and splits.gallery is None
        image = splits.test[0][0]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32, kind
    # Validation classes come from the training classes only; the test split is untouched.
    splits = quiet(build_splits, data_config("cub200", tmp_path / "cub", val_class_fraction=0.34))
    assert splits.val.num_classes == 1 and splits.train.num_classes == 2
    assert set(splits.val.classes.tolist()) | set(splits.train.classes.tolist()) == {1, 2, 3}
    assert splits.test.classes.tolist() == [101, 102, 103]
    with pytest.raises(ConfigError, match="data.test_path: not used by dataset 'cub200'"):
        data_config("cub200", tmp_path, test_path=str(tmp_path))
    with pytest.raises(DataError, match="images have 3 channel\\(s\\) but data.channels is 1"):
        quiet(build_splits, data_config("cifar10", tmp_path / "cifar", channels=1))
    with pytest.raises(DataError, match="CUB-200-2011: dataset folder .* does not exist"):
        build_splits(data_config("cub200", tmp_path / "missing"))


def test_build_splits_inshop_gallery_and_max_classes(tmp_path: Path) -> None:
    make_inshop(tmp_path)
    splits = quiet(build_splits, data_config("inshop", tmp_path))
    assert len(splits.test) == 6 and len(splits.gallery) == 4
    assert splits.summary()["gallery_images"] == 4 and splits.summary()["test_classes"] == 3
    image = splits.gallery[0][0]
    assert image.shape == (3, 16, 16)
    cut = quiet(build_splits, data_config("inshop", tmp_path, max_classes=2))
    assert cut.test.classes.tolist() == ["id_00000005", "id_00000006"]
    assert cut.gallery.classes.tolist() == ["id_00000006"] and len(cut.gallery) == 2
    with pytest.raises(DataError, match="no gallery image of the first 1 query classes"):
        quiet(build_splits, data_config("inshop", tmp_path, max_classes=1))


def test_inshop_training_scores_queries_against_the_gallery(tmp_path: Path) -> None:
    """A 1-epoch run: the final test metrics are query-vs-gallery, checked against a naive loop."""
    make_inshop(tmp_path / "data")
    raw = {
        "name": "inshop-tiny", "out_dir": str(tmp_path / "run"),
        "data": {"dataset": "inshop", "path": str(tmp_path / "data"), "channels": 3, "image_size": 16,
                 "classes_per_batch": 2, "samples_per_class": 2, "val_class_fraction": 0.5},
        "model": {"backbone": "convnet4", "embedding_size": 8},
        "loss": {"name": "multi_similarity", "params": {"alpha": 2.0, "beta": 40.0, "base": 0.5}},
        "eval": {"ks": [1, 2], "test_metrics": ["recall", "precision@1"]},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "seed": 0},
    }
    trainer = quiet(Trainer, config_from_dict(raw), progress=False)
    result = trainer.fit()
    test = result["test"]
    # 6 queries, 2 of them (item 5) with no gallery image: lone, left out of the metrics.
    assert test["num_queries"] == 6 and test["num_lone_queries"] == 2
    assert result["splits"]["gallery_images"] == 4

    model = trainer.model
    model.load_state_dict(load_checkpoint(tmp_path / "run" / BEST)["model"])
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        q = model(torch.stack([trainer.splits.test[i][0] for i in range(6)]).to(device)).cpu()
        g = model(torch.stack([trainer.splits.gallery[i][0] for i in range(4)]).to(device)).cpu()
    q_items, g_items = original_ids(trainer.splits.test), original_ids(trainer.splits.gallery)
    hits1, hits2 = [], []
    for i in range(6):
        if q_items[i] not in g_items:
            continue
        d = [float(torch.linalg.vector_norm(q[i] - g[j])) for j in range(4)]
        order = sorted(range(4), key=lambda j: (d[j], j))
        hits1.append(g_items[order[0]] == q_items[i])
        hits2.append(q_items[i] in (g_items[order[0]], g_items[order[1]]))
    assert test["recall@1"] == pytest.approx(np.mean(hits1), abs=1e-6)
    assert test["recall@2"] == pytest.approx(np.mean(hits2), abs=1e-6)
    assert test["precision@1"] == pytest.approx(np.mean(hits1), abs=1e-6)


def test_inshop_gallery_too_small_for_recall_k(tmp_path: Path) -> None:
    make_inshop(tmp_path / "data")
    raw = {"out_dir": str(tmp_path / "run"),
           "data": {"dataset": "inshop", "path": str(tmp_path / "data"), "channels": 3, "image_size": 16,
                    "classes_per_batch": 2, "samples_per_class": 2, "val_class_fraction": 0.0},
           "model": {"backbone": "convnet4", "embedding_size": 8}, "eval": {"ks": [1, 8]}}
    with pytest.raises(DataError, match=r"the gallery has 4 images, too few for Recall@8"):
        quiet(Trainer, config_from_dict(raw), progress=False)


# --------------------------------------------------------------------------- recipe configs
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))


def test_recipes_exist_for_every_standard_dataset() -> None:
    kinds = {yaml.safe_load(p.read_text())["data"]["dataset"] for p in RECIPES}
    assert {"cub200", "cars196", "sop", "inshop", "cifar10"} <= kinds <= set(STANDARD_DATASETS)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_config_loads(path: Path) -> None:
    """Every recipe validates without its data or weights (placeholders), and its names are registered."""
    from dmlgen.losses import LOSSES, MINERS
    from dmlgen.models.backbones import BACKBONES

    cfg = load_config(path)
    assert cfg.data.dataset in STANDARD_DATASETS and cfg.data.path and cfg.data.path.startswith("/path/to/")
    assert cfg.model.backbone in BACKBONES and cfg.model.backbone == "resnet50"
    assert cfg.model.weights is not None and cfg.model.weights.startswith("/path/to/")
    assert cfg.data.channels == 3 and cfg.data.eval_transforms.image_size == cfg.data.image_size
    assert cfg.data.train_transforms.image_size == cfg.data.image_size == 224
    assert cfg.loss.name in LOSSES
    if cfg.loss.miner is None or cfg.loss.miner.name in MINERS:
        # The params are accepted by the constructors (per-class losses get a class count and the embedding size).
        criterion = build_criterion(cfg.loss, num_classes=100, embedding_size=cfg.model.embedding_size)
        assert criterion.loss is not None
    build_regularizers(cfg.regularizers)
    if cfg.data.dataset == "inshop":
        assert cfg.eval.ks == [1, 10, 20, 30, 40]
    if cfg.data.dataset == "sop":
        assert cfg.eval.ks == [1, 10, 100, 1000]
