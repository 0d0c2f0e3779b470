"""Reducers: turn a loss's per-element values into a scalar (pytorch-metric-learning's reducers).

A loss returns one or more :class:`LossTerm` s; the loss's reducer reduces each and the results are summed.
An empty term (no element) reduces to the batch's in-graph zero, ``emb.sum() * 0`` (methods.md §1.2.4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ._checks import build_from_spec
from .batch import MetricBatch

TermKind = Literal["element", "pos_pair", "neg_pair", "triplet", "already_reduced"]


@dataclass(frozen=True)
class LossTerm:
    """Per-element losses ``(T,)`` (or a 0-dim value when ``kind == "already_reduced"``).

    ``indices`` says what each element is: ``(anchors,)`` for "element", ``(a, p)`` / ``(a, n)`` for pairs,
    ``(a, p, n)`` for triplets. It may be ``None`` when no reducer asked for it (see
    :attr:`BaseReducer.needs_indices`); losses only build it on demand to save memory.
    """

    losses: Tensor
    kind: TermKind
    indices: tuple[Tensor, ...] | None = None


class BaseReducer(torch.nn.Module):
    """``reducer(term, batch) -> 0-dim tensor``. Subclasses implement :meth:`reduce` for a non-empty term."""

    #: Set by reducers that weight elements by their indices (per-anchor, per-class, ...).
    needs_indices: bool = False

    def forward(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        if term.kind == "already_reduced":
            return term.losses.reshape(())
        if term.losses.numel() == 0:
            return batch.zero()
        return self.reduce(term, batch)

    def reduce(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        raise NotImplementedError


class MeanReducer(BaseReducer):
    """Mean over all elements (PML's MeanReducer, the default of most losses)."""

    def reduce(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        return term.losses.mean()


class AvgNonZeroReducer(BaseReducer):
    """Mean over the elements > 0 (PML's AvgNonZeroReducer, the triplet loss's default); zero if none is."""

    def reduce(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        losses = term.losses
        active = losses > 0
        # Sum/count instead of boolean indexing: no host sync and no data-dependent shape. `where` (not a
        # product) keeps a NaN element out of the sum, as PML's `losses[losses > 0]` does.
        total = torch.where(active, losses, torch.zeros_like(losses)).sum()
        count = active.sum().clamp_min(1).to(losses.dtype)
        return total / count


class SumReducer(BaseReducer):
    """Sum over all elements."""

    def reduce(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        return term.losses.sum()


REDUCERS: dict[str, type[BaseReducer]] = {
    "mean": MeanReducer,
    "avg_non_zero": AvgNonZeroReducer,
    "sum": SumReducer,
}

ReducerSpec = BaseReducer | str | Mapping[str, Any] | None


def build_reducer(spec: ReducerSpec, *, default: type[BaseReducer] = MeanReducer) -> BaseReducer:
    """A reducer from an instance, a name (``"mean"``, ``"avg_non_zero"``, ``"sum"``), a mapping
    ``{"name": ...}``, or ``None`` for ``default()``."""
    if spec is None:
        return default()
    if isinstance(spec, BaseReducer):
        return spec
    return build_from_spec("reducer", REDUCERS, spec)
