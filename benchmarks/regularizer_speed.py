"""Regularizer overhead (issue 5): what MDR adds to the loss step, and what LSD costs per training step.

MDR, at batch 256 (64 classes x 4) x 512-d fp32, forward + backward of the loss step with and without MDR.
The target row is MDR's recipe (methods.md §3.2-3.3), whose "Triplet" baseline is the same step with λ = 0:
the head's mean-distance scaling ("learning without L2 norm"), the distance-weighted miner (``all_pos_pairs``)
and the triplet loss (margin 0.2, Euclidean distance of the scaled, un-normalised embeddings). Target: MDR adds
at most 20% to it. Also shown: the same outside a step block (nothing shared), and the miner and triplet loss
on unscaled embeddings, where MDR has no distance matrix to share and runs its own backward product.

LSD: one full training step (student forward, multi-similarity loss + miner, backward, Adam step) with and
without LSD, against the bare teacher forward (the epoch snapshot in eval mode, no gradients) that LSD needs
on the same batch, and the LSD loss alone (forward + backward on fixed embeddings). "LSD extra / teacher
forward" near 1 means LSD costs the teacher forward and nothing more.
Backbones: convnet4 at 28 px (the Omniglot configs, batch 128) and resnet18 at 112 px (batch 64).

The losses run inside ``shared_gram_matrices()`` as the trainer runs every step: one batch-by-batch product
for the scaling, the miner and MDR, and one distance matrix whose backward product serves the scaling and MDR.
The last table times the recipe's whole loss step, also with the scaling's former (N, N, D) formulation.

Both variants of each comparison run interleaved in one process (the order alternates every repeat); each time
cell is the median over ``--repeats`` timed calls after ``--warmup`` untimed ones. "MDR adds" is the median of
the per-repeat differences over the median loss step, which a shared machine's drift moves less than a
difference of two medians.

Run:  .venv/bin/python benchmarks/regularizer_speed.py [--repeats 50] [--threads 1] [--parts mdr lsd] [--tuned-malloc]
      [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_speed import make_batch  # noqa: E402

import dmlgen.losses as dl  # noqa: E402
from dmlgen.engine.allocator import tune_glibc_malloc  # noqa: E402
from dmlgen.engine.config import ModelConfig  # noqa: E402
from dmlgen.engine.setup import build_model_from_config  # noqa: E402
from dmlgen.engine.teacher import EpochSnapshotTeacher  # noqa: E402
from dmlgen.losses.distances import euclidean_distance_matrix, shared_gram_matrices  # noqa: E402
from dmlgen.losses.regularizers import ListwiseSelfDistillation, MDRRegularizer, mdr_loss  # noqa: E402
from dmlgen.models.heads import scale_by_mean_distance  # noqa: E402


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each call of each function, ``repeats`` each, calls interleaved and the order alternated per
    repeat (so entry r of every list comes from the same stretch of time)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function (:func:`interleaved_times`)."""
    return {n: statistics.median(t) for n, t in interleaved_times(fns, repeats, warmup).items()}


def added_fraction(base: list[float], more: list[float]) -> float:
    """Median of the paired differences ``more[r] - base[r]`` over the median of ``base``: what a second variant
    adds, robust to the drift of a shared machine (both calls of a pair run back to back)."""
    return statistics.median(m - b for b, m in zip(base, more)) / statistics.median(base)


def mdr_recipe_losses() -> tuple[dl.DistanceWeightedMiner, dl.TripletMarginLoss, MDRRegularizer]:
    """MDR's recipe: DW miner over all positive pairs, triplet margin 0.2 on un-normalised distances, MDR λ 0.6."""
    miner = dl.DistanceWeightedMiner(lower=0.5, upper=1.4, layout="all_pos_pairs",
                                     generator=torch.Generator().manual_seed(0))
    triplet = dl.TripletMarginLoss(margin=0.2, distance={"name": "lp", "normalize_embeddings": False})
    return miner, triplet, MDRRegularizer(weight=0.6)


def mdr_overhead(repeats: int, warmup: int) -> dict[str, float]:
    features, labels = make_batch(0)
    miner, triplet, mdr = mdr_recipe_losses()

    def step(scaled: bool, with_mdr: bool, shared: bool = True) -> None:
        f = features.clone().requires_grad_(True)
        with shared_gram_matrices() if shared else contextlib.nullcontext():  # the trainer opens one per step
            emb = scale_by_mean_distance(f) if scaled else f
            total = triplet(emb, labels, miner(emb, labels))
            if with_mdr:
                total = total + mdr.weight * mdr(emb, labels) + mdr.penalty()
        total.backward()

    def mdr_only() -> None:
        emb = features.clone().requires_grad_(True)
        (mdr(emb, labels) + mdr.penalty()).backward()

    def mdr_autograd() -> None:
        # The same value through the functional core and autograd (what the module computed before its closed
        # form): the module's speed-up, measured in the same run.
        emb = features.clone().requires_grad_(True)
        dist = euclidean_distance_matrix(emb)
        (mdr_loss(dist, mdr.running_mean, mdr.running_std, mdr.levels) + mdr.penalty()).backward()

    raw = interleaved_times({
        "recipe": lambda: step(True, False), "recipe+mdr": lambda: step(True, True),
        "recipe+mdr_unshared": lambda: step(True, True, shared=False),
        "triplet": lambda: step(False, False), "triplet+mdr": lambda: step(False, True),
        "mdr": mdr_only, "mdr_autograd": mdr_autograd}, repeats, warmup)
    return {**{f"{k}_ms": 1000 * statistics.median(v) for k, v in raw.items()},
            "recipe_added_fraction": added_fraction(raw["recipe"], raw["recipe+mdr"]),
            "recipe_unshared_added_fraction": added_fraction(raw["recipe"], raw["recipe+mdr_unshared"]),
            "triplet_added_fraction": added_fraction(raw["triplet"], raw["triplet+mdr"])}


def scale_by_mean_distance_pairwise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The head's scaling as it was before the Gram-based matrix: an (N, N, D) difference tensor."""
    n = x.shape[0]
    sq = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(dim=2)
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return x / (sq[off].clamp_min(1e-12).sqrt().mean() + eps)


def recipe_loss_step(repeats: int, warmup: int) -> dict[str, float]:
    """MDR's whole recipe after the backbone (scaling, DW miner, triplet, MDR; 256 x 512) in a step block, against
    the same with the scaling's former (N, N, D) formulation (outside a block, as it ran then)."""
    features, labels = make_batch(0)
    miner, triplet, mdr = mdr_recipe_losses()

    def step(scale: Callable[[torch.Tensor], torch.Tensor], shared: bool) -> None:
        f = features.clone().requires_grad_(True)
        with shared_gram_matrices() if shared else contextlib.nullcontext():
            emb = scale(f)
            total = triplet(emb, labels, miner(emb, labels)) + mdr.weight * mdr(emb, labels) + mdr.penalty()
        total.backward()

    t = interleaved({"shared": lambda: step(scale_by_mean_distance, True),
                     "pairwise_scaling": lambda: step(scale_by_mean_distance_pairwise, False)},
                    max(3, repeats // 10), min(warmup, 2))
    return {f"{k}_ms": 1000 * v for k, v in t.items()}


def lsd_cost(backbone: str, size: int, channels: int, classes: int, per_class: int, repeats: int,
             warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model_from_config(ModelConfig(backbone=backbone, embedding_size=128), channels, pretrained=False)
    model.train()
    teacher = EpochSnapshotTeacher(model)
    teacher.refresh(model)
    loss = dl.MultiSimilarityLoss()
    miner = dl.MultiSimilarityMiner()
    lsd = ListwiseSelfDistillation(weight=50.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(classes * per_class, channels, size, size, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)

    def step(with_lsd: bool) -> None:
        emb = model(images)
        total = loss(emb, labels, miner(emb, labels))
        if with_lsd:
            total = total + lsd.weight * lsd(emb, labels, teacher(images))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    with torch.no_grad():
        student_emb, teacher_emb = model(images), teacher(images)

    def lsd_only() -> None:
        emb = student_emb.clone().requires_grad_(True)
        lsd(emb, labels, teacher_emb).backward()

    t = interleaved({"step": lambda: step(False), "step+lsd": lambda: step(True),
                     "teacher_forward": lambda: teacher(images), "lsd_loss": lsd_only}, repeats, warmup)
    extra = t["step+lsd"] - t["step"]
    return {**{f"{k}_ms": 1000 * v for k, v in t.items()}, "lsd_extra_ms": 1000 * extra,
            "lsd_extra_over_teacher_forward": extra / t["teacher_forward"],
            "lsd_added_fraction": extra / t["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--tuned-malloc", action="store_true",
                        help="apply the allocator settings the dmlgen command uses (engine/allocator.py) first")
    parser.add_argument("--parts", nargs="+", choices=["mdr", "lsd"], default=["mdr", "lsd"],
                        help="which comparisons to run (default: both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tuned_malloc and not tune_glibc_malloc():
        parser.error("--tuned-malloc: the allocator settings could not be applied (not glibc, or opted out)")

    results: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__, "tuned_malloc": args.tuned_malloc}
    if "mdr" in args.parts:
        results["mdr"] = mdr_overhead(args.repeats, args.warmup)
        m = results["mdr"]
        print(f"MDR at 256 x 512, {args.threads} thread(s), median of {args.repeats}")
        print("| loss step | without MDR (ms) | with MDR (ms) | MDR adds | target |")
        print("|---|---:|---:|---:|---:|")
        print(f"| recipe: scaling + DW miner + triplet | {m['recipe_ms']:.2f} | {m['recipe+mdr_ms']:.2f} | "
              f"{100 * m['recipe_added_fraction']:+.1f}% | <= 20% |")
        print(f"| recipe, no step block (nothing shared) | {m['recipe_ms']:.2f} | {m['recipe+mdr_unshared_ms']:.2f} | "
              f"{100 * m['recipe_unshared_added_fraction']:+.1f}% | |")
        print(f"| unscaled embeddings: DW miner + triplet | {m['triplet_ms']:.2f} | {m['triplet+mdr_ms']:.2f} | "
              f"{100 * m['triplet_added_fraction']:+.1f}% | |")
        print(f"\nMDR alone (forward + backward): {m['mdr_ms']:.2f} ms; by autograd through mdr_loss: "
              f"{m['mdr_autograd_ms']:.2f} ms")
        results["recipe"] = r = recipe_loss_step(args.repeats, args.warmup)
        print("\nMDR's recipe after the backbone: mean-distance scaling + DW miner + triplet + MDR, 256 x 512")
        print("| in a step block (ms) | with the old (N, N, D) scaling (ms) |")
        print("|---:|---:|")
        print(f"| {r['shared_ms']:.2f} | {r['pairwise_scaling_ms']:.1f} |")
    if "lsd" in args.parts:
        settings = [("convnet4", 28, 1, 32, 4, args.repeats), ("resnet18", 112, 3, 16, 4, max(5, args.repeats // 5))]
        print("\nLSD per training step (multi-similarity loss, Adam)")
        print("| backbone | batch | step (ms) | step + LSD (ms) | LSD extra (ms) | teacher forward (ms) | "
              "LSD loss alone (ms) | extra / teacher fwd | extra / step |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for backbone, size, channels, classes, per_class, reps in settings:
            r = lsd_cost(backbone, size, channels, classes, per_class, reps, min(args.warmup, reps))
            results[f"lsd_{backbone}"] = r
            print(f"| {backbone} {size} px | {classes * per_class} | {r['step_ms']:.1f} | {r['step+lsd_ms']:.1f} | "
                  f"{r['lsd_extra_ms']:.1f} | {r['teacher_forward_ms']:.1f} | {r['lsd_loss_ms']:.2f} | "
                  f"{r['lsd_extra_over_teacher_forward']:.2f} | {100 * r['lsd_added_fraction']:+.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
