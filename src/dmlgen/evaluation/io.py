"""Reading embeddings and labels from files (``.npy``, ``.npz``, ``.pt``, ``.csv``), with errors that name the file.

Nothing here executes code from a file: ``.npy``/``.npz`` are read with ``allow_pickle=False`` and ``.pt`` with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmlgen.errors import DataError

__all__ = ["SUFFIXES", "as_embeddings", "as_labels", "load_array", "load_embeddings_and_labels"]

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".csv")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _pick(path: Path, arrays: Mapping[str, Any], key: str | None, what: str) -> Any:
    """``arrays[key]``, or the only entry when ``key`` is None; errors list the keys."""
    names = list(arrays)
    if key is None:
        if len(names) == 1:
            return arrays[names[0]]
        raise DataError(f"file {path} holds {len(names)} {what} {names}; choose one with a key")
    if key not in arrays:
        raise DataError(f"file {path} has no {what[:-1]} {key!r}; it holds {names}")
    return arrays[key]


def _tensor_to_numpy(path: Path, value: Any) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise DataError(f"file {path} holds a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
        value = value.to(torch.float32)  # numpy has no bfloat16
    return value.numpy()


def _csv_has_header(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    [float(field) for field in line.split(",")]
                except ValueError:
                    return True
                return False
    return False


def _load_csv(path: Path) -> np.ndarray:
    header = _csv_has_header(path)
    try:
        with warnings.catch_warnings():
            # An empty file is reported below as a DataError; numpy's warning would only repeat it.
            warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
            data = np.loadtxt(path, delimiter=",", dtype=np.float64, skiprows=int(header), ndmin=2)
    except ValueError as exc:
        # numpy's message names the row and column of the first bad value.
        raise DataError(f"file {path} is not a numeric CSV: {_first_line(exc)}") from None
    if data.size == 0:
        raise DataError(f"file {path} holds no numeric rows")
    # One value per line is a vector (e.g. labels), not an (N, 1) matrix.
    return data[:, 0] if data.shape[1] == 1 else data


def load_array(path: str | Path, key: str | None = None) -> np.ndarray:
    """Read one array from ``.npy``, ``.npz``, ``.pt``/``.pth`` or ``.csv``.

    Args:
        path: the file; the suffix selects the reader.
        key: the array to take from an ``.npz`` (or from a dict saved in a ``.pt``); needed only when the
            file holds more than one.

    Returns:
        The array as stored (``.csv``: float64; a single-column CSV gives a 1-D array; a header line is skipped).

    Raises:
        DataError: missing file, unknown suffix, corrupt or unreadable content, or a missing/ambiguous key.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"file {path}: unknown extension {suffix or '(none)'!r}; expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"file {path} does not exist" if not path.exists() else f"{path} is not a file")
    if key is not None and suffix in (".npy", ".csv"):
        raise DataError(f"file {path}: a key ({key!r}) applies only to .npz and .pt files")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                name = _pick(path, {name: name for name in npz.files}, key, "arrays")
                return np.asarray(npz[name])
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, Mapping):
                tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                return _tensor_to_numpy(path, _pick(path, tensors, key, "tensors"))
            if key is not None:
                raise DataError(f"file {path} holds a single {type(obj).__name__}, not a dict with key {key!r}")
            return _tensor_to_numpy(path, obj)
        return _load_csv(path)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError,
            UnicodeDecodeError, KeyError, zlib.error) as exc:
        # numpy, zipfile and torch raise all of these for truncated or foreign files.
        raise DataError(f"file {path} cannot be read as {suffix}: {_first_line(exc)}") from None


def _to_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        return (array.float() if array.dtype in (torch.bfloat16, torch.float16) else array).numpy()
    return np.asarray(array)


def _source(value: Any, name: str) -> str:
    return f"{name} file {value}" if isinstance(value, (str, Path)) else name


def as_embeddings(array: Any, source: str = "embeddings") -> np.ndarray:
    """Check an (N, D) real array (non-empty, finite) -> float32 (float64 is kept). ``source`` names it in errors."""
    arr = _to_numpy(array)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{source}: expected real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise DataError(f"{source}: expected a 2-D array (N, D), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{source} is empty (shape {arr.shape})")
    if arr.dtype != np.float64:
        with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
            arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(f"{source}: {len(rows)} of {len(arr)} rows contain NaN or inf (first: row {rows[0]})")
    return arr


def as_labels(array: Any, source: str = "labels", n: int | None = None) -> np.ndarray:
    """Check (N,) integer labels (an (N, 1) column or integral floats are accepted) -> int64."""
    arr = _to_numpy(array)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{source}: expected a 1-D array (N,), got shape {arr.shape}")
    if len(arr) == 0:
        raise DataError(f"{source} is empty")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            rows = np.flatnonzero(bad)
            raise DataError(f"{source}: {len(rows)} of {len(arr)} labels are not integers "
                            f"(first: row {rows[0]} = {arr[rows[0]]!r})")
    elif arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{source}: expected integer labels, got dtype {arr.dtype}")
    if n is not None and len(arr) != n:
        raise DataError(f"{source} has {len(arr)} labels but the embeddings have {n} rows")
    return arr.astype(np.int64)


def load_embeddings_and_labels(
    embeddings: str | Path | Any,
    labels: str | Path | Any,
    *,
    embeddings_key: str | None = None,
    labels_key: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load and check a pair: embeddings (N, D) float32 (float64 kept) and labels (N,) int64.

    Each argument is a file path (read with :func:`load_array` and the matching key) or an array.
    Raises DataError for a wrong ndim, empty input, NaN/inf rows, non-integer labels or a length mismatch.
    """
    emb = load_array(embeddings, embeddings_key) if isinstance(embeddings, (str, Path)) else embeddings
    lab = load_array(labels, labels_key) if isinstance(labels, (str, Path)) else labels
    emb = as_embeddings(emb, _source(embeddings, "embeddings"))
    lab = as_labels(lab, _source(labels, "labels"), n=len(emb))
    return emb, lab
