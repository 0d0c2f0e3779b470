"""Loss speed: forward + backward of each dmlgen loss (with its miner) against pytorch-metric-learning's same
loss and miner, at batch 256 (64 classes x 4) x 512-d, fp32, on the CPU.

Both libraries run interleaved in one process (the order alternates every repeat); each cell is the median
over ``--repeats`` timed calls after ``--warmup`` untimed ones. One call = miner + loss forward + backward
(gradients of the embeddings and of the loss's own parameters). The "same value" column compares the two
losses' values on one batch where the selection is deterministic (random miners draw different triplets).

Run:  .venv/bin/python benchmarks/loss_speed.py [--repeats 100] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

BATCH_CLASSES, PER_CLASS, DIM = 64, 4, 512


def make_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 embeddings ``(256, 512)`` and labels, like a batch in mid-training: class centres in a random
    8-dimensional subspace (so some classes are close) plus noise. Leave-one-out Recall@1 is 0.95; the loss
    sees about 50k semi-hard and 300 hard triplets (of 193k), 680 + 3600 multi-similarity pairs, and every
    loss is non-zero."""
    g = torch.Generator().manual_seed(seed)
    n = BATCH_CLASSES * PER_CLASS
    labels = torch.arange(BATCH_CLASSES).repeat_interleave(PER_CLASS)[torch.randperm(n, generator=g)]
    centres = F.normalize(torch.randn(BATCH_CLASSES, 8, generator=g) @ torch.randn(8, DIM, generator=g), dim=1)
    x = centres[labels] + 0.06 * torch.randn(n, DIM, generator=g)
    return x, labels


def cases() -> list[tuple[str, Callable[[], Any], Callable[[], Any], bool]]:
    """(name, build dmlgen (miner, loss), build PML (miner, loss), deterministic selection)."""
    import pytorch_metric_learning.losses as pl
    import pytorch_metric_learning.miners as pm

    import dmlgen.losses as dl

    def proxies_pair(ours: Any, theirs: Any, attr: str, transpose: bool) -> tuple[Any, Any]:
        with torch.no_grad():
            getattr(theirs, attr).copy_(ours.proxies.t() if transpose else ours.proxies)
        return ours, theirs

    def proxy_anchor() -> tuple[Any, Any]:
        return proxies_pair(dl.ProxyAnchorLoss(BATCH_CLASSES, DIM), pl.ProxyAnchorLoss(BATCH_CLASSES, DIM),
                            "proxies", False)

    def normalized_softmax() -> tuple[Any, Any]:
        return proxies_pair(dl.NormalizedSoftmaxLoss(BATCH_CLASSES, DIM), pl.NormalizedSoftmaxLoss(BATCH_CLASSES, DIM),
                            "W", True)

    pa, ns = proxy_anchor(), normalized_softmax()
    return [
        ("triplet + semihard",
         lambda: (dl.TripletMarginMiner(0.2, "semihard"), dl.TripletMarginLoss(0.2)),
         lambda: (pm.TripletMarginMiner(0.2, "semihard"), pl.TripletMarginLoss(0.2)), True),
        ("triplet + batch_hard",
         lambda: (dl.BatchHardMiner(), dl.TripletMarginLoss(0.2)),
         lambda: (pm.BatchHardMiner(), pl.TripletMarginLoss(0.2)), True),
        ("triplet + distance_weighted",
         lambda: (dl.DistanceWeightedMiner(0.5, 1.4), dl.TripletMarginLoss(0.2)),
         lambda: (pm.DistanceWeightedMiner(0.5, 1.4), pl.TripletMarginLoss(0.2)), False),
        ("contrastive (no miner)",
         lambda: (None, dl.ContrastiveLoss()),
         lambda: (None, pl.ContrastiveLoss()), True),
        ("margin + distance_weighted",
         lambda: (dl.DistanceWeightedMiner(0.5, 1.4, layout="one_per_anchor"),
                  dl.MarginLoss(num_classes=BATCH_CLASSES, denominator="active_hinges")),
         lambda: (pm.DistanceWeightedMiner(0.5, 1.4), pl.MarginLoss(learn_beta=True, num_classes=BATCH_CLASSES)),
         False),
        ("multi_similarity + MS miner",
         lambda: (dl.MultiSimilarityMiner(0.1), dl.MultiSimilarityLoss()),
         lambda: (pm.MultiSimilarityMiner(0.1), pl.MultiSimilarityLoss()), True),
        ("proxy_anchor", lambda: (None, pa[0]), lambda: (None, pa[1]), True),
        ("normalized_softmax", lambda: (None, ns[0]), lambda: (None, ns[1]), True),
    ]


def step(miner: Any, loss: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """One miner + loss forward + backward; returns the loss value."""
    x.grad = None
    for p in loss.parameters():
        p.grad = None
    indices = miner(x, y) if miner is not None else None
    value = loss(x, y, indices)
    value.backward()
    return float(value.detach())


def time_case(ours: tuple[Any, Any], theirs: tuple[Any, Any], x: torch.Tensor, y: torch.Tensor, repeats: int,
              warmup: int) -> tuple[list[float], list[float]]:
    times: dict[str, list[float]] = {"ours": [], "pml": []}
    impls = {"ours": ours, "pml": theirs}
    for r in range(warmup + repeats):
        order = ("ours", "pml") if r % 2 == 0 else ("pml", "ours")
        for name in order:
            start = time.perf_counter()
            step(*impls[name], x, y)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed * 1e3)
    return times["ours"], times["pml"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--only", nargs="*", help="substrings of the case names to run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = make_batch(0)
    x.requires_grad_(True)
    rows = []
    print(f"batch {len(y)} ({BATCH_CLASSES} classes x {PER_CLASS}) x {DIM}-d fp32, CPU, {args.threads} thread(s), "
          f"torch {torch.__version__}; median of {args.repeats} interleaved repeats")
    print(f"{'loss (+ miner)':32s} {'dmlgen ms':>10s} {'PML ms':>10s} {'ratio':>7s}  same value")
    for name, make_ours, make_theirs, deterministic in cases():
        if args.only and not any(s in name for s in args.only):
            continue
        ours, theirs = make_ours(), make_theirs()
        same = "-"
        if deterministic:
            v_o, v_p = step(*ours, x, y), step(*theirs, x, y)
            same = f"|diff| {abs(v_o - v_p):.1e}"
        t_o, t_p = time_case(ours, theirs, x, y, args.repeats, args.warmup)
        m_o, m_p = statistics.median(t_o), statistics.median(t_p)
        rows.append({"case": name, "dmlgen_ms": m_o, "pml_ms": m_p, "ratio": m_o / m_p, "same_value": same})
        print(f"{name:32s} {m_o:10.2f} {m_p:10.2f} {m_o / m_p:7.2f}  {same}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": args.threads, "repeats": args.repeats, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
