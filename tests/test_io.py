"""Array files: every format round-trips, and every bad file is a DataError that names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dmlgen.errors import DataError
from dmlgen.evaluation.io import as_embeddings, as_labels, load_array, load_embeddings_and_labels

X = np.arange(12, dtype=np.float32).reshape(4, 3) / 7.0


class NotAllowed:
    """A pickled instance of this class must never be unpickled by load_array."""

    created = 0

    def __reduce__(self):  # type: ignore[override]
        return (NotAllowed._side_effect, ())

    @staticmethod
    def _side_effect() -> str:
        NotAllowed.created += 1
        return "ran"


# --------------------------------------------------------------------------- load_array: formats
def test_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", X)
    out = load_array(tmp_path / "x.npy")
    assert out.dtype == np.float32 and np.array_equal(out, X)


def test_npz_single_and_keyed(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", emb=X)
    assert np.array_equal(load_array(tmp_path / "one.npz"), X)
    np.savez(tmp_path / "two.npz", emb=X, labels=np.arange(4))
    assert np.array_equal(load_array(str(tmp_path / "two.npz"), key="labels"), np.arange(4))
    with pytest.raises(DataError, match=r"two\.npz.*\['emb', 'labels'\]"):
        load_array(tmp_path / "two.npz")
    with pytest.raises(DataError, match=r"no array 'lbl'.*\['emb', 'labels'\]"):
        load_array(tmp_path / "two.npz", key="lbl")


def test_pt_tensor_and_dict(tmp_path: Path) -> None:
    torch.save(torch.from_numpy(X), tmp_path / "x.pt")
    assert np.array_equal(load_array(tmp_path / "x.pt"), X)
    torch.save({"emb": torch.from_numpy(X), "labels": torch.arange(4)}, tmp_path / "d.pt")
    assert np.array_equal(load_array(tmp_path / "d.pt", key="labels"), np.arange(4))
    with pytest.raises(DataError, match=r"d\.pt.*\['emb', 'labels'\]"):
        load_array(tmp_path / "d.pt")
    torch.save(torch.from_numpy(X).to(torch.bfloat16), tmp_path / "bf16.pt")
    assert load_array(tmp_path / "bf16.pt").dtype == np.float32


def test_pt_never_runs_pickled_code(tmp_path: Path) -> None:
    torch.save({"emb": torch.zeros(2, 2), "evil": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match=r"evil\.pt"):
        load_array(tmp_path / "evil.pt")
    assert NotAllowed.created == 0


def test_npy_object_array_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy"):
        load_array(tmp_path / "obj.npy")


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    (tmp_path / "plain.csv").write_text("0.5,1,2\n3,4,5.25\n")
    assert np.array_equal(load_array(tmp_path / "plain.csv"), [[0.5, 1, 2], [3, 4, 5.25]])
    (tmp_path / "head.csv").write_text("a,b,c\n0.5,1,2\n3,4,5.25\n")
    assert np.array_equal(load_array(tmp_path / "head.csv"), [[0.5, 1, 2], [3, 4, 5.25]])
    (tmp_path / "labels.csv").write_text("label\n3\n1\n3\n")
    out = load_array(tmp_path / "labels.csv")
    assert out.shape == (3,) and np.array_equal(out, [3, 1, 3])
    (tmp_path / "row.csv").write_text("1,2,3\n")
    assert load_array(tmp_path / "row.csv").shape == (1, 3)


# --------------------------------------------------------------------------- load_array: errors
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.npy does not exist"):
        load_array(tmp_path / "nope.npy")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(DataError, match="not a file"):
        load_array(tmp_path / "dir.npy")


@pytest.mark.parametrize("name", ["x.txt", "x.h5", "x"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("1,2\n")
    with pytest.raises(DataError, match=r"unknown extension.*\.npy"):
        load_array(tmp_path / name)


@pytest.mark.parametrize("name", ["bad.npy", "bad.npz", "bad.pt"])
def test_garbage_bytes(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x00\x01not really an array" * 10)
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        load_array(tmp_path / name)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt"])
def test_truncated_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    big = np.random.default_rng(0).normal(size=(200, 50))
    if suffix == ".npy":
        np.save(path, big)
    elif suffix == ".npz":
        np.savez_compressed(path, emb=big)
    else:
        torch.save(torch.from_numpy(big), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=f"x\\{suffix}"):
        load_array(path)


def test_csv_with_text_cell_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("1,2\n3,oops\n")
    with pytest.raises(DataError, match=r"t\.csv.*oops"):
        load_array(tmp_path / "t.csv")


def test_empty_csv(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match=r"e\.csv holds no numeric rows"):
        load_array(tmp_path / "e.csv")
    (tmp_path / "h.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"h\.csv"):
        load_array(tmp_path / "h.csv")


def test_key_on_a_single_array_format(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", X)
    with pytest.raises(DataError, match="only to .npz and .pt"):
        load_array(tmp_path / "x.npy", key="emb")


# --------------------------------------------------------------------------- embeddings and labels
def test_load_pair_from_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "run.npz", emb=X.astype(np.float64), labels=np.array([0, 0, 1, 1]))
    emb, lab = load_embeddings_and_labels(tmp_path / "run.npz", tmp_path / "run.npz",
                                          embeddings_key="emb", labels_key="labels")
    assert emb.dtype == np.float64 and emb.shape == (4, 3)
    assert lab.dtype == np.int64 and np.array_equal(lab, [0, 0, 1, 1])


def test_load_pair_from_arrays_converts_types() -> None:
    emb, lab = load_embeddings_and_labels(np.arange(8, dtype=np.int32).reshape(4, 2),
                                          np.array([[1.0], [2.0], [2.0], [1.0]]))
    assert emb.dtype == np.float32 and lab.dtype == np.int64 and lab.shape == (4,)
    emb, lab = load_embeddings_and_labels(torch.ones(3, 2, dtype=torch.float16), torch.tensor([0, 1, 1]))
    assert emb.dtype == np.float32 and np.array_equal(lab, [0, 1, 1])


def test_length_mismatch_names_both_counts(tmp_path: Path) -> None:
    np.save(tmp_path / "e.npy", X)
    np.save(tmp_path / "l.npy", np.arange(3))
    with pytest.raises(DataError, match=r"labels file .*l\.npy has 3 labels but the embeddings have 4 rows"):
        load_embeddings_and_labels(tmp_path / "e.npy", tmp_path / "l.npy")


def test_nan_rows_are_counted(tmp_path: Path) -> None:
    bad = np.ones((10, 3))
    bad[2, 1] = np.nan
    bad[7, 0] = np.inf
    bad[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match=r"nan\.npy: 2 of 10 rows contain NaN or inf \(first: row 2\)"):
        load_embeddings_and_labels(tmp_path / "nan.npy", np.zeros(10, dtype=np.int64))


@pytest.mark.parametrize("emb, match", [
    (np.ones(5), "2-D"),
    (np.ones((2, 2, 2)), "2-D"),
    (np.ones((0, 4)), "empty"),
    (np.ones((3, 0)), "empty"),
    (np.array([["a", "b"]]), "real numbers"),
    (np.ones((2, 2), dtype=bool), "real numbers"),
])
def test_bad_embeddings(emb: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        as_embeddings(emb)


@pytest.mark.parametrize("lab, match", [
    (np.array([0.0, 1.5, 2.0]), r"1 of 3 labels are not integers \(first: row 1"),
    (np.array([0.0, np.nan, 2.0]), "not integers"),
    (np.ones((3, 2), dtype=np.int64), "1-D"),
    (np.array([], dtype=np.int64), "empty"),
    (np.array([True, False, True]), "integer labels"),
    (np.array(["a", "b", "c"]), "integer labels"),
])
def test_bad_labels(lab: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        as_labels(lab)


def test_float32_overflow_is_caught() -> None:
    with pytest.raises(DataError, match="1 of 2 rows"):
        as_embeddings(np.array([[1e300, 0.0], [1.0, 1.0]], dtype=np.float64).astype(np.longdouble))
