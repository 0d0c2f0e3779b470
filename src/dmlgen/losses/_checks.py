"""Parameter validators shared by distances, reducers, miners and losses.

Each raises :class:`~dmlgen.errors.ConfigError` naming the owner, the parameter and the value, so a
bad YAML entry is reported as such instead of surfacing later as a tensor error.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, TypeVar

from dmlgen.errors import ConfigError

T = TypeVar("T")


def check_number(owner: str, name: str, value: Any, *, positive: bool = False) -> float:
    """Return ``value`` as a float; it must be a finite real number (and > 0 if ``positive``)."""
    # bool is a subclass of int: `margin: true` in a config is a typo, not 1.0.
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}")
    if positive and float(value) <= 0:
        raise ConfigError(f"{owner}: {name} must be > 0, got {value!r}")
    return float(value)


def check_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value``; it must be an ``int`` (not a bool or a float) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    """Return ``value``; it must be a real ``bool`` (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}: {name} must be true or false, got {value!r}")
    return value


def check_choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Return ``value``; it must be one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        accepted = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{owner}: {name} must be one of {accepted}, got {value!r}")
    return value


def accepted_params(factory: Callable[..., Any]) -> list[str]:
    """Keyword parameters of ``factory`` (a class or function), in signature order."""
    sig = inspect.signature(factory)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in sig.parameters.items() if p.kind in kinds and n != "self"]


def build_named(kind: str, table: Mapping[str, Callable[..., T]], name: Any, params: Mapping[str, Any]) -> T:
    """``table[name](**params)`` with ConfigErrors that name an unknown ``name`` or parameter key."""
    if not isinstance(name, str) or name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; accepted: {', '.join(sorted(table))}")
    factory = table[name]
    accepted = accepted_params(factory)
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"{kind} {name!r}: unknown parameter {key!r}; accepted: {', '.join(accepted) or '(none)'}"
            )
    required = [n for n, p in inspect.signature(factory).parameters.items()
                if n in accepted and p.default is inspect.Parameter.empty]
    missing = [n for n in required if n not in params]
    if missing:
        raise ConfigError(f"{kind} {name!r}: missing parameter(s) {', '.join(map(repr, missing))}")
    return factory(**params)


def build_from_spec(kind: str, table: Mapping[str, Callable[..., T]], spec: Any) -> T:
    """Build from a name (``"cosine"``) or a mapping ``{"name": "lp", **params}`` as read from YAML."""
    if isinstance(spec, str):
        return build_named(kind, table, spec, {})
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ConfigError(f"{kind} {dict(spec)!r}: missing 'name'; accepted: {', '.join(sorted(table))}")
        params = {k: v for k, v in spec.items() if k != "name"}
        return build_named(kind, table, spec["name"], params)
    raise ConfigError(
        f"{kind} must be a module, a name ({', '.join(sorted(table))}) or a mapping with 'name', got {spec!r}"
    )


def check_triplets_per_anchor(owner: str, value: Any) -> int | str:
    """``"all"`` or an integer >= 1 (random triplets per anchor)."""
    if value != "all" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{owner}: triplets_per_anchor must be 'all' or an integer >= 1, got {value!r}")
    return value


def check_generator(owner: str, value: Any) -> Any:
    """None or a ``torch.Generator``."""
    import torch

    if value is not None and not isinstance(value, torch.Generator):
        raise ConfigError(f"{owner}: generator must be a torch.Generator, got {value!r}")
    return value
