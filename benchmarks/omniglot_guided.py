"""Guided DML on Omniglot: the same student trained three ways, several seeds (configs/omniglot/guided.yaml).

Variants (same student: convnet4 -> 128-d, same data, batches, optimiser, schedule and epochs):

  dml          the student trained by its DML loss alone (multi-similarity; ``method: {name: standard}``)
  guided       the paper's student: regression to the master's targets only (trains the seed's master)
  guided+dml   regression + 1.0 x the multi-similarity loss, from the same seed's master and targets
               (``method.params.master_checkpoint``: the master is trained once per seed, not twice)

Each run trains on the background alphabets minus 5 validation alphabets, selects the student's checkpoint by
validation MAP@R and tests it once on the 659 evaluation classes. The table gives Recall@1, MAP@R and NMI, mean
± 95% t-interval over seeds; then the master's training time and the targets' time per seed (stage wall times
from ``pipeline.json``). A run already finished (``test_metrics.json``) is reused; an interrupted one resumes
(single runs from ``last.ckpt``, pipelines stage by stage).

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/omniglot_guided.py [--seeds 0 1 2] [--out runs/bench-guided]
      [--variants dml guided guided+dml] [--set key=value ...]
(``--set method.*`` overrides apply to the guided variants only.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sweep import REPO, mean_ci, print_results  # noqa: E402

from dmlgen.engine.run import train  # noqa: E402

CONFIG = REPO / "configs" / "omniglot" / "guided.yaml"
TEST_METRICS = "eval.test_metrics=[recall, precision@1, r_precision, map@r, nmi]"
METRICS = ("recall@1", "map@r", "nmi")
VARIANTS = ("dml", "guided", "guided+dml")


def overrides_for(variant: str, out: Path, seed: int) -> list[str]:
    if variant == "dml":
        return ["method={name: standard}"]
    if variant == "guided":
        return []
    master = out / f"guided-seed{seed}" / "master" / "master.ckpt"
    return ["method.params.dml_weight=1.0", f"method.params.master_checkpoint={master}"]


def run_one(variant: str, seed: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """Train (or reuse / resume) one (variant, seed) run; its test result plus the wall time of this call."""
    run_dir = out / f"{variant}-seed{seed}"
    done, timing = run_dir / "test_metrics.json", run_dir / "wall_seconds.txt"
    if done.is_file():
        return json.loads(done.read_text())
    resume = (run_dir / "pipeline.json").is_file() or (run_dir / "last.ckpt").is_file()
    if variant == "dml":  # `method.*` overrides configure the guided method, which this variant replaces
        extra = [o for o in extra if not o.strip().startswith("method.")]
    start = time.perf_counter()
    result = train(CONFIG, [*overrides_for(variant, out, seed), f"train.seed={seed}", TEST_METRICS, *extra],
                   out_dir=run_dir, progress=False, resume=resume, overwrite=not resume)
    timing.write_text(f"{time.perf_counter() - start:.1f}\n")
    print(f"{variant} seed {seed}: {timing.read_text().strip()} s", flush=True)
    return result


def stage_seconds(result: dict[str, Any], stage: str) -> float:
    for row in result.get("pipeline", {}).get("stages", []):
        if row["name"] == stage and isinstance(row.get("seconds"), (int, float)):
            return float(row["seconds"])
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-guided")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    variants = list(args.variants)
    if "guided+dml" in variants and "guided" not in variants:
        variants.insert(variants.index("guided+dml"), "guided")  # it reuses the guided run's master
    # Seed by seed over all variants, so that an interrupted benchmark has comparable rows for the seeds it did.
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    masters: list[tuple[float, float]] = []
    for seed in args.seeds:
        for variant in variants:
            result = run_one(variant, seed, out, list(args.overrides))
            row: dict[str, Any] = {k: float(v) for k, v in result["test"].items()}
            row["selected_epoch"] = result["selected_epoch"]
            timing = out / f"{variant}-seed{seed}" / "wall_seconds.txt"
            row["wall_seconds"] = float(timing.read_text()) if timing.is_file() else float("nan")
            results[variant].append(row)
            if variant == "guided":
                masters.append((stage_seconds(result, "master"), stage_seconds(result, "targets")))
    print_results({v: results[v] for v in args.variants}, METRICS, args.seeds, out)
    if masters:
        m_mean, m_half = mean_ci([m for m, _ in masters])
        t_mean, t_half = mean_ci([t for _, t in masters])
        print(f"master training: {m_mean:.0f} ± {m_half:.0f} s per seed (seconds {[round(m) for m, _ in masters]}); "
              f"targets: {t_mean:.0f} ± {t_half:.0f} s; guided+dml reuses the seed's master and targets are "
              "recomputed in its own run; the wall times above are per run (guided includes its master)")


if __name__ == "__main__":
    main()
