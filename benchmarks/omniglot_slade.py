"""SLADE on Omniglot (configs/omniglot/slade.yaml): teacher vs SLADE student vs a model given all labels.

Protocol: 5 background alphabets validate, 15 of the other 25 lose their labels (the unlabeled pool), the
10 left are labeled; test = the 659 classes of the evaluation alphabets (leave-one-out). Per seed:

  slade        the pipeline as configured: ssl -> teacher -> pseudo labels -> student rounds. Rows:
               ``teacher`` (labeled only, its own test result) and ``student r`` for every round.
  no-pairs     control: the same pipeline with ``lambda_unlabeled = 0``, i.e. the student trains as long, with
               the labeled loss and the basis, but without the selected unlabeled pairs. Its ssl / teacher /
               pseudo-label stages are copied from the slade run (identical configs, so the pipeline's cache
               treats them as done) and only the student trains.
  all-labels   upper bound: ``method: standard`` on all 25 training alphabets with their labels, as many epochs
               as teacher + students together, its backbone initialised from the slade run's SSL checkpoint
               (SSL saw the same images).

Printed: Recall@1 and MAP@R on the test split, mean ± 95% CI over the seeds; the purity of each round's pseudo
labels (NMI against the hidden labels) and the precision of the student's selected pairs (last epoch; hidden
labels are read for this report only). ``summary.json`` holds every number.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/omniglot_slade.py [--seeds 0 1 2] [--out runs/bench-slade]
      [--variants slade no-pairs all-labels] [--set key=value ...]   (overrides go to every variant)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sweep import REPO, mean_ci  # noqa: E402

from dmlgen.engine.checkpoint import load_checkpoint  # noqa: E402
from dmlgen.engine.config import load_config  # noqa: E402
from dmlgen.engine.pipeline import PIPELINE_FILE, stage_record  # noqa: E402
from dmlgen.engine.run import train  # noqa: E402

CONFIG = "configs/omniglot/slade.yaml"
VARIANTS = ("slade", "no-pairs", "all-labels")
METRICS = ("recall@1", "map@r")


def run_one(run_dir: Path, overrides: list[str], *, seeded: bool = False) -> dict[str, Any]:
    """Train (or finish, or reuse) one run of CONFIG into ``run_dir``; returns its test_metrics.json content.

    ``seeded``: ``run_dir`` already holds stages copied from another run (:func:`seed_cache`), which a fresh
    start must keep (no overwrite)."""
    done = run_dir / "test_metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    # A pipeline (or a plain run) stopped part-way continues where it stopped.
    resume = (run_dir / PIPELINE_FILE).is_file() or (run_dir / "last.ckpt").is_file()
    start = time.perf_counter()
    result = train(REPO / CONFIG, overrides, out_dir=run_dir, progress=False, resume=resume,
                   overwrite=not resume and not seeded)
    seconds = time.perf_counter() - start
    (run_dir / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    print(f"{run_dir.name}: {seconds:.0f} s", flush=True)
    return result


def seed_cache(source: Path, target: Path) -> None:
    """Copy the slade run's shared stages (ssl, teacher, pseudo1) into a control run that has not started."""
    if (target / PIPELINE_FILE).is_file() or not (source / PIPELINE_FILE).is_file():
        return
    target.mkdir(parents=True, exist_ok=True)
    for stage in ("ssl", "teacher", "pseudo1"):
        if (source / stage).is_dir() and not (target / stage).exists():
            shutil.copytree(source / stage, target / stage)


def test_row(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result["test"].items() if isinstance(v, (int, float))}


def student_selection(run_dir: Path, stage: str) -> dict[str, float]:
    """Precision of the selected unlabeled pairs in the student's last epoch (hidden labels, report only)."""
    row = load_checkpoint(run_dir / stage / "last.ckpt")["history"][-1]
    out = {}
    for side in ("pos", "neg"):
        selected, true = row.get(f"train_selected_{side}"), row.get(f"train_selected_{side}_true")
        if selected and true is not None:
            out[f"{side}_precision"] = true / selected
            out[f"{side}_per_step"] = selected
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-slade")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    user = list(args.overrides)
    rows: dict[str, list[dict[str, float]]] = {}
    purity: dict[int, list[float]] = {}
    selection: dict[str, list[dict[str, float]]] = {}

    for seed in args.seeds:
        base = [f"train.seed={seed}", *user]
        cfg = load_config(REPO / CONFIG, base)
        p = cfg.method.parsed_params()
        rounds = p.rounds
        slade_dir = out / f"slade-seed{seed}"
        result = run_one(slade_dir, base)  # every variant needs it: the others reuse its stages
        if "slade" in args.variants:
            rows.setdefault("teacher (labeled only)", []).append(test_row(stage_record(slade_dir, "teacher")["result"]))
            for r in range(1, rounds + 1):
                record = stage_record(slade_dir, f"student{r}")["result"]
                rows.setdefault(f"SLADE student, round {r}", []).append(test_row(record))
                nmi = json.loads((slade_dir / f"pseudo{r}" / "pseudo_labels.json").read_text())["nmi"]
                purity.setdefault(r, []).append(float(nmi))
                selection.setdefault(f"round {r}", []).append(student_selection(slade_dir, f"student{r}"))
            assert result["test"] == stage_record(slade_dir, f"student{rounds}")["result"]["test"]
        if "no-pairs" in args.variants:
            control = out / f"no-pairs-seed{seed}"
            seed_cache(slade_dir, control)
            result = run_one(control, [*base, "method.params.lambda_unlabeled=0.0"], seeded=True)
            rows.setdefault(f"no-pairs student (lambda_unlabeled 0), round {rounds}", []).append(test_row(result))
        if "all-labels" in args.variants:
            epochs = (p.teacher_epochs or cfg.train.epochs) + rounds * (p.student_epochs or cfg.train.epochs)
            extra = ["data.unlabeled=null", "method={name: standard, params: {}}", f"train.epochs={epochs}"]
            if p.ssl is not None:
                extra += [f"model.weights={(slade_dir / 'ssl' / 'best.ckpt').resolve()}", "model.imagenet=false"]
            result = run_one(out / f"all-labels-seed{seed}", [*base, *extra])
            rows.setdefault(f"all labels (upper bound, {epochs} epochs)", []).append(test_row(result))

    print(f"\nOmniglot evaluation set (659 unseen classes), seeds {args.seeds}, mean ± 95% CI, in %")
    print("| model | " + " | ".join(METRICS) + " |")
    print("|---|" + "---:|" * len(METRICS))
    for name, values in rows.items():
        cells = []
        for m in METRICS:
            mean, half = mean_ci([v[m] for v in values])
            cells.append(f"{100 * mean:.2f} ± {100 * half:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if purity:
        print("\npseudo-label purity (NMI against the hidden labels of the unlabeled pool), mean ± 95% CI:")
        for r, values in purity.items():
            mean, half = mean_ci(values)
            print(f"  round {r}: {100 * mean:.2f} ± {100 * half:.2f}")
    if selection:
        print("\nselected unlabeled pairs in the student's last epoch (per step; precision by the hidden labels):")
        for name, values in selection.items():
            parts = []
            for side in ("pos", "neg"):
                if all(f"{side}_precision" in v for v in values):
                    prec = mean_ci([v[f"{side}_precision"] for v in values])[0]
                    count = mean_ci([v[f"{side}_per_step"] for v in values])[0]
                    parts.append(f"{side} {count:.0f}/step at precision {100 * prec:.1f}%")
            print(f"  {name}: " + ", ".join(parts))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "purity": purity, "selection": selection,
                                                  "seeds": args.seeds, "overrides": user}, indent=2))
    run_walls = {d.name: float((d / "wall_seconds.txt").read_text()) for d in sorted(out.iterdir())
                 if (d / "wall_seconds.txt").is_file()}
    if run_walls:
        print("\nwall seconds per run: " + ", ".join(f"{k} {v:.0f}" for k, v in run_walls.items()))


if __name__ == "__main__":
    main()
