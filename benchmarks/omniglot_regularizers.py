"""MDR and LSD on Omniglot: each regularizer against its base loss, same budget, several seeds.

Variants (configs/omniglot/*.yaml; the triplet rows use MDR's recipe: mean-distance-scaled embeddings
without L2 norm, distance-weighted sampling, triplet margin 0.2):

  triplet              triplet_mdr.yaml with no regularizer (the recipe's "Triplet" baseline)
  triplet+mdr          triplet_mdr.yaml
  ms                   multi_similarity.yaml
  ms+lsd               multi_similarity_lsd.yaml
  ms+mdr+lsd           multi_similarity_mdr_lsd.yaml

Test metrics: Recall@1, MAP@R, NMI and the spectral decay ρ (mode 1) of the test embeddings, mean ± 95% CI.

Weight sweep (validation split only, one seed): ``--sweep mdr 0.05 0.1 0.2 0.4`` or ``--sweep lsd 10 50 200``
prints the validation MAP@R of the selected epoch for each weight; test numbers are not looked at.

Run:  .venv/bin/python benchmarks/omniglot_regularizers.py [--seeds 0 1 2] [--out runs/bench-regularizers]
      [--variants ...] [--set key=value ...] [--sweep mdr|lsd W ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sweep import Variant, print_results, run_variants, weight_sweep  # noqa: E402

TEST_METRICS = "eval.test_metrics=[recall, precision@1, r_precision, map@r, nmi, ami, rho]"
VARIANTS = {
    "triplet": Variant("triplet", "configs/omniglot/triplet_mdr.yaml", ("regularizers=[]",)),
    "triplet+mdr": Variant("triplet+mdr", "configs/omniglot/triplet_mdr.yaml"),
    "ms": Variant("ms", "configs/omniglot/multi_similarity.yaml"),
    "ms+lsd": Variant("ms+lsd", "configs/omniglot/multi_similarity_lsd.yaml"),
    "ms+mdr+lsd": Variant("ms+mdr+lsd", "configs/omniglot/multi_similarity_mdr_lsd.yaml"),
}
SWEEPS = {  # regularizer -> (config, how its weight is set)
    "mdr": ("configs/omniglot/triplet_mdr.yaml", "regularizers=[{{name: mdr, weight: {w}}}]"),
    "lsd": ("configs/omniglot/multi_similarity_lsd.yaml", "regularizers=[{{name: lsd, weight: {w}}}]"),
}
METRICS = ("recall@1", "map@r", "nmi", "rho@1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-regularizers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sweep", nargs="+", metavar=("REGULARIZER", "WEIGHT"),
                        help="validation sweep of one regularizer's weight (seed: the first of --seeds)")
    args = parser.parse_args()

    if args.sweep:
        weight_sweep(args.sweep[0], args.sweep[1:], SWEEPS, args.seeds[0], args.out, args.overrides)
        return

    results = run_variants([VARIANTS[v] for v in args.variants], args.seeds, args.out,
                           [TEST_METRICS, *args.overrides])
    print_results(results, METRICS, args.seeds, args.out)


if __name__ == "__main__":
    main()
