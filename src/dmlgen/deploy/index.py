"""Search indexes over a gallery of images embedded by a trained model.

An index folder holds:

- ``index.json``: format, kind, metric, the model's identity (SHA-256 of its description and weights, and
  its embedding size), the image preprocessing, the kind's parameters, the recall of an approximate kind
  measured at build time, and the gallery items (``paths``; ``labels``: class folder name or null);
- ``embeddings.npy``: ``(N, D)`` float32 model outputs, row ``i`` for ``paths[i]``;
- ``faiss.index`` (kinds ``ivf`` and ``hnsw`` only): the faiss index, written with ``faiss.write_index``.

Kinds: ``exact`` searches with dmlgen's blocked torch kNN (:func:`dmlgen.evaluation.knn.knn`); ``ivf``
(faiss IVF-Flat: k-means cells, ``nprobe`` of ``nlist`` cells searched) and ``hnsw`` (faiss HNSW-Flat graph)
are approximate and need the optional faiss package. The folder is written to a temporary sibling and
renamed into place, so a crash leaves the old index or the new one, never a mix of both.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dmlgen
from dmlgen.errors import CheckpointError, ConfigError, DataError
from dmlgen.evaluation.knn import knn, prepare_embeddings

__all__ = [
    "INDEX_FORMAT",
    "INDEX_KINDS",
    "INDEX_METRICS",
    "EmbeddingIndex",
    "LoadedIndex",
    "SearchResult",
    "approximate_recall",
    "build_index",
    "collect_images",
    "load_index",
    "model_identity",
    "search",
]

INDEX_FORMAT = 1
INDEX_KINDS = ("exact", "ivf", "hnsw")
INDEX_METRICS = ("euclidean", "cosine", "inner_product")
META_FILE, EMBEDDINGS_FILE, FAISS_FILE = "index.json", "embeddings.npy", "faiss.index"

DEFAULT_HNSW_M = 32  #: graph neighbours per node (faiss HNSW ``M``)
DEFAULT_EF_CONSTRUCTION = 80  #: candidate list while inserting (faiss default 40 builds a weaker graph)
DEFAULT_EF_SEARCH = 64  #: candidate list while searching (at least k)
RECALL_K = 10  #: recall@k measured when an approximate index is built
RECALL_QUERIES = 1000  #: gallery items used as queries for that measurement


# --------------------------------------------------------------------------- helpers
def _import_faiss(kind: str) -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            f"index kind {kind!r} needs the faiss package: pip install 'dmlgen[faiss]' (or use kind 'exact')"
        ) from None
    return faiss


def default_nlist(num_items: int) -> int:
    """IVF cells for ``num_items`` vectors: about ``4 sqrt(N)``, with at least 39 training points per cell
    (faiss's own minimum for a stable k-means), and at least 1."""
    return max(1, min(round(4 * math.sqrt(num_items)), num_items // 39))


def default_nprobe(nlist: int) -> int:
    """IVF cells searched per query: 1/8 of the cells (recall@10 1.00 and 0.86 on docs/deploy.md's two
    100k sets; check the recall stored in index.json and raise ``nprobe`` when it is too low)."""
    return max(1, min(nlist, math.ceil(nlist / 8)))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def _as_float32(x: Any, name: str) -> np.ndarray:
    """Validated (N, D) float32 copy of ``x`` (numbers only, finite, non-empty)."""
    # prepare_embeddings checks arrays of any dtype itself (strings, objects: a DataError naming ``name``).
    return prepare_embeddings(x, "euclidean", name).numpy().astype(np.float32, copy=True)


def _l2_normalized(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        row = int(np.flatnonzero(norms.ravel() == 0)[0])
        raise DataError(f"{name} row {row} is all zeros: its cosine similarity is undefined")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


# --------------------------------------------------------------------------- the index
class EmbeddingIndex:
    """Nearest-neighbour search over fixed gallery embeddings ``(N, D)``.

    Build one with :meth:`build`; :meth:`search` returns distances in the unit of ``metric`` (Euclidean
    distance, or cosine similarity / inner product: larger is closer), closest first.
    """

    def __init__(self, embeddings: np.ndarray, kind: str, metric: str, params: dict[str, Any],
                 faiss_index: Any = None) -> None:
        self.embeddings = embeddings
        self.kind = kind
        self.metric = metric
        self.params = params
        self.faiss_index = faiss_index

    @property
    def num_items(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @classmethod
    def build(cls, embeddings: Any, kind: str = "exact", metric: str = "euclidean", *, nlist: int | None = None,
              nprobe: int | None = None, hnsw_m: int = DEFAULT_HNSW_M,
              ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef_search: int = DEFAULT_EF_SEARCH,
              seed: int = 0) -> EmbeddingIndex:
        """Index ``embeddings`` (N, D).

        Args:
            kind: ``exact`` | ``ivf`` | ``hnsw``.
            metric: ``euclidean`` | ``cosine`` (vectors L2-normalised, inner product) | ``inner_product``.
            nlist, nprobe: IVF cells and cells searched per query (default :func:`default_nlist`,
                :func:`default_nprobe`).
            hnsw_m, ef_construction, ef_search: HNSW graph degree and candidate-list sizes.
            seed: seed of the IVF k-means.
        """
        kind, metric = _check_kind_metric(kind, metric)
        emb = _as_float32(embeddings, "embeddings")
        n, dim = emb.shape
        vectors = _l2_normalized(emb, "embeddings") if metric == "cosine" else emb  # zero rows fail here
        if kind == "exact":
            return cls(emb, kind, metric, {})
        faiss = _import_faiss(kind)
        faiss_metric = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
        params: dict[str, Any]
        if kind == "ivf":
            nlist = default_nlist(n) if nlist is None else _positive_int("nlist", nlist)
            if nlist > n:
                raise ConfigError(f"nlist: {nlist} IVF cells need at least as many gallery items, got {n}")
            nprobe = default_nprobe(nlist) if nprobe is None else _positive_int("nprobe", nprobe)
            if nprobe > nlist:
                raise ConfigError(f"nprobe: at most nlist = {nlist}, got {nprobe}")
            index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss_metric)
            index.cp.seed = int(seed)  # k-means initialisation: the same index on every run
            index.train(vectors)
            params = {"nlist": nlist, "nprobe": nprobe, "seed": int(seed)}
        else:
            hnsw_m = _positive_int("hnsw_m", hnsw_m)
            ef_construction = _positive_int("ef_construction", ef_construction)
            ef_search = _positive_int("ef_search", ef_search)
            index = faiss.index_factory(dim, f"HNSW{hnsw_m},Flat", faiss_metric)
            index.hnsw.efConstruction = ef_construction
            params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
        index.add(vectors)
        return cls(emb, kind, metric, params, index)

    def search(self, queries: Any, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` gallery rows of every query ``(Nq, D)`` -> ``(distances (Nq, k) float32, indices
        (Nq, k) int64)``, closest first.

        ``nprobe`` / ``ef_search`` replace the index's stored search parameters for this call. Rows for
        which an approximate index returns fewer than ``k`` items (too few items in the probed cells) are
        searched exactly.
        """
        q = prepare_embeddings(queries, self.metric, "queries")
        if q.shape[1] != self.dim:
            raise DataError(f"queries are {q.shape[1]}-d but the index holds {self.dim}-d embeddings")
        k = _positive_int("k", k)
        if k > self.num_items:
            raise DataError(f"k = {k} neighbours requested but the index holds {self.num_items} item(s)")
        gallery = torch.from_numpy(self.embeddings)
        if self.kind == "exact":
            if nprobe is not None or ef_search is not None:
                raise ConfigError("nprobe / ef_search: only for ivf / hnsw indexes; this index is exact")
            res = knn(q, gallery, k, metric=self.metric)  # type: ignore[arg-type]
            dist, idx = res.distances.numpy(), res.indices.numpy()
        else:
            faiss = _import_faiss(self.kind)
            # faiss.contrib.torch_utils (imported by pytorch-metric-learning, for one) replaces Index.search
            # with a version without `params`, keeping the numpy one as `search_numpy`.
            search = getattr(self.faiss_index, "search_numpy", self.faiss_index.search)
            dist, idx = search(np.ascontiguousarray(q.numpy()), k,
                               params=self._search_parameters(faiss, k, nprobe, ef_search))
            idx = idx.astype(np.int64)
            short = np.flatnonzero((idx < 0).any(axis=1))
            if len(short):
                res = knn(q[torch.from_numpy(short)], gallery, k, metric=self.metric)  # type: ignore[arg-type]
                idx[short] = res.indices.numpy()
                dist[short] = res.distances.numpy()
        if self.metric == "euclidean":
            # Both searches rank by |q|^2 - 2 q.r + |r|^2, whose cancellation leaves errors of about
            # 1e-7 |q|^2, i.e. 1e-3 after the square root of a near-zero distance: report |q - r| instead,
            # computed directly, and order each row by it (stable: ties keep the search's order).
            dist = _direct_euclidean(q.numpy(), self.embeddings, idx)
            order = np.argsort(dist, axis=1, kind="stable")
            dist, idx = np.take_along_axis(dist, order, axis=1), np.take_along_axis(idx, order, axis=1)
        return np.ascontiguousarray(dist, dtype=np.float32), idx

    def _search_parameters(self, faiss: Any, k: int, nprobe: int | None, ef_search: int | None) -> Any:
        if self.kind == "ivf":
            if ef_search is not None:
                raise ConfigError("ef_search: only for hnsw indexes; an ivf index takes nprobe")
            nlist = self.params["nlist"]
            nprobe = self.params["nprobe"] if nprobe is None else _positive_int("nprobe", nprobe)
            if nprobe > nlist:
                raise ConfigError(f"nprobe: at most nlist = {nlist}, got {nprobe}")
            return faiss.SearchParametersIVF(nprobe=nprobe)
        if nprobe is not None:
            raise ConfigError("nprobe: only for ivf indexes; an hnsw index takes ef_search")
        ef = self.params["ef_search"] if ef_search is None else _positive_int("ef_search", ef_search)
        return faiss.SearchParametersHNSW(efSearch=max(ef, k))  # fewer candidates than k cannot give k


def _direct_euclidean(queries: np.ndarray, gallery: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(Nq, k) ``|queries[i] - gallery[idx[i, j]]|`` in float32, in chunks of about 16M gathered values."""
    out = np.empty(idx.shape, dtype=np.float32)
    step = max(1, (16 << 20) // max(1, idx.shape[1] * gallery.shape[1]))
    for s in range(0, len(idx), step):
        diff = gallery[idx[s:s + step]] - queries[s:s + step, None, :]
        out[s:s + step] = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
    return out


def _check_kind_metric(kind: str, metric: str) -> tuple[str, str]:
    if kind not in INDEX_KINDS:
        raise ConfigError(f"index kind: must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if metric not in INDEX_METRICS:
        raise ConfigError(f"index metric: must be one of {', '.join(INDEX_METRICS)}, got {metric!r}")
    return kind, metric


# --------------------------------------------------------------------------- recall
def _drop_self(dist: np.ndarray, idx: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own gallery index (or, where it is absent, the last column): (B, k+1) -> (B, k)."""
    is_self = idx == own[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), idx.shape[1] - 1)
    keep = np.ones(idx.shape, dtype=bool)
    keep[np.arange(len(idx)), drop] = False
    width = idx.shape[1] - 1
    return dist[keep].reshape(-1, width), idx[keep].reshape(-1, width)


def _exact_scores(queries: np.ndarray, gallery: np.ndarray, idx: np.ndarray, metric: str) -> np.ndarray:
    """(B, k) float64 "smaller is closer" scores of gallery rows ``idx`` for each query, recomputed in float64
    so that an item scores the same whichever search found it."""
    q = queries.astype(np.float64)
    r = gallery[idx].astype(np.float64)  # (B, k, D)
    if metric == "euclidean":
        return ((r - q[:, None, :]) ** 2).sum(axis=2)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        r = r / np.linalg.norm(r, axis=2, keepdims=True)
    return -np.einsum("bd,bkd->bk", q, r)


def approximate_recall(index: EmbeddingIndex, queries: Any = None, *, k: int = RECALL_K,
                       num_queries: int = RECALL_QUERIES, seed: int = 0, nprobe: int | None = None,
                       ef_search: int | None = None) -> dict[str, Any]:
    """Recall@k of ``index``'s search against exact search.

    Per query, the fraction of its ``k`` results that are no farther than the exact k-th nearest neighbour
    (ties count as found; without ties this is the overlap of the two top-k sets), averaged over queries.
    Distances are recomputed in float64 for both result lists.

    ``queries=None``: ``num_queries`` gallery items drawn with ``seed`` (all when fewer), each searched
    leave-one-out (itself removed from both result lists). Otherwise every row of ``queries`` (Nq, D).
    Returns ``{"k", "recall", "num_queries", "queries", "exact_seconds", "approx_seconds"}`` plus the search
    parameters used.
    """
    k = _positive_int("k", k)
    n = index.num_items
    if queries is None:
        num_queries = _positive_int("num_queries", num_queries)
        if n < 2:
            raise DataError("recall on the gallery needs at least 2 items (each query leaves itself out)")
        k = min(k, n - 1)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(num_queries, n), replace=False))
        q = index.embeddings[rows]
        extra = 1
    else:
        q = _as_float32(queries, "queries")
        if q.shape[1] != index.dim:
            raise DataError(f"queries are {q.shape[1]}-d but the index holds {index.dim}-d embeddings")
        if k > n:
            raise DataError(f"k = {k} neighbours requested but the index holds {n} item(s)")
        rows, extra = None, 0
    exact = EmbeddingIndex(index.embeddings, "exact", index.metric, {})
    start = time.perf_counter()
    exact_d, exact_i = exact.search(q, k + extra)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    approx_d, approx_i = index.search(q, k + extra, nprobe=nprobe, ef_search=ef_search)
    approx_s = time.perf_counter() - start
    if rows is not None:
        exact_d, exact_i = _drop_self(exact_d, exact_i, rows)
        approx_d, approx_i = _drop_self(approx_d, approx_i, rows)
    found = 0.0
    for s in range(0, len(q), 1024):  # bounded memory: (1024, k, D) float64
        e = _exact_scores(q[s:s + 1024], index.embeddings, exact_i[s:s + 1024], index.metric)
        a = _exact_scores(q[s:s + 1024], index.embeddings, approx_i[s:s + 1024], index.metric)
        kth = e.max(axis=1, keepdims=True)
        found += float((a <= kth + 1e-9 * np.maximum(1.0, np.abs(kth))).sum())
    result: dict[str, Any] = {
        "k": k, "recall": found / (len(q) * k), "num_queries": len(q),
        "queries": "gallery (leave-one-out)" if rows is not None else "given",
        "exact_seconds": round(exact_s, 4), "approx_seconds": round(approx_s, 4),
    }
    if index.kind == "ivf":
        result["nprobe"] = index.params["nprobe"] if nprobe is None else nprobe
    elif index.kind == "hnsw":
        result["ef_search"] = index.params["ef_search"] if ef_search is None else ef_search
    return result


# --------------------------------------------------------------------------- models and images
def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """``{"hash", "embedding_size", "description"}`` of an :class:`~dmlgen.models.EmbeddingModel`.

    ``hash`` is the SHA-256 of its ``describe()`` and of every state-dict tensor (name, dtype, shape and
    bytes, in name order), so a ``.ckpt`` and its ``.safetensors`` export have the same identity.
    """
    description = model.describe()  # type: ignore[operator]
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return {"hash": "sha256:" + digest.hexdigest(), "embedding_size": int(model.embedding_size),
            "description": description}


def collect_images(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[str | None]]:
    """Image files of ``source`` -> ``(paths, labels)``, paths absolute.

    ``source``: a folder (every image below it, sorted, hidden files and folders skipped; an image in a
    sub-folder is labelled with the name of its top sub-folder, the class folder; one directly in the folder
    gets label None), or a list of image files and folders (files are unlabelled). Missing paths and an
    empty result are DataErrors naming the path.
    """
    from dmlgen.data.datasets import IMAGE_EXTENSIONS

    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise DataError("no images given")
    paths: list[str] = []
    labels: list[str | None] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = 0
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # also fixes the walk order
                rel = Path(dirpath).relative_to(p).parts
                for name in sorted(filenames):
                    if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(str((Path(dirpath) / name).resolve()))
                        labels.append(rel[0] if rel else None)
                        found += 1
            if not found:
                raise DataError(f"image folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif p.is_file():
            paths.append(str(p.resolve()))
            labels.append(None)
        else:
            raise DataError(f"image path {p} does not exist")
    return paths, labels


def _preprocessing(cfg: Any) -> dict[str, Any]:
    """How image files are turned into model inputs: the checkpoint's eval transforms, resized to
    ``data.image_size`` when they name no size (as training on image files does), in ``data.channels``."""
    eval_tf = cfg.data.eval_transforms
    if eval_tf.image_size is None:
        eval_tf = dataclasses.replace(eval_tf, image_size=cfg.data.image_size)
    return json.loads(json.dumps({"channels": cfg.data.channels, "eval_transforms": dataclasses.asdict(eval_tf)}))


def _embed_files(model: Any, cfg: Any, paths: list[str], *, batch_size: int | None, device: Any,
                 num_workers: int, progress: bool, desc: str) -> np.ndarray:
    from dmlgen.data.datasets import FileImageDataset
    from dmlgen.data.transforms import transform_config_from_dict, build_transforms
    from dmlgen.engine.setup import embed_dataset

    prep = _preprocessing(cfg)
    transform = build_transforms(transform_config_from_dict(prep["eval_transforms"]), train=False)
    dataset = FileImageDataset(paths, np.zeros(len(paths), dtype=np.int64), transform=transform,
                               channels=prep["channels"])
    batch_size = cfg.eval.batch_size if batch_size is None else _positive_int("batch_size", batch_size)
    emb, _ = embed_dataset(model, dataset, batch_size=batch_size, device=device, num_workers=num_workers,
                           progress=progress, desc=desc)
    return emb.numpy().astype(np.float32)


def _load_model(checkpoint: str | Path, device: str) -> tuple[Any, Any, torch.device]:
    from dmlgen.engine.run import load_trained_model
    from dmlgen.engine.setup import resolve_device

    dev = resolve_device(device)
    model, cfg = load_trained_model(checkpoint, str(dev))
    return model, cfg, dev


# --------------------------------------------------------------------------- index folders
@dataclass
class LoadedIndex:
    """An index folder read back: ``meta`` (index.json) and the searchable :class:`EmbeddingIndex`."""

    path: Path
    meta: dict[str, Any]
    index: EmbeddingIndex

    @property
    def paths(self) -> list[str]:
        return self.meta["paths"]

    @property
    def labels(self) -> list[str | None]:
        return self.meta["labels"]


def permissions(directory: bool = False) -> int:
    """The mode a plain ``open`` / ``mkdir`` would give under the current umask; ``tempfile`` creates 0600
    files and 0700 folders, which would make renamed outputs private."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _fsync_write(path: Path, write: Any) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"index folder {out} is a file; choose another --out")
    if not any(out.iterdir()):
        return
    if not (out / META_FILE).is_file():
        raise DataError(f"{out} exists and is not a dmlgen index (no {META_FILE}); refusing to replace it")
    if not overwrite:
        raise ConfigError(f"index folder {out} already exists; pass overwrite=True (--overwrite) to replace it")


def _write_index_dir(out: Path, meta: dict[str, Any], index: EmbeddingIndex, overwrite: bool) -> None:
    """Write the folder next to ``out`` and rename it into place (the old index, if any, is removed last)."""
    _check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _fsync_write(tmp / EMBEDDINGS_FILE, lambda h: np.save(h, index.embeddings, allow_pickle=False))
        if index.faiss_index is not None:
            faiss = _import_faiss(index.kind)
            faiss.write_index(index.faiss_index, str(tmp / FAISS_FILE))
            with open(tmp / FAISS_FILE, "rb") as handle:  # faiss closes its file without fsync
                os.fsync(handle.fileno())
        # index.json last: a folder with it is complete.
        _fsync_write(tmp / META_FILE, lambda h: h.write((json.dumps(meta, indent=1) + "\n").encode()))
        for child in tmp.iterdir():
            child.chmod(permissions())
        tmp.chmod(permissions(directory=True))
        if out.exists():
            if any(out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
                os.replace(out, old / "index")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
                return
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_index(index_dir: str | Path) -> LoadedIndex:
    """Read an index folder written by :func:`build_index`; every inconsistency is a DataError naming it."""
    folder = Path(index_dir)
    meta_path = folder / META_FILE
    if not folder.is_dir():
        raise DataError(f"index folder {folder} does not exist")
    if not meta_path.is_file():
        raise DataError(f"{folder} is not a dmlgen index: it has no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"index file {meta_path} cannot be read: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise DataError(f"{meta_path} is not a dmlgen index file (format {INDEX_FORMAT})")
    needed = ("kind", "metric", "num_items", "embedding_size", "model", "preprocessing", "params", "paths", "labels")
    missing = [key for key in needed if key not in meta]
    if missing:
        raise DataError(f"index file {meta_path} lacks {', '.join(missing)}")
    kind, metric = meta["kind"], meta["metric"]
    if kind not in INDEX_KINDS or metric not in INDEX_METRICS:
        raise DataError(f"index file {meta_path}: unknown kind {kind!r} or metric {metric!r}")
    n, dim = meta["num_items"], meta["embedding_size"]
    if len(meta["paths"]) != n or len(meta["labels"]) != n:
        raise DataError(f"index file {meta_path}: {len(meta['paths'])} paths and {len(meta['labels'])} labels "
                        f"for {n} items")
    emb_path = folder / EMBEDDINGS_FILE
    try:
        embeddings = np.load(emb_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"index embeddings {emb_path} cannot be read: {exc}") from None
    if embeddings.dtype != np.float32 or embeddings.shape != (n, dim):
        raise DataError(f"index embeddings {emb_path} are {embeddings.dtype} {embeddings.shape}, but {meta_path} "
                        f"says float32 ({n}, {dim})")
    faiss_index = None
    if kind != "exact":
        faiss = _import_faiss(kind)
        faiss_path = folder / FAISS_FILE
        if not faiss_path.is_file():
            raise DataError(f"index folder {folder} lacks {FAISS_FILE} (kind {kind})")
        try:
            faiss_index = faiss.read_index(str(faiss_path))
        except RuntimeError as exc:
            raise DataError(f"faiss index {faiss_path} cannot be read: {str(exc).splitlines()[0]}") from None
        if faiss_index.ntotal != n or faiss_index.d != dim:
            raise DataError(f"faiss index {faiss_path} holds {faiss_index.ntotal} {faiss_index.d}-d vectors, but "
                            f"{meta_path} says {n} {dim}-d")
    return LoadedIndex(folder, meta, EmbeddingIndex(embeddings, kind, metric, dict(meta["params"]), faiss_index))


def build_index(checkpoint: str | Path, images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                out_dir: str | Path, *, kind: str = "exact", metric: str | None = None, nlist: int | None = None,
                nprobe: int | None = None, hnsw_m: int = DEFAULT_HNSW_M,
                ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef_search: int = DEFAULT_EF_SEARCH,
                batch_size: int | None = None, device: str = "cpu", num_workers: int = 0,
                recall_k: int = RECALL_K, recall_queries: int = RECALL_QUERIES, seed: int = 0,
                overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Embed ``images`` with ``checkpoint`` and write the index folder ``out_dir``.

    ``images``: a folder or a list of files / folders (see :func:`collect_images`); they go through the
    checkpoint's eval transforms (see :func:`_preprocessing`). ``metric`` defaults to the run's
    ``eval.distance``. An approximate kind also stores its recall@``recall_k`` against exact search over
    ``recall_queries`` gallery items (leave-one-out) in ``index.json["recall"]``. Returns the metadata
    written to ``index.json``.
    """
    out = Path(out_dir)
    if kind not in INDEX_KINDS:
        raise ConfigError(f"index kind: must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if metric is not None:
        _check_kind_metric(kind, metric)
    if kind != "exact":
        _import_faiss(kind)
    _check_out_dir(out, overwrite)  # before the slow part
    recall_k = _positive_int("recall_k", recall_k)
    paths, labels = collect_images(images)
    start = time.perf_counter()
    model, cfg, dev = _load_model(checkpoint, device)
    metric = metric or cfg.eval.distance
    identity = model_identity(model)
    embeddings = _embed_files(model, cfg, paths, batch_size=batch_size, device=dev, num_workers=num_workers,
                              progress=progress, desc="embedding gallery")
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    index = EmbeddingIndex.build(embeddings, kind, metric, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
                                 ef_construction=ef_construction, ef_search=ef_search, seed=seed)
    build_s = time.perf_counter() - start
    recall = None
    if kind != "exact" and index.num_items >= 2:
        recall = approximate_recall(index, k=recall_k, num_queries=recall_queries, seed=seed)
    meta: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "dmlgen_version": dmlgen.__version__,
        "kind": kind,
        "metric": metric,
        "num_items": index.num_items,
        "embedding_size": index.dim,
        "model": {"hash": identity["hash"], "embedding_size": identity["embedding_size"],
                  "description": identity["description"], "checkpoint": str(Path(checkpoint).resolve())},
        "preprocessing": _preprocessing(cfg),
        "params": index.params,
        "recall": recall,
        "seconds": {"embed": round(embed_s, 3), "build": round(build_s, 3)},
        "paths": paths,
        "labels": labels,
    }
    _write_index_dir(out, meta, index, overwrite)
    return meta


# --------------------------------------------------------------------------- search
@dataclass(frozen=True)
class SearchResult:
    """Top-k gallery items of every query, closest first.

    ``indices`` (Nq, k) int64 gallery rows; ``distances`` (Nq, k) float32 in the unit of ``metric``
    (Euclidean distance; cosine similarity or inner product: larger is closer); ``paths`` / ``labels``
    the gallery items of ``indices``.
    """

    query_paths: list[str]
    indices: np.ndarray
    distances: np.ndarray
    paths: list[list[str]]
    labels: list[list[str | None]]
    metric: str

    def rows(self) -> list[dict[str, Any]]:
        """One row per (query, rank): ``query, rank (1 = closest), path, label, distance``."""
        out = []
        for qi, query in enumerate(self.query_paths):
            for rank in range(self.indices.shape[1]):
                out.append({"query": query, "rank": rank + 1, "path": self.paths[qi][rank],
                            "label": self.labels[qi][rank], "distance": float(self.distances[qi, rank])})
        return out

    def write_csv(self, path: str | Path) -> Path:
        """The :meth:`rows` as CSV with a header (empty label for unlabelled items)."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=["query", "rank", "path", "label", "distance"])
                writer.writeheader()
                for row in self.rows():
                    writer.writerow({**row, "label": "" if row["label"] is None else row["label"],
                                     "distance": f"{row['distance']:.6g}"})
        except OSError as exc:
            raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path


def check_model_matches(loaded: LoadedIndex, checkpoint: str | Path, identity: dict[str, Any],
                        preprocessing: dict[str, Any]) -> None:
    """CheckpointError unless ``checkpoint`` (its ``identity`` and ``preprocessing``) is the index's model."""
    stored = loaded.meta["model"]
    built_from = stored.get("checkpoint", "?")
    if identity["embedding_size"] != loaded.meta["embedding_size"]:
        raise CheckpointError(
            f"checkpoint {checkpoint} gives {identity['embedding_size']}-d embeddings but index {loaded.path} holds "
            f"{loaded.meta['embedding_size']}-d embeddings of another model (built from {built_from}); search with "
            "that checkpoint or rebuild the index with dmlgen index"
        )
    if identity["hash"] != stored.get("hash"):
        raise CheckpointError(
            f"checkpoint {checkpoint} is not the model index {loaded.path} was built with (model hash "
            f"{identity['hash'][7:19]} != {str(stored.get('hash'))[7:19]}, built from {built_from}); its "
            "embeddings are not comparable: search with that checkpoint or rebuild the index with dmlgen index"
        )
    if preprocessing != loaded.meta["preprocessing"]:
        raise CheckpointError(
            f"checkpoint {checkpoint} has the index's weights but preprocesses images differently "
            f"({preprocessing} vs {loaded.meta['preprocessing']} in {loaded.path / META_FILE})"
        )


def search(index_dir: str | Path, queries: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
           k: int = 5, *, checkpoint: str | Path | None = None, batch_size: int | None = None,
           device: str = "cpu", nprobe: int | None = None, ef_search: int | None = None,
           progress: bool = False) -> SearchResult:
    """Embed the query images with the index's model and return their ``k`` nearest gallery items.

    ``queries``: image files and/or folders (see :func:`collect_images`). ``checkpoint`` defaults to the one
    recorded in the index; whichever is used must have the index's model hash and embedding size, else a
    CheckpointError says so. ``nprobe`` / ``ef_search`` override the stored IVF / HNSW search parameters.
    """
    loaded = load_index(index_dir)
    k = _positive_int("k", k)
    if k > loaded.index.num_items:
        raise DataError(f"k = {k} neighbours requested but index {loaded.path} holds {loaded.index.num_items} item(s)")
    query_paths, _ = collect_images(queries)
    ckpt = checkpoint if checkpoint is not None else loaded.meta["model"].get("checkpoint")
    if ckpt is None:
        raise ConfigError(f"index {loaded.path} records no checkpoint; give one")
    model, cfg, dev = _load_model(ckpt, device)
    check_model_matches(loaded, ckpt, model_identity(model), _preprocessing(cfg))
    emb = _embed_files(model, cfg, query_paths, batch_size=batch_size, device=dev, num_workers=0,
                       progress=progress, desc="embedding queries")
    dist, idx = loaded.index.search(emb, k, nprobe=nprobe, ef_search=ef_search)
    return SearchResult(
        query_paths=query_paths, indices=idx, distances=dist,
        paths=[[loaded.paths[j] for j in row] for row in idx.tolist()],
        labels=[[loaded.labels[j] for j in row] for row in idx.tolist()],
        metric=loaded.index.metric,
    )
