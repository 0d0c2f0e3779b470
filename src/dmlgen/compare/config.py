"""The ``dmlgen compare`` configuration: methods, their search spaces, seeds, folds and budgets.

A compare config is YAML read with the safe loader and validated into :class:`CompareConfig`; like run
configs it only names things (files, dotted config keys, numbers), never Python objects. Every method's
run config is loaded and checked at load time, with each search-space bound or choice applied once, so a
typo in a key or a bound the run config rejects fails before any training, naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from dmlgen.engine.config import RunConfig, config_from_dict
from dmlgen.engine.config_schema import from_dict, load_yaml, to_dict
from dmlgen.errors import ConfigError

__all__ = ["CompareConfig", "MethodSpec", "SearchParam", "load_compare_config", "resolve_run_config", "select_methods",
           "set_key"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SCALAR = (str, int, float, bool, type(None))
# Run-config keys that change how a run is executed but not its result: left out of fingerprints, so that
# e.g. another device or worker count on the resuming machine does not make a "different" study.
_EXECUTION_KEYS = ("name", "out_dir", "train.device", "train.log_every", "data.num_workers", "eval.batch_size")


@dataclass
class SearchParam:
    """One searched hyper-parameter.

    ``type``: ``float`` / ``int`` (between ``low`` and ``high``, inclusive, optionally ``log`` scale or a
    ``step``) or ``categorical`` (one of ``choices``). ``keys``: the dotted run-config keys that receive the
    value (default: the parameter's own name), e.g. ``[loss.params.margin, loss.miner.params.margin]`` to
    search a loss margin and its miner's margin as one value.
    """

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    keys: list[str] | None = None

    def check(self, where: str) -> None:
        """Raise a ConfigError naming ``where.<field>`` for an inconsistent declaration."""
        if self.type == "categorical":
            extra = [k for k, v in (("low", self.low), ("high", self.high), ("step", self.step)) if v is not None]
            if extra or self.log:
                raise ConfigError(f"{where}.{(extra or ['log'])[0]}: not used by type categorical (give choices)")
            if not self.choices:
                raise ConfigError(f"{where}.choices: a categorical parameter needs a non-empty list of choices")
            for i, choice in enumerate(self.choices):
                if not isinstance(choice, _SCALAR):
                    raise ConfigError(f"{where}.choices[{i}]: must be a number, string, true/false or null, "
                                      f"got {choice!r}")
            if len({json.dumps(c) for c in self.choices}) != len(self.choices):
                raise ConfigError(f"{where}.choices: a choice is listed twice in {self.choices}")
            return
        if self.choices is not None:
            raise ConfigError(f"{where}.choices: only for type categorical, not {self.type}")
        for name, value in (("low", self.low), ("high", self.high)):
            if value is None:
                raise ConfigError(f"{where}.{name}: required for type {self.type}")
        assert self.low is not None and self.high is not None
        if self.type == "int":
            for name, value in (("low", self.low), ("high", self.high), ("step", self.step)):
                if value is not None and not float(value).is_integer():
                    raise ConfigError(f"{where}.{name}: must be an integer for type int, got {value}")
        if not self.low < self.high:
            raise ConfigError(f"{where}.low: must be < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"{where}.low: must be > 0 on a log scale, got {self.low}")
        if self.log and self.step is not None:
            raise ConfigError(f"{where}.step: cannot be combined with log: true")
        if self.step is not None and self.step <= 0:
            raise ConfigError(f"{where}.step: must be > 0, got {self.step}")

    def probe_values(self) -> list[Any]:
        """Values that must each give a valid run config: both bounds, or every choice."""
        if self.type == "categorical":
            assert self.choices is not None
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


@dataclass
class MethodSpec:
    """One compared method: a run config (``config``, a YAML path), its own ``overrides`` and search space."""

    name: str
    config: str
    search_space: dict[str, SearchParam] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str) -> None:
        """Raise a ConfigError naming ``where.<field>`` (e.g. ``methods[0].search_space.optimizer.lr.low``)."""
        if not _NAME.match(self.name):
            raise ConfigError(f"{where}.name: {self.name!r} must start with a letter or digit and hold only "
                              "letters, digits, '_', '.' and '-' (it names folders and studies)")
        if not self.search_space:
            raise ConfigError(f"{where}.search_space: empty for method {self.name!r}; declare at least one "
                              "parameter, e.g. optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
        for pname, param in self.search_space.items():
            param.check(f"{where}.search_space.{pname}")
            keys = param.keys if param.keys is not None else [pname]
            if not keys:
                raise ConfigError(f"{where}.search_space.{pname}.keys: empty list")
            for key in keys:
                if not key or any(not part for part in key.split(".")):
                    raise ConfigError(f"{where}.search_space.{pname}: {key!r} is not a dotted config key")

    def keys_of(self, pname: str) -> list[str]:
        keys = self.search_space[pname].keys
        return list(keys) if keys is not None else [pname]


@dataclass
class SamplerConfig:
    """Optuna's TPE sampler: ``seed`` (fixed, so a search is repeatable) and ``startup_trials`` (random
    trials before TPE models the results)."""

    seed: int = 0
    startup_trials: int = 10

    def validate(self) -> None:
        if self.startup_trials < 0:
            raise ConfigError(f"sampler.startup_trials: must be >= 0, got {self.startup_trials}")


@dataclass
class CompareConfig:
    """A whole comparison (see docs/compare.md).

    Every run's config is: the method's YAML, then ``overrides`` (all runs), the method's ``overrides``,
    ``search_overrides`` (search trials) or ``final_overrides`` (final runs), then the searched values.
    """

    methods: list[MethodSpec]
    name: str = "compare"
    out_dir: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    folds: int = 4
    trials: int = 20
    # Validation metric of the search (mean over folds of each fold's best epoch); it is also every run's
    # eval.select_metric, so one metric selects both hyper-parameters and checkpoints.
    score_metric: str = "map@r"
    # Seed of the class folds and of the run configs' splits (data.split_seed), the same for every method.
    split_seed: int = 0
    # Any database URL Optuna accepts; None: sqlite:///<out_dir>/optuna.db.
    storage: str | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    overrides: dict[str, Any] = field(default_factory=dict)
    search_overrides: dict[str, Any] = field(default_factory=dict)
    final_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"name: {self.name!r} must hold only letters, digits, '_', '.' and '-'")
        if not self.methods:
            raise ConfigError("methods: empty; list at least one method")
        for i, method in enumerate(self.methods):
            method.check(f"methods[{i}]")
        names = [m.name for m in self.methods]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"methods: name {twice[0]!r} is used twice")
        if not self.seeds:
            raise ConfigError("seeds: empty; give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: a seed is listed twice in {self.seeds}")
        if self.folds < 2:
            raise ConfigError(f"folds: must be >= 2, got {self.folds}")
        if self.trials < 1:
            raise ConfigError(f"trials: must be >= 1, got {self.trials}")
        if self.storage is not None and not self.storage.strip():
            raise ConfigError("storage: empty string; omit it for the default sqlite:///<out_dir>/optuna.db")

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir if self.out_dir is not None else f"runs/compare/{self.name}")

    def storage_url(self) -> str:
        if self.storage is not None:
            return self.storage
        return f"sqlite:///{self.out_path.resolve() / 'optuna.db'}"

    def method(self, name: str) -> MethodSpec:
        for m in self.methods:
            if m.name == name:
                return m
        raise ConfigError(f"no method named {name!r}; methods: {', '.join(m.name for m in self.methods)}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------- dotted keys
def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (dotted) in raw run-config data; missing mappings are created (validation then rejects
    unknown keys), a list item is chosen by index (``regularizers.0.weight``) or by its ``name``
    (``regularizers.mdr.weight``)."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where)
            if last:
                node[index] = copy.deepcopy(value)
                return
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[:i])} is a {type(node).__name__}, not a mapping or list")
        if last:
            node[part] = copy.deepcopy(value)
            return
        if node.get(part) is None:
            node[part] = {}
        node = node[part]


def _list_index(items: list[Any], part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not 0 <= index < len(items):
            raise ConfigError(f"{where}: index {index} out of range (the list has {len(items)} items)")
        return index
    named = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("name") == part]
    if len(named) != 1:
        names = [str(item.get("name")) for item in items if isinstance(item, dict)]
        raise ConfigError(f"{where}: {'no' if not named else 'more than one'} list item named {part!r} "
                          f"(items: {', '.join(names) or 'none'}); use an index or a unique name")
    return named[0]


# --------------------------------------------------------------------------- run configs
Stage = Literal["search", "final"]


def _method_raw(cfg: CompareConfig, method: MethodSpec, stage: Stage) -> dict[str, Any]:
    data = load_yaml(method.config)
    for source, overrides in (("overrides", cfg.overrides), (f"methods.{method.name}.overrides", method.overrides),
                              (f"{stage}_overrides", cfg.search_overrides if stage == "search" else cfg.final_overrides)):
        for key, value in overrides.items():
            try:
                set_key(data, key, value)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
    set_key(data, "data.split_seed", cfg.split_seed)
    set_key(data, "eval.select_metric", cfg.score_metric)
    return data


def resolve_run_config(cfg: CompareConfig, method: MethodSpec, stage: Stage, params: dict[str, Any] | None = None,
                       *, fold: int | None = None, seed: int | None = None) -> RunConfig:
    """The validated run config of one search fold (``stage="search"``, ``fold``) or final run (``seed``).

    ``params`` maps search-space names to values. Search runs use ``data.folds = cfg.folds``; final runs the
    method config's own train / validation split.
    """
    data = _method_raw(cfg, method, stage)
    for pname, value in (params or {}).items():
        for key in method.keys_of(pname):
            set_key(data, key, value)
    if stage == "search":
        set_key(data, "data.folds", cfg.folds)
        set_key(data, "data.fold", 0 if fold is None else fold)
    if seed is not None:
        set_key(data, "train.seed", seed)
    return config_from_dict(data)


def fingerprint(run_config: RunConfig | dict[str, Any]) -> str:
    """12 hex digits of SHA-256 over the config's result-relevant keys (:data:`_EXECUTION_KEYS` left out)."""
    data = copy.deepcopy(run_config.to_dict() if isinstance(run_config, RunConfig) else run_config)
    for key in _EXECUTION_KEYS:
        *head, last = key.split(".")
        node = data
        for part in head:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_methods(cfg: CompareConfig) -> None:
    """Load every method's run config, and apply each bound / choice alone, so errors surface now."""
    from dmlgen.engine.setup import build_criterion, build_regularizers  # torch: only when checking

    def check(run_cfg: RunConfig) -> None:
        build_criterion(run_cfg.loss, num_classes=8, embedding_size=run_cfg.model.embedding_size)
        build_regularizers(run_cfg.regularizers)

    for i, method in enumerate(cfg.methods):
        where = f"methods[{i}] ({method.name})"
        for stage in ("search", "final"):
            try:
                check(resolve_run_config(cfg, method, stage))  # type: ignore[arg-type]
            except ConfigError as exc:
                raise ConfigError(f"{where}: {method.config} with the compare overrides ({stage} runs): {exc}") \
                    from None
        for pname, param in method.search_space.items():
            for value in param.probe_values():
                try:
                    check(resolve_run_config(cfg, method, "search", {pname: value}))
                except ConfigError as exc:
                    raise ConfigError(f"methods[{i}].search_space.{pname}: the value {value!r} gives an invalid "
                                      f"run config of method {method.name!r}: {exc}") from None


def _resolve_path(path: str, base: Path, field_name: str) -> str:
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        if candidate.is_file():
            return str(candidate)
        raise ConfigError(f"{field_name}: file {candidate} does not exist")
    tried = [base / candidate, Path.cwd() / candidate]
    for place in tried:
        if place.is_file():
            return str(place.resolve())
    raise ConfigError(f"{field_name}: file {path!r} not found (looked in {tried[0].parent} and {tried[1].parent})")


def _read_numbers(data: dict[str, Any]) -> None:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: accept such bounds as the numbers they spell."""
    methods = data.get("methods")
    for method in methods if isinstance(methods, list) else []:
        space = method.get("search_space") if isinstance(method, dict) else None
        for param in space.values() if isinstance(space, dict) else []:
            for name in ("low", "high", "step"):
                value = param.get(name) if isinstance(param, dict) else None
                if isinstance(value, str):
                    try:
                        param[name] = float(value)
                    except ValueError:
                        pass  # left for the type check, which names the key


def compare_config_from_dict(data: dict[str, Any], base_dir: str | Path = ".", *, check: bool = True) -> CompareConfig:
    """Validate raw data into a :class:`CompareConfig`; relative method config paths are looked up next to
    ``base_dir`` first, then in the current folder. ``check`` also loads and checks every run config."""
    data = copy.deepcopy(data)
    if "methods" not in data:
        raise ConfigError("methods: required (a list of {name, config, search_space})")
    _read_numbers(data)
    cfg = from_dict(CompareConfig, data)
    for i, method in enumerate(cfg.methods):
        method.config = _resolve_path(method.config, Path(base_dir), f"methods[{i}].config")
    if check:
        _check_methods(cfg)
    return cfg


def load_compare_config(path: str | Path, *, out_dir: str | Path | None = None, check: bool = True) -> CompareConfig:
    """Read and validate a compare config; errors name the file and the key. ``out_dir`` replaces ``out_dir``."""
    data = load_yaml(path)
    if out_dir is not None:
        data["out_dir"] = str(out_dir)
    data.setdefault("name", Path(path).stem)
    try:
        return compare_config_from_dict(data, Path(path).resolve().parent, check=check)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def select_methods(cfg: CompareConfig, names: Sequence[str]) -> CompareConfig:
    """``cfg`` with only the methods named (in the config's order): e.g. one share of a compare per process,
    all on one storage and folder; a later run over the whole config reuses every finished trial and run."""
    known = [m.name for m in cfg.methods]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"--methods: {', '.join(unknown) or 'no name given'}: not a method of the compare config "
                          f"(its methods: {', '.join(known)})")
    return replace(cfg, methods=[m for m in cfg.methods if m.name in set(names)])
