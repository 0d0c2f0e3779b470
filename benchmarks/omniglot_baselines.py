"""Omniglot test results of the shipped baselines over several seeds, mean +- 95% confidence interval.

Each (config, seed) is one full ``dmlgen train`` run of configs/omniglot/<config>.yaml with
``train.seed`` set: training on the background alphabets minus the held-out validation alphabets,
checkpoint chosen by validation MAP@R, one test evaluation on the 659 unseen evaluation classes.

Run:  .venv/bin/python benchmarks/omniglot_baselines.py [--seeds 0 1 2] [--out runs/bench-baselines]
      [--configs triplet_semihard multi_similarity] [--set key=value ...]
Runs that already finished (test_metrics.json present) are reused, so an interrupted sweep continues.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from dmlgen.engine.run import baseline_config, train

METRICS = ("recall@1", "map@r", "r_precision", "nmi")
# two-sided 95% Student t quantiles for n - 1 degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t confidence interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = _T95.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["triplet_semihard", "multi_similarity"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-baselines")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {}
    for name in args.configs:
        for seed in args.seeds:
            run_dir = Path(args.out) / f"{name}-seed{seed}"
            done = run_dir / "test_metrics.json"
            if done.is_file():
                result = json.loads(done.read_text())
            else:
                start = time.perf_counter()
                result = train(baseline_config(name), [f"train.seed={seed}", *args.overrides], out_dir=run_dir,
                               progress=False, overwrite=True)
                print(f"{name} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
            row = {m: float(result["test"][m]) for m in METRICS}
            row["selected_epoch"] = result["selected_epoch"]
            results.setdefault(name, []).append(row)

    print(f"\nOmniglot evaluation set (659 unseen classes), seeds {args.seeds}, mean +- 95% CI")
    print("| config | " + " | ".join(METRICS) + " | selected epochs |")
    print("|---|" + "---:|" * (len(METRICS) + 1))
    for name, rows in results.items():
        cells = []
        for m in METRICS:
            mean, half = mean_ci([r[m] for r in rows])
            cells.append(f"{100 * mean:.2f} ± {100 * half:.2f}")
        epochs = ", ".join(str(r["selected_epoch"]) for r in rows)
        print(f"| {name} | " + " | ".join(cells) + f" | {epochs} |")
    (Path(args.out) / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
