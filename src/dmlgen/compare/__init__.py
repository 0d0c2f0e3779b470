"""``dmlgen compare``: a fair comparison of methods (docs/compare.md).

For each method: an Optuna search over a declared space with a fixed trial budget, every trial scored by
class-disjoint k-fold cross-validation inside the training classes; then the best values trained over
several seeds, one test evaluation per seed; then mean ± 95% CI per metric and paired tests over seeds.
"""

from dmlgen.compare.config import CompareConfig, MethodSpec, SearchParam, load_compare_config
from dmlgen.compare.runner import CompareInterrupted, run_compare
from dmlgen.compare.stats import mean_ci, paired_tests

__all__ = ["CompareConfig", "CompareInterrupted", "MethodSpec", "SearchParam", "load_compare_config", "mean_ci",
           "paired_tests", "run_compare"]
