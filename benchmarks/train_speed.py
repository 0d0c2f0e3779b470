"""Training-loop overhead: a full Omniglot training epoch vs the bare model forward+backward.

For each baseline config (configs/omniglot/), in one process and on the same batches:

  full  the engine's epoch (Trainer._train_epoch): class-balanced sampling, DataLoader with the config's
        transforms and workers, mining, the loss, backward, optimizer step, logging
  bare  the same model on the same batches, pre-loaded as tensors: forward, ``embeddings.sum()``,
        backward and the same optimizer step (the "physical floor" of the model)

The two are interleaved (bare, full, bare, full, ...) and the median of ``--repeats`` epochs each is
reported, as images/s and overhead = full time / bare time - 1 (target: at most 15%).

Run:  .venv/bin/python benchmarks/train_speed.py [--repeats 3] [--configs triplet_semihard multi_similarity]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dmlgen.engine.config import load_config
from dmlgen.engine.logging import RunLogger
from dmlgen.engine.setup import SeededBatches, SeededDataset, build_loader
from dmlgen.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def measure(config: str, repeats: int, overrides: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "omniglot" / f"{config}.yaml", [f"out_dir={tmp}", *overrides])
        trainer = Trainer(cfg, progress=False)
        logger = RunLogger(tmp, tensorboard=False)
        steps = trainer.steps_per_epoch
        # the epoch's batches, materialised once for the bare loop
        batches = SeededBatches(trainer.sampler, seed=cfg.train.seed, epoch=0, start_batch=0, num_batches=steps)
        loader = build_loader(SeededDataset(trainer.splits.train), batches, cfg.data.num_workers, seed=cfg.train.seed)
        cached = [(images.clone(), labels.clone()) for images, labels, _ in loader]
        images_per_epoch = sum(len(labels) for _, labels in cached)
        model, optimizer = trainer.model, trainer.optimizer

        def bare() -> float:
            model.train()
            start = time.perf_counter()
            for images, _ in cached:
                embeddings = model(images)
                optimizer.zero_grad(set_to_none=True)
                embeddings.sum().backward()
                optimizer.step()
            return time.perf_counter() - start

        def full() -> float:
            trainer.state.step_in_epoch = 0
            start = time.perf_counter()
            trainer._train_epoch(logger)
            return time.perf_counter() - start

        bare()  # warm-up: allocator, thread pool, first-call dispatch
        bare_s, full_s = [], []
        for _ in range(repeats):
            bare_s.append(bare())
            full_s.append(full())
        logger.close()
    b, f = statistics.median(bare_s), statistics.median(full_s)
    return {"steps": steps, "images": images_per_epoch, "bare_s": b, "full_s": f,
            "bare_ips": images_per_epoch / b, "full_ips": images_per_epoch / f, "overhead": f / b - 1,
            "num_workers": cfg.data.num_workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["triplet_semihard", "multi_similarity"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. data.num_workers=1")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} interleaved epochs")
    print(f"{'config':<18}{'steps':>6}{'images':>8}{'bare s':>8}{'full s':>8}{'bare img/s':>12}"
          f"{'full img/s':>12}{'overhead':>10}")
    for name in args.configs:
        r = measure(name, args.repeats, args.overrides)
        print(f"{name:<18}{r['steps']:>6}{r['images']:>8}{r['bare_s']:>8.1f}{r['full_s']:>8.1f}"
              f"{r['bare_ips']:>12.0f}{r['full_ips']:>12.0f}{100 * r['overhead']:>9.1f}%", flush=True)


if __name__ == "__main__":
    main()
