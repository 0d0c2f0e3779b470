"""Shared by the Omniglot quality benchmarks: run named variants over seeds, tabulate mean ± 95% CI.

A variant is a config file plus ``--set`` overrides. Each (variant, seed) is one full ``dmlgen train`` run
(train on the background alphabets minus the validation ones, checkpoint by validation MAP@R, one test
evaluation on the 659 evaluation classes). Finished runs (``test_metrics.json`` present) are reused and
unfinished ones resume from their ``last.ckpt``, so an interrupted sweep continues where it stopped (the
wall time of a resumed run counts only its last part).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmlgen.engine.run import train

# two-sided 95% Student t quantiles for n - 1 degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Variant:
    """``name``: row label; ``config``: path relative to the repository; ``overrides``: ``key=value``."""

    name: str
    config: str
    overrides: tuple[str, ...] = field(default_factory=tuple)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t confidence interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = _T95.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def run_variants(variants: Sequence[Variant], seeds: Sequence[int], out: str | Path,
                 extra_overrides: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Train every (variant, seed) not yet done; return ``{variant: [result per seed]}`` with the test
    metrics, the selected epoch and the wall time of the run."""
    results: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        for seed in seeds:
            run_dir = Path(out) / f"{variant.name}-seed{seed}"
            done = run_dir / "test_metrics.json"
            timing = run_dir / "wall_seconds.txt"
            if done.is_file():
                result = json.loads(done.read_text())
            else:
                # A run stopped part-way (Ctrl-C, end of a session) continues from its last.ckpt.
                resume = (run_dir / "last.ckpt").is_file()
                start = time.perf_counter()
                result = train(REPO / variant.config, [*variant.overrides, f"train.seed={seed}", *extra_overrides],
                               out_dir=run_dir, progress=False, overwrite=not resume, resume=resume)
                timing.write_text(f"{time.perf_counter() - start:.1f}\n")
                print(f"{variant.name} seed {seed}: {timing.read_text().strip()} s", flush=True)
            row = {k: float(v) for k, v in result["test"].items()}
            row["selected_epoch"] = result["selected_epoch"]
            row["wall_seconds"] = float(timing.read_text()) if timing.is_file() else float("nan")
            results.setdefault(variant.name, []).append(row)
    return results


def markdown_table(results: dict[str, list[dict[str, Any]]], metrics: Sequence[str], scale: float = 100.0) -> str:
    """One row per variant: ``mean ± CI`` per metric (× ``scale``), then the selected epochs."""
    lines = ["| variant | " + " | ".join(metrics) + " | selected epochs |",
             "|---|" + "---:|" * (len(metrics) + 1)]
    for name, rows in results.items():
        cells = []
        for m in metrics:
            factor = 1.0 if m.startswith("rho") or m.startswith("pi") else scale
            mean, half = mean_ci([r[m] for r in rows])
            cells.append(f"{factor * mean:.2f} ± {factor * half:.2f}" if factor != 1.0
                         else f"{mean:.3f} ± {half:.3f}")
        epochs = ", ".join(str(r["selected_epoch"]) for r in rows)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {epochs} |")
    return "\n".join(lines)


def print_results(results: dict[str, list[dict[str, Any]]], metrics: Sequence[str], seeds: Sequence[int],
                  out: str | Path) -> None:
    """The test table on the Omniglot evaluation set, mean wall time per variant, and ``summary.json``."""
    print(f"\nOmniglot evaluation set (659 unseen classes), seeds {list(seeds)}, mean ± 95% CI")
    print(markdown_table(results, metrics))
    walls = {name: mean_ci([r["wall_seconds"] for r in rows])[0] for name, rows in results.items()}
    print("mean wall seconds per run: " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.json").write_text(json.dumps(results, indent=2))


def weight_sweep(name: str, weights: Sequence[str], sweeps: dict[str, tuple[str, str]], seed: int,
                 out: str | Path, overrides: Sequence[str]) -> None:
    """Validation-only sweep of one weight: ``sweeps[name] = (config, override template with {w})``; trains one
    seed per weight under ``out/sweep`` and prints the validation MAP@R of each selected epoch (no test numbers)."""
    if name not in sweeps or not weights:
        raise SystemExit(f"--sweep takes one of {', '.join(sweeps)} and at least one weight")
    config, template = sweeps[name]
    variants = [Variant(f"{name}-w{w}", config, (template.format(w=w),)) for w in weights]
    folder = Path(out) / "sweep"
    run_variants(variants, [seed], folder, overrides)
    print(f"\nvalidation MAP@R of the selected epoch, seed {seed} ({name} weight sweep)")
    for v in variants:
        run = json.loads((folder / f"{v.name}-seed{seed}" / "test_metrics.json").read_text())
        print(f"| {v.name} | {100 * run['val_score']:.2f} | epoch {run['selected_epoch']} |")
