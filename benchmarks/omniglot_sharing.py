"""Sharing Matters and its MIC option on Omniglot against the margin-loss baseline: same budget, several seeds.

Variants (configs/omniglot/*.yaml; every one trains the class head with the same margin loss, so the rows
differ only in the method):

  margin            margin.yaml (method: standard), the baseline
  sharing           sharing.yaml: random surrogate groups (variant A), alternating steps (the reference)
  sharing-summed    sharing_summed.yaml: DiVA-style summed objective, variant D on the class batch
  mic               mic.yaml: k-means pseudo labels on class-standardised features (MIC option)

Every run is scored on the test split with the class head (the reference's test embedding, also what the
validation selected the checkpoint with); the Sharing rows are scored a second time with the concatenation
of both heads (``eval_embedding: concat``, weights 1 / 1) from the same selected checkpoint, marked
``[concat]``. Test metrics: Recall@1, MAP@R, NMI and the spectral decay ρ (mode 1), mean ± 95% CI.

Weight sweep (validation split only, one seed): ``--sweep adv 100 500 2000`` (λ_adv of sharing.yaml) or
``--sweep shared 0.1 0.3 1.0`` (α_shared of sharing_summed.yaml) prints the validation MAP@R of the selected
epoch for each weight; test numbers are not looked at.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/omniglot_sharing.py [--seeds 0 1 2]
      [--out runs/bench-sharing] [--variants ...] [--set key=value ...] [--sweep adv|shared W ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sweep import Variant, print_results, run_variants, weight_sweep  # noqa: E402

TEST_METRICS_LIST = ["recall", "precision@1", "r_precision", "map@r", "nmi", "ami", "rho"]
TEST_METRICS = f"eval.test_metrics=[{', '.join(TEST_METRICS_LIST)}]"
VARIANTS = {
    "margin": Variant("margin", "configs/omniglot/margin.yaml"),
    "sharing": Variant("sharing", "configs/omniglot/sharing.yaml"),
    "sharing-summed": Variant("sharing-summed", "configs/omniglot/sharing_summed.yaml"),
    "mic": Variant("mic", "configs/omniglot/mic.yaml"),
}
SWEEPS = {  # name -> (config, the override that sets the weight)
    "adv": ("configs/omniglot/sharing.yaml", "method.params.adv_weight={w}"),
    "shared": ("configs/omniglot/sharing_summed.yaml", "method.params.shared_weight={w}"),
}
METRICS = ("recall@1", "map@r", "nmi", "rho@1")


def concat_test_metrics(run_dir: Path) -> dict[str, float]:
    """Test metrics of the run's selected checkpoint with both heads concatenated (cached in the run folder)."""
    cache = run_dir / "test_metrics_concat.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from dmlgen.engine.run import load_trained_model
    from dmlgen.engine.setup import build_splits, embed_dataset
    from dmlgen.evaluation.evaluate import evaluate_embeddings

    model, cfg = load_trained_model(run_dir / "best.ckpt")
    model.eval_embedding = "concat"  # type: ignore[assignment]
    test = build_splits(cfg.data).test
    emb, labels = embed_dataset(model, test, batch_size=cfg.eval.batch_size, device=next(model.parameters()).device)
    result = evaluate_embeddings(emb, labels, metrics=TEST_METRICS_LIST, ks=tuple(cfg.eval.ks),
                                 metric=cfg.eval.distance, seed=cfg.train.seed)
    cache.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-sharing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sweep", nargs="+", metavar=("WEIGHT", "VALUE"),
                        help="validation sweep of adv (λ_adv, sharing.yaml) or shared (α_shared, "
                             "sharing_summed.yaml)")
    args = parser.parse_args()

    if args.sweep:
        weight_sweep(args.sweep[0], args.sweep[1:], SWEEPS, args.seeds[0], args.out, args.overrides)
        return

    variants = [VARIANTS[v] for v in args.variants]
    # Seed by seed over all variants, so that an interrupted benchmark has comparable rows for the seeds it did.
    results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for seed in args.seeds:
        for name, rows in run_variants(variants, [seed], args.out, [TEST_METRICS, *args.overrides]).items():
            results[name] += rows
    table: dict[str, list[dict[str, Any]]] = {}
    for v in variants:
        table[v.name] = results[v.name]
        if v.name != "margin":
            rows = []
            for seed, class_row in zip(args.seeds, results[v.name]):
                row = {k: float(x) for k, x in concat_test_metrics(Path(args.out) / f"{v.name}-seed{seed}").items()}
                row["selected_epoch"] = class_row["selected_epoch"]
                row["wall_seconds"] = class_row["wall_seconds"]
                rows.append(row)
            table[f"{v.name} [concat]"] = rows
    print_results(table, METRICS, args.seeds, args.out)


if __name__ == "__main__":
    main()
