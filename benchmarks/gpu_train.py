"""GPU training and evaluation speed: ResNet-50 at 224 px, batch 128 (32 classes x 4), AMP, channels-last.

Training, for three variants (multi-similarity loss + miner as the baseline, + MDR, + LSD), in one process:

  bare   the model alone on cached GPU batches: autocast forward, ``embeddings.sum()``, scaled backward,
         optimizer step (the physical floor; measured once, the model is the same in every variant)
  full   the engine's step (``Trainer._train_epoch``): class-balanced sampling, DataLoader workers applying
         the CUB training transforms (RandomResizedCrop 224, flip, normalise) to synthetic uint8 images held
         in memory, host-to-device copy, mining and loss in fp32, the regularizer (LSD: the teacher's forward
         too), backward, optimizer step, logging

Both report images/s over the steps after ``--warmup``; overhead = bare images/s / full images/s - 1 (the
target is at most 5%). The images are in memory, so JPEG decoding (a cost of the data set, not of the engine)
is not part of "full". Channels-last: the model's weights and every input batch (a forward pre-hook).

Evaluation: 60,000 x 512 SOP-like embeddings (benchmarks/eval_speed.py's generator) on the same device:
dmlgen's ``evaluate_embeddings`` (P@1, R-Precision, MAP@R, Recall@1/2/4/8, torch kNN) against
pytorch-metric-learning's ``AccuracyCalculator(k="max_bin_count")`` with its torch kNN (``CustomKNN``); the
metric values are compared too.

The device name, torch and CUDA versions are printed and stored with the numbers (``--json``).

Run:          .venv/bin/python benchmarks/gpu_train.py [--steps 50] [--warmup 10] [--workers 8] [--json out.json]
Smoke check:  .venv/bin/python benchmarks/gpu_train.py --device cpu --tiny   (ResNet-18 at 64 px, seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_speed import make_data  # noqa: E402  (the SOP-like embedding generator)

from dmlgen.data.datasets import ArrayImageDataset  # noqa: E402
from dmlgen.data.transforms import TransformConfig, build_transforms  # noqa: E402
from dmlgen.engine.config import config_from_dict  # noqa: E402
from dmlgen.engine.logging import RunLogger  # noqa: E402
from dmlgen.engine.setup import DataSplits, SeededBatches, SeededDataset, build_loader  # noqa: E402
from dmlgen.engine.trainer import Trainer  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "baseline": [],
    "+mdr": [{"name": "mdr", "weight": 0.2}],
    "+lsd": [{"name": "lsd", "weight": 50.0}],
}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of the run: the issue's setting, or a tiny one for a CPU smoke check."""
    if args.tiny:
        return {"backbone": "resnet18", "image": 64, "stored": 48, "classes_per_batch": 4, "m": 4, "embedding": 64,
                "eval_n": 2_000, "eval_dim": 64}
    return {"backbone": "resnet50", "image": 224, "stored": 128, "classes_per_batch": 32, "m": 4, "embedding": 512,
            "eval_n": 60_000, "eval_dim": 512}


def device_description(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_splits(s: dict[str, Any], steps: int, seed: int = 0) -> DataSplits:
    """In-memory uint8 RGB images, enough for ``steps`` class-balanced batches in one epoch; a small test split
    (the trainer probes the model with it)."""
    rng = np.random.default_rng(seed)
    batch = s["classes_per_batch"] * s["m"]
    per_class = 4 * s["m"]
    classes = max(-(-steps * batch // per_class), 2 * s["classes_per_batch"])
    n, side = classes * per_class, s["stored"]
    images = rng.integers(0, 256, size=(n, 3, side, side), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    train_tf = build_transforms(TransformConfig(image_size=s["image"], random_resized_crop_scale=(0.08, 1.0),
                                                horizontal_flip=True, normalize_mean=tuple(MEAN),
                                                normalize_std=tuple(STD)), train=True)
    eval_tf = build_transforms(TransformConfig(image_size=s["image"], resize_to=s["image"],
                                               normalize_mean=tuple(MEAN), normalize_std=tuple(STD)), train=False)
    train = ArrayImageDataset(images, labels, transform=train_tf)
    test = ArrayImageDataset(images[:64], np.repeat(np.arange(16), 4), transform=eval_tf)
    return DataSplits(train=train, val=None, test=test)


def make_trainer(s: dict[str, Any], splits: DataSplits, regularizers: list[dict[str, Any]], out: str,
                 args: argparse.Namespace) -> Trainer:
    cfg = config_from_dict({
        "name": "gpu-train-benchmark",
        "out_dir": out,
        "data": {"dataset": "npz", "path": "synthetic", "image_size": s["image"], "channels": 3,
                 "classes_per_batch": s["classes_per_batch"], "samples_per_class": s["m"],
                 "num_workers": args.workers},
        "model": {"backbone": s["backbone"], "embedding_size": s["embedding"], "normalize": True, "imagenet": False},
        "loss": {"name": "multi_similarity", "params": {"alpha": 2.0, "beta": 40.0, "base": 0.5},
                 "miner": {"name": "multi_similarity", "params": {"epsilon": 0.1}}},
        "regularizers": regularizers,
        "optimizer": {"name": "adam", "lr": 1e-5, "weight_decay": 4e-4},
        "scheduler": {"name": "none"},
        # Two epochs so that LSD's weight (epoch / epochs) is not 0 in the measured epoch (the second).
        "train": {"epochs": 2, "max_steps_per_epoch": args.warmup + args.steps, "amp": True, "seed": 0,
                  "device": args.device, "log_every": 10},
    })
    trainer = Trainer(cfg, progress=False, splits=splits)
    to_channels_last(trainer.model)
    if trainer.teacher is not None:
        to_channels_last(trainer.teacher.model)
        trainer.teacher.refresh(trainer.model)  # a valid teacher, as after epoch 1
    trainer.state.epoch = 1
    return trainer


def to_channels_last(model: torch.nn.Module) -> None:
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(
        lambda module, inputs: (inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:]))


def cached_batches(trainer: Trainer, count: int) -> list[torch.Tensor]:
    """The first ``count`` training batches as the loader makes them, on the device."""
    batches = SeededBatches(trainer.sampler, seed=0, epoch=0, start_batch=0, num_batches=count)
    loader = build_loader(SeededDataset(trainer.splits.train), batches, trainer.cfg.data.num_workers, seed=0)
    return [images.to(trainer.device) for images, _, _ in loader]


def measure_bare(trainer: Trainer, cached: list[torch.Tensor], warmup: int) -> float:
    """Images/s of autocast forward + backward + optimizer step on cached batches (one sync at each end)."""
    model, optimizer, scaler, device = trainer.model, trainer.optimizer, trainer.scaler, trainer.device
    model.train()

    def step(images: torch.Tensor) -> None:
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=trainer.use_amp):
            embeddings = model(images)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(embeddings.float().sum()).backward()
        scaler.step(optimizer)
        scaler.update()

    for images in cached[:warmup]:
        step(images)
    synchronize(device)
    start = time.perf_counter()
    for images in cached[warmup:]:
        step(images)
    synchronize(device)
    return sum(len(b) for b in cached[warmup:]) / (time.perf_counter() - start)


def measure_full(trainer: Trainer, warmup: int, out: str) -> float:
    """Images/s of the engine's steps after ``warmup`` (each step ends with ``float(loss)``, a device sync)."""
    stamps: list[float] = []
    original = trainer._train_step

    def timed(images: torch.Tensor, labels: torch.Tensor) -> Any:
        result = original(images, labels)
        stamps.append(time.perf_counter())
        return result

    trainer._train_step = timed  # type: ignore[method-assign]
    trainer.state.step_in_epoch = 0
    logger = RunLogger(out, tensorboard=False)
    try:
        trainer._train_epoch(logger)
    finally:
        logger.close()
        trainer._train_step = original  # type: ignore[method-assign]
    batch = trainer.cfg.data.classes_per_batch * trainer.cfg.data.samples_per_class
    return (len(stamps) - 1 - warmup) * batch / (stamps[-1] - stamps[warmup])


def train_speed(s: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    splits = synthetic_splits(s, args.warmup + args.steps)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bare_ips = None
        for name, regs in VARIANTS.items():
            trainer = make_trainer(s, splits, regs, tmp, args)
            if bare_ips is None:
                cached = cached_batches(trainer, args.warmup + args.steps)
                bare_ips = statistics.median(measure_bare(trainer, cached, args.warmup) for _ in range(args.repeats))
                del cached
            full_ips = statistics.median(measure_full(trainer, args.warmup, tmp) for _ in range(args.repeats))
            out[name] = {"bare_ips": bare_ips, "full_ips": full_ips, "overhead": bare_ips / full_ips - 1}
            print(f"  {name:<10}bare {bare_ips:9.1f} img/s   full {full_ips:9.1f} img/s   "
                  f"overhead {100 * (bare_ips / full_ips - 1):6.1f}%", flush=True)
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def eval_speed(s: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from dmlgen.evaluation.evaluate import evaluate_embeddings

    x_np, y_np = make_data(s["eval_n"], s["eval_dim"], 0)
    x, y = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)

    def dmlgen_eval() -> dict[str, float]:
        got = evaluate_embeddings(x, y, metrics=["recall", "precision@1", "r_precision", "map@r"], ks=(1, 2, 4, 8))
        return {k: got[k] for k in ("precision@1", "r_precision", "map@r")}

    def pml_eval() -> dict[str, float]:
        from pytorch_metric_learning.distances import LpDistance
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import CustomKNN

        calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                  k="max_bin_count", knn_func=CustomKNN(LpDistance(normalize_embeddings=False),
                                                                        batch_size=args.pml_batch_size))
        got = calc.get_accuracy(x, y, x, y, ref_includes_query=True)
        return {"precision@1": got["precision_at_1"], "r_precision": got["r_precision"],
                "map@r": got["mean_average_precision_at_r"]}

    out: dict[str, Any] = {"n": s["eval_n"], "dim": s["eval_dim"]}
    for name, fn in (("dmlgen", dmlgen_eval), ("pml", pml_eval)):
        try:
            fn()  # warm-up: kernels, allocator
            times, values = [], {}
            for _ in range(args.repeats):
                synchronize(device)
                start = time.perf_counter()
                values = fn()
                synchronize(device)
                times.append(time.perf_counter() - start)
        except (RuntimeError, ImportError) as exc:  # e.g. PML's one-block kNN out of memory
            out[name] = {"error": str(exc).splitlines()[0]}
            print(f"  {name:<8}failed: {out[name]['error']}", flush=True)
            continue
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        out[name] = {"seconds": statistics.median(times), "values": {k: float(v) for k, v in values.items()},
                     "peak_gpu_gb": peak}
        print(f"  {name:<8}{statistics.median(times):8.2f} s" + (f"   peak {peak:.1f} GB" if peak else "")
              + "   " + "  ".join(f"{k}={v:.6f}" for k, v in values.items()), flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    if "values" in out.get("dmlgen", {}) and "values" in out.get("pml", {}):
        a, b = out["dmlgen"]["values"], out["pml"]["values"]
        out["max_abs_diff"] = max(abs(a[k] - b[k]) for k in a)
        out["dmlgen_vs_pml"] = out["dmlgen"]["seconds"] / out["pml"]["seconds"]
        print(f"  dmlgen / pml time {out['dmlgen_vs_pml']:.2f}x, max |metric difference| {out['max_abs_diff']:.1e}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a smoke check)")
    parser.add_argument("--tiny", action="store_true", help="ResNet-18, 64 px, batch 16, 2,000 x 64 evaluation")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 50; --tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 10; --tiny 1)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per number; the median is reported")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: min(8, CPUs); --tiny 0)")
    parser.add_argument("--pml-batch-size", type=int, default=None,
                        help="queries per block of PML's torch kNN (default: PML's, all at once)")
    parser.add_argument("--skip", choices=("train", "eval"), action="append", default=[])
    parser.add_argument("--json", help="write the device description and every number here")
    args = parser.parse_args()
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10)
    args.workers = args.workers if args.workers is not None else (0 if args.tiny else min(8, os.cpu_count() or 1))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or use --device cpu --tiny for a smoke check")
    torch.backends.cudnn.benchmark = True
    s = settings(args)
    info = device_description(device)
    print(f"device: {info['name']} ({info['device']}), torch {info['torch']}"
          + (f", CUDA {info['cuda']}" if "cuda" in info else "") + f", {info['cpus']} CPUs")
    result: dict[str, Any] = {"device": info, "settings": s, "steps": args.steps, "warmup": args.warmup,
                              "workers": args.workers}
    if "train" not in args.skip:
        print(f"training: {s['backbone']} at {s['image']} px, batch {s['classes_per_batch'] * s['m']} "
              f"({s['classes_per_batch']} classes x {s['m']}), AMP {device.type == 'cuda'}, channels-last, "
              f"{args.workers} workers, {args.steps} steps after {args.warmup}")
        result["train"] = train_speed(s, args, device)
    if "eval" not in args.skip:
        print(f"evaluation: {s['eval_n']:,} x {s['eval_dim']} embeddings on {device}")
        result["eval"] = eval_speed(s, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
