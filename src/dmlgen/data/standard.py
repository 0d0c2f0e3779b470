"""The standard DML benchmarks read from their original files, with their class-disjoint splits (methods.md §8).

One loader per dataset; each takes the dataset's root folder (or the folder above it) and returns a
:class:`StandardSplits` of the project's dataset classes, with the original class ids in ``classes``:

============ ======================================== ============================================
loader       files read                               split (train / test)
============ ======================================== ============================================
cub200       ``images.txt``, ``image_class_labels.txt``, classes 1-100 / 101-200
             ``classes.txt``, ``images/``
cars196      ``cars_annos.mat``, ``car_ims/``         classes 1-98 / 99-196
sop          ``Ebay_train.txt``, ``Ebay_test.txt``     the two files (classes 1-11318 / 11319-22634)
inshop       ``Eval/list_eval_partition.txt``, ``img/`` ``train`` / ``query`` + ``gallery``
cifar10/100  python pickle batches                    first / second half of the classes [LIB]
============ ======================================== ============================================

Every problem with the files (a missing file, a wrong header or field count, a non-integer id, a label
out of range, an image listed but absent, classes shared by the two sides) is a :class:`DataError`
naming the file and line (or entry). ``on_error="skip"`` drops unreadable images instead (see
:class:`~dmlgen.data.datasets.FileImageDataset`). Counts that differ from the full standard copy are
reported (``counts="warn"``, the default), raised (``"raise"``) or ignored (``"ignore"``).
"""

from __future__ import annotations

import codecs
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dmlgen.data.datasets import ArrayImageDataset, FileImageDataset, OnError
from dmlgen.errors import ConfigError, DataError

__all__ = [
    "STANDARD_COUNTS",
    "STANDARD_DATASETS",
    "StandardSplits",
    "load_cars196",
    "load_cifar",
    "load_cub200",
    "load_inshop",
    "load_sop",
    "load_standard",
    "shared_class_codes",
]

STANDARD_DATASETS = ("cub200", "cars196", "sop", "inshop", "cifar10", "cifar100")
Counts = Literal["warn", "raise", "ignore"]

# (images, classes) of each part of the full standard copy (methods.md §8); None: not a fixed number.
STANDARD_COUNTS: dict[str, dict[str, tuple[int, int | None]]] = {
    "cub200": {"train": (5864, 100), "test": (5924, 100)},
    "cars196": {"train": (8054, 98), "test": (8131, 98)},
    "sop": {"train": (59551, 11318), "test": (60502, 11316)},
    # 3,985 test items over query and gallery together (checked separately).
    "inshop": {"train": (25882, 3997), "query": (14218, None), "gallery": (12612, None)},
    # Class-disjoint protocol: all 60,000 images, the first half of the classes train.
    "cifar10": {"train": (30000, 5), "test": (30000, 5)},
    "cifar100": {"train": (30000, 50), "test": (30000, 50)},
}
_INSHOP_TEST_ITEMS = 3985

CUB_NUM_CLASSES, CUB_TRAIN_CLASSES = 200, 100
CARS_NUM_CLASSES, CARS_TRAIN_CLASSES = 196, 98
SOP_NUM_CLASSES, SOP_NUM_SUPER_CLASSES = 22634, 12
_SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]
_INSHOP_HEADER = ["image_name", "item_id", "evaluation_status"]
_INSHOP_STATUS = ("train", "query", "gallery")


@dataclass
class StandardSplits:
    """The standard class-disjoint parts of one benchmark.

    Attributes:
        name: the dataset kind (``cub200``, ..., ``cifar100``).
        train: the training classes' images.
        test: the test classes' images; for In-Shop the **query** images (also :attr:`query`).
        gallery: In-Shop's gallery images (same item ids as the queries); None elsewhere.
        skipped: ``(path, reason)`` of images dropped under ``on_error="skip"``.
        class_names: original class id -> readable name, where the files give one.
    """

    name: str
    train: Any
    test: Any
    gallery: Any | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    class_names: dict[Any, str] = field(default_factory=dict)

    @property
    def query(self) -> Any:
        """The query set of a query/gallery benchmark (In-Shop): the same object as ``test``."""
        return self.test

    def parts(self) -> dict[str, Any]:
        """``{"train": ..., "test": ...}``, or ``{"train", "query", "gallery"}`` for In-Shop."""
        if self.gallery is None:
            return {"train": self.train, "test": self.test}
        return {"train": self.train, "query": self.test, "gallery": self.gallery}

    def summary(self) -> dict[str, int]:
        """Images and classes per part, e.g. ``{"train_images": 5864, "train_classes": 100, ...}``."""
        out: dict[str, int] = {}
        for part, ds in self.parts().items():
            out[f"{part}_images"] = len(ds)
            out[f"{part}_classes"] = int(ds.num_classes)
        return out


# --------------------------------------------------------------------------- shared helpers
def shared_class_codes(*datasets: Any) -> list[np.ndarray]:
    """One integer code per original class, shared by several datasets (query and gallery).

    Each dataset numbers its classes ``0..C-1`` on its own; entry ``k`` of the result maps dataset ``k``'s
    contiguous labels to codes that agree across all of them: ``codes[k][ds_k.labels]``.
    """
    if not datasets:
        return []
    union = np.unique(np.concatenate([np.asarray(ds.classes) for ds in datasets]))
    return [np.searchsorted(union, np.asarray(ds.classes)).astype(np.int64) for ds in datasets]


def _find_root(root: str | os.PathLike[str], marker: str, folder: str, what: str, layout: str) -> Path:
    """``root`` if it holds ``marker``, else ``root/folder`` if that does; otherwise a DataError."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"{what}: dataset folder {base} does not exist or is not a folder")
    for candidate in (base, base / folder):
        if (candidate / marker).exists():
            return candidate
    raise DataError(f"{what}: {base} has no {marker} (nor {folder}/{marker}); expected layout: {layout}")


def _open_text(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (newlines stripped); a missing or unreadable file is a DataError."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return handle.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{what}: file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{what}: file {path} is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def _rows(path: Path, what: str, columns: Sequence[str], first_line: int = 1,
          lines: list[str] | None = None) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of the whitespace-separated rows of ``path`` from ``first_line`` on.

    Blank lines are skipped; a row with another number of fields than ``columns`` is a DataError.
    ``lines``: the file's lines when already read.
    """
    if lines is None:
        lines = _open_text(path, what)
    found = False
    for number, line in enumerate(lines, start=1):
        if number < first_line or not line.strip():
            continue
        fields = line.split()
        if len(fields) != len(columns):
            raise DataError(
                f"{path}, line {number}: expected {len(columns)} fields ({' '.join(columns)}), got {len(fields)}: "
                f"{line.strip()[:80]!r}"
            )
        found = True
        yield number, fields
    if not found:
        raise DataError(f"{what}: {path} lists no images (no data rows)")


def _int_field(value: str, where: str, name: str) -> int:
    """``int(value)``; otherwise a DataError naming ``where`` (``"<file>, line <n>"``)."""
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{where}: {name} must be an integer, got {value!r}") from None


def _check_range(value: int, low: int, high: int, where: str, name: str) -> int:
    if not low <= value <= high:
        raise DataError(f"{where}: {name} {value} is out of range {low}..{high}")
    return value


def _int_in(value: str, low: int, high: int, where: str, name: str) -> int:
    """An integer field within ``low..high``."""
    return _check_range(_int_field(value, where, name), low, high, where, name)


def _check_exists(paths: Sequence[str], places: Sequence[str], on_error: OnError) -> None:
    """With ``on_error="raise"`` a listed image that is absent is a DataError naming where it is listed."""
    if on_error == "skip":
        return  # FileImageDataset.verify drops and reports them
    for path, place in zip(paths, places):
        if not os.path.isfile(path):
            raise DataError(f"{place}: image file {path} does not exist")


def _check_options(on_error: str, counts: str) -> None:
    """Checked before any file is read."""
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error: must be 'raise' or 'skip', got {on_error!r}")
    if counts not in ("warn", "raise", "ignore"):
        raise ConfigError(f"counts: must be 'warn', 'raise' or 'ignore', got {counts!r}")


def _check_counts(name: str, parts: dict[str, Any], counts: Counts) -> None:
    """Compare with the full standard copy (methods.md §8): warn, raise or say nothing."""
    if counts == "ignore":
        return
    found, expected = [], []
    for part, (n_images, n_classes) in STANDARD_COUNTS[name].items():
        ds = parts[part]
        found.append(f"{part} {len(ds)} images / {ds.num_classes} classes")
        expected.append(f"{part} {n_images} / {n_classes if n_classes is not None else 'any'}")
        if len(ds) != n_images or (n_classes is not None and ds.num_classes != n_classes):
            break
    else:
        if name != "inshop":
            return
        items = len(np.union1d(parts["query"].classes, parts["gallery"].classes))
        if items == _INSHOP_TEST_ITEMS:
            return
        found.append(f"{items} query/gallery items")
        expected.append(f"{_INSHOP_TEST_ITEMS} items")
    message = (f"{name}: this copy differs from the standard one ({', '.join(found)}; standard: "
               f"{', '.join(expected)})")
    if counts == "raise":
        raise DataError(message)
    warnings.warn(message + "; a partial or modified copy gives results that are not comparable", stacklevel=3)


def _file_dataset(paths: list[str], labels: Any, groups: Any, channels: int, on_error: OnError,
                  what: str) -> FileImageDataset:
    try:
        return FileImageDataset(paths, labels, groups=groups, channels=channels, on_error=on_error)
    except DataError as exc:
        raise DataError(f"{what}: {exc}") from None


def _split_by_class(ds: Any, is_train: np.ndarray, what: str, sides: tuple[str, str]) -> tuple[Any, Any]:
    """``ds`` cut into the images whose original class satisfies ``is_train`` (per class) and the rest."""
    train_mask = is_train[ds.labels]
    for mask, side in ((train_mask, sides[0]), (~train_mask, sides[1])):
        if not mask.any():
            raise DataError(f"{what}: no image of the {side}")
    return ds.subset(np.flatnonzero(train_mask)), ds.subset(np.flatnonzero(~train_mask))


# --------------------------------------------------------------------------- CUB-200-2011
def load_cub200(root: str | os.PathLike[str], *, channels: int = 3, on_error: OnError = "raise",
                counts: Counts = "warn") -> StandardSplits:
    """CUB-200-2011: classes 1-100 train (5,864 images), 101-200 test (5,924 images), full images.

    ``root`` holds ``images.txt`` (``<image_id> <relpath>``), ``image_class_labels.txt``
    (``<image_id> <class_id 1..200>``), ``classes.txt`` (``<class_id> <dir_name>``) and ``images/``, or is
    the folder above ``CUB_200_2011/``. ``train_test_split.txt`` and ``bounding_boxes.txt`` are not used.
    ``classes`` holds the class ids 1..200; ``class_names`` their folder names.
    """
    what = "CUB-200-2011"
    _check_options(on_error, counts)
    base = _find_root(root, "images.txt", "CUB_200_2011", what,
                      "images.txt, image_class_labels.txt, classes.txt, images/<NNN.Name>/*.jpg")
    names: dict[int, str] = {}
    names_file = base / "classes.txt"
    for line, (cid, name) in _rows(names_file, what, ("class_id", "dir_name")):
        c = _int_in(cid, 1, CUB_NUM_CLASSES, f"{names_file}, line {line}", "class_id")
        if c in names:
            raise DataError(f"{names_file}, line {line}: class_id {c} is listed twice")
        names[c] = name
    images_file = base / "images.txt"
    image_rows: dict[int, tuple[int, str]] = {}
    for line, (iid, rel) in _rows(images_file, what, ("image_id", "relpath")):
        i = _int_field(iid, f"{images_file}, line {line}", "image_id")
        if i in image_rows:
            raise DataError(f"{images_file}, line {line}: image_id {i} is listed twice")
        image_rows[i] = (line, rel)
    labels_file = base / "image_class_labels.txt"
    class_of: dict[int, int] = {}
    for line, (iid, cid) in _rows(labels_file, what, ("image_id", "class_id")):
        i = _int_field(iid, f"{labels_file}, line {line}", "image_id")
        c = _int_in(cid, 1, CUB_NUM_CLASSES, f"{labels_file}, line {line}", "class_id")
        if i not in image_rows:
            raise DataError(f"{labels_file}, line {line}: image_id {i} is not in {images_file.name}")
        if i in class_of:
            raise DataError(f"{labels_file}, line {line}: image_id {i} has a second label")
        if c not in names:
            raise DataError(f"{labels_file}, line {line}: class_id {c} is not in {names_file.name}")
        class_of[i] = c
    paths, labels, places = [], [], []
    for i, (line, rel) in image_rows.items():
        if i not in class_of:
            raise DataError(f"{images_file}, line {line}: image_id {i} has no label in {labels_file.name}")
        folder = rel.split("/", 1)[0]
        if "/" in rel and folder != names[class_of[i]]:
            # Label files out of step with images.txt would otherwise train on wrong labels silently.
            raise DataError(
                f"{images_file}, line {line}: {rel} lies in folder {folder!r} but {labels_file.name} gives it "
                f"class {class_of[i]} ({names[class_of[i]]!r})"
            )
        paths.append(str(base / "images" / rel))
        labels.append(class_of[i])
        places.append(f"{images_file}, line {line}")
    _check_exists(paths, places, on_error)
    full = _file_dataset(paths, np.array(labels, dtype=np.int64), None, channels, on_error, what)
    train, test = _split_by_class(full, full.classes <= CUB_TRAIN_CLASSES, f"{what} at {base}",
                                  ("training classes 1-100", "test classes 101-200"))
    out = StandardSplits("cub200", train, test, skipped=list(full.skipped), class_names=names)
    _check_counts("cub200", out.parts(), counts)
    return out


# --------------------------------------------------------------------------- Cars196
def _mat_scalar(entry: Any, name: str, where: str) -> Any:
    value = np.asarray(entry[name])
    if value.size != 1:
        raise DataError(f"{where}: field {name!r} must hold one value, got shape {value.shape}")
    return value.reshape(-1)[0]


def load_cars196(root: str | os.PathLike[str], *, channels: int = 3, on_error: OnError = "raise",
                 counts: Counts = "warn") -> StandardSplits:
    """Cars196 from ``cars_annos.mat``: classes 1-98 train (8,054 images), 99-196 test (8,131 images).

    ``cars_annos.mat`` (MATLAB v5) holds ``annotations``, a struct array with (at least) the fields
    ``relative_im_path`` (``car_ims/000001.jpg``, relative to ``root``) and ``class`` (1..196), read by name;
    ``test`` and the boxes are not used. ``class_names`` (1×196), when present, fills ``class_names``.
    The devkit layout (``cars_train_annos.mat``...) carries the classification split and is refused.
    """
    what = "Cars196"
    _check_options(on_error, counts)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"{what}: dataset folder {base} does not exist or is not a folder")
    mat_file = base / "cars_annos.mat"
    if not mat_file.is_file():
        devkit = [n for n in ("cars_train_annos.mat", "cars_meta.mat", "devkit") if (base / n).exists()]
        hint = (f"; {base} holds the devkit layout ({', '.join(devkit)}), whose train/test split is the "
                "classification one (the same 196 classes on both sides); use cars_annos.mat with car_ims/"
                if devkit else "; expected layout: cars_annos.mat and car_ims/")
        raise DataError(f"{what}: file {mat_file} does not exist{hint}")
    from scipy.io import loadmat  # scipy comes with scikit-learn; imported here to keep `import dmlgen` light

    try:
        mat = loadmat(str(mat_file))
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... for a file that is not v5
        raise DataError(f"{mat_file} cannot be read as a MATLAB v5 file: {type(exc).__name__}: {exc}") from None
    if "annotations" not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise DataError(f"{mat_file} has no 'annotations' variable; it holds: {keys}")
    annos = np.asarray(mat["annotations"]).reshape(-1)
    fields = annos.dtype.names or ()
    missing = [f for f in ("relative_im_path", "class") if f not in fields]
    if missing:
        raise DataError(
            f"{mat_file}: 'annotations' lacks the field(s) {', '.join(missing)}; it has: {', '.join(fields) or 'none'}"
        )
    if len(annos) == 0:
        raise DataError(f"{mat_file}: 'annotations' is empty")
    class_names: dict[Any, str] = {}
    if "class_names" in mat:
        raw_names = np.asarray(mat["class_names"]).reshape(-1)
        class_names = {k + 1: str(np.asarray(n).reshape(-1)[0]) if np.asarray(n).size else "" for k, n in
                       enumerate(raw_names)}
    paths, labels, places = [], [], []
    for k, entry in enumerate(annos, start=1):
        where = f"{mat_file}, annotation {k}"
        rel = _mat_scalar(entry, "relative_im_path", where)
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{where}: relative_im_path must be a file name, got {rel!r}")
        raw = _mat_scalar(entry, "class", where)
        if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer, float, np.floating)) \
                or float(raw) != int(raw):
            raise DataError(f"{where}: class must be an integer, got {raw!r}")
        c = _check_range(int(raw), 1, CARS_NUM_CLASSES, where, "class")
        paths.append(str(base / rel))
        labels.append(c)
        places.append(where)
    _check_exists(paths, places, on_error)
    full = _file_dataset(paths, np.array(labels, dtype=np.int64), None, channels, on_error, what)
    train, test = _split_by_class(full, full.classes <= CARS_TRAIN_CLASSES, f"{what} at {base}",
                                  ("training classes 1-98", "test classes 99-196"))
    out = StandardSplits("cars196", train, test, skipped=list(full.skipped), class_names=class_names)
    _check_counts("cars196", out.parts(), counts)
    return out


# --------------------------------------------------------------------------- Stanford Online Products
def _read_sop_file(path: Path, what: str) -> list[tuple[int, int, int, str]]:
    """Rows ``(line, class_id, super_class_id, relpath)`` of ``Ebay_train.txt`` / ``Ebay_test.txt``."""
    lines = _open_text(path, what)
    header = lines[0].split() if lines else []
    if header != _SOP_HEADER:
        raise DataError(f"{path}, line 1: expected the header {' '.join(_SOP_HEADER)!r}, got "
                        f"{(lines[0].strip() if lines else '')[:80]!r}")
    rows, seen = [], set()
    for line, (iid, cid, sid, rel) in _rows(path, what, _SOP_HEADER, first_line=2, lines=lines):
        where = f"{path}, line {line}"
        i = _int_field(iid, where, "image_id")
        if i in seen:
            raise DataError(f"{where}: image_id {i} is listed twice")
        seen.add(i)
        c = _int_in(cid, 1, SOP_NUM_CLASSES, where, "class_id")
        s = _int_in(sid, 1, SOP_NUM_SUPER_CLASSES, where, "super_class_id")
        rows.append((line, c, s, rel))
    return rows


def load_sop(root: str | os.PathLike[str], *, channels: int = 3, on_error: OnError = "raise",
             counts: Counts = "warn") -> StandardSplits:
    """Stanford Online Products: ``Ebay_train.txt`` trains (59,551 images, 11,318 classes), ``Ebay_test.txt``
    tests (60,502 images, 11,316 classes).

    Each file starts with the header ``image_id class_id super_class_id path``; paths are relative to
    ``root`` (``bicycle_final/111085122871_0.JPG``). ``classes`` holds the class ids; ``groups`` the
    super-class id (1..12) of each image as a string. A class in both files is a DataError.
    """
    what = "Stanford Online Products"
    _check_options(on_error, counts)
    base = _find_root(root, "Ebay_train.txt", "Stanford_Online_Products", what,
                      "Ebay_train.txt, Ebay_test.txt and the <super>_final/ image folders")
    train_file, test_file = base / "Ebay_train.txt", base / "Ebay_test.txt"
    rows = {"train": _read_sop_file(train_file, what), "test": _read_sop_file(test_file, what)}
    # Class-disjointness first: it needs only the lists, not the (possibly slow to verify) images.
    train_classes = {c for _, c, _, _ in rows["train"]}
    shared = sorted(train_classes & {c for _, c, _, _ in rows["test"]})
    if shared:
        line = next(ln for ln, c, _, _ in rows["test"] if c == shared[0])
        raise DataError(
            f"{test_file}, line {line}: class_id {shared[0]} is also a training class in {train_file.name}; the "
            f"standard split is class-disjoint ({len(shared)} shared class(es))"
        )
    sides = {}
    for side, path in (("train", train_file), ("test", test_file)):
        paths = [str(base / rel) for _, _, _, rel in rows[side]]
        _check_exists(paths, [f"{path}, line {line}" for line, _, _, _ in rows[side]], on_error)
        sides[side] = _file_dataset(paths, np.array([c for _, c, _, _ in rows[side]], dtype=np.int64),
                                    np.array([str(s) for _, _, s, _ in rows[side]]), channels, on_error, what)
    train, test = sides["train"], sides["test"]
    out = StandardSplits("sop", train, test, skipped=list(train.skipped) + list(test.skipped))
    _check_counts("sop", out.parts(), counts)
    return out


# --------------------------------------------------------------------------- In-Shop
def load_inshop(root: str | os.PathLike[str], *, channels: int = 3, on_error: OnError = "raise",
                counts: Counts = "warn") -> StandardSplits:
    """In-Shop Clothes Retrieval: ``train`` (25,882 images, 3,997 items), ``query`` (14,218) and ``gallery``
    (12,612) over 3,985 other items; evaluated query vs gallery (methods.md §8.4).

    ``root`` holds ``Eval/list_eval_partition.txt`` (line 1: the image count; line 2: the header
    ``image_name item_id evaluation_status``; then ``img/WOMEN/Dresses/id_00000002/02_1_front.jpg
    id_00000002 train``) and ``img/``. ``classes`` holds the item ids (strings, e.g. ``id_00000002``),
    ``groups`` the category (``WOMEN/Dresses``). ``test`` is the query set; map query and gallery labels
    to shared codes with :func:`shared_class_codes`.
    """
    what = "In-Shop"
    _check_options(on_error, counts)
    marker = os.path.join("Eval", "list_eval_partition.txt")
    base = _find_root(root, marker, "In-shop Clothes Retrieval Benchmark", what,
                      "Eval/list_eval_partition.txt and img/")
    path = base / marker
    lines = _open_text(path, what)
    first = lines[0].strip() if lines else ""
    try:
        declared = int(first)
    except ValueError:
        raise DataError(f"{path}, line 1: expected the number of images, got {first[:80]!r}") from None
    header = lines[1].split() if len(lines) > 1 else []
    if header != _INSHOP_HEADER:
        raise DataError(f"{path}, line 2: expected the header {' '.join(_INSHOP_HEADER)!r}, got "
                        f"{(lines[1].strip() if len(lines) > 1 else '')[:80]!r}")
    rows = []
    listed: dict[str, int] = {}
    for line, (name, item, status) in _rows(path, what, _INSHOP_HEADER, first_line=3, lines=lines):
        if status not in _INSHOP_STATUS:
            raise DataError(f"{path}, line {line}: evaluation_status must be train, query or gallery, got {status!r}")
        if name in listed:
            raise DataError(f"{path}, line {line}: {name} is already listed on line {listed[name]}")
        listed[name] = line
        rows.append((line, name, item, status))
    if declared != len(rows):
        raise DataError(f"{path}, line 1: says {declared} images but the file lists {len(rows)}")
    train_items = {item for _, _, item, status in rows if status == "train"}
    for line, _, item, status in rows:
        if status != "train" and item in train_items:
            raise DataError(f"{path}, line {line}: item {item} is a {status} item and also a training item; the "
                            "standard split is class-disjoint")
    paths = [str(base / name) for _, name, _, _ in rows]
    _check_exists(paths, [f"{path}, line {line}" for line, _, _, _ in rows], on_error)
    # img/<GENDER>/<Category>/<item>/<file>: the category is a handy group (e.g. per-category results).
    groups = np.array(["/".join(name.split("/")[1:3]) if name.count("/") >= 4 else "" for _, name, _, _ in rows])
    full = _file_dataset(paths, np.array([item for _, _, item, _ in rows], dtype=str), groups, channels, on_error,
                         what)
    status_of = {p: s for p, (_, _, _, s) in zip(paths, rows)}
    status = np.array([status_of[p] for p in full.paths])  # full.paths lacks the images skipped as unreadable
    parts = {}
    for s in _INSHOP_STATUS:
        idx = np.flatnonzero(status == s)
        if len(idx) == 0:
            raise DataError(f"{path}: no {s} image")
        parts[s] = full.subset(idx)
    out = StandardSplits("inshop", parts["train"], parts["query"], gallery=parts["gallery"],
                         skipped=list(full.skipped))
    _check_counts("inshop", out.parts(), counts)
    return out


# --------------------------------------------------------------------------- CIFAR-10/100
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and NumPy arrays only: a pickle naming any other global is refused.

    CIFAR batches hold dicts, lists, strings, ints and one uint8 array; nothing else may run on load.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only NumPy arrays are expected)")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:  # NumPy >= 2 keeps the array internals in numpy._core; pickles from NumPy 1 name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                         ("_codecs", "encode"): codecs.encode}
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


def _load_batch(path: Path, what: str) -> dict[str, Any]:
    """A CIFAR pickle batch as a dict with str keys."""
    try:
        with open(path, "rb") as handle:
            obj = _ArrayUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{what}: file {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # a truncated or foreign file raises anything from EOFError to TypeError
        raise DataError(f"{what}: {path} is not a CIFAR python batch: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{what}: {path} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _batch_arrays(path: Path, what: str, label_key: str, num_classes: int,
                  extra_key: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64, extra labels (N,) or None)`` of one batch file."""
    batch = _load_batch(path, what)
    for key in ("data", label_key) + ((extra_key,) if extra_key else ()):
        if key not in batch:
            raise DataError(f"{path}: no {key!r} entry; it holds: {', '.join(sorted(batch)) or 'nothing'}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be an array (N, 3072) of 3x32x32 images, got {shape}")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be uint8 pixels, got dtype {data.dtype}")

    def labels_of(key: str, high: int) -> np.ndarray:
        raw = batch[key]
        try:
            arr = np.asarray(raw)
        except Exception:  # pragma: no cover - ragged objects
            raise DataError(f"{path}: {key!r} is not a list of integers") from None
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise DataError(f"{path}: {key!r} must be a list of integers, got {arr.dtype} {arr.shape}")
        if len(arr) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(arr)} entries in {key!r}")
        bad = np.flatnonzero((arr < 0) | (arr >= high))
        if len(bad):
            raise DataError(f"{path}: {key!r}[{bad[0]}] = {arr[bad[0]]} is out of range 0..{high - 1}")
        return arr.astype(np.int64)

    labels = labels_of(label_key, num_classes)
    extra = labels_of(extra_key, 20) if extra_key else None
    return data.reshape(-1, 3, 32, 32), labels, extra


def _meta_names(path: Path, what: str, key: str, count: int) -> list[str]:
    meta = _load_batch(path, what)
    if key not in meta:
        raise DataError(f"{path}: no {key!r} entry; it holds: {', '.join(sorted(meta)) or 'nothing'}")
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in list(meta[key])]
    if len(names) != count:
        raise DataError(f"{path}: {key!r} lists {len(names)} names, expected {count}")
    return names


def load_cifar(root: str | os.PathLike[str], which: int = 10, *,
               protocol: Literal["class_disjoint", "closed_set"] = "class_disjoint",
               counts: Counts = "warn") -> StandardSplits:
    """CIFAR-10 / CIFAR-100 from the python pickle batches, as ``ArrayImageDataset`` (3×32×32 uint8 -> float).

    ``root`` is ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or
    ``cifar-100-python/`` (``train``, ``test``, ``meta``), or the folder above it. ``protocol``:

    - ``"class_disjoint"`` [LIB, methods.md §8.6]: all 60,000 images; the first half of the classes
      (0-4 / 0-49) train and the second half (5-9 / 50-99) test;
    - ``"closed_set"``: the official train / test files, the same classes on both sides (G-DML's release
      evaluation; not a zero-shot split).

    ``classes`` holds the class indices; ``class_names`` the names from the meta file; CIFAR-100's
    ``groups`` are the 20 coarse (super-class) names.
    """
    if which not in (10, 100) or isinstance(which, bool):
        raise ConfigError(f"load_cifar.which: must be 10 or 100, got {which!r}")
    if protocol not in ("class_disjoint", "closed_set"):
        raise ConfigError(f"load_cifar.protocol: must be 'class_disjoint' or 'closed_set', got {protocol!r}")
    _check_options("raise", counts)
    what = f"CIFAR-{which}"
    if which == 10:
        folder, train_files, test_files, meta_file = (
            "cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], ["test_batch"], "batches.meta")
        label_key, extra_key, names_key = "labels", None, "label_names"
    else:
        folder, train_files, test_files, meta_file = "cifar-100-python", ["train"], ["test"], "meta"
        label_key, extra_key, names_key = "fine_labels", "coarse_labels", "fine_label_names"
    base = _find_root(root, train_files[0], folder, what,
                      f"{folder}/ with {', '.join(train_files + test_files)} and {meta_file}")
    meta_path = base / meta_file
    names = _meta_names(meta_path, what, names_key, which)
    coarse = _meta_names(meta_path, what, "coarse_label_names", 20) if which == 100 else None
    sides = {}
    for side, files in (("train", train_files), ("test", test_files)):
        chunks = [_batch_arrays(base / f, what, label_key, which, extra_key) for f in files]
        images = np.concatenate([c[0] for c in chunks])
        labels = np.concatenate([c[1] for c in chunks])
        extra = np.concatenate([c[2] for c in chunks]) if extra_key else None  # type: ignore[misc]
        sides[side] = (images, labels, extra)

    def dataset(images: np.ndarray, labels: np.ndarray, extra: np.ndarray | None) -> ArrayImageDataset:
        groups = None if coarse is None or extra is None else np.array(coarse, dtype=str)[extra]
        return ArrayImageDataset(images, labels, groups=groups)

    class_names = dict(enumerate(names))
    if protocol == "closed_set":
        return StandardSplits(f"cifar{which}", dataset(*sides["train"]), dataset(*sides["test"]),
                              class_names=class_names)
    images = np.concatenate([sides["train"][0], sides["test"][0]])
    labels = np.concatenate([sides["train"][1], sides["test"][1]])
    extra = None if extra_key is None else np.concatenate([sides["train"][2], sides["test"][2]])
    full = dataset(images, labels, extra)
    train, test = _split_by_class(full, full.classes < which // 2, f"{what} at {base}",
                                  (f"training classes 0-{which // 2 - 1}", f"test classes {which // 2}-{which - 1}"))
    out = StandardSplits(f"cifar{which}", train, test, class_names=class_names)
    _check_counts(f"cifar{which}", out.parts(), counts)
    return out


# --------------------------------------------------------------------------- by name
def load_standard(name: str, root: str | os.PathLike[str], *, channels: int = 3, on_error: OnError = "raise",
                  counts: Counts = "warn") -> StandardSplits:
    """The loader of ``name`` (one of :data:`STANDARD_DATASETS`) on ``root``.

    ``channels`` and ``on_error`` apply to the image-file datasets; CIFAR arrays are always RGB.
    """
    if name == "cub200":
        return load_cub200(root, channels=channels, on_error=on_error, counts=counts)
    if name == "cars196":
        return load_cars196(root, channels=channels, on_error=on_error, counts=counts)
    if name == "sop":
        return load_sop(root, channels=channels, on_error=on_error, counts=counts)
    if name == "inshop":
        return load_inshop(root, channels=channels, on_error=on_error, counts=counts)
    if name in ("cifar10", "cifar100"):
        return load_cifar(root, 10 if name == "cifar10" else 100, counts=counts)
    raise ConfigError(f"unknown standard dataset {name!r}; choose {', '.join(STANDARD_DATASETS)}")
