"""What the HTML report shows beyond the run's files: the retrieval gallery, the 2-D map and diagnostics.

Everything here comes from the test split embedded with the run's ``best.ckpt`` (the checkpoint the test
metrics are of). The embeddings, the neighbours of the query pool, the thumbnails shown and the map are
kept in ``RUN_DIR/report_cache.npz`` (plain arrays, no pickles) keyed by the SHA-256 of ``best.ckpt`` and
by the settings that produced each part, so a second ``dmlgen report`` redraws the page without the model
or the data set.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmlgen.errors import ConfigError, DataError
from dmlgen.reporting.figures import thumbnail, to_uint8_image
from dmlgen.reporting.projection import MAP_METHODS, MapMethod, project_2d, sample_map_points, umap_available
from dmlgen.reporting.retrieval import rank_queries, sample_queries, worst_first

CACHE_NAME = "report_cache.npz"
CACHE_FORMAT = "dmlgen-report-cache-1"
# Test-metric keys that are diagnostics (methods.md §1.6): shown in their own table.
DIAGNOSTIC_PREFIXES = ("rho@", "pi_")


@dataclass(frozen=True)
class ReportOptions:
    """Bounds on the report's work; all of them also keys of the cache.

    gallery_queries: rows of the retrieval gallery (worst queries first); 0 leaves the gallery out.
    neighbours: neighbours shown per query.
    query_pool: queries ranked to find the worst ones (a seeded sample when the test split is larger;
        None: all).
    map_points / map_classes: points and classes of the 2-D map (map_classes None or 0: all classes);
        map_points 0 leaves the map out.
    map_method: ``auto`` (UMAP when umap-learn is installed, else t-SNE), ``umap`` or ``tsne``.
    thumb_size: thumbnail side in pixels. seed: seeds every sample and the map. cache: read and write
        ``report_cache.npz``.
    """

    gallery_queries: int = 12
    neighbours: int = 8
    query_pool: int | None = 20_000
    map_points: int = 2000
    map_classes: int | None = 20
    map_method: MapMethod = "auto"
    thumb_size: int = 64
    seed: int = 0
    cache: bool = True

    def validate(self) -> None:
        checks = (("gallery_queries", self.gallery_queries, 0), ("neighbours", self.neighbours, 1),
                  ("map_points", self.map_points, 0), ("thumb_size", self.thumb_size, 8))
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"report option {name}: must be an integer >= {low}, got {value!r}")
        for name, value in (("query_pool", self.query_pool), ("map_classes", self.map_classes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"report option {name}: must be a non-negative integer or None, got {value!r}")
        if self.query_pool == 0:
            raise ConfigError("report option query_pool: must be >= 1 (or None for all queries), got 0")
        if self.map_method not in MAP_METHODS:
            raise ConfigError(f"report option map_method: choose {', '.join(MAP_METHODS)}, got {self.map_method!r}")


@dataclass
class Thumb:
    """One picture of the gallery: ``image`` (S, S, 3) uint8; ``correct`` None for the query itself."""

    image: np.ndarray
    class_name: str
    index: int
    correct: bool | None = None
    distance: float | None = None


@dataclass
class GalleryRow:
    """A query and its nearest neighbours. ``first_hit``: 1-based rank of the first correct one (0: none
    within the ranked depth, which is at least R_q)."""

    query: Thumb
    ap_at_r: float
    first_hit: int
    num_relevant: int
    neighbours: list[Thumb]


@dataclass
class RunVisuals:
    """Everything the HTML report draws from the test embeddings."""

    rows: list[GalleryRow]
    metric: str
    leave_one_out: bool
    num_test: int
    num_pool: int
    num_lone: int
    pool_map_at_r: float
    map_xy: np.ndarray | None
    map_class_names: np.ndarray | None
    map_method: str
    diagnostics: dict[str, float]
    diagnostics_source: str
    spectrum: np.ndarray | None
    options: ReportOptions
    from_cache: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- cache
def checkpoint_fingerprint(path: str | Path) -> str:
    """SHA-256 (hex) of a checkpoint file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _key(**settings: Any) -> str:
    return json.dumps(settings, sort_keys=True)


def load_cache(path: Path, fingerprint: str) -> dict[str, np.ndarray]:
    """The cache's arrays when it exists, is readable and belongs to this checkpoint; else ``{}``."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):
        return {}  # a damaged cache is only a lost speed-up: rebuilt below
    if str(arrays.get("format", "")) != CACHE_FORMAT or str(arrays.get("fingerprint", "")) != fingerprint:
        return {}
    return arrays


def save_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as handle:  # a handle: np.savez would append .npz to the temporary name
            np.savez_compressed(handle, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- model and data, loaded lazily
class _RunSource:
    """The checkpoint's model and the run's test data, loaded on first use only."""

    def __init__(self, checkpoint: Path, device: str, progress: bool) -> None:
        self.checkpoint, self.device, self.progress = checkpoint, device, progress
        self._model: Any = None
        self._cfg: Any = None
        self._splits: Any = None

    def _load(self) -> None:
        if self._splits is not None:
            return
        from dmlgen.engine.run import load_trained_model
        from dmlgen.engine.setup import build_splits

        self._model, self._cfg = load_trained_model(self.checkpoint, self.device)
        self._splits = build_splits(self._cfg.data)

    @property
    def cfg(self) -> Any:
        self._load()
        return self._cfg

    def dataset(self, gallery: bool) -> Any:
        self._load()
        return self._splits.gallery if gallery else self._splits.test

    @property
    def has_gallery(self) -> bool:
        self._load()
        return self._splits.gallery is not None

    def embed(self) -> dict[str, np.ndarray]:
        """Embeddings, label codes and class names of the test split (and of the gallery, if any)."""
        from dmlgen.data.standard import shared_class_codes
        from dmlgen.engine.setup import embed_dataset, resolve_device

        self._load()
        cfg, test, gallery = self._cfg, self._splits.test, self._splits.gallery

        def run(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
            emb, labels = embed_dataset(self._model, ds, batch_size=cfg.eval.batch_size,
                                        device=resolve_device(self.device), num_workers=cfg.data.num_workers,
                                        progress=self.progress, desc=f"report: embedding {name}")
            return emb.numpy().astype(np.float32), labels.numpy().astype(np.int64)

        emb, labels = run(test, "test")
        out = {"emb": emb, "labels": labels, "class_names": np.asarray(test.classes)[labels].astype(str)}
        if gallery is not None:
            g_emb, g_labels = run(gallery, "gallery")
            # Each split numbers its classes on its own: shared codes of the original ids (as the test does).
            q_codes, g_codes = shared_class_codes(test, gallery)
            out.update(labels=q_codes[labels], gallery_emb=g_emb, gallery_labels=g_codes[g_labels],
                       gallery_class_names=np.asarray(gallery.classes)[g_labels].astype(str))
        return out


def raw_image(dataset: Any, index: int) -> np.ndarray:
    """The stored picture of item ``index`` before transforms (array row or image file); datasets of
    neither kind give their transformed tensor, min-max scaled."""
    images = getattr(dataset, "images", None)
    if images is not None:
        return to_uint8_image(images[index])
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        from PIL import Image, UnidentifiedImageError

        path = paths[index]
        try:
            with Image.open(path) as im:
                im.draft("RGB", (256, 256))  # JPEG: decode at a reduced scale, enough for a thumbnail
                return to_uint8_image(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"report thumbnail: cannot read image file {path}: {exc}") from None
    return to_uint8_image(dataset[index][0].numpy())


# --------------------------------------------------------------------------- collection
def collect_run_visuals(run_dir: str | Path, options: ReportOptions | None = None, *,
                        test_metrics: dict[str, Any] | None = None, device: str = "auto",
                        progress: bool = False) -> RunVisuals:
    """Gallery rows, map points and diagnostics of a finished run folder (``best.ckpt`` needed).

    ``test_metrics`` (the ``test`` entry of ``test_metrics.json``) supplies ρ and π when it holds them;
    otherwise they are computed here from the test embeddings.
    """
    start = time.perf_counter()
    opts = options or ReportOptions()
    opts.validate()
    run = Path(run_dir)
    best = run / "best.ckpt"
    if not best.is_file():
        raise DataError(f"{run} has no best.ckpt: the HTML report needs the selected checkpoint")
    fingerprint = checkpoint_fingerprint(best)
    cache_path = run / CACHE_NAME
    cache = load_cache(cache_path, fingerprint) if opts.cache else {}
    source = _RunSource(best, device, progress)
    # Parts not redrawn this time (e.g. the map with map_points 0) stay in the cache for the next call.
    store: dict[str, np.ndarray] = {**cache, "format": np.array(CACHE_FORMAT), "fingerprint": np.array(fingerprint)}
    from_cache: list[str] = []
    changed = False

    # Embeddings of the test split (and gallery).
    emb_keys = ("emb", "labels", "class_names", "gallery_emb", "gallery_labels", "gallery_class_names", "metric",
                "dataset")
    if "emb" in cache:
        data = {k: cache[k] for k in emb_keys if k in cache}
        from_cache.append("embeddings")
    else:
        data = source.embed()
        cfg = source.cfg
        data["metric"] = np.array(cfg.eval.distance)
        data["dataset"] = np.array(cfg.data.dataset)
        changed = True
    store.update(data)
    emb, labels = data["emb"], data["labels"]
    metric = str(data["metric"])
    loo = "gallery_emb" not in data
    ref_names = data["class_names"] if loo else data["gallery_class_names"]

    # Neighbours of the query pool.
    rank_key = _key(k=opts.neighbours, pool=opts.query_pool, seed=opts.seed, metric=metric)
    rank_fields = ("queries", "neighbours", "distances", "correct", "num_relevant", "ap_at_r", "first_hit")
    if opts.gallery_queries and str(cache.get("rank_key", "")) == rank_key:
        ranking = {f: cache[f"rank_{f}"] for f in rank_fields}
        from_cache.append("neighbours")
    elif opts.gallery_queries:
        pool = sample_queries(len(emb), opts.query_pool, opts.seed)
        result = rank_queries(emb, labels, data.get("gallery_emb"), data.get("gallery_labels"), k=opts.neighbours,
                              metric=metric, queries=pool)  # type: ignore[arg-type]
        ranking = {f: getattr(result, f) for f in rank_fields}
        changed = True
    else:
        ranking = None
    if ranking is not None:
        store["rank_key"] = np.array(rank_key)
        store.update({f"rank_{f}": v for f, v in ranking.items()})

    rows: list[GalleryRow] = []
    num_pool = num_lone = 0
    pool_map = float("nan")
    if ranking is not None:
        order = worst_first(ranking["ap_at_r"], ranking["first_hit"], ranking["queries"])[: opts.gallery_queries]
        num_pool = len(ranking["queries"])
        num_lone = int(np.isnan(ranking["ap_at_r"]).sum())
        scored = ranking["ap_at_r"][~np.isnan(ranking["ap_at_r"])]
        pool_map = float(scored.mean()) if len(scored) else float("nan")
        shown = min(opts.neighbours, ranking["neighbours"].shape[1])
        wanted = sorted({(0, int(ranking["queries"][p])) for p in order}
                        | {(0 if loo else 1, int(n)) for p in order for n in ranking["neighbours"][p, :shown]})
        thumbs, reused = _thumbnails(cache, wanted, opts.thumb_size, source, str(data.get("dataset", "")))
        if reused:
            from_cache.append("thumbnails")
        else:
            changed = True
        ids = [(int(s), int(i)) for s, i in zip(thumbs["thumb_source"], thumbs["thumb_index"], strict=True)]
        where = {item: pos for pos, item in enumerate(ids)}
        store.update(thumbs)
        for p in order:
            q = int(ranking["queries"][p])
            nbrs = [Thumb(thumbs["thumbs"][where[(0 if loo else 1, int(n))]], str(ref_names[n]), int(n),
                          bool(ranking["correct"][p, j]), float(ranking["distances"][p, j]))
                    for j, n in enumerate(ranking["neighbours"][p, :shown])]
            rows.append(GalleryRow(Thumb(thumbs["thumbs"][where[(0, q)]], str(data["class_names"][q]), q),
                                   float(ranking["ap_at_r"][p]), int(ranking["first_hit"][p]),
                                   int(ranking["num_relevant"][p]), nbrs))

    # 2-D map.
    map_xy = map_names = None
    map_method = ""
    if opts.map_points:
        map_key = _key(points=opts.map_points, classes=opts.map_classes, method=opts.map_method, seed=opts.seed,
                       umap=umap_available() if opts.map_method == "auto" else None)
        if str(cache.get("map_key", "")) == map_key:
            idx, map_xy, map_method = cache["map_index"], cache["map_xy"], str(cache["map_method"])
            from_cache.append("map")
        else:
            idx = sample_map_points(labels, max_points=opts.map_points, max_classes=opts.map_classes, seed=opts.seed)
            points = emb[idx]
            if metric == "cosine":  # the map should see the geometry the ranking uses
                points = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
            if len(idx) >= 4:
                map_xy, map_method = project_2d(points, method=opts.map_method, seed=opts.seed)
            else:
                map_xy, map_method = np.zeros((0, 2), np.float32), "none (fewer than 4 points)"
            changed = True
        store.update(map_key=np.array(map_key), map_index=idx, map_xy=map_xy, map_method=np.array(map_method))
        map_names = data["class_names"][idx] if len(map_xy) else None
        if not len(map_xy):
            map_xy = None

    # Diagnostics ρ and π (methods.md §1.6).
    diagnostics, source_note, spectrum, diag_changed = _diagnostics(cache, emb, labels, test_metrics, from_cache)
    changed |= diag_changed
    store.update(diag_names=np.array(list(diagnostics), dtype=str),
                 diag_values=np.array(list(diagnostics.values()), dtype=np.float64))
    if spectrum is not None:
        store["spectrum"] = spectrum

    if opts.cache and (changed or not cache):
        save_cache(cache_path, store)
    return RunVisuals(
        rows=rows, metric=metric, leave_one_out=loo, num_test=len(emb), num_pool=num_pool, num_lone=num_lone,
        pool_map_at_r=pool_map, map_xy=map_xy, map_class_names=map_names, map_method=map_method,
        diagnostics=diagnostics, diagnostics_source=source_note, spectrum=spectrum, options=opts,
        from_cache=from_cache, seconds=time.perf_counter() - start,
    )


def _thumbnails(cache: dict[str, np.ndarray], wanted: list[tuple[int, int]], size: int, source: _RunSource,
                dataset_name: str) -> tuple[dict[str, np.ndarray], bool]:
    """Thumbnails of ``wanted`` (source 0 test / 1 gallery, index): from the cache when it holds them all at
    this size, else drawn from the data (True when reused)."""
    key = _key(size=size)
    if str(cache.get("thumb_key", "")) == key and "thumbs" in cache:
        have = {(int(s), int(i)) for s, i in zip(cache["thumb_source"], cache["thumb_index"], strict=True)}
        if set(wanted) <= have:
            return {k: cache[k] for k in ("thumb_key", "thumbs", "thumb_source", "thumb_index")}, True
    invert = dataset_name == "omniglot"  # Omniglot stores strokes as 1: show them dark on white
    images = []
    for src, index in wanted:
        arr = raw_image(source.dataset(bool(src)), index)
        images.append(thumbnail(255 - arr if invert else arr, size))
    thumbs = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return {"thumb_key": np.array(key), "thumbs": thumbs, "thumb_source": np.array([s for s, _ in wanted], np.int64),
            "thumb_index": np.array([i for _, i in wanted], np.int64)}, False


def _diagnostics(cache: dict[str, np.ndarray], emb: np.ndarray, labels: np.ndarray,
                 test_metrics: dict[str, Any] | None, from_cache: list[str]
                 ) -> tuple[dict[str, float], str, np.ndarray | None, bool]:
    """ρ and π: the test evaluation's values when it computed them, else computed (and cached) here."""
    from dmlgen.evaluation.diagnostics import density_ratio, singular_value_spectrum, spectral_decays

    changed = False
    if "spectrum" in cache:
        spectrum = cache["spectrum"]
    else:
        spectrum = singular_value_spectrum(emb)
        changed = True
    given = {k: float(v) for k, v in (test_metrics or {}).items()
             if k.startswith(DIAGNOSTIC_PREFIXES) or k == "rank"}
    has_rho = any(k.startswith("rho@") for k in given)
    has_pi = "pi_ratio" in given
    if has_rho and has_pi:
        return given, "test evaluation (test_metrics.json)", spectrum, changed
    if "diag_names" in cache:
        from_cache.append("diagnostics")
        return (dict(zip(cache["diag_names"].tolist(), cache["diag_values"].tolist(), strict=True)),
                "computed by the report from the test embeddings", spectrum, changed)
    # Modes beyond min(N, D) singular values are undefined (tiny test sets, narrow embeddings): left out.
    modes = [m for m in (-1, 1, 2, 10) if m < 0 or m <= min(emb.shape)]
    out = dict(spectral_decays(emb, modes))
    try:
        out.update(density_ratio(emb, labels))
    except DataError as exc:  # e.g. a single test class: say why π is missing instead of failing the page
        out["pi_ratio"] = float("nan")
        note = f"; π not defined: {exc}"
    else:
        note = ""
    return out, f"computed by the report from the test embeddings{note}", spectrum, True


def options_dict(options: ReportOptions) -> dict[str, Any]:
    """The options as a plain dict (for the page's settings line)."""
    return asdict(options)
