"""Hyper-parameter search of one method: Optuna TPE, each trial scored by class-disjoint k-fold CV.

A trial suggests one value per search-space entry, trains one run per fold (``data.folds = k``,
``data.fold = i``: the training classes are cut into k class-disjoint groups, group i validates) and
scores the mean over folds of each fold's best validation ``score_metric``. The test classes are never
loaded into a fold's training or validation and never scored during the search.

Resuming: the study lives in the storage; ``study.optimize`` only runs the trials still missing (COMPLETE
trials counted), so a finished trial is never rerun. Trials that were interrupted (Ctrl-C, or a process
that died) are queued again with the same values, and their fold runs, kept in a folder named after the
trial's config, continue from their last checkpoint; finished folds are reused.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmlgen.compare.config import CompareConfig, MethodSpec, fingerprint, resolve_run_config
from dmlgen.engine.config import RunConfig
from dmlgen.errors import ConfigError, DataError

__all__ = ["best_trial", "count_trials", "open_study", "run_search", "search_spec", "study_name", "train_fold"]

Log = Callable[[str], None]
FOLD_RESULT = "fold_result.json"


def study_name(cfg: CompareConfig, method: MethodSpec) -> str:
    return f"{cfg.name}.{method.name}"


def search_spec(cfg: CompareConfig, method: MethodSpec) -> dict[str, Any]:
    """What makes a search the same search: the method's search-run config (without the searched values),
    the search space, the folds and the score. Stored in the study; a mismatch on resume is refused."""
    base = resolve_run_config(cfg, method, "search")
    return {
        "run_config": fingerprint(base),
        "search_space": {name: {k: v for k, v in vars(p).items() if v is not None and v is not False}
                         for name, p in sorted(method.search_space.items())},
        "folds": cfg.folds,
        "score_metric": cfg.score_metric,
        "split_seed": cfg.split_seed,
    }


def count_trials(study: Any) -> dict[str, int]:
    """Trials by state name (``COMPLETE``, ``FAIL``, ``RUNNING``, ``WAITING``, ``PRUNED``)."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def _trial_seed(base: int, number: int, name: str = "") -> int:
    import zlib

    import numpy as np

    return int(np.random.SeedSequence([base, number, zlib.crc32(name.encode())]).generate_state(1)[0])


def _sampler(cfg: CompareConfig) -> Any:
    """Optuna's TPE sampler, seeded per trial from ``sampler.seed`` and the trial's number.

    The number is unique in the storage, so processes that share a study (several machines, or several
    processes of one) never draw the same values for different trials, however they start; a search is
    repeatable, and a resumed one does not replay the random start-up values it already tried. TPE keeps no
    state between trials except its random generator (it reads the finished trials from the study), so a fresh
    seeded instance per trial (and parameter) is the same sampler.
    """
    import optuna

    startup = cfg.sampler.startup_trials
    base = cfg.sampler.seed

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def _tpe(self, trial: Any, name: str = "") -> Any:
            # One generator per (trial, parameter): two parameters must not share a random draw.
            return optuna.samplers.TPESampler(seed=_trial_seed(base, trial.number, name), n_startup_trials=startup)

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return self._tpe(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
            return self._tpe(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
            return self._tpe(trial, param_name).sample_independent(study, trial, param_name, param_distribution)

    return TrialSeededTPE()


def open_study(cfg: CompareConfig, method: MethodSpec, storage: Any, *, resume: bool) -> Any:
    """Create the method's study, or load it (``resume``) after checking it is the same search."""
    import optuna

    name = study_name(cfg, method)
    spec = search_spec(cfg, method)
    existing = {s.study_name: s for s in storage.get_all_studies()}
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage)
        n = len(study.get_trials(deepcopy=False))
        if n and not resume:
            raise ConfigError(f"study {name!r} already holds {n} trial(s); continue it with --resume, or choose "
                              "another compare name, --out or storage")
        stored = study.user_attrs.get("dmlgen_search")
        if stored is not None and stored != spec:
            diffs = [k for k in sorted(set(stored) | set(spec)) if stored.get(k) != spec.get(k)]
            raise ConfigError(
                f"study {name!r} was made by a different search ({', '.join(diffs)} changed: "
                f"{[stored.get(k) for k in diffs]} stored, {[spec.get(k) for k in diffs]} now); restore the "
                "settings, or choose another compare name, --out or storage"
            )
    else:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"study {name!r} in the storage minimises; dmlgen compare needs a maximising study")
    if "dmlgen_search" not in study.user_attrs:
        study.set_user_attr("dmlgen_search", spec)
    study.sampler = _sampler(cfg)
    return study


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _fail_dead_trials(study: Any) -> list[int]:
    """Mark failed the RUNNING trials whose process is gone: of this machine at once (by pid), of other
    machines once their heartbeat is older than the grace period. Returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    dead = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        wh, _, pid = worker.rpartition(":")
        if wh == host and pid.isdigit() and not _pid_alive(int(pid)):
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            dead.append(trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fail_stale_trials is flagged experimental
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return dead + sorted(before - after)


def _requeue_interrupted(study: Any, method: MethodSpec) -> list[dict[str, Any]]:
    """Queue again the values of failed trials that did not fail on their own (interrupted or killed, not
    diverged or in error) and that no finished, running or queued trial has. Returns the queued values."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    taken = [t.params or t.system_attrs.get("fixed_params", {}) for t in trials
             if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)]
    queued = []
    for trial in trials:
        if trial.state != TrialState.FAIL or "diverged" in trial.user_attrs or "error" in trial.user_attrs:
            continue
        if set(trial.params) != set(method.search_space) or trial.params in taken:
            continue
        study.enqueue_trial(dict(trial.params))
        taken.append(trial.params)
        queued.append(dict(trial.params))
    return queued


def _suggest(trial: Any, method: MethodSpec) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, p in method.search_space.items():
        if p.type == "categorical":
            params[name] = trial.suggest_categorical(name, p.choices)
        elif p.type == "int":
            assert p.low is not None and p.high is not None
            params[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
    return params


def train_fold(run_cfg: RunConfig, out_dir: Path, *, resume_command: str | None = None) -> dict[str, Any]:
    """Train one fold run in ``out_dir`` and return ``{"score", "selected_epoch", "seconds"}``.

    A folder with ``fold_result.json`` is reused as is; one with ``last.ckpt`` (a multi-stage method:
    ``pipeline.json``) continues from it. The run's final evaluation re-scores its validation fold instead of
    the test split (which the search never uses), so its ``test_metrics.json`` is replaced by
    ``fold_result.json``. A multi-stage method (Guided DML, SLADE) runs all its stages in the folder; its
    score is the last stage's.
    """
    from dmlgen.engine.pipeline import PIPELINE_FILE, is_pipeline, run_pipeline
    from dmlgen.engine.setup import build_splits
    from dmlgen.engine.trainer import LAST, Trainer

    done = out_dir / FOLD_RESULT
    if done.is_file():
        return dict(json.loads(done.read_text()))
    cfg = copy.deepcopy(run_cfg)
    cfg.out_dir = str(out_dir)
    start = time.perf_counter()
    if is_pipeline(cfg):
        resume = (out_dir / PIPELINE_FILE).is_file()
        result = run_pipeline(cfg, resume=resume, overwrite=not resume, progress=False,
                              resume_command=resume_command, html_report=False, validation_as_test=True)
    else:
        resume = (out_dir / LAST).is_file()
        splits = build_splits(cfg.data).validation_as_test(f"fold {cfg.data.fold} of data.folds={cfg.data.folds}")
        trainer = Trainer(cfg, progress=False, splits=splits, pretrained=not resume,
                          resume_command=resume_command)
        result = trainer.fit(resume=resume, overwrite=True)
    if result["val_score"] is None:
        raise DataError(f"fold run {out_dir} has no validation score")
    summary = {"score": float(result["val_score"]), "metric": result["selection_metric"],
               "selected_epoch": result["selected_epoch"], "seconds": round(time.perf_counter() - start, 2),
               "val": result["test"], "splits": {k: v for k, v in result["splits"].items() if "test" not in k}}
    (out_dir / "test_metrics.json").unlink(missing_ok=True)
    done.write_text(json.dumps(summary, indent=2))
    return summary


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _objective(cfg: CompareConfig, method: MethodSpec, out: Path, log: Log,
               resume_command: str | None) -> Callable[[Any], float]:
    from dmlgen.engine.trainer import TrainingDiverged, TrainingInterrupted

    def objective(trial: Any) -> float:
        trial.set_user_attr("worker", _worker())
        params = _suggest(trial, method)
        key = fingerprint(resolve_run_config(cfg, method, "search", params, fold=0))
        folder = out / "search" / method.name / key
        trial.set_user_attr("run_dir", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.json").write_text(json.dumps(params, indent=2))
        start = time.perf_counter()
        scores: list[float] = []
        try:
            for fold in range(cfg.folds):
                run_cfg = resolve_run_config(cfg, method, "search", params, fold=fold)
                result = train_fold(run_cfg, folder / f"fold{fold}", resume_command=resume_command)
                scores.append(float(result["score"]))
                trial.report(float(result["score"]), fold)
        except TrainingDiverged as exc:
            trial.set_user_attr("diverged", str(exc))
            log(f"[{method.name}] trial {trial.number}: diverged ({_fmt_params(params)}): {exc}")
            raise
        except (KeyboardInterrupt, TrainingInterrupted):
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as exc:
            trial.set_user_attr("error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        value = statistics.fmean(scores)
        trial.set_user_attr("fold_scores", scores)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        log(f"[{method.name}] trial {trial.number}: val {cfg.score_metric} {value:.4f} (folds "
            f"{', '.join(f'{s:.4f}' for s in scores)}) with {_fmt_params(params)}; "
            f"{time.perf_counter() - start:.0f} s")
        return value

    return objective


def run_search(cfg: CompareConfig, method: MethodSpec, storage: Any, *, resume: bool, log: Log = print,
               resume_command: str | None = None) -> Any:
    """Run the trials of ``method`` still missing (``cfg.trials`` COMPLETE in all); returns the study."""
    import optuna
    from optuna.trial import TrialState

    from dmlgen.engine.trainer import TrainingDiverged

    study = open_study(cfg, method, storage, resume=resume)
    dead = _fail_dead_trials(study)
    queued = _requeue_interrupted(study, method)
    if dead or queued:
        log(f"[{method.name}] {len(dead)} trial(s) of a stopped process marked failed; {len(queued)} interrupted "
            "trial(s) queued again with the same values")
    objective = _objective(cfg, method, cfg.out_path, log, resume_command)
    diverged_at_start = sum(1 for t in study.get_trials(deepcopy=False) if "diverged" in t.user_attrs)
    max_diverged = max(3, cfg.trials)
    while True:
        counts = count_trials(study)
        complete, running = counts.get("COMPLETE", 0), counts.get("RUNNING", 0)
        # Trials running in other processes (a shared storage) count as on their way.
        remaining = cfg.trials - complete - running
        if remaining <= 0:
            break
        diverged = sum(1 for t in study.get_trials(deepcopy=False) if "diverged" in t.user_attrs)
        if diverged - diverged_at_start >= max_diverged:
            raise DataError(f"method {method.name}: {diverged - diverged_at_start} search trials diverged (NaN loss) "
                            f"in this session, {complete} of {cfg.trials} finished; narrow the search space "
                            "(e.g. lower optimizer.lr high)")
        log(f"[{method.name}] search: {complete} of {cfg.trials} trials done, running {remaining} "
            f"({cfg.folds} folds each)")
        study.optimize(objective, n_trials=remaining, catch=(TrainingDiverged,), gc_after_trial=False,
                       callbacks=[optuna.study.MaxTrialsCallback(cfg.trials, states=(TrialState.COMPLETE,))])
    return study


def best_trial(study: Any, method: MethodSpec) -> Any:
    """The COMPLETE trial with the highest score; a ConfigError when the search has none."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(f"method {method.name}: no finished search trial in study {study.study_name!r}; run the "
                          "search first (dmlgen compare without --stage final)")
    # Ties go to the earlier trial, so the choice does not depend on the order trials finish in.
    return max(complete, key=lambda t: (t.value, -t.number))

