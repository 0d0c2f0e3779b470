"""``dmlgen demo``: train a baseline on Omniglot and score it on unseen classes next to untrained embeddings.

The demo trains one shipped baseline (``configs/omniglot/<baseline>.yaml``, a 4-block convnet to 128-d,
for :data:`TRAIN_EPOCHS` epochs so the whole demo fits in about 5 minutes on 2 CPU cores) into
``<out>/train/``, then compares its test result with three fixed embeddings of the 13,180 evaluation
images (659 classes from 20 alphabets never used for training), each scored leave-one-out with
:func:`dmlgen.evaluation.evaluate.evaluate_embeddings`:

- ``raw_pixels``: the 28x28 images flattened to 784-d and L2-normalised;
- ``random_projection``: those vectors times a fixed Gaussian matrix to 128-d (Johnson-Lindenstrauss);
- ``random_convnet``: a randomly initialised 4-block convnet to 128-d (eval mode, no training).

The untrained ones are the floor a trained model must clear. Writes ``metrics.json`` and ``report.md``
to the output folder (and the full training run to ``<out>/train/``).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dmlgen
from dmlgen.data.omniglot import OmniglotSet, load_omniglot
from dmlgen.errors import DataError

__all__ = ["BASELINES", "QUICK_CLASSES", "RandomConvNet", "format_table", "run_demo"]

IMAGE_SIZE = 28
EMBEDDING_DIM = 128
KS = (1, 2, 4, 8)
# --quick keeps the first 100 evaluation classes (2,000 images): seconds, for tests and smoke runs.
QUICK_CLASSES = 100
#: the baseline trained by the demo, and its epochs (measured to fit 5 minutes on 2 cores; docs/benchmarks.md)
TRAIN_BASELINE = "multi_similarity"
TRAIN_EPOCHS = 6
_BATCH = 1024


class RandomConvNet(nn.Module):
    """Four conv3x3-BN-ReLU-maxpool2 blocks (28 -> 14 -> 7 -> 3 -> 1), global average pool, linear to ``out_dim``.

    Input (N, 1, H, W) in [0, 1]; output (N, out_dim). Used untrained, in eval mode, as a baseline.
    """

    def __init__(self, out_dim: int = EMBEDDING_DIM, width: int = 64, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _pixels(data: OmniglotSet) -> torch.Tensor:
    """(N, H*W) float32, each row L2-normalised."""
    # torch.tensor copies: loaded Omniglot arrays are read-only (shared with load_omniglot's cache).
    flat = torch.tensor(data.images, dtype=torch.float32).reshape(len(data), -1)
    return F.normalize(flat, dim=1)


def embed_raw_pixels(data: OmniglotSet, seed: int) -> torch.Tensor:
    """(N, 784) unit vectors of the pixels (``seed`` unused: nothing random)."""
    del seed
    return _pixels(data)


def embed_random_projection(data: OmniglotSet, seed: int) -> torch.Tensor:
    """(N, 128): unit pixel vectors times a seeded Gaussian (784, 128) matrix, then L2-normalised."""
    generator = torch.Generator().manual_seed(seed)
    pixels = _pixels(data)
    projection = torch.randn(pixels.shape[1], EMBEDDING_DIM, generator=generator) / EMBEDDING_DIM**0.5
    return F.normalize(pixels @ projection, dim=1)


def embed_random_convnet(data: OmniglotSet, seed: int) -> torch.Tensor:
    """(N, 128): a seeded, untrained :class:`RandomConvNet` in eval mode, outputs L2-normalised."""
    # Seed only the initialisation, without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RandomConvNet().eval()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None]
    with torch.inference_mode():
        out = torch.cat([net(images[i:i + _BATCH]) for i in range(0, len(images), _BATCH)])
    return F.normalize(out, dim=1)


BASELINES: dict[str, tuple[Callable[[OmniglotSet, int], torch.Tensor], str]] = {
    "raw_pixels": (embed_raw_pixels, "28x28 pixels flattened to 784-d, L2-normalised"),
    "random_projection": (embed_random_projection, "pixels x fixed Gaussian matrix to 128-d, L2-normalised"),
    "random_convnet": (embed_random_convnet, "untrained 4-block convnet (seeded, eval mode) to 128-d, L2-normalised"),
}


def _fmt(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or name.startswith("num_"):
        return str(int(value))
    if name.endswith("_s"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def _rows(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for metrics in results.values():
        names.extend(k for k in metrics if k not in names)
    # Counts and timings after the metrics: they describe the run, not the embedding.
    tail = [n for n in names if n.startswith("num_") or n.endswith("_s") or n == "embedding_dim"]
    return [n for n in names if n not in tail] + tail


def format_table(results: Mapping[str, Mapping[str, Any]], markdown: bool = False) -> str:
    """One row per metric, one column per baseline; ``markdown`` gives a GitHub table."""
    cols = list(results)
    rows = _rows(results)
    cells = [[name] + [_fmt(name, results[c].get(name, "")) for c in cols] for name in rows]
    if markdown:
        lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    header = ["metric"] + cols
    widths = [max(len(r[i]) for r in [header] + cells) for i in range(len(header))]
    fmt = "  ".join(["{:<%d}" % widths[0]] + ["{:>%d}" % w for w in widths[1:]])
    return "\n".join([fmt.format(*header)] + [fmt.format(*row) for row in cells])


def _command(out_dir: Path, quick: bool, seed: int, train: bool) -> str:
    return (f"dmlgen demo --out {out_dir}" + (" --quick" if quick else "") + (f" --seed {seed}" if seed else "")
            + ("" if train else " --no-train"))


def _report(summary: Mapping[str, Any]) -> str:
    ds = summary["dataset"]
    trained = summary.get("trained")
    title = "a trained baseline vs untrained embeddings" if trained else "untrained baselines"
    lines = [
        f"# dmlgen demo: {title} on Omniglot",
        "",
        f"Omniglot evaluation set ({ds['images']} images, {ds['classes']} classes, {ds['alphabets']} alphabets "
        f"that no model sees in training), {ds['image_size']}x{ds['image_size']} pixels, stroke = 1. "
        "Every image is a query; its references are all other images (leave-one-out, "
        f"{summary['settings']['distance']} distance, K = {', '.join(map(str, summary['settings']['ks']))}).",
        "",
        "The untrained embeddings are the floor a trained model must clear.",
        "",
    ]
    if trained:
        lines += [
            f"- `{trained['name']}`: the `{trained['baseline']}` baseline (configs/omniglot/{trained['baseline']}.yaml) "
            f"trained for {trained['epochs']} epoch(s) on the background alphabets in {trained['train_time_s']:.0f} s; "
            f"the checkpoint of epoch {trained['selected_epoch']} was chosen by validation "
            f"{trained['selection_metric']} on held-out background alphabets, then tested once. "
            f"Run folder: `{trained['run_dir']}` (its report.md has the training curves).",
        ]
    lines += [f"- `{name}`: {text}" for name, (_, text) in BASELINES.items()]
    lines += [
        "",
        format_table(summary["baselines"], markdown=True),
        "",
        "Times of the untrained rows are wall-clock seconds (embedding + evaluation) on "
        f"{summary['environment']['torch_threads']} CPU thread(s); `num_*` are query counts.",
        "",
        "Reproduce:",
        "",
        "```",
        summary["command"],
        "```",
        "",
    ]
    if summary["settings"]["quick"]:
        lines.insert(2, f"**Quick run**: only the first {QUICK_CLASSES} evaluation classes.\n")
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    quick: bool = False,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
    train: bool = True,
    baseline: str = TRAIN_BASELINE,
    epochs: int = TRAIN_EPOCHS,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``baseline`` and evaluate it with :data:`BASELINES` on the Omniglot evaluation set.

    Args:
        out_dir: output folder (created); the training run goes to ``out_dir/train``.
        quick: only the first :data:`QUICK_CLASSES` classes of every split, one short epoch.
        seed: seeds training, the projection, the convnet initialisation and ``evaluate_embeddings``.
        metrics: passed to ``evaluate_embeddings`` for the untrained rows (None: its default set, which
            is also the trained run's test set).
        train: False scores the untrained embeddings only.
        baseline: ``multi_similarity`` or ``triplet_semihard``.
        epochs: training epochs.
        progress: progress bars during training.

    Returns:
        The content of ``metrics.json``: ``baselines`` maps each name to its metrics plus
        ``embedding_dim``, ``embed_time_s`` and ``wall_time_s`` (seconds).
    """
    from dmlgen.evaluation.evaluate import evaluate_embeddings

    start = time.perf_counter()
    out = Path(out_dir)
    try:  # fail before the work, not after it
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot write the demo output to {out}: {exc.strerror or exc}") from None
    data = load_omniglot("evaluation", image_size=IMAGE_SIZE)
    if quick:
        data = data.subset(data.labels < data.labels.min() + QUICK_CLASSES)
    load_s = time.perf_counter() - start

    results: dict[str, dict[str, Any]] = {}
    trained: dict[str, Any] | None = None
    if train:
        trained, scores = _train(out / "train", baseline, epochs, seed, quick, progress)
        results[trained["name"]] = scores
    for name, (embed, _) in BASELINES.items():
        t0 = time.perf_counter()
        emb = embed(data, seed)
        t1 = time.perf_counter()
        scores = evaluate_embeddings(emb, torch.tensor(data.labels), metrics=metrics, ks=KS,
                                     metric="euclidean", seed=seed)
        t2 = time.perf_counter()
        results[name] = {k: float(v) for k, v in scores.items()}
        results[name].update(embedding_dim=int(emb.shape[1]), embed_time_s=round(t1 - t0, 3),
                             wall_time_s=round(t2 - t0, 3))

    summary: dict[str, Any] = {
        "dataset": {"name": "omniglot", **data.describe(), "protocol": "leave-one-out"},
        "settings": {"quick": quick, "seed": seed, "ks": list(KS), "distance": "euclidean",
                     "metrics": None if metrics is None else list(metrics)},
        "baselines": results,
        "trained": trained,
        "load_time_s": round(load_s, 3),
        "total_time_s": round(time.perf_counter() - start, 3),
        "environment": {"dmlgen": dmlgen.__version__, "torch": torch.__version__, "numpy": np.__version__,
                        "python": platform.python_version(), "torch_threads": torch.get_num_threads()},
        "command": _command(out, quick, seed, train),
    }
    try:
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (out / "report.md").write_text(_report(summary), encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write the demo output to {out}: {exc.strerror or exc}") from None
    return summary


def _train(run_dir: Path, baseline: str, epochs: int, seed: int, quick: bool,
           progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the demo baseline; returns (description, test scores with ``wall_time_s``)."""
    from dmlgen.engine.run import train_baseline

    overrides = [f"train.seed={seed}", f"train.epochs={epochs}"]
    if quick:
        overrides += [f"data.max_classes={QUICK_CLASSES}", "train.epochs=1", "train.max_steps_per_epoch=10"]
    t0 = time.perf_counter()
    result = train_baseline(baseline, run_dir, overrides, progress=progress, overwrite=True)
    seconds = time.perf_counter() - t0
    scores: dict[str, Any] = {k: float(v) for k, v in result["test"].items()}
    scores.update(embedding_dim=EMBEDDING_DIM, wall_time_s=round(seconds, 3))
    described = {
        "name": f"trained_{baseline}",
        "baseline": baseline,
        "epochs": 1 if quick else epochs,
        "train_time_s": round(seconds, 1),
        "selected_epoch": result["selected_epoch"],
        "selection_metric": result["selection_metric"],
        "run_dir": str(run_dir),
    }
    return described, scores
