"""``dmlgen compare``: search every method, train its best values over the seeds, tabulate the results.

Layout of the compare folder (``out_dir``)::

    compare_config.yaml           the validated compare config
    optuna.db                     the studies (default storage)
    search/<method>/<key>/fold<i> one run per trial and fold (<key>: hash of the trial's run config)
    final/<method>/seed<s>_<key>  one run per seed with the best values (test_metrics.json, report.md)
    results.{md,csv,json}, comparisons.csv, per_seed.csv
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from dmlgen.compare.config import CompareConfig, MethodSpec, fingerprint, resolve_run_config
from dmlgen.compare.results import summarize, write_results
from dmlgen.compare.search import best_trial, count_trials, open_study, run_search
from dmlgen.compare.storage import display_url, open_storage
from dmlgen.errors import ConfigError, DmlgenError

__all__ = ["CompareInterrupted", "run_compare", "run_final"]

Log = Callable[[str], None]
Stage = Literal["all", "search", "final"]
# Files and folders of a compare; without --resume a folder holding any of them is refused.
_STATE = ("optuna.db", "search", "final", "results.json")


class CompareInterrupted(DmlgenError):
    """Ctrl-C during a compare; the message says what is kept and how to continue."""


def run_final(cfg: CompareConfig, method: MethodSpec, params: dict[str, Any], *, log: Log = print,
              resume_command: str | None = None) -> dict[str, Any]:
    """Train ``method`` with ``params`` once per seed (finished runs reused, interrupted ones resumed) and
    return ``{"per_seed": {seed: test metrics}, "run_dirs": {seed: folder}}``."""
    from dmlgen.engine.run import train
    from dmlgen.engine.trainer import LAST

    per_seed: dict[int, dict[str, float]] = {}
    run_dirs: dict[int, str] = {}
    for seed in cfg.seeds:
        run_cfg = resolve_run_config(cfg, method, "final", params, seed=seed)
        folder = cfg.out_path / "final" / method.name / f"seed{seed}_{fingerprint(run_cfg)}"
        done = folder / "test_metrics.json"
        if done.is_file():
            result = json.loads(done.read_text())
        else:
            resume = (folder / LAST).is_file()
            log(f"[{method.name}] final run, seed {seed}{' (resumed)' if resume else ''}: {folder}")
            start = time.perf_counter()
            # report.md per run; the compare's own results.html replaces one HTML page per seed and method
            # (each would embed the test split again), and `dmlgen report FOLDER` still writes one.
            result = train(run_cfg, out_dir=folder, resume=resume, overwrite=True, progress=False,
                           resume_command=resume_command, html_report=False)
            log(f"[{method.name}] seed {seed}: test {cfg.score_metric} "
                f"{result['test'].get(cfg.score_metric, float('nan')):.4f} (epoch {result['selected_epoch']}); "
                f"{time.perf_counter() - start:.0f} s")
        per_seed[seed] = {k: float(v) for k, v in result["test"].items()}
        run_dirs[seed] = str(folder)
    return {"per_seed": per_seed, "run_dirs": run_dirs}


def _check_fresh(cfg: CompareConfig) -> None:
    found = [name for name in _STATE if (cfg.out_path / name).exists()]
    if found:
        raise ConfigError(f"{cfg.out_path} already holds a compare ({', '.join(found)}); continue it with --resume, "
                          "or choose another folder with --out")


def _search_info(cfg: CompareConfig, study: Any, best: Any) -> dict[str, Any]:
    counts = count_trials(study)
    return {"study": study.study_name, "complete": counts.get("COMPLETE", 0), "failed": counts.get("FAIL", 0),
            "running": counts.get("RUNNING", 0), "best_trial": best.number, "best_score": float(best.value),
            "score_metric": cfg.score_metric, "fold_scores": best.user_attrs.get("fold_scores"),
            "run_dir": best.user_attrs.get("run_dir")}


def run_compare(cfg: CompareConfig, *, resume: bool = False, stage: Stage = "all", log: Log = print,
                resume_command: str | None = None) -> dict[str, Any] | None:
    """Run a comparison; returns the ``results.json`` payload (None for ``stage="search"``).

    ``stage``: ``search`` (only the searches, e.g. on several machines sharing one storage), ``final`` (only
    the final runs and results, from the finished searches) or ``all``. Without ``resume`` an output folder
    or study that already holds a compare is refused. Ctrl-C raises :class:`CompareInterrupted` after the
    interrupted run saved its state; finished trials and runs are kept.
    """
    import optuna

    if stage not in ("all", "search", "final"):
        raise ConfigError(f"stage: must be all, search or final, got {stage!r}")
    if not resume and stage != "final":  # the final stage only ever continues a compare
        _check_fresh(cfg)
    out = cfg.out_path
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as exc:
        raise ConfigError(f"cannot write the compare folder {out}: {exc.strerror or exc}") from None
    url = cfg.storage_url()
    storage = open_storage(url)
    resume_command = resume_command or "dmlgen compare CONFIG --resume"
    previous_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.ERROR)  # one line per trial is printed here instead
    current = "setup"
    try:
        studies = {}
        for method in cfg.methods:
            current = f"the search of {method.name}"
            if stage == "final":
                studies[method.name] = open_study(cfg, method, storage, resume=True)
            else:
                studies[method.name] = run_search(cfg, method, storage, resume=resume, log=log,
                                                  resume_command=resume_command)
        if stage == "search":
            return None
        methods: dict[str, dict[str, Any]] = {}
        for method in cfg.methods:
            current = f"the final runs of {method.name}"
            study = studies[method.name]
            best = best_trial(study, method)
            info = _search_info(cfg, study, best)
            if info["complete"] < cfg.trials:
                log(f"[{method.name}] warning: {info['complete']} of {cfg.trials} search trials finished; using the "
                    "best of those")
            if info["running"]:
                log(f"[{method.name}] warning: {info['running']} search trial(s) still running elsewhere; the best "
                    "values may change when they finish")
            params = dict(best.params)
            (out / "final" / method.name).mkdir(parents=True, exist_ok=True)
            (out / "final" / method.name / "best.json").write_text(json.dumps({"params": params, **info}, indent=2))
            final = run_final(cfg, method, params, log=log, resume_command=resume_command)
            methods[method.name] = {"config": method.config, "best_params": params, "search": info, **final}
        payload = summarize(methods, cfg.seeds)
        payload = {"name": cfg.name, "setup": _setup(cfg, url), **payload, "compare_config": cfg.to_dict()}
        paths = write_results(out, payload)
        html = _html_report(out, payload)
        log(f"wrote {', '.join(str(p) for p in paths + html)}")
        return payload
    except KeyboardInterrupt:
        raise CompareInterrupted(_interrupted(current, url, resume_command)) from None
    except DmlgenError as exc:
        from dmlgen.engine.trainer import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            raise CompareInterrupted(f"{_interrupted(current, url, resume_command)} ({exc})") from None
        raise
    finally:
        optuna.logging.set_verbosity(previous_level)


def _interrupted(current: str, url: str, resume_command: str) -> str:
    return (f"interrupted during {current}; finished trials are kept in {display_url(url)} and finished runs in "
            f"their folders; continue with: {resume_command}")


def _setup(cfg: CompareConfig, url: str) -> dict[str, Any]:
    return {"seeds": list(cfg.seeds), "folds": cfg.folds, "trials": cfg.trials, "score_metric": cfg.score_metric,
            "split_seed": cfg.split_seed, "sampler_seed": cfg.sampler.seed, "storage": display_url(url),
            "tests": "paired t-test (scipy.stats.ttest_rel) over seeds; Wilcoxon signed-rank (scipy.stats.wilcoxon) "
                     "with at least 6 seeds; two-sided; no multiple-comparison correction",
            "interval": "95% Student t-interval over seeds (mean ± t_{n-1,0.975} s / sqrt(n))"}


def _epochs_file(run_dir: Path) -> Path:
    """``epochs.csv`` of a run folder; for a multi-stage run, that of its last (deployed) stage."""
    from dmlgen.engine.pipeline import PIPELINE_FILE

    pipeline = run_dir / PIPELINE_FILE
    if not (run_dir / "epochs.csv").is_file() and pipeline.is_file():
        stages = json.loads(pipeline.read_text()).get("stages") or [{}]
        return run_dir / str(stages[-1].get("name", "")) / "epochs.csv"
    return run_dir / "epochs.csv"


def _html_report(out: Path, payload: dict[str, Any]) -> list[Path]:
    """``results.html``: the mean test metrics per method (bars) and the first seed's training curves, via
    :func:`dmlgen.reporting.html.write_compare_report`; skipped when its plotting dependencies are missing."""
    try:
        from dmlgen.reporting.html import read_epochs_csv, write_compare_report
    except ImportError:
        return []
    seeds = payload["setup"]["seeds"]
    means = {name: {m: s["mean"] for m, s in info["summary"].items()} for name, info in payload["methods"].items()}
    histories = {name: read_epochs_csv(_epochs_file(Path(info["run_dirs"][seeds[0]])))
                 for name, info in payload["methods"].items()}
    notes = [f"Test metrics: mean over seeds {', '.join(map(str, seeds))} (one test evaluation per seed); the 95% "
             "confidence intervals and the paired tests between methods are in results.md / results.json.",
             f"Hyper-parameters: {payload['setup']['trials']} Optuna trials per method, each the mean validation "
             f"{payload['setup']['score_metric']} over {payload['setup']['folds']} class-disjoint folds of the "
             f"training classes. Curves: the final run of seed {seeds[0]}."]
    path = write_compare_report(out, means, histories=histories, title=f"Compare: {payload['name']}",
                                notes=notes, name="results.html")
    return [Path(path)]
