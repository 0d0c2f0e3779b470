"""Image datasets for metric learning: in-memory arrays and image files, plus builders.

Every dataset returns ``(image, label, index)`` from ``__getitem__``: ``image`` a float tensor ``(C, H, W)``
(after the optional transform), ``label`` an int in ``0..num_classes-1`` and ``index`` the row in this
dataset. ``__getitem__`` is a pure function of ``index``; all batch composition lives in the batch
samplers (methods.md §2.1), so any number of DataLoader workers is safe.

Each dataset exposes:

- ``labels``: ``(N,)`` int64, contiguous ``0..C-1``;
- ``classes``: ``(C,)`` the original class names or ids, ``classes[label]``, in sorted order;
- ``num_classes`` and ``class_to_label`` (original -> contiguous);
- ``groups``: ``(N,)`` str (e.g. the Omniglot alphabet, a super-class) or None.

``subset(indices)`` keeps the original class names, so ids stay traceable across class-disjoint splits.
"""

from __future__ import annotations

import csv
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dmlgen.errors import ConfigError, DataError

if TYPE_CHECKING:
    from dmlgen.data.omniglot import OmniglotSet

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "FileImageDataset",
    "check_image_file",
    "csv_dataset",
    "image_folder_dataset",
    "npz_dataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
Transform = Callable[[Any], Any]
OnError = Literal["raise", "skip"]

# Marks "keep the parent's transform" in subset(); None already means "no transform".
_KEEP: Any = object()
# Bad files named in full in an error message; the rest are counted.
_MAX_NAMED = 5


# --------------------------------------------------------------------------- labels
def _remap_labels(raw: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Original labels (N,) -> (contiguous int64 labels (N,), sorted original classes (C,))."""
    arr = np.asarray(raw)
    if arr.ndim != 1:
        raise DataError(f"{what}: labels must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)))][0]
            raise DataError(f"{what}: labels must be integers or strings, got the value {bad!r}")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "O":
        kinds = {type(v) for v in arr.tolist()}
        if all(issubclass(k, str) for k in kinds):
            arr = arr.astype(str)
        elif all(issubclass(k, (int, np.integer)) and not issubclass(k, bool) for k in kinds):
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"{what}: labels mix types {sorted(k.__name__ for k in kinds)}; use ints or strings")
    elif arr.dtype.kind not in "iuU":
        raise DataError(f"{what}: labels must be integers or strings, got dtype {arr.dtype}")
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.int64)
    classes, inverse = np.unique(arr, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), classes


def _as_groups(groups: Any, n: int, what: str) -> np.ndarray | None:
    if groups is None:
        return None
    arr = np.asarray(groups)
    if arr.shape != (n,):
        raise DataError(f"{what}: groups must have shape ({n},) like the labels, got {arr.shape}")
    return arr.astype(str)


def _as_index_array(indices: Any, n: int, what: str) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.dtype == np.bool_:
        if idx.shape != (n,):
            raise DataError(f"{what}: boolean mask must have shape ({n},), got {idx.shape}")
        return np.flatnonzero(idx)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise DataError(f"{what}: indices must be a 1-D integer array or a boolean mask, got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise DataError(f"{what}: index out of range for {n} images (min {idx.min()}, max {idx.max()})")
    return np.where(idx < 0, idx + n, idx)


class _LabeledDataset(Dataset):
    """Shared label bookkeeping: contiguous labels, original classes, optional groups."""

    labels: np.ndarray
    classes: np.ndarray
    groups: np.ndarray | None
    transform: Transform | None

    def _set_labels(self, raw_labels: Any, groups: Any, what: str) -> None:
        self.labels, self.classes = _remap_labels(raw_labels, what)
        if len(self.labels) == 0:
            raise DataError(f"{what}: no images")
        self.groups = _as_groups(groups, len(self.labels), what)

    def _set_subset_labels(self, parent: _LabeledDataset, idx: np.ndarray) -> None:
        # Remap within the subset but keep the parent's original class names.
        used, inverse = np.unique(parent.labels[idx], return_inverse=True)
        self.labels = inverse.reshape(-1).astype(np.int64)
        self.classes = parent.classes[used]
        self.groups = None if parent.groups is None else parent.groups[idx]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(len(self.classes))

    @property
    def class_to_label(self) -> dict[Any, int]:
        """Original class name/id -> contiguous label."""
        return {c.item() if isinstance(c, np.generic) else c: i for i, c in enumerate(self.classes)}

    def _check_index(self, index: int) -> int:
        n = len(self.labels)
        i = int(index)
        if i < -n or i >= n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return i + n if i < 0 else i


def _to_float_tensor(image: Any) -> torch.Tensor:
    """PIL image or tensor -> plain float32 tensor (C, H, W); uint8 is scaled to [0, 1]."""
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"the transform must return a PIL image or a tensor, got {type(image).__name__}")
    image = image.as_subclass(torch.Tensor)
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    if image.dtype == torch.bool:
        return image.float()
    return image if image.dtype == torch.float32 else image.float()


# --------------------------------------------------------------------------- arrays
class ArrayImageDataset(_LabeledDataset):
    """Images held in memory as one array.

    Args:
        images: ``(N, H, W)`` or ``(N, C, H, W)``; uint8 (0..255), bool, or float in [0, 1].
        labels: ``(N,)`` ints or strings (remapped to ``0..C-1``; the originals are in ``classes``).
        groups: optional ``(N,)`` group names (e.g. alphabets).
        transform: applied to the float tensor ``(C, H, W)`` in [0, 1].

    ``__getitem__`` returns ``(float32 tensor (C, H, W), label, index)``.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: Any,
        groups: Any = None,
        transform: Transform | None = None,
    ) -> None:
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.ndim not in (3, 4):
            raise DataError(f"ArrayImageDataset: images must be (N, H, W) or (N, C, H, W), got shape {arr.shape}")
        if arr.dtype.kind == "f":
            # min/max propagate NaN and expose inf without an image-sized temporary (Omniglot 105 px: ~850 MB).
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
            if np.isnan(lo) or np.isnan(hi):
                raise DataError("ArrayImageDataset: images contain NaN values")
            if lo < 0.0 or hi > 1.0:
                raise DataError(
                    f"ArrayImageDataset: float images must lie in [0, 1], got values in [{lo:g}, {hi:g}] "
                    "(pass uint8 for 0..255 pixels)"
                )
        elif arr.dtype not in (np.uint8, np.bool_):
            raise DataError(f"ArrayImageDataset: images must be uint8, bool or float, got dtype {arr.dtype}")
        if arr.ndim == 4 and arr.shape[1] not in (1, 3, 4):
            raise DataError(
                f"ArrayImageDataset: images (N, C, H, W) must have 1, 3 or 4 channels, got shape {arr.shape}; "
                "channel-last arrays need images.transpose(0, 3, 1, 2)"
            )
        labels_arr = np.asarray(labels)
        if len(labels_arr) != len(arr):
            raise DataError(f"ArrayImageDataset: {len(arr)} images but {len(labels_arr)} labels")
        self.images = arr
        self.transform = transform
        self._set_labels(labels_arr, groups, "ArrayImageDataset")

    def get_batch(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        """``[self[i] for i in indices]`` in one array read and one transform call on ``(B, C, H, W)``.

        Only valid when the transform draws no random numbers (see :func:`is_deterministic`); the
        per-image path costs ~50 us of Python per image, a noticeable share of a small model's step.
        """
        rows = [self._check_index(i) for i in indices]
        images = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
        if images.dim() == 3:
            images = images.unsqueeze(1)
        images = _to_float_tensor(images)
        if self.transform is not None:
            images = _to_float_tensor(self.transform(images))
        return [(images[k], int(self.labels[r]), r) for k, r in enumerate(rows)]

    @classmethod
    def from_omniglot(cls, data: OmniglotSet, transform: Transform | None = None) -> ArrayImageDataset:
        """Wrap an :class:`~dmlgen.data.omniglot.OmniglotSet`; groups are the alphabets, classes the global ids."""
        return cls(data.images, data.labels, groups=data.alphabets, transform=transform)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        i = self._check_index(index)
        # A copy, so a transform that works in place cannot alter the stored array.
        image = torch.tensor(self.images[i])
        if image.dim() == 2:
            image = image.unsqueeze(0)
        image = _to_float_tensor(image)
        if self.transform is not None:
            image = _to_float_tensor(self.transform(image))
        return image, int(self.labels[i]), i

    def subset(self, indices: Any, transform: Transform | None = _KEEP) -> ArrayImageDataset:
        """Rows ``indices`` (int array or boolean mask); labels remapped, original ``classes`` kept."""
        idx = _as_index_array(indices, len(self), "ArrayImageDataset.subset")
        if len(idx) == 0:
            raise DataError("ArrayImageDataset.subset: the subset is empty")
        new = object.__new__(type(self))
        new.images = self.images[idx]
        new.transform = self.transform if transform is _KEEP else transform
        new._set_subset_labels(self, idx)
        return new


# --------------------------------------------------------------------------- files
def _open_image(path: str, mode: str) -> Image.Image:
    """Fully decoded PIL image in ``mode``; every failure is a DataError naming ``path``."""
    try:
        with Image.open(path) as im:
            # Decode now: a truncated file fails here with its path, not later inside a transform.
            im.load()
            return im.convert(mode)
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except UnidentifiedImageError:
        raise DataError(f"image file {path} is not a readable image (unknown format or not an image)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image file {path} cannot be decoded (corrupt or truncated): {exc}") from None


def check_image_file(path: str | os.PathLike[str], full: bool = True) -> str | None:
    """Why ``path`` is not a usable image, or None when it is.

    Reads the header (format, size) and, with ``full``, decodes every pixel so that truncated
    files are caught. Pure function of the path: safe to call from several threads.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width <= 0 or height <= 0:
                return f"image has size {width}x{height}"
            if full:
                im.load()
    except FileNotFoundError:
        return "file does not exist"
    except UnidentifiedImageError:
        return "not a readable image (unknown format or not an image)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot be decoded (corrupt or truncated): {exc}"
    return None


def _check_all(paths: Sequence[str], full: bool, num_threads: int | None) -> list[str | None]:
    if num_threads is None:
        num_threads = min(8, (os.cpu_count() or 1) * 2)
    if num_threads <= 1 or len(paths) < 64:
        return [check_image_file(p, full) for p in paths]
    # Decoding releases the GIL, so threads give real parallelism; map() keeps the input order.
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        return list(pool.map(lambda p: check_image_file(p, full), paths, chunksize=32))


def _describe_bad(bad: list[tuple[str, str]]) -> str:
    named = "; ".join(f"{p}: {r}" for p, r in bad[:_MAX_NAMED])
    more = f" (and {len(bad) - _MAX_NAMED} more)" if len(bad) > _MAX_NAMED else ""
    return named + more


class FileImageDataset(_LabeledDataset):
    """Images read from files with PIL on every access.

    Args:
        paths: ``N`` image paths.
        labels: ``(N,)`` ints or strings (remapped to ``0..C-1``; the originals are in ``classes``).
        groups: optional ``(N,)`` group names.
        transform: applied to the PIL image (mode ``L`` or ``RGB``); its output, PIL or tensor, is turned
            into a float32 tensor ``(C, H, W)`` in [0, 1] if it is not one already.
        channels: 1 (greyscale) or 3 (RGB).
        on_error: ``"raise"``: a missing file is a DataError now, an unreadable or truncated one a
            DataError naming its path when it is read. ``"skip"``: every file is checked now (header and
            full decode, in threads) and the bad ones are dropped before any sampling; they are listed in
            ``skipped`` as ``(path, reason)``. Files are never skipped mid-epoch: one that breaks after
            the check still raises.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Any,
        groups: Any = None,
        transform: Transform | None = None,
        channels: int = 3,
        on_error: OnError = "raise",
    ) -> None:
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ConfigError(f"FileImageDataset: channels must be 1 or 3, got {channels!r}")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"FileImageDataset: on_error must be 'raise' or 'skip', got {on_error!r}")
        self.paths = [os.fspath(p) for p in paths]
        labels_arr = np.asarray(labels)
        if len(labels_arr) != len(self.paths):
            raise DataError(f"FileImageDataset: {len(self.paths)} paths but {len(labels_arr)} labels")
        self.transform = transform
        self.channels = channels
        self.on_error: OnError = on_error
        self.skipped: list[tuple[str, str]] = []
        self._set_labels(labels_arr, groups, "FileImageDataset")
        if on_error == "skip":
            self.verify()
        else:
            missing = [p for p in self.paths if not os.path.isfile(p)]
            if missing:
                raise DataError(f"{len(missing)} image file(s) do not exist: {', '.join(missing[:_MAX_NAMED])}")

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        i = self._check_index(index)
        image: Any = _open_image(self.paths[i], self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return _to_float_tensor(image), int(self.labels[i]), i

    def verify(self, *, full: bool = True, num_threads: int | None = None) -> list[tuple[str, str]]:
        """Check every file (header, and a full decode with ``full``) before training.

        With ``on_error="skip"`` the bad files are dropped (labels are remapped if a class empties) and
        appended to ``skipped``; with ``"raise"`` a DataError names them. Returns the bad ``(path, reason)``.
        Call it before building a sampler: it changes the dataset's length.
        """
        reasons = _check_all(self.paths, full, num_threads)
        bad = [(p, r) for p, r in zip(self.paths, reasons) if r is not None]
        if not bad:
            return []
        if self.on_error == "raise":
            raise DataError(f"{len(bad)} of {len(self.paths)} image file(s) cannot be used: {_describe_bad(bad)}")
        if len(bad) == len(self.paths):
            raise DataError(f"all {len(bad)} image file(s) cannot be used: {_describe_bad(bad)}")
        keep = np.array([r is None for r in reasons])
        idx = np.flatnonzero(keep)
        old_labels, old_classes, old_groups = self.labels, self.classes, self.groups
        self.paths = [self.paths[i] for i in idx]
        used, inverse = np.unique(old_labels[idx], return_inverse=True)
        self.labels = inverse.reshape(-1).astype(np.int64)
        self.classes = old_classes[used]
        self.groups = None if old_groups is None else old_groups[idx]
        self.skipped.extend(bad)
        warnings.warn(
            f"skipped {len(bad)} of {len(keep)} image file(s) that cannot be used: {_describe_bad(bad)}",
            stacklevel=2,
        )
        return bad

    def subset(self, indices: Any, transform: Transform | None = _KEEP) -> FileImageDataset:
        """Rows ``indices`` (int array or boolean mask); labels remapped, original ``classes`` kept.

        The subset's ``skipped`` is empty: files skipped while building the parent are reported by the parent.
        """
        idx = _as_index_array(indices, len(self), "FileImageDataset.subset")
        if len(idx) == 0:
            raise DataError("FileImageDataset.subset: the subset is empty")
        new = object.__new__(type(self))
        new.paths = [self.paths[i] for i in idx]
        new.transform = self.transform if transform is _KEEP else transform
        new.channels = self.channels
        new.on_error = self.on_error
        new.skipped = []
        new._set_subset_labels(self, idx)
        return new


# --------------------------------------------------------------------------- builders
def _is_image_name(name: str, extensions: Iterable[str]) -> bool:
    return not name.startswith(".") and name.lower().endswith(tuple(e.lower() for e in extensions))


def image_folder_dataset(
    root: str | os.PathLike[str],
    *,
    transform: Transform | None = None,
    channels: int = 3,
    on_error: OnError = "raise",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> FileImageDataset:
    """``root/<class>/**/<image>``: one sub-folder per class (the folder name is the class).

    Only files with an image extension count (case-insensitive); hidden files and folders are
    ignored. Classes and files are sorted, so the result is the same on every machine. A class
    folder without images, or images lying directly in ``root``, is a DataError.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"image folder {base} does not exist or is not a folder")
    entries = sorted(os.scandir(base), key=lambda e: e.name)
    loose = [e.name for e in entries if e.is_file() and _is_image_name(e.name, extensions)]
    if loose:
        raise DataError(
            f"image folder {base}: images must sit in one sub-folder per class, found {len(loose)} directly in it "
            f"(e.g. {loose[0]})"
        )
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not class_dirs:
        raise DataError(f"image folder {base} has no class sub-folders")
    paths: list[str] = []
    labels: list[str] = []
    empty: list[str] = []
    for entry in class_dirs:
        found = []
        for dirpath, dirnames, filenames in os.walk(entry.path):
            # Sorting in place fixes os.walk's visiting order too.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_name(f, extensions))
        if not found:
            empty.append(entry.name)
        paths.extend(found)
        labels.extend([entry.name] * len(found))
    if empty:
        raise DataError(
            f"image folder {base}: class folder(s) without images ({', '.join(extensions)}): "
            f"{', '.join(empty[:_MAX_NAMED])}"
        )
    return FileImageDataset(
        paths, np.array(labels, dtype=str), transform=transform, channels=channels, on_error=on_error
    )


def _parse_label_column(values: list[str]) -> np.ndarray:
    """Integers when every label is one (sorted numerically), otherwise strings."""
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except ValueError:
        return np.array(values, dtype=str)


def csv_dataset(
    csv_path: str | os.PathLike[str],
    split: str | None = None,
    root: str | os.PathLike[str] | None = None,
    *,
    transform: Transform | None = None,
    channels: int = 3,
    on_error: OnError = "raise",
) -> FileImageDataset:
    """A CSV file with a header row and the columns ``path,label`` and optional ``split``, ``group``.

    Relative paths are resolved against ``root`` (default: the CSV file's folder). With ``split``
    only the rows whose ``split`` column equals it are used. Labels that are all integers keep their
    numeric order; otherwise they are strings. Errors name the CSV file and line number.
    """
    csv_file = Path(csv_path)
    base = Path(root) if root is not None else csv_file.parent
    try:
        handle = open(csv_file, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"CSV file {csv_file} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read CSV file {csv_file}: {exc.strerror or exc}") from None
    rows: list[tuple[int, str, str, str | None, str | None]] = []
    splits_seen: set[str] = set()
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"CSV file {csv_file} is empty; expected a header row path,label[,split]")
            columns = [h.strip().lower() for h in header]
            missing = [c for c in ("path", "label") if c not in columns]
            if missing:
                raise DataError(
                    f"{csv_file}, line 1: header must name the columns path,label[,split], got {','.join(header)!r}"
                )
            if len(set(columns)) != len(columns):
                raise DataError(f"{csv_file}, line 1: duplicate column names in header {','.join(header)!r}")
            i_path, i_label = columns.index("path"), columns.index("label")
            i_split = columns.index("split") if "split" in columns else None
            i_group = columns.index("group") if "group" in columns else None
            if split is not None and i_split is None:
                raise DataError(f"{csv_file}: split={split!r} requested but the header has no 'split' column")
            for row in reader:
                line = reader.line_num
                if not row or all(not v.strip() for v in row):
                    continue
                if len(row) != len(columns):
                    raise DataError(f"{csv_file}, line {line}: expected {len(columns)} fields, got {len(row)}")
                path, label = row[i_path].strip(), row[i_label].strip()
                if not path:
                    raise DataError(f"{csv_file}, line {line}: empty path")
                if not label:
                    raise DataError(f"{csv_file}, line {line}: empty label for {path}")
                row_split = row[i_split].strip() if i_split is not None else None
                if row_split is not None:
                    splits_seen.add(row_split)
                if split is not None and row_split != split:
                    continue
                group = row[i_group].strip() if i_group is not None else None
                rows.append((line, path, label, row_split, group))
        except csv.Error as exc:
            raise DataError(f"{csv_file}, line {reader.line_num}: malformed CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"CSV file {csv_file} is not UTF-8 text ({exc.reason})") from None
    if not rows:
        if split is not None:
            found = ", ".join(sorted(splits_seen)) or "none"
            raise DataError(f"{csv_file}: no rows with split {split!r} (splits found: {found})")
        raise DataError(f"CSV file {csv_file} has a header but no rows")
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for _, p, _, _, _ in rows]
    if on_error == "raise":
        for (line, _, _, _, _), p in zip(rows, paths):
            if not os.path.isfile(p):
                raise DataError(f"{csv_file}, line {line}: image file {p} does not exist")
    labels = _parse_label_column([r[2] for r in rows])
    groups = np.array([r[4] for r in rows], dtype=str) if i_group is not None else None
    return FileImageDataset(paths, labels, groups=groups, transform=transform, channels=channels, on_error=on_error)


def npz_dataset(
    path: str | os.PathLike[str],
    images_key: str = "images",
    labels_key: str = "labels",
    *,
    groups_key: str | None = None,
    transform: Transform | None = None,
) -> ArrayImageDataset:
    """An ``.npz`` archive holding ``images`` (N, H, W) / (N, C, H, W) and ``labels`` (N,) (keys configurable)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"npz file {file} does not exist")
    try:
        with np.load(file, allow_pickle=False) as archive:
            keys = list(archive.files)
            for key in (images_key, labels_key) + ((groups_key,) if groups_key else ()):
                if key not in keys:
                    raise DataError(f"npz file {file} has no array {key!r}; it holds: {', '.join(keys) or 'nothing'}")
            images = archive[images_key]
            labels = archive[labels_key]
            groups = archive[groups_key] if groups_key else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # ValueError: not an npz/npy file, or object arrays (pickles are refused on purpose).
        raise DataError(f"npz file {file} cannot be read: {type(exc).__name__}: {exc}") from None
    if labels.ndim != 1:
        raise DataError(f"npz file {file}: {labels_key!r} must be 1-D, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"npz file {file}: {len(images)} images but {len(labels)} labels")
    try:
        return ArrayImageDataset(images, labels, groups=groups, transform=transform)
    except DataError as exc:
        raise DataError(f"npz file {file}: {exc}") from None


_RANDOM_TRANSFORMS = (v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomAffine, v2.ColorJitter,
                      v2.RandomRotation, v2.RandomCrop, v2.RandomVerticalFlip)
_DETERMINISTIC_TRANSFORMS = (v2.ToImage, v2.ToDtype, v2.ToPureTensor, v2.Resize, v2.CenterCrop, v2.Normalize)


def is_deterministic(transform: Transform | None) -> bool:
    """True when ``transform`` is None or a ``v2.Compose`` of known deterministic steps (no RNG draws)."""
    if transform is None:
        return True
    if isinstance(transform, v2.Compose):
        return all(is_deterministic(t) for t in transform.transforms)
    return isinstance(transform, _DETERMINISTIC_TRANSFORMS) and not isinstance(transform, _RANDOM_TRANSFORMS)
