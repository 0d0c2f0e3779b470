"""The ``dmlgen`` command: exit codes, messages, arguments reaching evaluate_embeddings, the demo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dmlgen
import dmlgen.evaluation.evaluate as evaluate_module
from dmlgen.cli import main
from dmlgen.demo import BASELINES, embed_random_convnet
from dmlgen.data.omniglot import load_omniglot


@pytest.fixture()
def clustered(tmp_path: Path) -> tuple[Path, Path]:
    """Five tight, far-apart clusters of four 8-d points: every metric is perfect."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 4)
    emb = 100.0 * np.eye(5, 8)[labels] + 0.01 * rng.normal(size=(20, 8))
    np.save(tmp_path / "emb.npy", emb.astype(np.float32))
    np.save(tmp_path / "labels.npy", labels)
    return tmp_path / "emb.npy", tmp_path / "labels.npy"


@pytest.fixture()
def recorder(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace evaluate_embeddings by a stub that records its arguments."""
    calls: list[dict[str, Any]] = []

    def fake(embeddings, labels, gallery=None, gallery_labels=None, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(dict(embeddings=embeddings, labels=labels, gallery=gallery, gallery_labels=gallery_labels,
                          **kwargs))
        return {"recall@1": 0.5, "map@r": 0.25, "num_queries": 20.0}

    monkeypatch.setattr(evaluate_module, "evaluate_embeddings", fake)
    return calls


# --------------------------------------------------------------------------- parser
def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "evaluate" in out and "demo" in out
    assert main(["--version"]) == 0
    assert dmlgen.__version__ in capsys.readouterr().out
    assert main(["evaluate", "--help"]) == 0
    assert "--gallery-labels" in capsys.readouterr().out


def test_no_command_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "a command is required" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["evaluate"]) == 2  # missing positional arguments
    assert "EMBEDDINGS" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluate
def test_evaluate_perfect_clusters(clustered: tuple[Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    emb, labels = clustered
    out_json = tmp_path / "sub" / "metrics.json"
    code = main(["evaluate", str(emb), str(labels), "--metrics", "recall,map@r", "--json", str(out_json)])
    assert code == 0
    out = capsys.readouterr().out
    assert "20 queries" in out and "leave-one-out" in out
    assert any(line.split() == ["recall@1", "1.0000"] for line in out.splitlines())
    assert any(line.split() == ["map@r", "1.0000"] for line in out.splitlines())
    saved = json.loads(out_json.read_text())
    assert saved["metrics"]["recall@1"] == 1.0 and saved["metrics"]["map@r"] == 1.0
    assert saved["settings"]["ks"] == [1, 2, 4, 8] and saved["inputs"]["num_embeddings"] == 20


def test_evaluate_matches_the_library_call(clustered: tuple[Path, Path], tmp_path: Path) -> None:
    emb, labels = clustered
    x = np.load(emb)
    y = np.load(labels)
    # Shuffle labels so that the numbers are not all 1.
    y = np.random.default_rng(1).permutation(y)
    np.save(tmp_path / "shuffled.npy", y)
    assert main(["evaluate", str(emb), str(tmp_path / "shuffled.npy"), "--k", "1,3",
                 "--json", str(tmp_path / "m.json")]) == 0
    direct = evaluate_module.evaluate_embeddings(x, y, ks=(1, 3))
    saved = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert saved.keys() == direct.keys()
    for key, value in direct.items():
        assert saved[key] == pytest.approx(float(value)), key


def test_evaluate_passes_every_option(clustered: tuple[Path, Path], tmp_path: Path,
                                      recorder: list[dict[str, Any]]) -> None:
    emb, labels = clustered
    np.savez(tmp_path / "gallery.npz", emb=np.ones((6, 8)), labels=np.arange(6))
    code = main(["evaluate", str(emb), str(labels), "--gallery", str(tmp_path / "gallery.npz"),
                 "--gallery-labels", str(tmp_path / "gallery.npz"), "--embeddings-key", "emb",
                 "--labels-key", "labels", "--metrics", "recall, precision@1", "--k", "1,5",
                 "--distance", "cosine", "--class-balanced", "--seed", "7"])
    assert code == 0
    (call,) = recorder
    assert call["embeddings"].shape == (20, 8) and call["labels"].dtype == np.int64
    assert call["gallery"].shape == (6, 8) and np.array_equal(call["gallery_labels"], np.arange(6))
    assert call["metrics"] == ["recall", "precision@1"] and tuple(call["ks"]) == (1, 5)
    assert call["metric"] == "cosine" and call["class_balanced"] is True and call["seed"] == 7


def test_evaluate_defaults(clustered: tuple[Path, Path], recorder: list[dict[str, Any]]) -> None:
    assert main(["evaluate", *map(str, clustered)]) == 0
    (call,) = recorder
    assert call["gallery"] is None and call["metrics"] is None and tuple(call["ks"]) == (1, 2, 4, 8)
    assert call["metric"] == "euclidean" and call["class_balanced"] is False and call["seed"] == 0


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    return err


def test_evaluate_missing_file(tmp_path: Path, clustered: tuple[Path, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tmp_path / "missing.npy"), str(clustered[1])]) == 2
    assert "missing.npy does not exist" in _error(capsys)


def test_evaluate_length_mismatch(tmp_path: Path, clustered: tuple[Path, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "short.npy", np.arange(19))
    assert main(["evaluate", str(clustered[0]), str(tmp_path / "short.npy")]) == 2
    assert "has 19 labels but the embeddings have 20 rows" in _error(capsys)


def test_evaluate_nan_embeddings(tmp_path: Path, clustered: tuple[Path, Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    x = np.load(clustered[0])
    x[3, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    assert main(["evaluate", str(tmp_path / "nan.npy"), str(clustered[1])]) == 2
    assert "1 of 20 rows contain NaN" in _error(capsys)


@pytest.mark.parametrize("args, message", [
    (["--k", "0,1"], "--k"),
    (["--k", "1,x"], "--k"),
    (["--metrics", "recall,,map@r"], "--metrics"),
    (["--gallery", "g.npy"], "--gallery and --gallery-labels"),
])
def test_evaluate_bad_options(clustered: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                              args: list[str], message: str) -> None:
    assert main(["evaluate", *map(str, clustered), *args]) == 2
    assert message in _error(capsys)


def test_evaluate_unknown_metric(clustered: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", *map(str, clustered), "--metrics", "recall,accuracy_of_vibes"]) == 2
    assert "accuracy_of_vibes" in _error(capsys)


def test_evaluate_gallery_dimension_mismatch(clustered: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "g.npy", np.ones((6, 3)))
    np.save(tmp_path / "gl.npy", np.arange(6))
    assert main(["evaluate", *map(str, clustered), "--gallery", str(tmp_path / "g.npy"),
                 "--gallery-labels", str(tmp_path / "gl.npy")]) == 2
    assert "8-d but gallery" in _error(capsys)


def test_bugs_keep_their_traceback(clustered: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> dict[str, float]:
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(evaluate_module, "evaluate_embeddings", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["evaluate", *map(str, clustered)])


def test_installed_script(clustered: tuple[Path, Path], tmp_path: Path) -> None:
    script = shutil.which("dmlgen", path=str(Path(sys.executable).parent))
    assert script is not None, "the dmlgen console script is not installed next to this Python"
    ok = subprocess.run([script, "evaluate", *map(str, clustered), "--metrics", "recall"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "recall@1" in ok.stdout
    bad = subprocess.run([script, "evaluate", str(tmp_path / "none.npz"), str(clustered[1])],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "none.npz" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- demo
def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "metrics.json").read_text())
    trained = "trained_multi_similarity"
    assert set(summary["baselines"]) == set(BASELINES) | {trained}
    # the trained row is the run's own test result on the same 100 classes
    run = json.loads((out / "train" / "test_metrics.json").read_text())
    assert summary["baselines"][trained]["map@r"] == pytest.approx(run["test"]["map@r"])
    assert run["splits"]["test_classes"] == 100 and run["splits"]["test_images"] == 2000
    assert (out / "train" / "best.ckpt").is_file() and summary["trained"]["epochs"] == 1
    assert summary["dataset"]["classes"] == 100 and summary["dataset"]["images"] == 2000
    for name, metrics in summary["baselines"].items():
        assert 0.0 <= metrics["recall@1"] <= 1.0 and metrics["wall_time_s"] > 0, name
        assert metrics["num_queries"] == 2000
        assert name in printed
    # Chance Recall@1 is 19/1999 ~ 0.01: even untrained pixels do much better on Omniglot.
    assert summary["baselines"]["raw_pixels"]["recall@1"] > 0.2
    assert summary["baselines"]["random_projection"]["embedding_dim"] == 128
    report = (out / "report.md").read_text()
    assert "| recall@1 |" in report and f"dmlgen demo --out {out} --quick" in report
    assert trained in report and str(out / "train") in report
    assert "recall@1" in printed and "metrics.json" in printed


def test_demo_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a folder")
    assert main(["demo", "--out", str(tmp_path / "file" / "demo"), "--quick", "--no-train"]) == 2
    assert "cannot write the demo output" in _error(capsys)


def test_random_convnet_is_seeded_and_leaves_global_rng_alone() -> None:
    data = load_omniglot("evaluation")
    data = data.subset(data.labels < 964 + 3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = embed_random_convnet(data, seed=0)
    after = torch.rand(1)
    b = embed_random_convnet(data, seed=0)
    c = embed_random_convnet(data, seed=1)
    assert torch.equal(before, after)
    assert a.shape == (60, 128) and torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.allclose(a.norm(dim=1), torch.ones(60))
