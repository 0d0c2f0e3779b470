"""The HTML run report: its pieces against naive oracles, self-containedness, the cache, the CLI, and the
page rendered by a real headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dmlgen.cli import main
from dmlgen.errors import ConfigError, DataError
from dmlgen.reporting import collect as collect_mod
from dmlgen.reporting import projection
from dmlgen.reporting.collect import CACHE_NAME, GalleryRow, ReportOptions, RunVisuals, Thumb, collect_run_visuals
from dmlgen.reporting.figures import thumbnail, to_uint8_image
from dmlgen.reporting.html import (
    read_epochs_csv,
    render_run_html,
    write_compare_report,
    write_html_report,
    write_reports,
)
from dmlgen.reporting.projection import project_2d, sample_map_points
from dmlgen.reporting.retrieval import rank_queries, sample_queries, worst_first
from _fixtures import one_thread  # noqa: F401  (autouse: every test here runs on one thread)

CHROMIUM = "/usr/bin/chromium"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TINY: dict[str, Any] = {
    "name": "tiny-report",
    "out_dir": "runs/should-not-be-used",
    "data": {"dataset": "omniglot", "max_classes": 6, "classes_per_batch": 3, "samples_per_class": 4},
    "model": {"backbone": "convnet4", "embedding_size": 16},
    "loss": {"name": "multi_similarity", "params": {"alpha": 2.0, "beta": 50.0, "base": 0.5},
             "miner": {"name": "multi_similarity", "params": {"epsilon": 0.1}}},
    "train": {"epochs": 2, "max_steps_per_epoch": 2},
}


# --------------------------------------------------------------------------- oracles
def naive_ranking(emb: np.ndarray, labels: np.ndarray, queries: list[int], depth: int,
                  gallery: np.ndarray | None = None, gallery_labels: np.ndarray | None = None,
                  metric: str = "euclidean") -> list[dict[str, Any]]:
    """Per query, by plain Python loops: neighbours sorted by (distance, index), R_q, AP@R, first hit."""
    out = []
    ref = emb if gallery is None else gallery
    ref_labels = labels if gallery is None else gallery_labels
    for q in queries:
        cands = [j for j in range(len(ref)) if gallery is not None or j != q]
        if metric == "cosine":
            qn = emb[q] / np.linalg.norm(emb[q])
            key = {j: -float(qn @ (ref[j] / np.linalg.norm(ref[j]))) for j in cands}
        else:
            key = {j: float(((emb[q].astype(np.float64) - ref[j]) ** 2).sum()) for j in cands}
        order = sorted(cands, key=lambda j: (key[j], j))
        rel = [bool(ref_labels[j] == labels[q]) for j in order]
        r = sum(1 for j in cands if ref_labels[j] == labels[q])
        hits, ap = 0, 0.0
        for i in range(r):
            if rel[i]:
                hits += 1
                ap += hits / (i + 1)
        first = next((i + 1 for i in range(depth) if rel[i]), 0)
        out.append({"neighbours": order[:depth], "r": r, "ap": ap / r if r else float("nan"), "first": first,
                    "rel": rel[:depth]})
    return out


def naive_worst_first(ap: np.ndarray, first: np.ndarray, queries: np.ndarray) -> list[int]:
    positions = [p for p in range(len(ap)) if not np.isnan(ap[p])]
    return sorted(positions, key=lambda p: (ap[p], -(first[p] if first[p] else 10**18), queries[p]))


class _Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def tags_of(page: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def decoded_png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,"), src[:40]
    raw = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert raw.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def assert_self_contained(page: str) -> int:
    """No external URL anywhere, no script / stylesheet link / frame, every <img> an inline PNG of positive
    size; returns the number of images."""
    assert "http://" not in page and "https://" not in page
    assert "url(" not in page  # no CSS resource
    tags = tags_of(page)
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed", "source")]
    for tag, attrs in tags:
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            value = attrs.get(name)
            if value is None:
                continue
            if name == "href":
                assert value.startswith("#"), value  # in-page anchors only
            elif tag != "img":
                raise AssertionError(f"<{tag} {name}=...> in the page")
    images = [attrs for tag, attrs in tags if tag == "img"]
    for attrs in images:
        image = decoded_png(attrs["src"])
        assert image.width > 0 and image.height > 0
    return len(images)


# --------------------------------------------------------------------------- retrieval pieces
def test_rank_queries_matches_a_naive_loop_with_ties_and_duplicates() -> None:
    rng = np.random.default_rng(0)
    emb = rng.integers(0, 3, size=(40, 3)).astype(np.float32)  # many exact ties and duplicate points
    labels = rng.integers(0, 5, size=40)
    res = rank_queries(emb, labels, k=6)
    depth = res.neighbours.shape[1]
    assert depth == max(6, int(max((labels == labels[q]).sum() - 1 for q in range(40))))
    oracle = naive_ranking(emb, labels, list(range(40)), depth)
    for p, o in enumerate(oracle):
        assert res.neighbours[p].tolist() == o["neighbours"]
        assert res.correct[p].tolist() == o["rel"]
        assert res.num_relevant[p] == o["r"]
        assert res.first_hit[p] == o["first"]
        assert res.ap_at_r[p] == pytest.approx(o["ap"], abs=1e-12)


def test_rank_queries_on_a_pool_drops_the_query_itself_by_index() -> None:
    rng = np.random.default_rng(1)
    emb = rng.integers(0, 2, size=(30, 2)).astype(np.float32)  # 4 distinct points: long runs of duplicates
    labels = rng.integers(0, 3, size=30)
    pool = np.array([0, 5, 17, 29])
    res = rank_queries(emb, labels, k=4, queries=pool)
    assert res.queries.tolist() == pool.tolist()
    depth = res.neighbours.shape[1]
    oracle = naive_ranking(emb, labels, pool.tolist(), depth)
    for p, o in enumerate(oracle):
        assert int(pool[p]) not in res.neighbours[p].tolist()
        assert res.neighbours[p].tolist() == o["neighbours"]
        assert res.first_hit[p] == o["first"]
        assert res.ap_at_r[p] == pytest.approx(o["ap"], abs=1e-12)


def test_rank_queries_against_a_gallery_and_with_cosine() -> None:
    rng = np.random.default_rng(2)
    q, g = rng.normal(size=(12, 5)).astype(np.float32), rng.normal(size=(25, 5)).astype(np.float32)
    yq, yg = rng.integers(0, 4, size=12), rng.integers(0, 4, size=25)
    yq[0] = 9  # a lone query: no gallery image of its class
    res = rank_queries(q, yq, g, yg, k=5, metric="cosine")
    oracle = naive_ranking(q, yq, list(range(12)), res.neighbours.shape[1], g, yg, metric="cosine")
    for p, o in enumerate(oracle):
        assert res.neighbours[p].tolist() == o["neighbours"]
        assert res.num_relevant[p] == o["r"]
        if o["r"]:
            assert res.ap_at_r[p] == pytest.approx(o["ap"], abs=1e-9)
    assert np.isnan(res.ap_at_r[0]) and res.num_relevant[0] == 0


def test_worst_first_matches_a_naive_sort_and_leaves_out_lone_queries() -> None:
    rng = np.random.default_rng(3)
    ap = rng.choice([0.0, 0.25, 0.5, 1.0, np.nan], size=200)  # many exact ties in AP@R
    first = rng.integers(0, 6, size=200)
    queries = rng.permutation(1000)[:200]
    got = worst_first(ap, first, queries).tolist()
    assert got == naive_worst_first(ap, first, queries)
    assert len(got) == int((~np.isnan(ap)).sum())
    # AP@R ties: a query without a correct neighbour in the depth (0) comes before one that has one.
    assert worst_first(np.array([0.0, 0.0]), np.array([3, 0]), np.array([0, 1])).tolist() == [1, 0]


def test_sample_queries_and_bad_options() -> None:
    assert sample_queries(5, None).tolist() == [0, 1, 2, 3, 4]
    picked = sample_queries(1000, 50, seed=4)
    assert len(picked) == 50 and len(set(picked.tolist())) == 50 and (np.diff(picked) > 0).all()
    assert picked.tolist() == sample_queries(1000, 50, seed=4).tolist()
    with pytest.raises(DataError, match="neighbours per query"):
        rank_queries(np.zeros((3, 2)), [0, 0, 1], k=0)
    with pytest.raises(ConfigError, match="gallery_queries"):
        ReportOptions(gallery_queries=-1).validate()
    with pytest.raises(ConfigError, match="map_method"):
        ReportOptions(map_method="pca").validate()  # type: ignore[arg-type]


# --------------------------------------------------------------------------- map and thumbnails
def test_sample_map_points_bounds_classes_and_points() -> None:
    labels = np.repeat(np.arange(50), [3 if c % 2 else 40 for c in range(50)])
    idx = sample_map_points(labels, max_points=100, max_classes=10, seed=0)
    chosen = labels[idx]
    assert len(idx) == 100 and len(np.unique(chosen)) == 10 and (np.diff(idx) > 0).all()
    counts = np.bincount(chosen)[np.unique(chosen)]
    sizes = np.bincount(labels)[np.unique(chosen)]
    # Even shares: the classes not taken whole differ by at most one point and get no fewer than any class
    # that is taken whole.
    full = counts == sizes
    assert (~full).any() and counts[~full].max() - counts[~full].min() <= 1
    if full.any():
        assert counts[~full].min() >= counts[full].max()
    every = sample_map_points(labels, max_points=10**6, max_classes=None)
    assert every.tolist() == list(range(len(labels)))


def test_project_2d_falls_back_to_tsne_without_umap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(projection, "umap_available", lambda: False)
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 0.1, (15, 8)), rng.normal(5, 0.1, (15, 8))]).astype(np.float32)
    xy, method = project_2d(x, seed=0)
    assert xy.shape == (30, 2) and np.isfinite(xy).all()
    assert method.startswith("t-SNE") and "umap-learn is not installed" in method
    # Two well separated blobs stay separated: every point is closer to its own blob's centre.
    c0, c1 = xy[:15].mean(0), xy[15:].mean(0)
    assert (np.linalg.norm(xy[:15] - c0, axis=1) < np.linalg.norm(xy[:15] - c1, axis=1)).all()
    with pytest.raises(DataError, match="at least 4 points"):
        project_2d(x[:3])


def test_project_2d_prefers_umap_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """umap-learn is an optional extra: a stand-in module records that ``auto`` hands it the points."""
    import types

    calls: list[tuple[int, dict[str, Any]]] = []

    class FakeUMAP:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

        def fit_transform(self, x: np.ndarray) -> np.ndarray:
            calls.append((len(x), self.kwargs))
            return x[:, :2] * 2

    fake = types.ModuleType("umap")
    fake.UMAP = FakeUMAP  # type: ignore[attr-defined]
    fake.__version__ = "0.0-test"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "umap", fake)
    monkeypatch.setattr(projection, "umap_available", lambda: True)
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    xy, method = project_2d(x, seed=7)
    assert method == "UMAP (umap-learn 0.0-test)" and np.array_equal(xy, x[:, :2] * 2)
    assert calls == [(10, {"n_components": 2, "n_neighbors": 9, "random_state": 7})]
    _, method = project_2d(x, method="tsne")
    assert method.startswith("t-SNE") and "not installed" not in method


def test_thumbnails_scale_and_convert() -> None:
    tiny = np.zeros((28, 28), dtype=np.float32)
    tiny[10:18, 3] = 1.0
    th = thumbnail(to_uint8_image(tiny), 56)
    assert th.shape == (56, 56, 3) and th.dtype == np.uint8
    assert (th[20:36, 6:8] == 255).all() and (th[0:20, 6:8] == 0).all()  # nearest upscaling, factor 2
    chw = np.random.default_rng(0).random((3, 10, 20)).astype(np.float32)
    assert to_uint8_image(chw).shape == (10, 20, 3)
    wide = thumbnail(np.full((10, 40, 3), 7, np.uint8), 32)
    assert (wide[:10] == 255).all() and (wide[14:18] == 7).all()  # letterboxed on white
    normalised = to_uint8_image(np.array([[-2.0, 0.0], [1.0, 2.0]]))
    assert normalised.min() == 0 and normalised.max() == 255


def test_read_epochs_csv_parses_numbers(tmp_path: Path) -> None:
    path = tmp_path / "epochs.csv"
    path.write_text("epoch,train_loss,val_map@r,note\n1,0.5,nan,x\n2,0.25,,y\n")
    rows = read_epochs_csv(path)
    assert rows[0]["epoch"] == 1 and rows[0]["train_loss"] == 0.5 and np.isnan(rows[0]["val_map@r"])
    assert "val_map@r" not in rows[1] and rows[1]["note"] == "y"
    assert read_epochs_csv(tmp_path / "absent.csv") == []


# --------------------------------------------------------------------------- page from hand-made visuals
def _visuals(rows: list[GalleryRow]) -> RunVisuals:
    return RunVisuals(rows=rows, metric="euclidean", leave_one_out=True, num_test=10, num_pool=10, num_lone=0,
                      pool_map_at_r=0.5, map_xy=np.random.default_rng(0).normal(size=(10, 2)),
                      map_class_names=np.array(list("aabbccddee")), map_method="t-SNE (test)",
                      diagnostics={"rho@1": 0.5, "pi_ratio": 0.8, "pi_intra": 0.4, "pi_inter": 0.5},
                      diagnostics_source="test", spectrum=np.array([0.5, 0.3, 0.2]), options=ReportOptions())


def test_page_marks_correct_and_incorrect_neighbours() -> None:
    img = np.full((8, 8, 3), 128, np.uint8)
    marks = [[True, False, False], [False, False, True]]
    rows = [GalleryRow(Thumb(img, "cls<&>", q), 0.1 * q, 1, 3,
                       [Thumb(img, f"n{j}", 10 + j, ok, 0.5 + j) for j, ok in enumerate(m)])
            for q, m in enumerate(marks)]
    result = {"test": {"map@r": 0.5, "recall@1": 0.75, "rho@1": 0.5}, "selected_epoch": 1,
              "selection_metric": "map@r", "val_score": 0.4, "splits": {}}
    history = [{"epoch": 1, "train_loss": 1.0, "val_map@r": 0.4}, {"epoch": 2, "train_loss": 0.8, "val_map@r": 0.3}]
    page = render_run_html(result, history, {"name": "x"}, _visuals(rows))
    figures = [a for t, a in tags_of(page) if t == "figure"]
    nbrs = [a for a in figures if "data-correct" in a]
    assert [a["data-correct"] == "1" for a in nbrs] == [ok for m in marks for ok in m]
    assert all(("ok" in a["class"].split()) == (a["data-correct"] == "1") for a in nbrs)
    assert all(("bad" in a["class"].split()) == (a["data-correct"] == "0") for a in nbrs)
    assert [a["data-query"] for t, a in tags_of(page) if t == "div" and "data-query" in a] == ["0", "1"]
    assert "cls&lt;&amp;&gt;" in page and "cls<&>" not in page  # class names are escaped
    # curves, 6 thumbnails per row pair (1 query + 3 neighbours each), the map and the spectrum
    assert assert_self_contained(page) == 1 + 2 * 4 + 1 + 1


def test_compare_report_is_self_contained_and_bolds_the_best(tmp_path: Path) -> None:
    results = {"a": {"map@r": 0.3, "recall@1": 0.6, "pi_ratio": 0.2}, "b": {"map@r": 0.4, "recall@1": 0.5,
                                                                          "pi_ratio": 0.9}}
    histories = {"a": [{"epoch": 1, "train_loss": 1.0, "val_map@r": 0.2}, {"epoch": 2, "train_loss": 0.9,
                                                                         "val_map@r": 0.25}],
                 "b": [{"epoch": 1, "train_loss": 1.1, "val_map@r": 0.3}]}
    path = write_compare_report(tmp_path / "cmp", results, histories=histories, title="MS vs triplet",
                                notes=["3 seeds each"])
    page = path.read_text()
    assert path.name == "report.html"
    assert assert_self_contained(page) == 4  # two bar charts, two curve plots
    bold = re.findall(r'<td class="num best">([^<]*)</td>', page)
    assert bold == ["0.6000", "0.4000"]  # recall@1 of a, map@r of b; pi_ratio is never ranked
    with pytest.raises(DataError, match="no runs"):
        write_compare_report(tmp_path / "empty", {})


# --------------------------------------------------------------------------- a real (tiny) run
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path_factory.mktemp("run")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture()
def run_copy(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def test_train_writes_a_self_contained_html_report(trained: Path) -> None:
    page = (trained / "report.html").read_text(encoding="utf-8")
    assert (trained / CACHE_NAME).is_file()
    # curves + spectrum + map + 12 gallery rows of 1 query and 8 neighbours
    assert assert_self_contained(page) == 3 + 12 * 9
    assert "t-SNE" in page or "UMAP" in page
    md = (trained / "report.md").read_text(encoding="utf-8")
    assert "[report.html](report.html)" in md and "## Worst queries" in md and "## Diagnostics" in md


def test_gallery_marks_and_order_match_a_naive_loop_on_the_run(trained: Path) -> None:
    with np.load(trained / CACHE_NAME, allow_pickle=False) as cache:
        emb, labels = cache["emb"], cache["labels"]
    n = len(emb)
    oracle = naive_ranking(emb, labels, list(range(n)), 8)
    ap = np.array([o["ap"] for o in oracle])
    first = np.array([o["first"] for o in oracle])
    expected = naive_worst_first(ap, first, np.arange(n))[:12]
    page = (trained / "report.html").read_text(encoding="utf-8")
    shown = [int(a["data-query"]) for t, a in tags_of(page) if t == "div" and "data-query" in a]
    assert shown == expected
    marks = [a["data-correct"] == "1" for t, a in tags_of(page) if t == "figure" and "data-correct" in a]
    assert marks == [ok for q in expected for ok in oracle[q]["rel"][:8]]
    aps = [float(x) for x in re.findall(r"AP@R ([0-9.]+) \(R = ", page)]
    assert aps == pytest.approx([round(ap[q], 3) for q in expected], abs=1e-3)
    assert aps == sorted(aps)


def test_rerun_uses_the_cache_without_model_or_data(run_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(self: Any) -> None:
        raise AssertionError("the cached report must not load the model or the data")

    before = (run_copy / "report.html").read_text(encoding="utf-8")
    with monkeypatch.context() as m:
        m.setattr(collect_mod._RunSource, "_load", refuse)
        (run_copy / "report.html").unlink()
        assert main(["report", str(run_copy)]) == 0
    after = (run_copy / "report.html").read_text(encoding="utf-8")
    strip = re.compile(r"dmlgen [0-9.]+, [0-9-]+ [0-9:]+|; reused from report_cache.npz: [a-z, ]+")
    assert strip.sub("", after) == strip.sub("", before)
    assert "reused from report_cache.npz: embeddings, neighbours, thumbnails, map, diagnostics" in after
    assert "report.html" in capsys.readouterr().out
    # Another checkpoint (its hash differs) invalidates the cache: the model must be loaded again.
    with open(run_copy / "best.ckpt", "ab") as handle:
        handle.write(b"\0")
    visuals = collect_run_visuals(run_copy, ReportOptions(gallery_queries=2, map_points=20), device="cpu")
    assert visuals.from_cache == [] and len(visuals.rows) == 2 and visuals.map_xy is not None


def test_report_cli_options(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_copy / "report.html").unlink()
    assert main(["report", str(run_copy), "--no-html"]) == 0
    assert not (run_copy / "report.html").exists() and "report.md" in capsys.readouterr().out
    assert main(["report", str(run_copy), "--gallery-queries", "3", "--neighbours", "4", "--map-points", "30",
                 "--map-classes", "3", "--device", "cpu"]) == 0
    page = (run_copy / "report.html").read_text(encoding="utf-8")
    assert len([1 for t, a in tags_of(page) if t == "div" and "data-query" in a]) == 3
    assert len([1 for t, a in tags_of(page) if t == "figure" and "data-correct" in a]) == 3 * 4
    assert "Points: 30 of 120" in page
    assert main(["report", str(run_copy), "--neighbours", "0"]) == 2
    assert "neighbours" in capsys.readouterr().err
    assert main(["report", str(run_copy), "--gallery-queries", "0", "--map-points", "0"]) == 0
    page = (run_copy / "report.html").read_text(encoding="utf-8")
    assert "data-query" not in page and assert_self_contained(page) == 2  # curves and spectrum only


def test_html_failure_after_training_is_a_warning(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = json.loads((run_copy / "test_metrics.json").read_text())
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    (run_copy / "best.ckpt").unlink()
    (run_copy / "report.html").unlink()
    paths = write_reports(run_copy, result, [], config, strict=False)
    assert [p.name for p in paths] == ["report.md"]
    assert "warning: report.html not written" in capsys.readouterr().err
    with pytest.raises(DataError, match="best.ckpt"):
        write_reports(run_copy, result, [], config, strict=True)
    with pytest.raises(DataError, match="best.ckpt"):
        write_html_report(run_copy)


def test_query_vs_gallery_run_shows_gallery_neighbours(tmp_path: Path) -> None:
    """In-Shop (fabricated, 3-channel image files): queries rank the gallery; lone queries are left out."""
    from test_standard_datasets import make_inshop, quiet

    from dmlgen.engine.config import config_from_dict
    from dmlgen.engine.run import train

    make_inshop(tmp_path / "data")
    raw = {
        "name": "inshop-report", "out_dir": str(tmp_path / "run"),
        "data": {"dataset": "inshop", "path": str(tmp_path / "data"), "channels": 3, "image_size": 16,
                 "classes_per_batch": 2, "samples_per_class": 2, "val_class_fraction": 0.5},
        "model": {"backbone": "convnet4", "embedding_size": 8},
        "loss": {"name": "multi_similarity", "params": {"alpha": 2.0, "beta": 40.0, "base": 0.5}},
        "eval": {"ks": [1, 2]},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "seed": 0},
    }
    quiet(train, config_from_dict(raw), progress=False)
    run = tmp_path / "run"
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "queries against the gallery" in page
    with np.load(run / CACHE_NAME, allow_pickle=False) as cache:
        q, yq, g, yg = cache["emb"], cache["labels"], cache["gallery_emb"], cache["gallery_labels"]
    assert (len(q), len(g)) == (6, 4)
    oracle = naive_ranking(q, yq, list(range(6)), 4, g, yg)
    ap = np.array([o["ap"] for o in oracle])
    expected = naive_worst_first(ap, np.array([o["first"] for o in oracle]), np.arange(6))
    assert len(expected) == 4  # two lone queries (item 5 has no gallery image)
    shown = [int(a["data-query"]) for t, a in tags_of(page) if t == "div" and "data-query" in a]
    assert shown == expected
    marks = [a["data-correct"] == "1" for t, a in tags_of(page) if t == "figure" and "data-correct" in a]
    assert marks == [ok for i in expected for ok in oracle[i]["rel"]]
    assert assert_self_contained(page) == 3 + 4 * 5
    thumbs = [decoded_png(a["src"]) for t, a in tags_of(page) if t == "img" and a.get("width") == "64"]
    assert len(thumbs) == 4 * 5 and all(t.size == (64, 64) and t.mode == "RGB" for t in thumbs)


# --------------------------------------------------------------------------- the page in a real browser
def _install_chromium() -> str:
    """Debian's chromium: present, or installed with apt-get when this is root on Debian; else a failure
    that says what to install (the browser test is never skipped)."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.fail(f"the browser test needs Debian's chromium at {CHROMIUM}; apt-get is "
                    f"{'missing' if apt is None else 'not usable without root'}: install it with "
                    "`sudo apt-get install -y chromium`", pytrace=False)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", "chromium"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, check=False)
        log.append(proc.stdout[-2000:] + proc.stderr[-2000:])
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"apt-get install chromium did not provide {CHROMIUM}:\n" + "\n".join(log), pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="session")
def chromium() -> str:
    return _install_chromium()


def test_missing_chromium_is_installed_with_apt_or_fails_clearly(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "chromium"
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", str(fake))
    commands: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(cmd)
        if "install" in cmd:
            fake.write_text("")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert _install_chromium() == str(fake)
    assert commands == [["/usr/bin/apt-get", "update"],
                        ["/usr/bin/apt-get", "install", "-y", "--no-install-recommends", "chromium"]]
    fake.unlink()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match=r"apt-get is missing: install it with .*apt-get install"):
        _install_chromium()


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


# Appended to a copy of the page: after load, list every image's state in an element --dump-dom shows.
_PROBE = ("<script>window.addEventListener('load',function(){var r=[];for(var i=0;i<document.images.length;i++)"
          "{var m=document.images[i];r.push([m.complete,m.naturalWidth,m.naturalHeight]);}"
          "var p=document.createElement('pre');p.id='imgcheck';p.textContent=JSON.stringify(r);"
          "document.body.appendChild(p);});</script>")


def test_report_renders_in_headless_chromium(trained: Path, chromium: str, tmp_path: Path) -> None:
    page = (trained / "report.html").read_text(encoding="utf-8")
    n_images = len([1 for t, _ in tags_of(page) if t == "img"])
    probe = tmp_path / "probe.html"
    # One deliberately broken image at the end shows that the probe can tell a broken image from a drawn one.
    broken_img = '<img src="data:image/png;base64,AAAA" alt="broken on purpose">'
    probe.write_text(page.replace("</body>", broken_img + _PROBE + "</body>"), encoding="utf-8")
    dom = _browser(chromium, tmp_path / "p1", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    states = json.loads(found.group(1))
    assert len(states) == n_images + 1 == 3 + 12 * 9 + 1
    broken = [i for i, (complete, w, h) in enumerate(states) if not (complete and w > 0 and h > 0)]
    assert broken == [n_images]  # only the one added above

    shot = tmp_path / "shot.png"
    run = _browser(chromium, tmp_path / "p2", "--hide-scrollbars", f"--screenshot={shot}",
                   "--window-size=1280,2200", (trained / "report.html").as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2200)
    pixels = np.asarray(image).astype(np.int16)
    assert pixels.std() > 20  # not a blank page
    # The gallery's borders are drawn: green (correct), red (incorrect) and blue (query) pixels.
    for colour in ((0x1a, 0x98, 0x50), (0xd7, 0x30, 0x27), (0x2c, 0x7b, 0xb6)):
        close = (np.abs(pixels - np.array(colour)).max(axis=2) <= 8).sum()
        assert close > 200, colour
