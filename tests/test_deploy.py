"""dmlgen.deploy: index build + search, approximate-index recall, exports (TorchScript, ONNX, safetensors),
refusal of foreign models and of pickled objects, and the index / search / export commands."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dmlgen.cli import main
from dmlgen.data.omniglot import load_omniglot
from dmlgen.deploy import (
    EmbeddingIndex,
    ExportError,
    approximate_recall,
    build_index,
    export_onnx,
    export_torchscript,
    load_index,
    model_identity,
    save_weights_safetensors,
    search,
)
from dmlgen.deploy.index import collect_images
from dmlgen.engine.checkpoint import atomic_save, load_checkpoint
from dmlgen.engine.config import config_from_dict
from dmlgen.engine.run import load_trained_model, train
from dmlgen.engine.setup import build_model_from_config
from dmlgen.errors import CheckpointError, ConfigError, DataError
from _fixtures import one_thread  # noqa: F401  (autouse: every test here runs on one thread)

faiss = pytest.importorskip("faiss")

TINY: dict[str, Any] = {
    "name": "tiny",
    "data": {"dataset": "omniglot", "max_classes": 8, "classes_per_batch": 4, "samples_per_class": 4},
    "model": {"backbone": "convnet4", "embedding_size": 16},
    "loss": {"name": "multi_similarity", "params": {"alpha": 2.0, "beta": 50.0, "base": 0.5},
             "miner": {"name": "multi_similarity", "params": {"epsilon": 0.1}}},
    "train": {"epochs": 1, "max_steps_per_epoch": 2},
}
NUM_CLASSES, PER_CLASS = 6, 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.ckpt of a 1-epoch, 2-step Omniglot run (seconds)."""
    out = tmp_path_factory.mktemp("run")
    config = out / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config, out_dir=out / "run", progress=False)
    finally:
        torch.set_num_threads(before)
    return out / "run" / "best.ckpt"


def _variant(ckpt: Path, out: Path, embedding_size: int | None = None) -> Path:
    """A valid checkpoint of another model: the same weights with one changed, or another embedding size."""
    state = load_checkpoint(ckpt)
    if embedding_size is None:
        state["model"] = {k: v.clone() for k, v in state["model"].items()}
        state["model"]["head.layers.0.bias"][0] += 0.5
    else:
        state["config"]["model"]["embedding_size"] = embedding_size
        cfg = config_from_dict(state["config"])
        model = build_model_from_config(cfg.model, in_channels=cfg.data.channels, pretrained=False)
        state["model"], state["model_description"] = model.state_dict(), model.describe()
    atomic_save(state, out)
    return out


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/<class>/<i>.png: 6 Omniglot evaluation classes x 4 images, stroke white as in training."""
    root = tmp_path_factory.mktemp("gallery")
    data = load_omniglot("evaluation")
    for c in np.unique(data.labels)[:NUM_CLASSES]:
        (root / f"c{c}").mkdir()
        for i in np.flatnonzero(data.labels == c)[:PER_CLASS]:
            Image.fromarray(np.round(data.images[i] * 255).astype(np.uint8), mode="L").save(root / f"c{c}" / f"{i}.png")
    return root


def _pixels(paths: list[str]) -> torch.Tensor:
    """(N, 1, 28, 28) float images read with PIL alone: an oracle independent of the transform pipeline."""
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255.0)[None] for p in paths])


def _clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    return (centers[rng.integers(clusters, size=n)] + 0.4 * rng.normal(size=(n, dim))).astype(np.float32)


def _brute_force(queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """(Nq, k) indices of the nearest gallery rows, a plain float64 loop."""
    out = []
    for i, q in enumerate(queries.astype(np.float64)):
        d = ((gallery.astype(np.float64) - q) ** 2).sum(axis=1)
        if exclude_self:
            d[i] = np.inf
        out.append(np.argsort(d, kind="stable")[:k])
    return np.array(out)


# --------------------------------------------------------------------------- exact index round trip
def test_exact_index_round_trip(ckpt: Path, gallery: Path, tmp_path: Path) -> None:
    meta = build_index(ckpt, gallery, tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["embeddings.npy", "index.json"]
    assert meta == json.loads((tmp_path / "idx" / "index.json").read_text())
    n = NUM_CLASSES * PER_CLASS
    assert (meta["kind"], meta["metric"], meta["num_items"], meta["embedding_size"]) == ("exact", "euclidean", n, 16)
    assert meta["recall"] is None and meta["model"]["checkpoint"] == str(ckpt.resolve())
    assert meta["labels"] == [Path(p).parent.name for p in meta["paths"]]
    assert len(set(meta["labels"])) == NUM_CLASSES

    # The stored embeddings are the model's outputs on the image files.
    model, _ = load_trained_model(ckpt)
    with torch.no_grad():
        expected = model(_pixels(meta["paths"])).numpy()
    stored = np.load(tmp_path / "idx" / "embeddings.npy")
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    assert meta["model"]["hash"] == model_identity(model)["hash"]

    # Every gallery image finds itself first; the ranking and distances are brute force's.
    k = 5
    result = search(tmp_path / "idx", gallery, k, checkpoint=ckpt)
    assert result.query_paths == meta["paths"]
    assert result.indices[:, 0].tolist() == list(range(n))
    np.testing.assert_allclose(result.distances[:, 0], 0, atol=1e-6)
    oracle = _brute_force(expected, expected, k)
    assert (result.indices == oracle).all()
    naive = np.sqrt(((expected[:, None, :].astype(np.float64) - expected[oracle]) ** 2).sum(axis=2))
    np.testing.assert_allclose(result.distances, naive, atol=1e-5)
    assert result.paths[3] == [meta["paths"][j] for j in oracle[3]]
    assert result.labels[3][0] == meta["labels"][3]

    # One query file, the checkpoint recorded in the index by default.
    one = search(tmp_path / "idx", meta["paths"][7], 2)
    assert one.indices[0, 0] == 7 and one.paths[0][0] == meta["paths"][7]


def test_collect_images(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    image = Image.new("L", (8, 8))
    for rel in ("a/x.png", "a/deep/y.PNG", "b/z.jpg", "loose.png", ".hidden/h.png", "a/.h.png"):
        image.save(tmp_path / rel, format="PNG")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    paths, labels = collect_images(tmp_path)
    rel = [str(Path(p).relative_to(tmp_path.resolve())) for p in paths]
    assert rel == ["loose.png", "a/x.png", "a/deep/y.PNG", "b/z.jpg"]
    assert labels == [None, "a", "a", "b"]
    paths, labels = collect_images([tmp_path / "b" / "z.jpg", tmp_path / "a"])
    assert [Path(p).name for p in paths] == ["z.jpg", "x.png", "y.PNG"] and labels == [None, None, "deep"]
    with pytest.raises(DataError, match="missing.png does not exist"):
        collect_images([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        collect_images(tmp_path / "empty")


# --------------------------------------------------------------------------- approximate indexes
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_approximate_recall_matches_a_naive_oracle(kind: str, metric: str) -> None:
    both = _clustered(3200, 32, 40, seed=1)  # held-out queries from the gallery's distribution
    x, queries = both[:3000], both[3000:]
    params = {"nlist": 64, "nprobe": 2} if kind == "ivf" else {"hnsw_m": 8, "ef_construction": 16, "ef_search": 10}
    index = EmbeddingIndex.build(x, kind, metric, **params)
    k = 10
    got = approximate_recall(index, queries, k=k)
    _, approx = index.search(queries, k)
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        exact = _brute_force(queries / np.linalg.norm(queries, axis=1, keepdims=True), xn, k)
    else:
        exact = _brute_force(queries, x, k)
    naive = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx.tolist(), exact.tolist())])
    assert got["recall"] == pytest.approx(naive, abs=1e-12)
    assert 0.5 < got["recall"] < 1.0  # weak settings: approximate, but far from useless
    assert got["num_queries"] == 200 and got["queries"] == "given"

    # Leave-one-out on the gallery: each sampled row is excluded from its own neighbours.
    loo = approximate_recall(index, k=k, num_queries=150, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(len(x), size=150, replace=False))
    _, approx = index.search(x[rows], k + 1)
    ref = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
    hits = []
    for r, found in zip(rows, approx.tolist()):
        d = ((ref.astype(np.float64) - ref[r]) ** 2).sum(axis=1)
        d[r] = np.inf
        exact_set = set(np.argsort(d, kind="stable")[:k].tolist())
        hits.append(len(exact_set & set([j for j in found if j != r][:k])) / k)
    assert loo["recall"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert loo["num_queries"] == 150

    # Searching every cell is exact; a wide HNSW candidate list nearly so (a sparse graph may leave a few
    # items unreachable).
    if kind == "ivf":
        assert approximate_recall(index, queries, k=k, nprobe=64)["recall"] == 1.0
    else:
        assert got["recall"] < approximate_recall(index, queries, k=k, ef_search=3000)["recall"] >= 0.99


def test_exact_kind_and_distances_follow_the_metric() -> None:
    x = _clustered(500, 8, 5, seed=4)
    q = _clustered(20, 8, 5, seed=5)
    for kind in ("exact", "ivf", "hnsw"):
        index = EmbeddingIndex.build(x, kind, "euclidean", nlist=4, nprobe=4) if kind == "ivf" else \
            EmbeddingIndex.build(x, kind, "euclidean")
        dist, idx = index.search(q, 3)
        np.testing.assert_allclose(dist, np.linalg.norm(x[idx] - q[:, None, :], axis=2), rtol=1e-4, atol=1e-4)
        assert (idx == _brute_force(q, x, 3)).all()
    for kind in ("exact", "hnsw"):
        sim, idx = EmbeddingIndex.build(x, kind, "inner_product").search(q, 3)
        np.testing.assert_allclose(sim, np.einsum("nd,nkd->nk", q, x[idx]), rtol=1e-4)
        assert (idx == np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :3]).all()  # larger first


def test_ivf_rows_with_too_few_candidates_are_searched_exactly() -> None:
    x = _clustered(200, 16, 20, seed=6)
    index = EmbeddingIndex.build(x, "ivf", "euclidean", nlist=20, nprobe=1)
    raw_dist, raw_idx = index.faiss_index.search(x[:30], 60)
    assert (raw_idx < 0).any()  # one cell holds fewer than 60 items
    dist, idx = index.search(x[:30], 60)
    assert (idx >= 0).all()
    short = (raw_idx < 0).any(axis=1)
    assert (idx == _brute_force(x[:30], x, 60))[short].all()  # those rows: exact
    assert (idx[~short] == raw_idx[~short]).all()  # the others: faiss's answer
    np.testing.assert_allclose(dist, np.linalg.norm(x[idx] - x[:30, None], axis=2), atol=1e-4)


def test_index_parameter_errors() -> None:
    x = _clustered(100, 8, 4, seed=7)
    with pytest.raises(ConfigError, match="index kind: must be one of exact, ivf, hnsw, got 'lsh'"):
        EmbeddingIndex.build(x, "lsh")
    with pytest.raises(ConfigError, match="nlist: 500 IVF cells need at least as many gallery items, got 100"):
        EmbeddingIndex.build(x, "ivf", nlist=500)
    ivf = EmbeddingIndex.build(x, "ivf", nlist=4)
    with pytest.raises(ConfigError, match="nprobe: at most nlist = 4, got 9"):
        ivf.search(x[:2], 3, nprobe=9)
    with pytest.raises(ConfigError, match="ef_search: only for hnsw"):
        ivf.search(x[:2], 3, ef_search=9)
    with pytest.raises(DataError, match="k = 101 neighbours requested but the index holds 100"):
        ivf.search(x[:2], 101)
    with pytest.raises(DataError, match="queries are 4-d but the index holds 8-d"):
        ivf.search(x[:2, :4], 1)
    with pytest.raises(DataError, match="embeddings must hold numbers, got dtype <U1"):
        EmbeddingIndex.build(np.array([["a", "b"]]))
    with pytest.raises(DataError, match="queries holds NaN or inf in 1 row"):
        ivf.search(np.full((1, 8), np.nan), 1)
    with pytest.raises(ConfigError, match="nprobe / ef_search: only for ivf / hnsw indexes; this index is exact"):
        EmbeddingIndex.build(x).search(x[:1], 1, nprobe=2)


def test_approximate_kinds_need_faiss(monkeypatch: pytest.MonkeyPatch, ckpt: Path, gallery: Path,
                                      tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(ConfigError, match=r"index kind 'hnsw' needs the faiss package: pip install 'dmlgen\[faiss\]'"):
        EmbeddingIndex.build(_clustered(50, 4, 2, seed=0), "hnsw")
    with pytest.raises(ConfigError, match="index kind 'ivf' needs the faiss package"):
        build_index(ckpt, gallery, tmp_path / "idx", kind="ivf")
    assert not (tmp_path / "idx").exists()
    assert EmbeddingIndex.build(_clustered(50, 4, 2, seed=0), "exact").search(np.ones((1, 4)), 1)[1].shape == (1, 1)


# --------------------------------------------------------------------------- approximate indexes of images
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_image_index_stores_recall(kind: str, ckpt: Path, gallery: Path, tmp_path: Path) -> None:
    meta = build_index(ckpt, gallery, tmp_path / "idx", kind=kind, nlist=2 if kind == "ivf" else None)
    assert (tmp_path / "idx" / "faiss.index").is_file()
    recall = meta["recall"]
    assert recall["k"] == 10 and recall["num_queries"] == NUM_CLASSES * PER_CLASS
    loaded = load_index(tmp_path / "idx")
    again = approximate_recall(loaded.index, k=10, num_queries=1000, seed=0)
    assert recall["recall"] == pytest.approx(again["recall"]) and 0 < recall["recall"] <= 1
    assert loaded.index.faiss_index.ntotal == NUM_CLASSES * PER_CLASS
    result = search(tmp_path / "idx", gallery, 3, checkpoint=ckpt)
    assert result.indices[:, 0].tolist() == list(range(NUM_CLASSES * PER_CLASS))


# --------------------------------------------------------------------------- refusals
def test_search_refuses_an_index_of_another_model(ckpt: Path, gallery: Path, tmp_path: Path) -> None:
    build_index(ckpt, gallery, tmp_path / "idx")
    other = _variant(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=f"checkpoint {other} is not the model index {tmp_path / 'idx'} was "
                       r"built with \(model hash [0-9a-f]{12} != [0-9a-f]{12}, built from "):
        search(tmp_path / "idx", gallery, 1, checkpoint=other)
    wider = _variant(ckpt, tmp_path / "wider.ckpt", embedding_size=32)
    with pytest.raises(CheckpointError, match=f"checkpoint {wider} gives 32-d embeddings but index "
                       f"{tmp_path / 'idx'} holds 16-d embeddings of another model"):
        search(tmp_path / "idx", gallery, 1, checkpoint=wider)
    # The same weights under another checkpoint file are the same model.
    state = load_checkpoint(ckpt)
    atomic_save(state, tmp_path / "copy.ckpt")
    assert search(tmp_path / "idx", gallery, 1, checkpoint=tmp_path / "copy.ckpt").indices[0, 0] == 0


def test_index_folder_errors(ckpt: Path, gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_index(ckpt, gallery, out)
    with pytest.raises(ConfigError, match=f"index folder {out} already exists; pass overwrite=True"):
        build_index(ckpt, gallery, out)
    first = json.loads((out / "index.json").read_text())
    build_index(ckpt, gallery / sorted(os.listdir(gallery))[0], out, overwrite=True)
    assert json.loads((out / "index.json").read_text())["num_items"] == PER_CLASS != first["num_items"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="mine exists and is not a dmlgen index .* refusing to replace it"):
        build_index(ckpt, gallery, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"

    with pytest.raises(DataError, match="is not a dmlgen index: it has no index.json"):
        load_index(tmp_path / "mine")
    np.save(out / "embeddings.npy", np.zeros((3, 16), dtype=np.float32))
    with pytest.raises(DataError, match=r"embeddings.npy are float32 \(3, 16\), but .* says float32 \(4, 16\)"):
        load_index(out)
    with pytest.raises(DataError, match="index folder .*nowhere does not exist"):
        load_index(tmp_path / "nowhere")


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path: Path, ckpt: Path, gallery: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "code-ran"
    evil, plain = tmp_path / "evil.ckpt", tmp_path / "plain.ckpt"
    state = load_checkpoint(ckpt)
    torch.save({**state, "extra": _RunsCode(str(marker))}, evil)
    torch.save({**state, "extra": _Plain()}, plain)
    with pytest.raises(CheckpointError, match=f"checkpoint {evil} holds Python objects other than tensors and plain "
                       r"data \(posix.system\); dmlgen refuses to load it"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match=f"checkpoint {plain} holds Python objects .*_Plain"):
        load_trained_model(plain)
    assert main(["index", "--checkpoint", str(evil), "--images", str(gallery), "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {evil} holds Python objects") and "\x1b" not in err
    assert not marker.exists() and not (tmp_path / "i").exists()


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Plain:
    pass


# --------------------------------------------------------------------------- exports
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches_pytorch(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model.pt"
    info = export_torchscript(ckpt, out)
    assert info["input_shape"] == ["N", 1, 28, 28] and info["max_abs_diff"] <= 1e-4
    model, _ = load_trained_model(ckpt)
    loaded = torch.jit.load(str(out))
    for batch in (1, 5):
        x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=1e-5)
            assert loaded(x).shape == (batch, 16)

    # A TorchScript file that does not reproduce the model is refused and not written.
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **kw: (lambda x: real_load(*a, **kw)(x) + 1e-3))
    with pytest.raises(ExportError, match=r"TorchScript export .*bad.pt: differs from the PyTorch model by 0.001 "):
        export_torchscript(ckpt, tmp_path / "bad.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_onnx_export_matches_pytorch(ckpt: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    info = export_onnx(ckpt, out)
    assert info["checked_with"] == "onnxruntime" and info["max_abs_diff"] <= 1e-4
    model, _ = load_trained_model(ckpt)
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["dmlgen.model_hash"] == model_identity(model)["hash"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 6):
        x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(10 + batch))
        with torch.no_grad():
            np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], model(x).numpy(), atol=1e-5)
    with pytest.raises(ExportError, match=r"ONNX export .*strict.onnx \(checked with onnxruntime\): differs from "
                       r"the PyTorch model by .* \(> atol 1e-15\)"):
        export_onnx(ckpt, tmp_path / "strict.onnx", atol=1e-15)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_onnx_export_without_onnxruntime_or_onnxscript(ckpt: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    info = export_onnx(ckpt, tmp_path / "model.onnx")
    assert info["checked_with"] == "onnx.reference" and info["max_abs_diff"] <= 1e-4
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ExportError, match=r"ONNX export needs the onnx and onnxscript packages: pip install "
                       r"'dmlgen\[export\]'"):
        export_onnx(ckpt, tmp_path / "other.onnx")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ExportError, match="safetensors export needs the safetensors package"):
        save_weights_safetensors(ckpt, tmp_path / "w.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_safetensors_round_trip(ckpt: Path, gallery: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "weights.safetensors"
    info = save_weights_safetensors(ckpt, out)
    sidecar = tmp_path / "weights.json"
    assert info["sidecar"] == str(sidecar)
    model, cfg = load_trained_model(ckpt)
    again, cfg2 = load_trained_model(out)
    assert cfg2.to_dict() == cfg.to_dict()
    state = model.state_dict()
    raw = load_file(out)
    assert raw.keys() == state.keys() and all(torch.equal(raw[k], state[k]) for k in state)
    assert model_identity(again) == model_identity(model)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    # An index built from the .ckpt is searchable with the .safetensors export: the same model.
    build_index(ckpt, gallery, tmp_path / "idx")
    assert search(tmp_path / "idx", gallery, 1, checkpoint=out).indices[:, 0].tolist() == list(range(24))

    with pytest.raises(ConfigError, match="must end in .safetensors"):
        save_weights_safetensors(ckpt, tmp_path / "weights.bin")
    data = bytearray(out.read_bytes())
    data[-1] ^= 1
    out.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {out} does not match its sidecar {sidecar}"):
        load_trained_model(out)
    sidecar.unlink()
    with pytest.raises(CheckpointError, match=f"its sidecar {sidecar} .* is missing"):
        load_trained_model(out)


def test_model_identity_tracks_weights(ckpt: Path, tmp_path: Path) -> None:
    a, _ = load_trained_model(ckpt)
    b, _ = load_trained_model(_variant(ckpt, tmp_path / "other.ckpt"))
    ia, ib = model_identity(a), model_identity(b)
    assert ia["hash"] != ib["hash"] and ia["description"] == ib["description"]
    assert ia["hash"].startswith("sha256:") and len(ia["hash"]) == 7 + 64 and ia["embedding_size"] == 16
    assert model_identity(load_trained_model(ckpt)[0]) == ia  # a pure function of the checkpoint


# --------------------------------------------------------------------------- CLI
def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    return err


def test_cli_index_search_export(ckpt: Path, gallery: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    idx = tmp_path / "idx"
    assert main(["index", "--checkpoint", str(ckpt), "--images", str(gallery), "--out", str(idx), "--kind", "hnsw",
                 "--ef-search", "32", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {idx}: 24 images (16-d, 6 class folders), hnsw index (hnsw_m 32, ef_construction 80, " \
        "ef_search 32), euclidean distance" in out
    recall = json.loads((idx / "index.json").read_text())["recall"]["recall"]
    assert f"recall@10 against exact search: {recall:.4f} (24 gallery images as queries" in out

    first_class = gallery / sorted(os.listdir(gallery))[0]
    assert main(["search", "--index", str(idx), "--checkpoint", str(ckpt), str(first_class), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    queries = sorted(str(p.resolve()) for p in first_class.iterdir())
    assert [line for line in lines if line.startswith("query ")] == [f"query {q}" for q in queries]
    top = lines[1].split()
    assert top[0] == "1" and float(top[1]) < 1e-3 and top[2] == queries[0] and top[3] == f"[{first_class.name}]"

    table = tmp_path / "res.csv"
    assert main(["search", "--index", str(idx), str(first_class), "-k", "2", "--out", str(table)]) == 0
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == PER_CLASS * 2 and list(rows[0]) == ["query", "rank", "path", "label", "distance"]
    assert all(r["path"] == r["query"] for r in rows if r["rank"] == "1")

    for fmt, name in (("torchscript", "m.pt"), ("onnx", "m.onnx"), ("safetensors", "m.safetensors")):
        assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(tmp_path / name)]) == 0
        assert f"wrote {tmp_path / name}" in capsys.readouterr().out
    assert (tmp_path / "m.json").is_file()
    # The exported weights drive dmlgen search too.
    assert main(["search", "--index", str(idx), "--checkpoint", str(tmp_path / "m.safetensors"), queries[1],
                 "-k", "1"]) == 0
    assert queries[1] in capsys.readouterr().out.splitlines()[1]


def test_cli_errors(ckpt: Path, gallery: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = tmp_path / "idx"
    assert main(["index", "--checkpoint", str(ckpt), "--images", str(gallery), "--out", str(idx), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "--checkpoint", str(ckpt), "--images", str(gallery), "--out", str(idx)]) == 2
    assert "already exists; pass overwrite=True (--overwrite)" in _error(capsys)
    assert main(["index", "--checkpoint", str(ckpt), "--images", str(gallery), "--out", str(tmp_path / "i2"),
                 "--kind", "hnsw", "--nprobe", "4"]) == 2
    assert "--nprobe: not a setting of a --kind hnsw index" in _error(capsys)
    other = _variant(ckpt, tmp_path / "other.ckpt")
    assert main(["search", "--index", str(idx), "--checkpoint", str(other), str(gallery)]) == 2
    assert f"error: checkpoint {other} is not the model index {idx} was built with" in _error(capsys)
    assert main(["search", "--index", str(idx), str(gallery), "-k", "25"]) == 2
    assert "k = 25 neighbours requested but index" in _error(capsys)
    assert main(["search", "--index", str(tmp_path / "none"), str(gallery)]) == 2
    assert "does not exist" in _error(capsys)
    assert main(["search", "--index", str(idx), str(gallery), "--nprobe", "2"]) == 2
    assert "nprobe / ef_search: only for ivf / hnsw indexes; this index is exact" in _error(capsys)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "w.safetensors"),
                 "--opset", "17"]) == 2
    assert "--opset: only for --format torchscript / onnx" in _error(capsys)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--atol", "0"]) == 2
    assert "--atol: must be > 0" in _error(capsys)


def test_approximate_search_survives_faiss_torch_utils() -> None:
    """faiss.contrib.torch_utils (imported by pytorch-metric-learning) swaps Index.search for a version
    without `params`; the index must keep working after that import."""
    import faiss.contrib.torch_utils  # noqa: F401

    x = _clustered(600, 16, 10, seed=5)
    for kind, params in (("ivf", {"nlist": 16, "nprobe": 16}), ("hnsw", {"hnsw_m": 8, "ef_construction": 32,
                                                                         "ef_search": 64})):
        index = EmbeddingIndex.build(x, kind, "euclidean", **params)
        dist, idx = index.search(x[:20], 3)
        assert idx[:, 0].tolist() == list(range(20)) and np.allclose(dist[:, 0], 0.0)
