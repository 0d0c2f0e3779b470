"""Omniglot (Lake et al. 2015, MIT licence), shipped with the package as NumPy arrays.

The arrays live in ``dmlgen/data/assets/omniglot/`` (see the README there): ``images`` is bool
``(C, 20, 105, 105)`` with True = white background, ``labels`` is ``(C, 20)`` (row index), axis 1 is the
drawer. :func:`load_omniglot` verifies the SHA-256 of each array before reading it, inverts the pixels
(stroke = 1), area-resizes them and keeps the result in a small in-process cache.
:func:`omniglot_splits` makes the class-disjoint train / val / test splits (methods.md §8.5).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from dmlgen.errors import ConfigError, DataError

__all__ = [
    "NUM_CLASSES",
    "OmniglotSet",
    "SPLITS",
    "clear_omniglot_cache",
    "load_omniglot",
    "omniglot_alphabets",
    "omniglot_root",
    "omniglot_splits",
    "subset_omniglot",
]

SPLITS = ("background", "evaluation")
NUM_CLASSES = {"background": 964, "evaluation": 659}
DRAWERS = 20
RAW_SIZE = 105
# First global class id (0-based) of each split: background 0..963, evaluation 964..1622.
_CLASS_OFFSET = {"background": 0, "evaluation": 964}
# Pinned copies of SHA256SUMS (methods.md §8.5): a folder whose SHA256SUMS was edited to match altered
# arrays is still rejected.
_PINNED_SHA256 = {
    "images_background.npz": "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
    "images_evaluation.npz": "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
}
# Images decoded and resized per step: bounds the float32 working set to ~45 MB at 105x105.
_CHUNK = 1024
_CACHE_SIZE = 4


@dataclass(frozen=True, eq=False)
class OmniglotSet:
    """Omniglot images with their labels; every array has the same length N.

    Attributes:
        images: (N, H, W) float32 in [0, 1], stroke = 1, background = 0.
        labels: (N,) int64 global class id 0..1622 (``classes.csv`` class_id - 1).
        alphabets: (N,) str, the alphabet of each image.
        characters: (N,) str, the character name within its alphabet (e.g. ``character01``).
        drawers: (N,) int64 drawer index 0..19 (the same 20 people for every character).
        split: ``background``/``evaluation`` for a loaded set, ``train``/``val``/``test`` for a split.
    """

    images: np.ndarray
    labels: np.ndarray
    alphabets: np.ndarray
    characters: np.ndarray
    drawers: np.ndarray
    split: str = field(default="")

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name in ("images", "alphabets", "characters", "drawers"):
            if len(getattr(self, name)) != n:
                raise DataError(f"OmniglotSet.{name} has {len(getattr(self, name))} rows, labels has {n}")
        if self.images.ndim != 3:
            raise DataError(f"OmniglotSet.images must be (N, H, W), got shape {self.images.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> np.ndarray:
        """Sorted distinct global class ids, (C,) int64."""
        return np.unique(self.labels)

    @property
    def num_classes(self) -> int:
        return int(len(self.classes))

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def describe(self) -> dict[str, Any]:
        """Counts for logs and reports: split, images, classes, alphabets, image_size."""
        return {
            "split": self.split,
            "images": len(self),
            "classes": self.num_classes,
            "alphabets": int(len(np.unique(self.alphabets))),
            "image_size": self.image_size,
        }

    def subset(self, mask: np.ndarray | Sequence[bool], split: str | None = None) -> OmniglotSet:
        """Rows where ``mask`` is True (see :func:`subset_omniglot`)."""
        return subset_omniglot(self, mask, split=split)


def subset_omniglot(data: OmniglotSet, mask: np.ndarray | Sequence[bool], split: str | None = None) -> OmniglotSet:
    """A new :class:`OmniglotSet` with the rows where the boolean ``mask`` (N,) is True.

    The arrays are fresh, writable copies. ``split`` renames the subset (default: keep the name).
    """
    mask_arr = np.asarray(mask)
    if mask_arr.dtype != np.bool_:
        raise DataError(f"subset mask must be boolean, got dtype {mask_arr.dtype}")
    if mask_arr.shape != (len(data),):
        raise DataError(f"subset mask must have shape ({len(data)},), got {mask_arr.shape}")
    return OmniglotSet(
        images=data.images[mask_arr],
        labels=data.labels[mask_arr],
        alphabets=data.alphabets[mask_arr],
        characters=data.characters[mask_arr],
        drawers=data.drawers[mask_arr],
        split=data.split if split is None else split,
    )


# --------------------------------------------------------------------------- files
def omniglot_root() -> Path:
    """Folder of the packaged arrays (``dmlgen/data/assets/omniglot``)."""
    # The package is installed as plain files (wheel or editable), so the Traversable is a real path.
    return Path(str(resources.files("dmlgen.data").joinpath("assets", "omniglot")))


def _resolve_root(root: str | Path | None) -> Path:
    path = omniglot_root() if root is None else Path(root)
    if not path.is_dir():
        raise DataError(f"Omniglot folder {path} does not exist")
    return path


def _read_sha256sums(root: Path) -> dict[str, str]:
    path = root / "SHA256SUMS"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read checksum file {path}: {exc.strerror or exc}") from None
    sums: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{path} line {lineno}: expected '<sha256>  <file name>', got {line!r}")
        sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def _read_verified(path: Path, expected: str | None) -> bytes:
    """The bytes of ``path``, hashed in 1 MiB chunks as they are read.

    The arrays are loaded from these same bytes, so the file cannot change between check and use.
    """
    digest = hashlib.sha256()
    buffer = io.BytesIO()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(functools.partial(handle.read, 1 << 20), b""):
                digest.update(chunk)
                buffer.write(chunk)
    except OSError as exc:
        raise DataError(f"cannot read Omniglot file {path}: {exc.strerror or exc}") from None
    if expected is not None and digest.hexdigest() != expected:
        raise DataError(
            f"Omniglot file {path} is corrupt or altered: SHA-256 {digest.hexdigest()} != expected {expected}"
        )
    return buffer.getvalue()


def _expected_sha256(root: Path, name: str) -> str:
    sums = _read_sha256sums(root)
    listed = sums.get(name)
    if listed is None:
        raise DataError(f"{root / 'SHA256SUMS'} has no entry for {name}")
    pinned = _PINNED_SHA256[name]
    if listed != pinned:
        raise DataError(
            f"{root / 'SHA256SUMS'} lists SHA-256 {listed} for {name}, but dmlgen expects {pinned}"
        )
    return pinned


def _read_classes(root: Path, split: str) -> list[dict[str, str]]:
    """The rows of ``classes.csv`` for ``split``, checked to be class ids offset+1 .. offset+C in order."""
    path = root / "classes.csv"
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"class_id", "split", "alphabet", "character"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: missing column(s) {sorted(missing)}")
            rows = [row for row in reader if row["split"] == split]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(rows) != NUM_CLASSES[split]:
        raise DataError(f"{path}: expected {NUM_CLASSES[split]} rows with split={split}, found {len(rows)}")
    for i, row in enumerate(rows):
        want = _CLASS_OFFSET[split] + i + 1
        if row["class_id"].strip() != str(want):
            raise DataError(f"{path}: split {split} row {i} has class_id {row['class_id']!r}, expected {want}")
    return rows


def _decode_npz(path: Path, data: bytes, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if "images" not in npz.files or "labels" not in npz.files:
                raise DataError(f"Omniglot file {path} must hold arrays 'images' and 'labels', has {npz.files}")
            images, labels = npz["images"], npz["labels"]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        # zipfile and zlib report damaged archives with all of these.
        raise DataError(f"Omniglot file {path} cannot be read: {exc}") from None
    c = NUM_CLASSES[split]
    if images.shape != (c, DRAWERS, RAW_SIZE, RAW_SIZE) or images.dtype != np.bool_:
        raise DataError(
            f"Omniglot file {path}: 'images' must be bool {(c, DRAWERS, RAW_SIZE, RAW_SIZE)}, "
            f"got {images.dtype} {images.shape}"
        )
    if labels.shape != (c, DRAWERS) or not np.array_equal(labels, np.repeat(np.arange(c)[:, None], DRAWERS, 1)):
        raise DataError(f"Omniglot file {path}: 'labels' must be the row index 0..{c - 1} of shape {(c, DRAWERS)}")
    return images, labels


def _to_float_resized(images: np.ndarray, image_size: int) -> np.ndarray:
    """(C, 20, 105, 105) bool, True = background -> (C*20, S, S) float32, stroke = 1."""
    flat = images.reshape(-1, RAW_SIZE, RAW_SIZE)
    out = np.empty((len(flat), image_size, image_size), dtype=np.float32)
    for start in range(0, len(flat), _CHUNK):
        # Invert while still bool: cheaper than 1 - x in float, and exact.
        block = torch.from_numpy(~flat[start:start + _CHUNK]).to(torch.float32)
        if image_size != RAW_SIZE:
            # "area" averages each output pixel's footprint: the ink fraction, no aliasing.
            block = F.interpolate(block[:, None], size=(image_size, image_size), mode="area")[:, 0]
        out[start:start + _CHUNK] = block.numpy()
    return out


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_cached(split: str, image_size: int, root: str, verify: bool, stamp: tuple[int, int]) -> OmniglotSet:
    # ``stamp`` (mtime_ns, size) of the array file is part of the key so that an edited file is re-read.
    del stamp
    root_path = Path(root)
    name = f"images_{split}.npz"
    path = root_path / name
    expected = _expected_sha256(root_path, name) if verify else None
    images_raw, _ = _decode_npz(path, _read_verified(path, expected), split)
    rows = _read_classes(root_path, split)

    images = _to_float_resized(images_raw, image_size)
    c = NUM_CLASSES[split]
    labels = np.repeat(np.arange(c, dtype=np.int64) + _CLASS_OFFSET[split], DRAWERS)
    alphabets = np.repeat(np.array([r["alphabet"] for r in rows]), DRAWERS)
    characters = np.repeat(np.array([r["character"] for r in rows]), DRAWERS)
    drawers = np.tile(np.arange(DRAWERS, dtype=np.int64), c)
    for arr in (images, labels, alphabets, characters, drawers):
        # Callers get copies; read-only here makes any internal in-place edit of the cache fail loudly.
        arr.flags.writeable = False
    return OmniglotSet(images, labels, alphabets, characters, drawers, split=split)


def clear_omniglot_cache() -> None:
    """Drop the decoded arrays kept by :func:`load_omniglot`."""
    _load_cached.cache_clear()


def load_omniglot(
    split: Literal["background", "evaluation"],
    image_size: int = 28,
    root: str | Path | None = None,
    verify: bool = True,
) -> OmniglotSet:
    """Load one Omniglot set, inverted (stroke = 1) and area-resized to ``image_size`` pixels.

    Args:
        split: ``background`` (964 classes, 19,280 images) or ``evaluation`` (659 classes, 13,180 images).
        image_size: output side in pixels, 1..105; 105 keeps the original images (float32: 850 MB for
            background, held twice: once in the cache, once returned; see :func:`clear_omniglot_cache`).
        root: folder holding the arrays, ``SHA256SUMS`` and ``classes.csv``; default: the packaged copy.
        verify: check each array's SHA-256 against ``SHA256SUMS`` (and dmlgen's pinned copy) first.

    Returns:
        An :class:`OmniglotSet` of fresh, writable arrays; images ordered character-major
        (index = character * 20 + drawer). The decoded arrays are cached per (split, size, root), so a repeated
        call costs a copy (milliseconds at 28 px) instead of a decode and resize.

    Raises:
        ConfigError: unknown split or bad image size.
        DataError: a missing, truncated or altered file (the message names it and both hashes).
    """
    shared = _load_shared(split, image_size, root, verify)
    return shared.subset(np.ones(len(shared), dtype=bool))


def _load_shared(split: str, image_size: int, root: str | Path | None, verify: bool) -> OmniglotSet:
    """The cached set itself: read-only arrays, not to be handed to callers."""
    if split not in SPLITS:
        raise ConfigError(f"Omniglot split must be one of {list(SPLITS)}, got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 1 <= image_size <= RAW_SIZE:
        raise ConfigError(f"Omniglot image_size must be an integer in 1..{RAW_SIZE}, got {image_size!r}")
    root_path = _resolve_root(root).resolve()
    path = root_path / f"images_{split}.npz"
    try:
        st = path.stat()
    except OSError:
        raise DataError(f"Omniglot file {path} does not exist") from None
    return _load_cached(split, int(image_size), str(root_path), bool(verify), (st.st_mtime_ns, st.st_size))


# --------------------------------------------------------------------------- splits
def omniglot_alphabets(split: Literal["background", "evaluation"], root: str | Path | None = None) -> list[str]:
    """Alphabet names of ``split`` in ``classes.csv`` order (30 background, 20 evaluation)."""
    if split not in SPLITS:
        raise ConfigError(f"Omniglot split must be one of {list(SPLITS)}, got {split!r}")
    rows = _read_classes(_resolve_root(root), split)
    return list(dict.fromkeys(r["alphabet"] for r in rows))


def _choose_val_alphabets(names: list[str], val_alphabets: int | Sequence[str], seed: int) -> list[str]:
    if isinstance(val_alphabets, (int, np.integer)) and not isinstance(val_alphabets, bool):
        n = int(val_alphabets)
        if not 0 <= n < len(names):
            raise ConfigError(
                f"val_alphabets must be in 0..{len(names) - 1} (background has {len(names)} alphabets), got {n}"
            )
        picked = np.random.default_rng(seed).choice(len(names), size=n, replace=False)
        return [names[i] for i in sorted(picked)]
    if isinstance(val_alphabets, str):
        val_alphabets = [val_alphabets]
    if not isinstance(val_alphabets, Sequence):
        raise ConfigError(f"val_alphabets must be an int or a list of alphabet names, got {val_alphabets!r}")
    chosen = list(val_alphabets)
    unknown = [a for a in chosen if a not in names]
    if unknown:
        raise ConfigError(
            f"val_alphabets: unknown background alphabet(s) {unknown}; valid names: {', '.join(names)}"
        )
    duplicates = sorted({a for a in chosen if chosen.count(a) > 1})
    if duplicates:
        raise ConfigError(f"val_alphabets: alphabet(s) listed twice: {duplicates}")
    if len(chosen) == len(names):
        raise ConfigError("val_alphabets: holding out every background alphabet leaves no training classes")
    return chosen


def omniglot_splits(
    image_size: int = 28,
    val_alphabets: int | Sequence[str] = 5,
    seed: int = 0,
    root: str | Path | None = None,
) -> dict[str, OmniglotSet]:
    """Class-disjoint splits: ``train``/``val`` from background, ``test`` = the evaluation set.

    Args:
        image_size: side in pixels (see :func:`load_omniglot`).
        val_alphabets: how many whole background alphabets to hold out for validation (chosen with
            ``seed``; 0 gives an empty ``val``), or their names.
        seed: seed of the alphabet draw when ``val_alphabets`` is an int.
        root: folder of the arrays (default: packaged copy).

    Returns:
        ``{"train", "val", "test"}`` -> :class:`OmniglotSet` (fresh writable arrays); test has 659 classes
        (13,180 images), train + val the 964 background classes.
    """
    # The shared cached arrays: subset() below makes the only copies.
    background = _load_shared("background", image_size, root, True)
    evaluation = _load_shared("evaluation", image_size, root, True)
    names = list(dict.fromkeys(background.alphabets.tolist()))
    held_out = _choose_val_alphabets(names, val_alphabets, seed)
    is_val = np.isin(background.alphabets, held_out)
    parts = {
        "train": background.subset(~is_val, split="train"),
        "val": background.subset(is_val, split="val"),
        "test": evaluation.subset(np.ones(len(evaluation), dtype=bool), split="test"),
    }
    # Disjointness holds by construction (whole alphabets, separate sets); check it anyway, it is cheap.
    train_c, val_c, test_c = (set(parts[k].labels.tolist()) for k in ("train", "val", "test"))
    if train_c & val_c or train_c & test_c or val_c & test_c:
        raise AssertionError("Omniglot splits share classes")
    return parts

