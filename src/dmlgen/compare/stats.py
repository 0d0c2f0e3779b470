"""Summary statistics over seeds: mean ± 95% t-interval, and paired tests between two methods.

Both methods of a pair are trained with the same seeds, so the tests are paired over seeds: a paired
t-test (``scipy.stats.ttest_rel``) always, and the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``,
exact for small n) when there are at least :data:`WILCOXON_MIN_N` seeds; with fewer, its smallest
possible two-sided p-value (2 / 2^n = 0.0625 at n = 5) could never reach 0.05. No correction for
multiple comparisons is applied.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["WILCOXON_MIN_N", "mean_ci", "paired_tests"]

WILCOXON_MIN_N = 6


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """``{"n", "mean", "std", "ci95", "low", "high"}`` of ``values`` (one value per seed).

    ``ci95`` is the half-width ``t_{n-1, (1+c)/2} · s / sqrt(n)`` (``s``: sample standard deviation);
    with one value the interval is undefined and ``std``, ``ci95``, ``low`` and ``high`` are None.
    """
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        raise ValueError("mean_ci: no values")
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None, "low": None, "high": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": half, "low": mean - half, "high": mean + half}


#: Differences whose spread is below this fraction of the values' magnitude are rounding, i.e. constant.
CONSTANT_DIFF_RTOL = 1e-12


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired comparison of two methods' per-seed values (same seed order): ``a - b``.

    Returns ``n``, ``mean_diff`` and the 95% t-interval of the differences (``diff_ci95``), ``t_test``
    ``{"statistic", "p"}`` (None with fewer than 2 seeds or constant differences, then ``note`` says why),
    and ``wilcoxon`` ``{"statistic", "p"}`` (None below :data:`WILCOXON_MIN_N` seeds or when every difference
    is 0). Two-sided p-values.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_tests: need two equally long 1-D sequences, got {x.shape} and {y.shape}")
    diff = x - y
    n = int(diff.size)
    summary = mean_ci(diff) if n else {"mean": math.nan, "ci95": None}
    out: dict[str, Any] = {"n": n, "mean_diff": summary["mean"], "diff_ci95": summary["ci95"], "t_test": None,
                           "wilcoxon": None, "note": None}
    notes = []
    if n < 2:
        notes.append("one seed: no test")
    elif np.ptp(diff) <= CONSTANT_DIFF_RTOL * max(float(np.abs(x).max()), float(np.abs(y).max())):
        # ttest_rel divides by the standard deviation of the differences: undefined when they are constant, and
        # when they differ only by rounding (x - y of values 0.1 apart) it returns |t| ~ 1e16, p ~ 0.
        notes.append("the differences are the same for every seed: the t-test is undefined")
    else:
        res = stats.ttest_rel(x, y)
        out["t_test"] = {"statistic": _finite(res.statistic), "p": _finite(res.pvalue)}
    if n >= WILCOXON_MIN_N:
        if np.all(diff == 0):
            notes.append("every difference is 0: no Wilcoxon test")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scipy warns when it falls back from the exact distribution
                res = stats.wilcoxon(x, y)
            out["wilcoxon"] = {"statistic": _finite(res.statistic), "p": _finite(res.pvalue)}
    elif n >= 2:
        notes.append(f"Wilcoxon signed-rank needs at least {WILCOXON_MIN_N} seeds")
    out["note"] = "; ".join(notes) or None
    return out
