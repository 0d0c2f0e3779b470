"""dmlgen.methods: training methods that change more than the loss (``method:`` in a run config).

``METHODS`` maps the fixed names a config may use to ``(method class, params dataclass)``; the engine
validates ``method.params`` with the dataclass (unknown keys and wrong types are ConfigErrors naming
``method.params.<key>``) and builds the method with :func:`build_method`.

- ``standard``: the engine's own step (one loss, optional regularizers).
- ``sharing``: Sharing Matters with the MIC option (methods.md §5), :mod:`dmlgen.methods.sharing`.
- ``slade``: the SLADE pipeline (methods.md §7), with its stage methods ``slade_ssl`` and ``slade_student``,
  :mod:`dmlgen.methods.slade`.
- ``guided``: the Guided DML pipeline (methods.md §6), with its student stage method ``guided_student``,
  :mod:`dmlgen.methods.guided`.
"""

from __future__ import annotations

from typing import Any

from dmlgen.errors import ConfigError

from .base import MethodSetup, StandardMethod, StandardParams, StepContext, TrainingMethod
from .guided import GuidedMethod, GuidedParams, GuidedStudentMethod, GuidedStudentParams
from .sharing import SharingMethod, SharingParams, TwoHeadModel
from .slade import (
    SladeMethod,
    SladeParams,
    SladeSSLMethod,
    SladeSSLParams,
    SladeStudentMethod,
    SladeStudentParams,
)

METHODS: dict[str, tuple[type[TrainingMethod], type[Any]]] = {
    "standard": (StandardMethod, StandardParams),
    "sharing": (SharingMethod, SharingParams),
    "guided": (GuidedMethod, GuidedParams),
    "guided_student": (GuidedStudentMethod, GuidedStudentParams),
    "slade": (SladeMethod, SladeParams),
    "slade_ssl": (SladeSSLMethod, SladeSSLParams),
    "slade_student": (SladeStudentMethod, SladeStudentParams),
}


def method_params_class(name: str) -> type[Any]:
    """The dataclass that validates ``method.params`` of method ``name``."""
    if name not in METHODS:
        raise ConfigError(f"method.name: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name][1]


def build_method(name: str, params: Any) -> TrainingMethod:
    """The method ``name`` with its validated params object."""
    cls, params_cls = METHODS.get(name, (None, None))
    if cls is None:
        raise ConfigError(f"method.name: {name!r} is not one of {', '.join(METHODS)}")
    if not isinstance(params, params_cls):  # type: ignore[arg-type]
        raise ConfigError(f"method {name!r}: params must be a {params_cls.__name__}")  # type: ignore[union-attr]
    return cls(params)


__all__ = [
    "METHODS",
    "GuidedMethod",
    "GuidedParams",
    "GuidedStudentMethod",
    "GuidedStudentParams",
    "MethodSetup",
    "SharingMethod",
    "SharingParams",
    "SladeMethod",
    "SladeParams",
    "SladeSSLMethod",
    "SladeSSLParams",
    "SladeStudentMethod",
    "SladeStudentParams",
    "StandardMethod",
    "StepContext",
    "TrainingMethod",
    "TwoHeadModel",
    "build_method",
    "method_params_class",
]
