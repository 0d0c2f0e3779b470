"""The results of a compare: per-method mean ± 95% CI over seeds and paired tests between methods.

``summarize`` turns per-seed test metrics into the ``results.json`` payload; ``write_results`` writes
``results.json``, ``results.md``, ``results.csv`` (one row per method and metric), ``comparisons.csv``
(one row per pair of methods and metric) and ``per_seed.csv`` (one row per run).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from dmlgen.compare.stats import WILCOXON_MIN_N, mean_ci, paired_tests
from dmlgen.errors import DataError
from dmlgen.reporting.markdown import ordered_metric_names

__all__ = ["summarize", "write_results"]

# Metrics shown in the Markdown tables of paired tests (besides the score metric), when present.
_MD_PAIRED = ("recall@1",)


def _metric_names(per_seed: dict[int, dict[str, float]]) -> list[str]:
    """Metrics every seed of a method has (``num_*`` counts left out), in the usual order."""
    sets = [set(m) for m in per_seed.values()]
    common = set.intersection(*sets) if sets else set()
    return [m for m in ordered_metric_names(sorted(common)) if not m.startswith("num_")]


def summarize(methods: dict[str, dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Add ``summary`` (``{metric: mean_ci}``) to each method and build the paired comparisons.

    ``methods[name]["per_seed"]`` maps each seed to its test metrics. Pairs are compared over the seeds, on
    every metric both methods have; ``a - b`` in config order.
    """
    for name, info in methods.items():
        per_seed = info["per_seed"]
        missing = [s for s in seeds if s not in per_seed]
        if missing:
            raise DataError(f"method {name}: no test result for seed(s) {missing}")
        info["metrics"] = _metric_names(per_seed)
        info["summary"] = {m: mean_ci([per_seed[s][m] for s in seeds]) for m in info["metrics"]}
    comparisons = []
    for a, b in combinations(methods, 2):
        shared = [m for m in methods[a]["metrics"] if m in methods[b]["metrics"]]
        for metric in shared:
            xa = [methods[a]["per_seed"][s][metric] for s in seeds]
            xb = [methods[b]["per_seed"][s][metric] for s in seeds]
            comparisons.append({"a": a, "b": b, "metric": metric, **paired_tests(xa, xb)})
    return {"methods": methods, "comparisons": comparisons}


def _pct(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def _mean_pm(summary: dict[str, Any]) -> str:
    if summary["ci95"] is None:
        return _pct(summary["mean"])
    return f"{_pct(summary['mean'])} ± {_pct(summary['ci95'])}"


def _fmt_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _against_best(payload: dict[str, Any], metric: str) -> list[str]:
    """Markdown lines: every method against the one with the best mean test ``metric`` (the paired rows of
    ``comparisons`` read from the best method's side); none with fewer than three methods."""
    means = {name: info["summary"][metric]["mean"] for name, info in payload["methods"].items()
             if metric in info["summary"] and info["summary"][metric]["mean"] is not None}
    if len(means) < 3:
        return []
    best = max(means, key=lambda name: means[name])
    lines = ["", f"## Against the best mean test {metric}: {best}", "",
             f"Each method minus {best} (×100), paired over seeds; the full table of pairs is below.", "",
             "| method | mean difference | 95% CI of the difference | t-test p |", "|---|---:|---:|---:|"]
    for c in payload["comparisons"]:
        if c["metric"] != metric or best not in (c["a"], c["b"]):
            continue
        other, sign = (c["b"], -1.0) if c["a"] == best else (c["a"], 1.0)
        ci = "—" if c["diff_ci95"] is None else f"± {_pct(c['diff_ci95'])}"
        t_p = _p(c["t_test"]["p"]) if c["t_test"] else "—"
        lines.append(f"| {other} | {_pct(sign * c['mean_diff'])} | {ci} | {t_p} |")
    return lines


def _markdown(payload: dict[str, Any]) -> str:
    setup, methods, seeds = payload["setup"], payload["methods"], payload["setup"]["seeds"]
    metric = setup["score_metric"]
    columns: list[str] = []
    for info in methods.values():
        columns += [m for m in info["metrics"] if m not in columns]
    columns = ordered_metric_names(columns)
    lines = [
        f"# Compare: {payload['name']}",
        "",
        f"Hyper-parameters: Optuna TPE (sampler seed {setup['sampler_seed']}), {setup['trials']} finished trials per "
        f"method, each scored by the mean validation {metric} over {setup['folds']} class-disjoint folds of the "
        f"training classes (the test classes are never used in the search). Final runs: the best values, trained "
        f"once per seed ({', '.join(map(str, seeds))}) on the method config's own train / validation split, "
        "one test evaluation each.",
        "",
        f"## Test metrics (×100, mean ± 95% t-interval over {len(seeds)} seed{'s' if len(seeds) != 1 else ''})",
        "",
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, info in methods.items():
        cells = [_mean_pm(info["summary"][m]) if m in info["summary"] else "—" for m in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _against_best(payload, metric)
    lines += ["", "## Search", "", f"| method | trials (finished / failed) | best trial | best val {metric} | "
              "values |", "|---|---:|---:|---:|---|"]
    for name, info in methods.items():
        s = info["search"]
        values = ", ".join(f"{k} = {_fmt_value(v)}" for k, v in info["best_params"].items())
        lines.append(f"| {name} | {s['complete']} / {s['failed']} | {s['best_trial']} | {s['best_score']:.4f} | "
                     f"{values} |")
    lines += ["", "## Paired tests over seeds", "",
              f"Differences A − B (×100) per seed; two-sided p-values of the paired t-test and, with at least "
              f"{WILCOXON_MIN_N} seeds, of the Wilcoxon signed-rank test. No multiple-comparison correction. "
              "Every metric is in results.json / comparisons.csv.", ""]
    shown = [metric] + [m for m in _MD_PAIRED if m != metric]
    for m in shown:
        rows = [c for c in payload["comparisons"] if c["metric"] == m]
        if not rows:
            continue
        lines += [f"### {m}", "", "| A | B | mean A − B | 95% CI of the difference | t-test p | Wilcoxon p |",
                  "|---|---|---:|---:|---:|---:|"]
        notes = set()
        for c in rows:
            ci = "—" if c["diff_ci95"] is None else f"± {_pct(c['diff_ci95'])}"
            t_p = _p(c["t_test"]["p"]) if c["t_test"] else "—"
            w_p = _p(c["wilcoxon"]["p"]) if c["wilcoxon"] else "—"
            lines.append(f"| {c['a']} | {c['b']} | {_pct(c['mean_diff'])} | {ci} | {t_p} | {w_p} |")
            if c["note"]:
                notes.add(c["note"])
        if notes:
            lines += ["", *(f"- {n}" for n in sorted(notes))]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _csv(rows: list[dict[str, Any]], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})
    return buf.getvalue()


def write_results(out_dir: str | Path, payload: dict[str, Any]) -> list[Path]:
    """Write the result files of ``payload`` (see :func:`summarize`) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    summary_rows = [{"method": name, "metric": m, **info["summary"][m]}
                    for name, info in payload["methods"].items() for m in info["metrics"]]
    comparison_rows = [{
        "method_a": c["a"], "method_b": c["b"], "metric": c["metric"], "n": c["n"], "mean_diff": c["mean_diff"],
        "diff_ci95": c["diff_ci95"],
        "t_statistic": c["t_test"]["statistic"] if c["t_test"] else None,
        "t_p": c["t_test"]["p"] if c["t_test"] else None,
        "wilcoxon_statistic": c["wilcoxon"]["statistic"] if c["wilcoxon"] else None,
        "wilcoxon_p": c["wilcoxon"]["p"] if c["wilcoxon"] else None,
        "note": c["note"],
    } for c in payload["comparisons"]]
    all_metrics = ordered_metric_names(sorted({m for info in payload["methods"].values() for m in info["metrics"]}))
    seed_rows = [{"method": name, "seed": seed, "run_dir": info["run_dirs"].get(seed), **values}
                 for name, info in payload["methods"].items() for seed, values in info["per_seed"].items()]
    files = {
        "results.json": json.dumps(payload, indent=2, default=str) + "\n",
        "results.md": _markdown(payload),
        "results.csv": _csv(summary_rows, ["method", "metric", "n", "mean", "std", "ci95", "low", "high"]),
        "comparisons.csv": _csv(comparison_rows, ["method_a", "method_b", "metric", "n", "mean_diff", "diff_ci95",
                                                  "t_statistic", "t_p", "wilcoxon_statistic", "wilcoxon_p", "note"]),
        "per_seed.csv": _csv(seed_rows, ["method", "seed", *all_metrics, "run_dir"]),
    }
    paths = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = out / name
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
            paths.append(path)
    except OSError as exc:
        raise DataError(f"cannot write the compare results in {out}: {exc.strerror or exc}") from None
    return paths
