"""dmlgen compare: config validation, class-disjoint folds, the Optuna search (resume, storage errors), the
statistics against closed forms and enumeration, and a tiny end-to-end compare on synthetic images."""

from __future__ import annotations

import copy
import itertools
import json
import math
import sqlite3
import statistics
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import dmlgen.compare.search as search_module
from dmlgen.cli import main
from dmlgen.compare import CompareInterrupted, load_compare_config, mean_ci, paired_tests, run_compare
from dmlgen.compare.config import compare_config_from_dict, resolve_run_config, set_key
from dmlgen.compare.storage import display_url, open_storage
from dmlgen.engine.config import DataConfig, config_from_dict
from dmlgen.engine.setup import build_splits
from dmlgen.errors import ConfigError, DataError
from _fixtures import one_thread  # noqa: F401  (autouse: every test here runs on one thread)

REPO = Path(__file__).resolve().parents[1]
SEMIHARD = str(REPO / "configs" / "omniglot" / "triplet_semihard.yaml")


def method(name: str = "a", config: str = SEMIHARD, **space: Any) -> dict[str, Any]:
    return {"name": name, "config": config,
            "search_space": space or {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}


def compare_dict(out: Path, *methods: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "t", "out_dir": str(out), "seeds": [0, 1], "folds": 2, "trials": 3,
            "methods": list(methods) or [method()], **extra}


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        compare_config_from_dict(data, REPO)
    return str(info.value)


# --------------------------------------------------------------------------- config validation
def test_empty_search_space_is_an_error_naming_the_method(tmp_path: Path) -> None:
    bad = method("semihard")
    bad["search_space"] = {}
    message = config_error(compare_dict(tmp_path, bad))
    assert "methods[0].search_space: empty for method 'semihard'" in message


@pytest.mark.parametrize("change, expected", [
    ({"trails": 3}, "unknown config key trails"),
    ({"trials": "many"}, "trials: expected an integer, got 'many'"),
    ({"trials": 0}, "trials: must be >= 1, got 0"),
    ({"folds": 1}, "folds: must be >= 2, got 1"),
    ({"seeds": []}, "seeds: empty"),
    ({"seeds": [0, 0]}, "seeds: a seed is listed twice"),
    ({"sampler": {"seed": 0, "startup": 3}}, "unknown config key sampler.startup"),
])
def test_compare_keys_are_checked(tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    assert expected in config_error({**compare_dict(tmp_path), **change})


@pytest.mark.parametrize("param, expected", [
    ({"type": "uniform", "low": 0, "high": 1}, "optimizer.lr.type: 'uniform' is not one of"),
    ({"type": "float", "lo": 0.1, "high": 1}, "unknown config key methods[0].search_space.optimizer.lr.lo"),
    ({"type": "float", "high": 1.0}, "methods[0].search_space.optimizer.lr.low: required for type float"),
    ({"type": "float", "low": 0.1, "high": 0.1}, "optimizer.lr.low: must be < high"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "optimizer.lr.low: must be > 0 on a log scale"),
    ({"type": "float", "low": "small", "high": 1.0}, "optimizer.lr.low: expected a number, got 'small'"),
    ({"type": "int", "low": 1.5, "high": 4}, "optimizer.lr.low: must be an integer for type int"),
    ({"type": "categorical", "choices": []}, "optimizer.lr.choices: a categorical parameter needs"),
    ({"type": "categorical", "choices": [1, [2]]}, "optimizer.lr.choices[1]: must be a number"),
    ({"type": "categorical", "choices": [1, 2], "low": 0}, "optimizer.lr.low: not used by type categorical"),
    ({"type": "float", "low": -1.0, "high": 1e-2},
     "search_space.optimizer.lr: the value -1.0 gives an invalid run config of method 'a': optimizer.lr: must be > 0"),
])
def test_search_space_entries_are_checked(tmp_path: Path, param: dict[str, Any], expected: str) -> None:
    assert expected in config_error(compare_dict(tmp_path, method(**{"optimizer.lr": param})))


def test_search_keys_and_overrides_must_exist_in_the_run_config(tmp_path: Path) -> None:
    typo = method(**{"optimizer.lrr": {"type": "float", "low": 0.1, "high": 1.0}})
    message = config_error(compare_dict(tmp_path, typo))
    assert "methods[0].search_space.optimizer.lrr" in message and "unknown config key optimizer.lrr" in message
    loss_typo = method(**{"loss.params.marginn": {"type": "float", "low": 0.1, "high": 0.2}})
    assert "search_space.loss.params.marginn" in config_error(compare_dict(tmp_path, loss_typo))
    message = config_error(compare_dict(tmp_path, search_overrides={"train.epoch": 1}))
    assert "(search runs)" in message and "unknown config key train.epoch" in message
    missing = config_error(compare_dict(tmp_path, method(config="nowhere.yaml")))
    assert "methods[0].config: file 'nowhere.yaml' not found" in missing
    assert "methods: name 'a' is used twice" in config_error(compare_dict(tmp_path, method(), method()))
    assert "methods[0].name: 'a b'" in config_error(compare_dict(tmp_path, method("a b")))


def test_valid_config_loads_with_yaml_numbers_and_tied_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    # "1e-4" without a dot is a string to YAML 1.1; bounds accept it as the number it spells.
    path.write_text(f"""
methods:
  - name: semihard
    config: {SEMIHARD}
    search_space:
      optimizer.lr: {{type: float, low: 1e-4, high: 1e-2, log: true}}
      margin: {{type: float, low: 0.05, high: 0.4, keys: [loss.params.margin, loss.miner.params.margin]}}
""")
    cfg = load_compare_config(path)
    assert cfg.name == "c" and cfg.folds == 4 and cfg.seeds == [0, 1, 2] and cfg.score_metric == "map@r"
    assert cfg.methods[0].search_space["optimizer.lr"].low == pytest.approx(1e-4)
    assert cfg.storage_url() == f"sqlite:///{(Path('runs/compare/c')).resolve() / 'optuna.db'}"
    run = resolve_run_config(cfg, cfg.methods[0], "search", {"optimizer.lr": 0.003, "margin": 0.3}, fold=1)
    assert run.optimizer.lr == 0.003 and run.loss.params["margin"] == 0.3
    assert run.loss.miner is not None and run.loss.miner.params["margin"] == 0.3
    assert (run.data.folds, run.data.fold, run.eval.select_metric) == (4, 1, "map@r")
    final = resolve_run_config(cfg, cfg.methods[0], "final", {"optimizer.lr": 0.003, "margin": 0.3}, seed=7)
    assert final.data.folds is None and final.train.seed == 7
    with pytest.raises(ConfigError, match=r"c.yaml: methods\[0\].search_space.optimizer.lr.high"):
        path.write_text(path.read_text().replace("high: 1e-2", "high: [1]"))
        load_compare_config(path)


def test_set_key_reaches_list_items_by_index_or_name() -> None:
    data: dict[str, Any] = {"regularizers": [{"name": "mdr", "weight": 0.2}, {"name": "lsd", "weight": 50.0}]}
    set_key(data, "regularizers.lsd.weight", 10.0)
    set_key(data, "regularizers.0.params.level_penalty", 0.1)
    set_key(data, "optimizer.lr", 0.5)
    assert data["regularizers"] == [{"name": "mdr", "weight": 0.2, "params": {"level_penalty": 0.1}},
                                    {"name": "lsd", "weight": 10.0}]
    assert data["optimizer"] == {"lr": 0.5}
    with pytest.raises(ConfigError, match="regularizers.kl: no list item named 'kl' .items: mdr, lsd"):
        set_key(data, "regularizers.kl.weight", 1.0)
    with pytest.raises(ConfigError, match="regularizers.5: index 5 out of range"):
        set_key(data, "regularizers.5.weight", 1.0)
    with pytest.raises(ConfigError, match="optimizer.lr is a float"):
        set_key(data, "optimizer.lr.x", 1.0)


# --------------------------------------------------------------------------- folds
def write_npz(path: Path, classes: int = 12, per_class: int = 5, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes) * 10 + 3, per_class)  # ids 3, 13, 23, ...: not 0..C-1
    # Class-dependent mean images, so that a few training steps can learn something.
    means = rng.random((classes, 16, 16))
    images = np.clip(means[np.repeat(np.arange(classes), per_class)] + 0.1 * rng.standard_normal(
        (len(labels), 16, 16)), 0, 1).astype(np.float32)
    np.savez(path, images=images, labels=labels)
    return path


def ids(ds: Any) -> set[int]:
    """Original class ids of a dataset."""
    return set(np.asarray(ds.classes)[ds.labels].tolist())


def test_data_folds_split_the_training_classes(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz", classes=12)
    base = {"dataset": "npz", "path": str(npz), "image_size": 16, "train_class_fraction": 0.75}
    usual = build_splits(DataConfig(**{**base, "val_class_fraction": 0.0}))
    training, test = ids(usual.train), ids(usual.test)
    assert len(training) == 9 and not training & test
    vals = []
    for fold in range(3):
        splits = build_splits(DataConfig(**base, folds=3, fold=fold))
        tr, va = ids(splits.train), ids(splits.val)
        assert not tr & va and tr | va == training, fold  # class-disjoint, covering every training class
        assert ids(splits.test) == test  # the test split is unchanged
        assert len(splits.train) == 5 * len(tr) and len(splits.val) == 5 * len(va)  # whole classes
        again = build_splits(DataConfig(**base, folds=3, fold=fold))
        assert ids(again.val) == va and np.array_equal(again.val.labels, splits.val.labels)  # deterministic
        vals.append(va)
    assert [len(v) for v in vals] == [3, 3, 3] and set().union(*vals) == training  # a partition
    other_seed = [ids(build_splits(DataConfig(**base, folds=3, fold=f, split_seed=1)).val) for f in range(3)]
    assert other_seed != vals  # split_seed draws the folds
    # max_classes keeps the first classes of the training set before folding.
    capped = [ids(build_splits(DataConfig(**base, folds=2, fold=f, max_classes=4)).val) for f in range(2)]
    assert set().union(*capped) == {3, 13, 23, 33}


def test_omniglot_folds_use_every_background_class() -> None:
    folds = [build_splits(DataConfig(folds=4, fold=f)) for f in range(4)]
    vals = [ids(s.val) for s in folds]
    background = set(range(964))  # global ids 0..963 are the background set, 964..1622 the evaluation set
    assert set().union(*vals) == background and sum(len(v) for v in vals) == 964
    for s, va in zip(folds, vals):
        assert ids(s.train) == background - va and min(ids(s.test)) >= 964
    assert len(folds[0].test) == 13180


def test_omniglot_folds_leave_the_unlabeled_alphabets_out_of_every_fold() -> None:
    """SLADE under cross-validation: whole alphabets go to the unlabeled pool first, the folds cut the rest."""
    unlabeled = {"source": "train_alphabets", "alphabets": 10, "seed": 0}
    folds = [build_splits(config_from_dict({"data": {"folds": 3, "fold": f, "unlabeled": unlabeled}}).data)
             for f in range(3)]
    pool = ids(folds[0].unlabeled.source)
    assert all(ids(s.unlabeled.source) == pool for s in folds)  # the same pool in every fold
    vals = [ids(s.val) for s in folds]
    labeled = set(range(964)) - pool
    assert pool and set().union(*vals) == labeled and sum(len(v) for v in vals) == len(labeled)
    for s, va in zip(folds, vals):
        assert ids(s.train) == labeled - va and not pool & (ids(s.train) | va)


@pytest.mark.parametrize("data, expected", [
    ({"folds": 1}, "data.folds: must be >= 2"),
    ({"fold": 1}, "data.fold: 1 needs data.folds"),
    ({"folds": 3, "fold": 3}, r"data.fold: must be in 0..2 \(data.folds=3\), got 3"),
])
def test_fold_keys_are_checked(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        config_from_dict({"data": data})


def test_more_folds_than_classes_is_a_data_error(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz", classes=4)
    with pytest.raises(DataError, match="data.folds=3: kfold_classes: 2 classes cannot make 3 folds"):
        build_splits(DataConfig(dataset="npz", path=str(npz), image_size=16, folds=3))


# --------------------------------------------------------------------------- search, resume, storage
class FakeFolds:
    """Stands in for fold training: a score from the values, a log of the calls, an optional interrupt."""

    def __init__(self, interrupt_on_trial: int | None = None) -> None:
        self.calls: list[tuple[float, int]] = []
        self.interrupt_on_trial = interrupt_on_trial
        self.trials_seen: list[float] = []

    def __call__(self, run_cfg: Any, out_dir: Path, **_: Any) -> dict[str, Any]:
        lr, fold = run_cfg.optimizer.lr, run_cfg.data.fold
        if fold == 0:
            self.trials_seen.append(lr)
        if self.interrupt_on_trial is not None and len(self.trials_seen) == self.interrupt_on_trial and fold == 1:
            raise KeyboardInterrupt
        self.calls.append((lr, fold))
        return {"score": -abs(math.log10(lr) + 2.5) + 0.01 * fold}


def search_cfg(tmp_path: Path, **extra: Any) -> Any:
    return compare_config_from_dict(compare_dict(tmp_path / "cmp", **extra), REPO)


def study_trials(cfg: Any) -> list[Any]:
    import optuna

    return optuna.load_study(study_name="t.a", storage=cfg.storage_url()).get_trials()


def test_interrupted_search_keeps_finished_trials_and_resumes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = search_cfg(tmp_path)
    first = FakeFolds(interrupt_on_trial=2)  # Ctrl-C in the second fold of the second trial
    monkeypatch.setattr(search_module, "train_fold", first)
    with pytest.raises(CompareInterrupted, match="interrupted during the search of a.*--resume"):
        run_compare(cfg, stage="search", log=lambda _: None, resume_command="dmlgen compare X --resume")
    trials = study_trials(cfg)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["interrupted"] is True
    done_lr, cut_lr = trials[0].params["optimizer.lr"], trials[1].params["optimizer.lr"]
    assert trials[0].value == pytest.approx(statistics.fmean([-abs(math.log10(done_lr) + 2.5) + 0.01 * f
                                                              for f in (0, 1)]))
    assert trials[0].user_attrs["fold_scores"] == [pytest.approx(trials[0].value - 0.005),
                                                   pytest.approx(trials[0].value + 0.005)]
    # Without --resume the folder (and its study) is refused.
    with pytest.raises(ConfigError, match="already holds a compare .*optuna.db.*--resume"):
        run_compare(cfg, stage="search", log=lambda _: None)
    second = FakeFolds()
    monkeypatch.setattr(search_module, "train_fold", second)
    lines: list[str] = []
    run_compare(cfg, resume=True, stage="search", log=lines.append)
    trials = study_trials(cfg)
    assert [t.state.name for t in trials].count("COMPLETE") == 3
    assert done_lr not in second.trials_seen  # the finished trial is not rerun
    assert second.trials_seen[0] == cut_lr  # the interrupted one is queued again with its values
    assert len(second.trials_seen) == 2 and any("queued again" in line for line in lines)
    # A third call has nothing left to do.
    third = FakeFolds()
    monkeypatch.setattr(search_module, "train_fold", third)
    run_compare(cfg, resume=True, stage="search", log=lambda _: None)
    assert third.calls == [] and len(study_trials(cfg)) == 4


def test_resume_refuses_a_changed_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_module, "train_fold", FakeFolds())
    run_compare(search_cfg(tmp_path, trials=1), stage="search", log=lambda _: None)
    changed = search_cfg(tmp_path, trials=1, folds=3)
    with pytest.raises(ConfigError, match="study 't.a' was made by a different search .*folds"):
        run_compare(changed, resume=True, stage="search", log=lambda _: None)


def test_search_is_repeatable_with_a_fixed_sampler_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    for name in ("x", "y"):
        fake = FakeFolds()
        monkeypatch.setattr(search_module, "train_fold", fake)
        run_compare(search_cfg(tmp_path / name), stage="search", log=lambda _: None)
        seen.append(fake.trials_seen)
    assert seen[0] == seen[1] and len(set(seen[0])) == 3


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_processes_sharing_a_study_draw_different_values(tmp_path: Path) -> None:
    """Two processes that open one study at the same moment (same trial count) still draw different values:
    the sampler is seeded per trial number, which the storage hands out once; and the parameters of one trial
    are separate draws, not one random number mapped onto each range."""
    space = {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "loss.params.margin": {"type": "float", "low": 0.05, "high": 0.5}}
    cfg = compare_config_from_dict(compare_dict(tmp_path / "cmp", method("a", **space)), REPO)
    (tmp_path / "cmp").mkdir()
    storage = open_storage(cfg.storage_url())
    spec = cfg.methods[0]
    first, second = (search_module.open_study(cfg, spec, storage, resume=True) for _ in range(2))
    params = [search_module._suggest(study.ask(), spec) for study in (first, second, first, second)]
    assert len({p["optimizer.lr"] for p in params}) == 4
    for p in params:
        u_lr = math.log(p["optimizer.lr"] / 1e-4) / math.log(100)
        u_margin = (p["loss.params.margin"] - 0.05) / 0.45
        assert abs(u_lr - u_margin) > 1e-6


def test_final_stage_needs_a_finished_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_module, "train_fold", FakeFolds())
    with pytest.raises(ConfigError, match="method a: no finished search trial in study 't.a'"):
        run_compare(search_cfg(tmp_path), stage="final", log=lambda _: None)


def test_cli_ctrl_c_exits_130_with_the_resume_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(search_module, "train_fold", FakeFolds(interrupt_on_trial=1))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(compare_dict(tmp_path / "cmp")))
    assert main(["compare", str(path), "--stage", "search", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted during the search of a" in err
    assert f"dmlgen compare {path} --stage search --resume" in err


def test_methods_option_splits_a_compare_between_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Shares of the methods search on one storage; the whole config then finds every trial finished."""
    import optuna

    fake = FakeFolds()
    monkeypatch.setattr(search_module, "train_fold", fake)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(compare_dict(tmp_path / "cmp", method("a"), method("b"), method("c"))))
    base = ["compare", str(path), "--stage", "search", "--quiet"]
    assert main([*base, "--methods", "c", "a"]) == 0
    storage = f"sqlite:///{tmp_path / 'cmp' / 'optuna.db'}"
    assert sorted(optuna.get_all_study_names(storage=storage)) == ["t.a", "t.c"]
    assert main([*base, "--methods", "b", "--resume"]) == 0
    trained = len(fake.calls)
    assert trained == 3 * 3 * 2  # 3 methods x 3 trials x 2 folds
    assert main([*base, "--resume"]) == 0 and len(fake.calls) == trained  # nothing left to run
    assert main([*base, "--methods", "a", "zz", "--resume"]) == 2
    assert "--methods: zz: not a method of the compare config (its methods: a, b, c)" in capsys.readouterr().err


@pytest.mark.parametrize("url, expected", [
    ("postgresql://user:secret@nohost:1/db", "storage postgresql://user:\\*\\*\\*@nohost:1/db: "),
    ("sqlite:///{missing}/optuna.db", "cannot open or reach the database: unable to open database file"),
    ("not-a-url", "is not a database URL"),
])
def test_unreachable_storage_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str,
                                              expected: str) -> None:
    fake = FakeFolds()
    monkeypatch.setattr(search_module, "train_fold", fake)
    cfg = search_cfg(tmp_path, storage=url.format(missing=tmp_path / "no" / "such" / "dir"))
    with pytest.raises(ConfigError, match=expected) as info:
        run_compare(cfg, log=lambda _: None)
    assert "secret" not in str(info.value) and fake.calls == []


def test_display_url_hides_passwords() -> None:
    assert display_url("postgresql://me:pa:ss@host/db") == "postgresql://me:***@host/db"
    assert display_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_shared_storage_file_is_a_plain_sqlite_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process (machine) opening the same URL sees the same study and its finished trials.
    monkeypatch.setattr(search_module, "train_fold", FakeFolds())
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    run_compare(search_cfg(tmp_path, storage=url, trials=2), stage="search", log=lambda _: None)
    with sqlite3.connect(tmp_path / "shared.db") as db:
        states = [row[0] for row in db.execute("SELECT state FROM trials")]
    assert states == ["COMPLETE", "COMPLETE"]
    import optuna

    assert len(optuna.load_study(study_name="t.a", storage=open_storage(url)).trials) == 2


# --------------------------------------------------------------------------- statistics
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}  # two-sided 95% Student t quantiles (printed tables)


def test_mean_ci_against_the_textbook_formula() -> None:
    for values in ([0.5, 0.7], [0.1, 0.2, 0.6], [3.0, 1.0, 4.0, 1.0, 5.0]):
        n = len(values)
        mean = sum(values) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        got = mean_ci(values)
        assert got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(sd)
        assert got["ci95"] == pytest.approx(T975[n - 1] * sd / math.sqrt(n), rel=1e-4)
        assert got["low"] == pytest.approx(mean - got["ci95"]) and got["n"] == n
    one = mean_ci([0.3])
    assert one["mean"] == 0.3 and one["ci95"] is None and one["std"] is None


def test_paired_t_test_against_closed_forms() -> None:
    # t with 1 degree of freedom is Cauchy: p = 1 - 2 atan(|t|) / pi; with 2: p = 1 - |t| / sqrt(2 + t^2).
    for a, b, p_of in (([0.50, 0.62], [0.40, 0.57], lambda t: 1 - 2 * math.atan(abs(t)) / math.pi),
                       ([0.50, 0.62, 0.55], [0.40, 0.57, 0.56], lambda t: 1 - abs(t) / math.sqrt(2 + t * t))):
        d = [x - y for x, y in zip(a, b)]
        n = len(d)
        md = sum(d) / n
        sd = math.sqrt(sum((x - md) ** 2 for x in d) / (n - 1))
        t = md / (sd / math.sqrt(n))
        got = paired_tests(a, b)
        assert got["t_test"]["statistic"] == pytest.approx(t) and got["t_test"]["p"] == pytest.approx(p_of(t))
        assert got["mean_diff"] == pytest.approx(md) and got["diff_ci95"] == pytest.approx(
            T975[n - 1] * sd / math.sqrt(n), rel=1e-4)
        assert got["wilcoxon"] is None and "at least 6 seeds" in got["note"]


def test_paired_t_test_calls_differences_that_differ_only_by_rounding_constant() -> None:
    # x = y + 0.1 in floating point: the differences spread by 2.8e-17, where scipy returned t ~ 8.8e15, p ~ 0
    # (and a precision-loss warning) for what is one constant difference.
    y = [0.6369616873214543, 0.2697867137638703, 0.04097352393619469]
    x = [v + 0.1 for v in y]
    assert max(a - b for a, b in zip(x, y)) != min(a - b for a, b in zip(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = paired_tests(x, y)
    assert got["t_test"] is None and "same for every seed" in got["note"]
    assert got["mean_diff"] == pytest.approx(0.1)
    real = paired_tests([0.70, 0.37, 0.14], [0.64, 0.27, 0.04])  # differences 0.06, 0.10, 0.10: a real spread
    assert real["t_test"] is not None and real["t_test"]["statistic"] == pytest.approx(6.5, rel=1e-6)


def exact_wilcoxon_p(d: list[float]) -> float:
    """Two-sided exact p of the signed-rank test by enumerating every sign pattern (no ties, no zeros)."""
    ranks = {v: r for r, v in enumerate(sorted(abs(x) for x in d), start=1)}
    w_plus = sum(ranks[abs(x)] for x in d if x > 0)
    total = len(d) * (len(d) + 1) / 2
    observed = min(w_plus, total - w_plus)
    stats = [sum(ranks[abs(x)] for x, s in zip(d, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    extreme = sum(1 for w in stats if min(w, total - w) <= observed)
    return min(1.0, extreme / len(stats))


def test_wilcoxon_against_enumeration() -> None:
    a = [0.61, 0.58, 0.66, 0.60, 0.63, 0.59, 0.64]
    b = [0.55, 0.60, 0.57, 0.51, 0.62, 0.49, 0.50]
    for n in (6, 7):
        d = [x - y for x, y in zip(a[:n], b[:n])]
        got = paired_tests(a[:n], b[:n])
        assert got["wilcoxon"]["p"] == pytest.approx(exact_wilcoxon_p(d))
        assert got["t_test"] is not None and got["note"] is None
    assert paired_tests(a[:5], b[:5])["wilcoxon"] is None


def test_degenerate_pairs_say_why_there_is_no_test() -> None:
    same = paired_tests([0.5] * 6, [0.5] * 6)
    assert same["t_test"] is None and same["wilcoxon"] is None and same["mean_diff"] == 0.0
    assert "undefined" in same["note"] and "every difference is 0" in same["note"]
    shifted = paired_tests([0.5, 0.6], [0.4, 0.5])
    assert shifted["t_test"] is None and shifted["mean_diff"] == pytest.approx(0.1)
    single = paired_tests([0.5], [0.4])
    assert single["t_test"] is None and single["note"] == "one seed: no test"


def test_a_fold_of_a_multi_stage_method_scores_its_validation_classes(tmp_path: Path) -> None:
    """Guided DML in a search fold: every stage runs in the fold folder, the last one tests on the validation
    classes (never the test split) and writes no HTML page; the folder is reused once finished."""
    from test_guided import TINY as GUIDED

    cfg = config_from_dict(GUIDED, ["data.folds=2", "data.fold=1"])
    fold = tmp_path / "fold1"
    result = search_module.train_fold(cfg, fold)
    val = build_splits(cfg.data).val
    assert result["val"]["num_queries"] == len(val) and result["metric"] == "map@r"
    assert not (fold / "test_metrics.json").exists() and (fold / "pipeline.json").is_file()
    stages = json.loads((fold / "pipeline.json").read_text())["stages"]
    last = fold / stages[-1]["name"]
    assert [s["status"] for s in stages] == ["complete"] * len(stages) and len(stages) >= 2
    assert json.loads((last / "test_metrics.json").read_text())["test"]["num_queries"] == len(val)
    assert (last / "report.md").is_file() and not list(fold.rglob("report.html"))
    assert search_module.train_fold(cfg, fold) == result  # fold_result.json reused


def test_results_markdown_lists_every_method_against_the_best() -> None:
    from dmlgen.compare.results import _against_best, summarize

    scores = {"a": [0.5, 0.6, 0.55], "b": [0.4, 0.45, 0.5], "c": [0.55, 0.7, 0.6]}
    payload = summarize({n: {"per_seed": {s: {"map@r": v} for s, v in enumerate(x)}} for n, x in scores.items()},
                        [0, 1, 2])
    lines = _against_best(payload, "map@r")
    assert lines[1] == "## Against the best mean test map@r: c"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in lines if line.startswith("| a |")
            or line.startswith("| b |")}
    # a - c per seed: -0.05, -0.10, -0.05; b - c: -0.15, -0.25, -0.10 (read from the best method's side).
    assert rows == {"a": f"{100 * -0.2 / 3:.2f}", "b": f"{100 * -0.5 / 3:.2f}"}
    two = summarize({n: {"per_seed": {s: {"map@r": v} for s, v in enumerate(scores[n])}} for n in ("a", "b")},
                    [0, 1, 2])
    assert _against_best(two, "map@r") == []  # two methods: the pair table says it all


# --------------------------------------------------------------------------- end to end
def tiny_method_config(path: Path, npz: Path, loss: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump({
        "data": {"dataset": "npz", "path": str(npz), "image_size": 16, "train_class_fraction": 0.5,
                 "val_class_fraction": 0.34, "classes_per_batch": 3, "samples_per_class": 3},
        "model": {"backbone": "convnet4", "embedding_size": 8},
        "loss": loss,
        "optimizer": {"name": "adam", "lr": 0.001},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "amp": False},
        "eval": {"ks": [1, 2], "batch_size": 64},
    }))
    return str(path)


def test_end_to_end_tiny_compare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    npz = write_npz(tmp_path / "d.npz", classes=18, per_class=5)
    triplet = tiny_method_config(tmp_path / "triplet.yaml", npz, {"name": "triplet_margin", "params": {"margin": 0.2}})
    ms = tiny_method_config(tmp_path / "ms.yaml", npz, {"name": "multi_similarity"})
    compare = {
        "name": "tiny", "out_dir": str(tmp_path / "out"), "seeds": [0, 1], "folds": 2, "trials": 1,
        "sampler": {"seed": 3}, "search_overrides": {"train.max_steps_per_epoch": 1},
        "methods": [
            {"name": "triplet", "config": triplet,
             "search_space": {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}},
            {"name": "ms", "config": ms,
             "search_space": {"loss.params.beta": {"type": "categorical", "choices": [10.0, 50.0]}}},
        ],
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(compare))
    assert main(["compare", str(path), "--quiet"]) == 0
    out = tmp_path / "out"
    assert "test map@r (mean ± 95% CI over seeds 0, 1)" in capsys.readouterr().out
    for name in ("results.md", "results.csv", "results.json", "comparisons.csv", "per_seed.csv", "optuna.db"):
        assert (out / name).is_file(), name
    payload = json.loads((out / "results.json").read_text())
    for name in ("triplet", "ms"):
        info = payload["methods"][name]
        per_seed = info["per_seed"]
        assert sorted(per_seed) == ["0", "1"] and info["search"]["complete"] == 1
        values = [per_seed[s]["map@r"] for s in ("0", "1")]
        assert info["summary"]["map@r"]["mean"] == pytest.approx(sum(values) / 2)
        # Each final run is a real run folder tested once, with the seed and best values in its config.
        for seed in (0, 1):
            run_dir = Path(info["run_dirs"][str(seed)])
            result = json.loads((run_dir / "test_metrics.json").read_text())
            assert result["test"]["map@r"] == per_seed[str(seed)]["map@r"]
            run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert run_cfg["train"]["seed"] == seed and run_cfg["data"]["folds"] is None
            assert run_cfg["train"]["max_steps_per_epoch"] == 2
        # The search folds validate on training classes only; their runs keep no test result.
        folds = sorted(Path(info["search"]["run_dir"]).glob("fold*"))
        assert [f.name for f in folds] == ["fold0", "fold1"]
        for fold in folds:
            assert not (fold / "test_metrics.json").exists()
            fold_result = json.loads((fold / "fold_result.json").read_text())
            assert fold_result["metric"] == "map@r" and "test_images" not in fold_result["splits"]
            fold_cfg = yaml.safe_load((fold / "config.yaml").read_text())
            assert fold_cfg["data"]["folds"] == 2 and fold_cfg["train"]["max_steps_per_epoch"] == 1
        assert info["search"]["best_score"] == pytest.approx(statistics.fmean(info["search"]["fold_scores"]))
    assert payload["methods"]["ms"]["best_params"]["loss.params.beta"] in (10.0, 50.0)
    pairs = [c for c in payload["comparisons"] if c["metric"] == "map@r"]
    assert len(pairs) == 1 and pairs[0]["a"] == "triplet" and pairs[0]["b"] == "ms"
    a = [payload["methods"]["triplet"]["per_seed"][s]["map@r"] for s in ("0", "1")]
    b = [payload["methods"]["ms"]["per_seed"][s]["map@r"] for s in ("0", "1")]
    assert pairs[0]["mean_diff"] == pytest.approx((a[0] - b[0] + a[1] - b[1]) / 2)
    md = (out / "results.md").read_text()
    assert "| triplet |" in md and "| ms |" in md and "### map@r" in md and "95% t-interval" in md
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "method,metric,n,mean,std,ci95,low,high"
    assert any(row.startswith("ms,map@r,2,") for row in csv_rows)
    # A resumed compare reuses every finished trial and run: nothing trains again, the results are equal.
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(search_module, "train_fold", no_training)
    monkeypatch.setattr("dmlgen.engine.run.train", no_training)
    before = copy.deepcopy(payload)
    assert main(["compare", str(path), "--resume", "--quiet"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["methods"] == before["methods"] and after["comparisons"] == before["comparisons"]
