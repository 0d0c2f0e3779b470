"""The ``dmlgen`` command.

Each sub-command is a pair of small functions: ``_add_<name>(subparsers)`` declares its arguments and
sets ``handler=_run_<name>``; ``_run_<name>(args) -> int`` does the work. Add a command by writing both and
listing the first in :data:`COMMANDS`. Handlers raise :class:`~dmlgen.errors.DmlgenError` for anything the
user can fix; :func:`main` prints it as ``error: <message>`` and returns 2. Heavy imports happen inside
handlers so that ``dmlgen --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dmlgen
from dmlgen.errors import ConfigError, DataError, DmlgenError
from dmlgen.engine.allocator import tune_glibc_malloc

__all__ = ["COMMANDS", "build_parser", "main"]

_Subparsers = Any  # argparse._SubParsersAction is private


# --------------------------------------------------------------------------- helpers
def _int_list(text: str, flag: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4); every item a positive integer."""
    items = [t.strip() for t in text.split(",")]
    try:
        values = tuple(int(t) for t in items)
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return values


def _name_list(text: str, flag: str) -> list[str]:
    """``"recall, map@r"`` -> ["recall", "map@r"]; empty items are an error, not skipped."""
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise ConfigError(f"{flag}: empty name in {text!r}")
    return items


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Two aligned columns, metric and value; counts (``num_*``) as integers, the rest with 4 decimals."""
    if not metrics:
        return "(no metrics)"
    width = max(len("metric"), *(len(k) for k in metrics))
    lines = [f"{'metric':<{width}}  value"]
    for name, value in metrics.items():
        if name.startswith("num_") and float(value).is_integer():
            text = str(int(value))
        else:
            text = f"{float(value):.4f}"
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)


def _key_for(path: str, key: str | None) -> str | None:
    """The key flags name arrays inside .npz/.pt files; a .npy or .csv next to them holds only one."""
    return key if Path(path).suffix.lower() in (".npz", ".pt", ".pth") else None


def _write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "evaluate",
        help="retrieval metrics of saved embeddings or of a trained checkpoint",
        description="Score embeddings against their labels: leave-one-out on EMBEDDINGS, or EMBEDDINGS as "
        "queries against a gallery. Files: .npy, .npz, .pt, .csv. With --checkpoint instead: embed a split "
        "of a dataset with a trained model (dmlgen train's best.ckpt or last.ckpt) and score it leave-one-out.",
    )
    p.add_argument("embeddings", metavar="EMBEDDINGS", nargs="?", help="(N, D) query embeddings")
    p.add_argument("labels", metavar="LABELS", nargs="?", help="(N,) integer labels")
    p.add_argument("--gallery", metavar="G", help="(M, D) reference embeddings (default: leave-one-out)")
    p.add_argument("--gallery-labels", metavar="GL", help="(M,) labels of --gallery")
    p.add_argument("--embeddings-key", metavar="KEY",
                   help="array name inside .npz/.pt embedding files (EMBEDDINGS and --gallery)")
    p.add_argument("--labels-key", metavar="KEY",
                   help="array name inside .npz/.pt label files (LABELS and --gallery-labels)")
    p.add_argument("--metrics", metavar="LIST",
                   help="comma-separated metric names, e.g. recall,map@r (default: evaluate_embeddings' set)")
    p.add_argument("--k", metavar="LIST",
                   help="Recall@K cut-offs (default: 1,2,4,8; with --checkpoint: the run's eval.ks)")
    p.add_argument("--distance", choices=("euclidean", "cosine"),
                   help="ranking distance (default: euclidean; with --checkpoint: the run's eval.distance)")
    p.add_argument("--class-balanced", action="store_true", help="average within each class first")
    p.add_argument("--seed", type=int,
                   help="seed of randomised metrics such as k-means (default: 0; with --checkpoint: train.seed)")
    p.add_argument("--json", metavar="OUT", help="also write the metrics and settings to this JSON file")
    _add_checkpoint_options(p, required=False)
    p.set_defaults(handler=_run_evaluate)


def _add_checkpoint_options(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("trained model (dmlgen train)")
    g.add_argument("--checkpoint", metavar="CKPT", required=required,
                   help="a checkpoint written by dmlgen train (best.ckpt or last.ckpt)")
    g.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="which class-disjoint split to embed (default: test)")
    g.add_argument("--config", metavar="YAML",
                   help="take the dataset and eval settings from this run config (default: the checkpoint's own)")
    g.add_argument("--dataset", choices=("omniglot", "image_folder", "csv", "npz"),
                   help="replace data.dataset (e.g. omniglot: the embedded Omniglot)")
    g.add_argument("--data-path", metavar="PATH", help="replace data.path (image folder, CSV or .npz file)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.max_classes=20 (repeatable)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass (default: eval.batch_size)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _checkpoint_embeddings(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(embeddings, labels, classes, config) of ``args.split`` embedded with ``args.checkpoint``."""
    from dmlgen.engine.run import embed_split, evaluation_config

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be a positive integer, got {args.batch_size}")
    cfg = evaluation_config(args.checkpoint, config=args.config, dataset=args.dataset, data_path=args.data_path,
                            overrides=args.overrides)
    emb, labels, classes = embed_split(args.checkpoint, args.split, config=cfg, device=args.device,
                                       batch_size=args.batch_size, progress=not args.no_progress)
    return emb, labels, classes, cfg


def _run_evaluate(args: argparse.Namespace) -> int:
    if args.checkpoint is not None:
        return _run_evaluate_checkpoint(args)
    checkpoint_only = [flag for flag, value in (("--config", args.config), ("--dataset", args.dataset),
                                                ("--data-path", args.data_path), ("--set", args.overrides))
                       if value]
    if checkpoint_only:
        raise ConfigError(f"{', '.join(checkpoint_only)} need --checkpoint")
    if args.embeddings is None or args.labels is None:
        raise ConfigError("give EMBEDDINGS and LABELS files, or --checkpoint CKPT; see dmlgen evaluate --help")
    return _run_evaluate_files(args)


def _run_evaluate_checkpoint(args: argparse.Namespace) -> int:
    from dmlgen.evaluation.evaluate import evaluate_embeddings

    if args.embeddings is not None or args.labels is not None:
        raise ConfigError("--checkpoint embeds a dataset itself: give no EMBEDDINGS / LABELS files with it")
    if args.gallery is not None or args.gallery_labels is not None:
        raise ConfigError("--gallery cannot be combined with --checkpoint (checkpoints are scored leave-one-out)")
    metrics = None if args.metrics is None else _name_list(args.metrics, "--metrics")
    given_ks = _int_list(args.k, "--k") if args.k is not None else None  # checked before the slow part
    emb, labels, _, cfg = _checkpoint_embeddings(args)
    ks = given_ks or tuple(cfg.eval.ks)
    distance = args.distance or cfg.eval.distance
    # The run's seed by default, so that k-means (NMI, AMI) matches the run's test_metrics.json.
    args.seed = cfg.train.seed if args.seed is None else args.seed
    if metrics is None:
        metrics = cfg.eval.test_metrics
    start = time.perf_counter()
    results = evaluate_embeddings(emb, labels, metrics=metrics, ks=ks, metric=distance,
                                  class_balanced=args.class_balanced, seed=args.seed)
    seconds = time.perf_counter() - start
    results = {k: float(v) for k, v in results.items()}
    print(f"{args.checkpoint}: {cfg.data.dataset} {args.split} split, {len(emb)} images ({emb.shape[1]}-d, "
          f"{len(set(labels.tolist()))} classes), leave-one-out, {distance} distance"
          f"{', class-balanced' if args.class_balanced else ''}; {seconds:.1f} s")
    print(format_metrics(results))
    if args.json:
        _write_json(args.json, {
            "metrics": results,
            "inputs": {"checkpoint": args.checkpoint, "split": args.split, "dataset": cfg.data.dataset,
                       "data_path": cfg.data.path, "num_embeddings": len(emb), "embedding_dim": int(emb.shape[1])},
            "settings": {"metrics": metrics, "ks": list(ks), "distance": distance,
                         "class_balanced": args.class_balanced, "seed": args.seed},
            "seconds": round(seconds, 3),
        })
        print(f"wrote {args.json}")
    return 0


def _run_evaluate_files(args: argparse.Namespace) -> int:
    from dmlgen.evaluation.evaluate import evaluate_embeddings
    from dmlgen.evaluation.io import load_embeddings_and_labels

    ks = _int_list(args.k if args.k is not None else "1,2,4,8", "--k")
    args.distance = args.distance or "euclidean"
    args.seed = 0 if args.seed is None else args.seed
    metrics = None if args.metrics is None else _name_list(args.metrics, "--metrics")
    if (args.gallery is None) != (args.gallery_labels is None):
        raise ConfigError("--gallery and --gallery-labels must be given together")

    emb, labels = load_embeddings_and_labels(args.embeddings, args.labels,
                                             embeddings_key=_key_for(args.embeddings, args.embeddings_key),
                                             labels_key=_key_for(args.labels, args.labels_key))
    gallery = gallery_labels = None
    if args.gallery is not None:
        gallery, gallery_labels = load_embeddings_and_labels(
            args.gallery, args.gallery_labels, embeddings_key=_key_for(args.gallery, args.embeddings_key),
            labels_key=_key_for(args.gallery_labels, args.labels_key),
        )
        if gallery.shape[1] != emb.shape[1]:
            raise DataError(f"query embeddings {args.embeddings} are {emb.shape[1]}-d but gallery {args.gallery} "
                            f"is {gallery.shape[1]}-d")

    start = time.perf_counter()
    results = evaluate_embeddings(emb, labels, gallery, gallery_labels, metrics=metrics, ks=ks,
                                  metric=args.distance, class_balanced=args.class_balanced, seed=args.seed)
    seconds = time.perf_counter() - start
    results = {k: float(v) for k, v in results.items()}

    mode = "leave-one-out" if gallery is None else f"against a gallery of {len(gallery)}"
    print(f"{len(emb)} queries ({emb.shape[1]}-d, {len(set(labels.tolist()))} classes), {mode}, "
          f"{args.distance} distance{', class-balanced' if args.class_balanced else ''}; {seconds:.1f} s")
    print(format_metrics(results))
    if args.json:
        _write_json(args.json, {
            "metrics": results,
            "inputs": {"embeddings": args.embeddings, "labels": args.labels, "gallery": args.gallery,
                       "gallery_labels": args.gallery_labels, "num_embeddings": len(emb),
                       "embedding_dim": int(emb.shape[1]), "num_gallery": None if gallery is None else len(gallery)},
            "settings": {"metrics": metrics, "ks": list(ks), "distance": args.distance,
                         "class_balanced": args.class_balanced, "seed": args.seed},
            "seconds": round(seconds, 3),
        })
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- train
def _add_train(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "train",
        help="train an embedding model from a YAML run config",
        description="Train on the config's training classes, select the checkpoint by validation MAP@R on "
        "held-out training classes, then evaluate it once on the unseen test classes. The run folder "
        "(--out, default: the config's out_dir) receives config.yaml, metrics.jsonl, epochs.csv, last.ckpt, "
        "best.ckpt, test_metrics.json, report.md and report.html (see dmlgen report). Ctrl-C saves last.ckpt; "
        "--resume continues exactly.",
    )
    p.add_argument("config", metavar="CONFIG", help="run config (YAML), e.g. configs/omniglot/triplet_semihard.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=2 (repeatable; the value is YAML)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: the config's out_dir)")
    p.add_argument("--resume", action="store_true", help="continue the run in the folder from its last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="start over in a folder that already holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import shlex

    from dmlgen.engine.distributed import is_main_process, launch_prefix
    from dmlgen.engine.run import train
    from dmlgen.engine.trainer import TrainingInterrupted

    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    # Under torchrun the resume hint is a torchrun command with the same number of processes.
    command = [*launch_prefix(), "train", args.config]
    for item in args.overrides:
        command += ["--set", item]
    if args.out:
        command += ["--out", args.out]
    resume_command = shlex.join([*command, "--resume"])
    start = time.perf_counter()
    try:
        result = train(args.config, args.overrides, out_dir=args.out, resume=args.resume,
                       overwrite=args.overwrite, progress=not args.no_progress, resume_command=resume_command)
    except TrainingInterrupted as exc:
        if is_main_process():
            print(str(exc), file=sys.stderr)
        return 130
    if not is_main_process():
        return 0  # distributed training: rank 0 reports
    out = Path(args.out) if args.out else None
    if out is None:
        from dmlgen.engine.config import load_config

        out = Path(load_config(args.config, args.overrides).out_dir)
    splits = result["splits"]
    print(f"test: {splits['test_images']} images of {splits['test_classes']} unseen classes, "
          f"checkpoint of epoch {result['selected_epoch']} ({result['selection']})")
    print(format_metrics(result["test"]))
    reports = [out / name for name in ("report.md", "report.html") if (out / name).is_file()]
    print(f"wrote {out / 'test_metrics.json'}, {' and '.join(map(str, reports))} in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------- embed
def _add_embed(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "embed",
        help="write the embeddings of a dataset split computed by a trained checkpoint",
        description="Embed a split (default: test) with a checkpoint of dmlgen train and write an .npz with "
        "embeddings (N, D) float32, labels (N,) int64 (0..C-1 within the split) and classes (N,) (original "
        "class ids or names). Score it later with: dmlgen evaluate FILE.npz FILE.npz --embeddings-key "
        "embeddings --labels-key labels",
    )
    p.add_argument("--out", required=True, metavar="FILE.npz", help="output file")
    _add_checkpoint_options(p, required=True)
    p.set_defaults(handler=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    from dmlgen.engine.run import save_embeddings

    emb, labels, classes, cfg = _checkpoint_embeddings(args)
    path = save_embeddings(args.out, emb, labels, classes)
    print(f"wrote {path}: {len(emb)} embeddings ({emb.shape[1]}-d) of the {cfg.data.dataset} {args.split} split, "
          f"{len(set(labels.tolist()))} classes")
    return 0


# --------------------------------------------------------------------------- report
def _add_report(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "report", help="rewrite report.md and report.html of a training run folder",
        description="Rebuild RUN_DIR/report.md and the self-contained RUN_DIR/report.html (metrics, training "
        "curves, a retrieval gallery of the worst test queries, a 2-D map of the test embeddings, the "
        "diagnostics rho and pi) from config.yaml, test_metrics.json, epochs.csv and best.ckpt. The test "
        "embeddings, neighbours, thumbnails and map are cached in RUN_DIR/report_cache.npz.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by dmlgen train")
    p.add_argument("--html", action=argparse.BooleanOptionalAction, default=True,
                   help="also write report.html (default: yes; --no-html writes report.md only)")
    p.add_argument("--gallery-queries", type=int, default=12, metavar="N",
                   help="worst queries shown in the retrieval gallery (default: 12; 0: no gallery)")
    p.add_argument("--neighbours", type=int, default=8, metavar="K", help="neighbours per query (default: 8)")
    p.add_argument("--query-pool", type=int, default=20_000, metavar="N",
                   help="test queries ranked to find the worst (a seeded sample beyond N; default: 20000)")
    p.add_argument("--map-points", type=int, default=2000, metavar="N",
                   help="points of the 2-D embedding map (default: 2000; 0: no map)")
    p.add_argument("--map-classes", type=int, default=20, metavar="N",
                   help="classes drawn in the map, chosen at random (default: 20; 0: all)")
    p.add_argument("--map-method", choices=("auto", "umap", "tsne"), default="auto",
                   help="auto: UMAP when umap-learn is installed, else t-SNE (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the map (default: 0)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="ignore and do not write report_cache.npz")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from dmlgen.engine.checkpoint import load_checkpoint
    from dmlgen.reporting.collect import ReportOptions
    from dmlgen.reporting.html import load_run_files, write_reports

    start = time.perf_counter()
    run = Path(args.run_dir)
    options = ReportOptions(gallery_queries=args.gallery_queries, neighbours=args.neighbours,
                            query_pool=args.query_pool, map_points=args.map_points,
                            map_classes=args.map_classes or None, map_method=args.map_method, seed=args.seed,
                            cache=args.cache)
    options.validate()
    result, history, config = load_run_files(run)
    if not history and (run / "last.ckpt").is_file():  # runs from before epochs.csv held every epoch
        history = load_checkpoint(run / "last.ckpt").get("history", [])
    paths = write_reports(run, result, history, config, html=args.html, options=options, device=args.device)
    print(f"wrote {' and '.join(str(p) for p in paths)} in {time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "demo",
        help="train a baseline on Omniglot and score it on unseen classes (about 5 minutes on 2 cores)",
        description="Train a shipped Omniglot baseline, then score it leave-one-out on the 659 unseen evaluation "
        "classes next to untrained embeddings (raw pixels, random projection, random convnet); write "
        "metrics.json and report.md (and the training run to OUT/train).",
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="only the first 100 classes of every split and one short epoch (seconds)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and the random baselines (default: 0)")
    p.add_argument("--no-train", dest="train", action="store_false", help="score the untrained embeddings only")
    p.add_argument("--baseline", default="multi_similarity", choices=("multi_similarity", "triplet_semihard"),
                   help="the baseline to train (default: multi_similarity)")
    p.add_argument("--epochs", type=int, default=None, metavar="E", help="training epochs (default: 6)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from dmlgen.demo import TRAIN_EPOCHS, format_table, run_demo

    epochs = TRAIN_EPOCHS if args.epochs is None else args.epochs
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    summary = run_demo(args.out, quick=args.quick, seed=args.seed, train=args.train, baseline=args.baseline,
                       epochs=epochs, progress=args.progress)
    ds = summary["dataset"]
    print(f"Omniglot {ds['split']}: {ds['images']} images, {ds['classes']} classes, leave-one-out")
    print(format_table(summary["baselines"]))
    out = Path(args.out)
    print(f"wrote {out / 'metrics.json'} and {out / 'report.md'} in {summary['total_time_s']:.1f} s")
    return 0


# --------------------------------------------------------------------------- index / search / export
def _add_index(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "index",
        help="build a search index of an image folder with a trained checkpoint",
        description="Embed every image below --images with the checkpoint (its eval transforms) and write the "
        "index folder --out: index.json (model hash, settings, paths, class folder names), embeddings.npy and, "
        "for ivf / hnsw, faiss.index. Approximate kinds store their recall@10 against exact search. "
        "Query it with dmlgen search.",
    )
    p.add_argument("--checkpoint", metavar="CKPT", required=True,
                   help="a checkpoint of dmlgen train (best.ckpt, last.ckpt) or a .safetensors export")
    p.add_argument("--images", metavar="DIR", required=True,
                   help="gallery folder; images in sub-folders are labelled with the sub-folder (class) name")
    p.add_argument("--out", metavar="INDEX_DIR", required=True, help="index folder to write")
    p.add_argument("--kind", choices=("exact", "ivf", "hnsw"), default="exact",
                   help="exact (torch kNN), ivf or hnsw (faiss, approximate; default: exact)")
    p.add_argument("--metric", choices=("euclidean", "cosine", "inner_product"),
                   help="ranking distance (default: the run's eval.distance)")
    p.add_argument("--nlist", type=int, metavar="N", help="ivf: number of cells (default: about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, metavar="N", help="ivf: cells searched per query (default: nlist / 8)")
    p.add_argument("--hnsw-m", type=int, metavar="M", help="hnsw: neighbours per node (default: 32)")
    p.add_argument("--ef-search", type=int, metavar="N", help="hnsw: search candidates (default: 64)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass (default: eval.batch_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from dmlgen.deploy.index import build_index

    given = {"--nlist": args.nlist, "--nprobe": args.nprobe, "--hnsw-m": args.hnsw_m, "--ef-search": args.ef_search}
    own = {"ivf": ("--nlist", "--nprobe"), "hnsw": ("--hnsw-m", "--ef-search")}.get(args.kind, ())
    foreign = [flag for flag, value in given.items() if value is not None and flag not in own]
    if foreign:
        raise ConfigError(f"{', '.join(foreign)}: not a setting of a --kind {args.kind} index")
    hnsw = {k: v for k, v in (("hnsw_m", args.hnsw_m), ("ef_search", args.ef_search)) if v is not None}
    start = time.perf_counter()
    meta = build_index(args.checkpoint, args.images, args.out, kind=args.kind, metric=args.metric, nlist=args.nlist,
                       nprobe=args.nprobe, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
                       progress=not args.no_progress, **hnsw)
    classes = {label for label in meta["labels"] if label is not None}
    params = ", ".join(f"{k} {v}" for k, v in meta["params"].items() if k != "seed")
    print(f"wrote {args.out}: {meta['num_items']} images ({meta['embedding_size']}-d, {len(classes)} class folders), "
          f"{meta['kind']} index{f' ({params})' if params else ''}, {meta['metric']} distance; "
          f"{time.perf_counter() - start:.1f} s")
    recall = meta["recall"]
    if recall is not None:
        print(f"recall@{recall['k']} against exact search: {recall['recall']:.4f} "
              f"({recall['num_queries']} gallery images as queries, leave-one-out)")
    return 0


def _add_search(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "search",
        help="find the gallery images of an index closest to query images",
        description="Embed the QUERY images (files or folders) with the index's model and print the k nearest "
        "gallery images (rank, distance, path, class folder), or write them to --out as CSV "
        "(query,rank,path,label,distance). The checkpoint must be the one the index was built with.",
    )
    p.add_argument("queries", metavar="QUERY", nargs="+", help="query image files or folders")
    p.add_argument("--index", metavar="INDEX_DIR", required=True, help="a folder written by dmlgen index")
    p.add_argument("--checkpoint", metavar="CKPT", help="the index's model (default: the path recorded in the index)")
    p.add_argument("-k", "--k", dest="k", type=int, default=5, help="results per query (default: 5)")
    p.add_argument("--out", metavar="FILE.csv", help="write the results as CSV instead of printing them")
    p.add_argument("--nprobe", type=int, metavar="N", help="ivf: cells searched per query (default: the index's)")
    p.add_argument("--ef-search", type=int, metavar="N", help="hnsw: search candidates (default: the index's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass (default: eval.batch_size)")
    p.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from dmlgen.deploy.index import search

    result = search(args.index, args.queries, args.k, checkpoint=args.checkpoint, batch_size=args.batch_size,
                    device=args.device, nprobe=args.nprobe, ef_search=args.ef_search)
    if args.out:
        path = result.write_csv(args.out)
        print(f"wrote {path}: top {args.k} of {len(result.query_paths)} queries ({result.metric} distance)")
        return 0
    for qi, query in enumerate(result.query_paths):
        print(f"query {query}")
        for rank in range(result.indices.shape[1]):
            label = result.labels[qi][rank]
            print(f"  {rank + 1:>3}  {result.distances[qi, rank]:.4f}  {result.paths[qi][rank]}"
                  f"{'' if label is None else f'  [{label}]'}")
    return 0


def _add_export(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained embedding model (TorchScript, ONNX) or its weights (safetensors)",
        description="torchscript / onnx: the eval-mode model images (N, C, H, W) -> embeddings (N, D), N "
        "dynamic, checked against the PyTorch model on random images (max abs diff <= --atol). safetensors: "
        "the weights plus a sidecar JSON (same name, .json) with the run config; the pair loads wherever a "
        "checkpoint does (dmlgen evaluate / embed / index --checkpoint).",
    )
    p.add_argument("--checkpoint", metavar="CKPT", required=True, help="a checkpoint of dmlgen train")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx", "safetensors"), help="output format")
    p.add_argument("--out", metavar="PATH", required=True, help="output file (.pt, .onnx, .safetensors)")
    p.add_argument("--image-size", type=int, metavar="N",
                   help="side of the example images (default: the size of the eval transforms' output)")
    p.add_argument("--opset", type=int, metavar="N", help="onnx: opset version (default: the exporter's)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted |export - PyTorch| (default: 1e-4)")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from dmlgen.deploy.export import export_onnx, export_torchscript, save_weights_safetensors

    if args.format == "safetensors":
        flags = [f for f, v in (("--image-size", args.image_size), ("--opset", args.opset)) if v is not None]
        if flags:
            raise ConfigError(f"{', '.join(flags)}: only for --format torchscript / onnx")
        info = save_weights_safetensors(args.checkpoint, args.out)
        print(f"wrote {info['path']} ({info['num_tensors']} tensors) and {info['sidecar']}; model {info['model_hash']}")
        return 0
    if not args.atol > 0:
        raise ConfigError(f"--atol: must be > 0, got {args.atol}")
    if args.format == "onnx":
        info = export_onnx(args.checkpoint, args.out, args.image_size, opset=args.opset, atol=args.atol)
        checked = f" with {info['checked_with']}"
    else:
        if args.opset is not None:
            raise ConfigError("--opset: only for --format onnx")
        info = export_torchscript(args.checkpoint, args.out, args.image_size, atol=args.atol)
        checked = ""
    shape = ", ".join(str(s) for s in info["input_shape"])
    print(f"wrote {info['path']} ({args.format}): images ({shape}) -> embeddings (N, {info['output_shape'][1]}); "
          f"max |export - PyTorch| = {info['max_abs_diff']:.2g}{checked}")
    return 0


# --------------------------------------------------------------------------- compare
def _add_compare(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "compare",
        help="compare methods fairly: hyper-parameter search by class-disjoint CV, then seeds, then tests",
        description="For each method of the compare config: an Optuna TPE search over its search space with a "
        "fixed number of trials, each scored by the mean validation metric over k class-disjoint folds of the "
        "training classes; then the best values trained once per seed and tested once each. Writes results.md, "
        "results.csv and results.json (mean ± 95%% CI per metric, paired tests between methods over seeds). "
        "Finished trials and runs are kept: --resume continues an interrupted compare. See docs/compare.md.",
    )
    p.add_argument("config", metavar="CONFIG", help="compare config (YAML), e.g. configs/compare/omniglot_small.yaml")
    p.add_argument("--out", metavar="DIR", help="compare folder (default: the config's out_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue a compare in the folder / storage: finished trials and runs are reused")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna database URL, e.g. postgresql://user:pw@host/db to share the search between machines "
                   "(default: the config's storage, or sqlite:///DIR/optuna.db)")
    p.add_argument("--stage", choices=("all", "search", "final"), default="all",
                   help="search: only the searches (e.g. extra machines); final: only the final runs and results "
                   "from finished searches (default: all)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="only these methods of the config (e.g. one share per process on one storage: run each "
                   "share with --resume, then the whole config with --stage final --resume for the full table)")
    p.add_argument("--quiet", action="store_true", help="no line per trial and run")
    p.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    import shlex

    from dmlgen.compare import CompareInterrupted, load_compare_config, run_compare
    from dmlgen.compare.config import select_methods

    cfg = load_compare_config(args.config, out_dir=args.out)
    if args.storage is not None:
        cfg.storage = args.storage
    if args.methods is not None:
        cfg = select_methods(cfg, args.methods)
    command = ["dmlgen", "compare", args.config]
    for flag, value in (("--out", args.out), ("--storage", args.storage)):
        if value is not None:
            command += [flag, value]
    if args.stage != "all":
        command += ["--stage", args.stage]
    if args.methods is not None:
        command += ["--methods", *args.methods]
    start = time.perf_counter()
    try:
        payload = run_compare(cfg, resume=args.resume, stage=args.stage,
                              log=(lambda line: None) if args.quiet else (lambda line: print(line, flush=True)),
                              resume_command=shlex.join([*command, "--resume"]))
    except CompareInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    if payload is None:
        print(f"searches done in {time.perf_counter() - start:.0f} s; storage {cfg.storage_url()}")
        return 0
    metric = cfg.score_metric
    width = max(len(name) for name in payload["methods"])
    print(f"test {metric} (mean ± 95% CI over seeds {', '.join(map(str, cfg.seeds))}):")
    for name, info in payload["methods"].items():
        s = info["summary"].get(metric)
        if s is not None:
            ci = "" if s["ci95"] is None else f" ± {s['ci95']:.4f}"
            print(f"  {name:<{width}}  {s['mean']:.4f}{ci}")
    print(f"{cfg.out_path / 'results.md'} ({time.perf_counter() - start:.0f} s)")
    return 0


# --------------------------------------------------------------------------- entry point
COMMANDS: tuple[Callable[[_Subparsers], None], ...] = (
    _add_train, _add_evaluate, _add_embed, _add_report, _add_demo, _add_index, _add_search, _add_export,
    _add_compare,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``dmlgen`` parser with every sub-command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="dmlgen", description="Deep metric learning that generalizes to unseen classes."
    )
    parser.add_argument("--version", action="version", version=f"dmlgen {dmlgen.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dmlgen``; returns the exit status (0 ok, 2 usage or input error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help/--version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        print("error: a command is required; see dmlgen --help", file=sys.stderr)
        return 2
    tune_glibc_malloc()  # freed buffers stay in the process instead of page-faulting back every step
    try:
        return int(handler(args))
    except DmlgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
