"""Allocator tuning (dmlgen.engine.allocator): the loss step with glibc's defaults and with freed memory kept.

Each measurement is a child process (the setting is process-wide): forward + backward of MDR's recipe loss step
(distance-weighted miner, triplet, MDR) at batch 256 x 512, one thread, median over ``--repeats`` steps after
``--warmup``. Children alternate (defaults, tuned, defaults, ...) ``--rounds`` times; the table gives each
round's medians and the ratio tuned / defaults.

Run:  .venv/bin/python benchmarks/allocator_speed.py [--rounds 3] [--repeats 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(repeats: int, warmup: int) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from loss_speed import make_batch
    from regularizer_speed import mdr_recipe_losses

    from dmlgen.engine.allocator import tune_glibc_malloc
    from dmlgen.losses.distances import shared_gram_matrices

    tuned = tune_glibc_malloc()
    torch.set_num_threads(1)
    x, labels = make_batch(0)
    miner, triplet, mdr = mdr_recipe_losses()
    times = []
    for r in range(warmup + repeats):
        emb = x.clone().requires_grad_(True)
        start = time.perf_counter()
        with shared_gram_matrices():
            total = triplet(emb, labels, miner(emb, labels)) + mdr.weight * mdr(emb, labels) + mdr.penalty()
        total.backward()
        if r >= warmup:
            times.append(time.perf_counter() - start)
    print(json.dumps({"tuned": tuned, "median_ms": 1000 * statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.repeats, args.warmup)
        return
    print("MDR recipe loss step, 256 x 512, 1 thread; median ms per child process")
    print("| round | glibc defaults | tuned | tuned / defaults |")
    print("|---:|---:|---:|---:|")
    ratios = []
    for r in range(args.rounds):
        result = {}
        for setting in ("0", "1"):
            env = {**os.environ, "DMLGEN_MALLOC_TUNING": setting, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats),
                                  "--warmup", str(args.warmup)], env=env, check=True, capture_output=True, text=True)
            result[setting] = json.loads(out.stdout.strip().splitlines()[-1])
        if not result["1"]["tuned"]:
            sys.exit("the tuning did not apply here (not Linux with glibc, or MALLOC_* variables set)")
        ratio = result["1"]["median_ms"] / result["0"]["median_ms"]
        ratios.append(ratio)
        print(f"| {r + 1} | {result['0']['median_ms']:.2f} | {result['1']['median_ms']:.2f} | {ratio:.2f} |")
    print(f"median ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
