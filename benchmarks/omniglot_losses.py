"""dmlgen's losses against pytorch-metric-learning's, trained the same way on Omniglot (issue 4).

For each loss config (triplet semi-hard, multi-similarity, proxy-anchor, normalized softmax) and seed, two
full training runs differ only in the loss object: dmlgen's (built from the config as usual) or PML's class
of the same name with the same parameters (and miner), swapped in through the trainer's criterion builder.
Same backbone, data, sampler, optimiser, budget and seed; the test metrics on the 659 unseen evaluation
classes are compared as mean ± 95% CI, and per seed as a paired difference.

Run:  .venv/bin/python benchmarks/omniglot_losses.py [--seeds 0 1 2] [--impls dmlgen pml]
      [--configs triplet_semihard multi_similarity proxy_anchor normalized_softmax]
      [--out runs/bench-losses] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sweep import Variant, markdown_table, mean_ci, run_variants  # noqa: E402

import dmlgen.engine.trainer as trainer_module  # noqa: E402
from dmlgen.engine.config import LossConfig  # noqa: E402

PML_LOSSES = {"triplet_margin": "TripletMarginLoss", "multi_similarity": "MultiSimilarityLoss",
              "proxy_anchor": "ProxyAnchorLoss", "normalized_softmax": "NormalizedSoftmaxLoss",
              "contrastive": "ContrastiveLoss", "margin": "MarginLoss"}
PML_MINERS = {"triplet_margin": "TripletMarginMiner", "multi_similarity": "MultiSimilarityMiner",
              "batch_hard": "BatchHardMiner"}
PER_CLASS = ("ProxyAnchorLoss", "NormalizedSoftmaxLoss")
METRICS = ("recall@1", "map@r", "r_precision", "nmi")


class PMLCriterion(nn.Module):
    """``criterion(embeddings, labels)`` with a pytorch-metric-learning loss and optional miner."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, indices)


def build_pml_criterion(cfg: LossConfig, num_classes: int, embedding_size: int | None = None) -> PMLCriterion:
    from pytorch_metric_learning import losses, miners

    name = PML_LOSSES[cfg.name]
    params: dict[str, Any] = dict(cfg.params)
    if name in PER_CLASS:
        params.setdefault("num_classes", num_classes)
        params.setdefault("embedding_size", embedding_size)
    loss = getattr(losses, name)(**params)
    miner = None
    if cfg.miner is not None:
        miner = getattr(miners, PML_MINERS[cfg.miner.name])(**dict(cfg.miner.params))
    return PMLCriterion(loss, miner)


@contextlib.contextmanager
def pml_losses() -> Iterator[None]:
    original = trainer_module.build_criterion
    trainer_module.build_criterion = build_pml_criterion  # type: ignore[assignment]
    try:
        yield
    finally:
        trainer_module.build_criterion = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+",
                        default=["triplet_semihard", "multi_similarity", "proxy_anchor", "normalized_softmax"])
    parser.add_argument("--impls", nargs="+", default=["dmlgen", "pml"], choices=["dmlgen", "pml"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-losses")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    results: dict[str, list[dict[str, Any]]] = {}
    for config in args.configs:
        for impl in args.impls:
            variant = Variant(f"{config}-{impl}", f"configs/omniglot/{config}.yaml")
            with pml_losses() if impl == "pml" else contextlib.nullcontext():
                results.update(run_variants([variant], args.seeds, args.out, args.overrides))

    print(f"\nOmniglot evaluation set (659 unseen classes), seeds {args.seeds}, mean ± 95% CI")
    print(markdown_table(results, METRICS))
    print("\npaired difference dmlgen − PML per seed (percentage points), mean ± 95% CI")
    for config in args.configs:
        mine, theirs = results.get(f"{config}-dmlgen"), results.get(f"{config}-pml")
        if not mine or not theirs:
            continue
        cells = []
        for m in ("recall@1", "map@r"):
            diffs = [100 * (a[m] - b[m]) for a, b in zip(mine, theirs, strict=True)]
            mean, half = mean_ci(diffs)
            cells.append(f"{m} {mean:+.2f} ± {half:.2f}")
        print(f"| {config} | " + " | ".join(cells) + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
