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
    ``divisor`` is the loss's own normaliser (a count, 0-dim tensor or number), read only by
    :class:`DivisorReducer`; other reducers ignore it.

    ``mask`` (bool, the shape of ``losses``) makes a *dense* term: only its True entries are elements, in
    ``torch.where(mask)`` order (which is also the order of ``indices``). Reducers then never gather the
    elements: a boolean selection and its backward (nonzero + index_put) cost more than the loss itself.
    """

    losses: Tensor
    kind: TermKind
    indices: tuple[Tensor, ...] | None = None
    divisor: Tensor | float | None = None
    mask: Tensor | None = None


class BaseReducer(torch.nn.Module):
    """``reducer(term, batch) -> 0-dim tensor``. Subclasses implement :meth:`reduce` for a non-empty term."""

    #: Set by reducers that weight elements by their indices (per-anchor, per-class, ...).
    needs_indices: bool = False

    def forward(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        if term.kind == "already_reduced":
            return term.losses.reshape(())
        if term.mask is not None:
            return self.reduce_masked(term, batch)
        if term.losses.numel() == 0:
            return batch.zero()
        return self.reduce(term, batch)

    def reduce(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        raise NotImplementedError

    def reduce_masked(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        """A dense term (``term.mask`` set); this fallback gathers the elements, subclasses avoid that."""
        assert term.mask is not None
        losses = term.losses[term.mask]
        if losses.numel() == 0:
            return batch.zero()
        return self.reduce(LossTerm(losses, term.kind, term.indices, term.divisor), batch)


def _masked(term: LossTerm) -> tuple[Tensor, Tensor]:
    """The dense losses with non-elements set to 0 (``where``, so a NaN outside the mask stays out), and the
    mask."""
    assert term.mask is not None
    return torch.where(term.mask, term.losses, torch.zeros_like(term.losses)), term.mask


class MeanReducer(BaseReducer):
    """Mean over all elements (PML's MeanReducer, the default of most losses)."""

    def reduce(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        return term.losses.mean()

    def reduce_masked(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        losses, mask = _masked(term)
        # An empty mask gives 0 / 1 = an in-graph zero.
        return losses.sum() / mask.sum().clamp_min(1).to(losses.dtype)


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

    def reduce_masked(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        losses, mask = _masked(term)
        active = mask & (losses > 0)
        return losses.sum() / active.sum().clamp_min(1).to(losses.dtype)


class SumReducer(BaseReducer):
    """Sum over all elements."""

    def reduce(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        return term.losses.sum()

    def reduce_masked(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        return _masked(term)[0].sum()


class DivisorReducer(BaseReducer):
    """Sum divided by the term's own ``divisor`` (PML's DivisorReducer: margin and proxy-anchor losses).

    A divisor of 0 (nothing active) gives the plain sum, which is then 0 for hinge losses; a term without a
    divisor is summed.
    """

    def reduce(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        return self._divide(term.losses.sum(), term)

    def reduce_masked(self, term: LossTerm, batch: MetricBatch) -> Tensor:
        return self._divide(_masked(term)[0].sum(), term)

    @staticmethod
    def _divide(total: Tensor, term: LossTerm) -> Tensor:
        if term.divisor is None:
            return total
        divisor = torch.as_tensor(term.divisor, dtype=total.dtype, device=total.device)
        # No host sync on the count; a zero divisor becomes 1 (dividing and masking would give 0 * inf = NaN).
        return total / torch.where(divisor > 0, divisor, torch.ones_like(divisor))


REDUCERS: dict[str, type[BaseReducer]] = {
    "mean": MeanReducer,
    "avg_non_zero": AvgNonZeroReducer,
    "sum": SumReducer,
    "divisor": DivisorReducer,
}

ReducerSpec = BaseReducer | str | Mapping[str, Any] | None


def build_reducer(spec: ReducerSpec, *, default: type[BaseReducer] = MeanReducer) -> BaseReducer:
    """A reducer from an instance, a name (``"mean"``, ``"avg_non_zero"``, ``"sum"``, ``"divisor"``), a mapping
    ``{"name": ...}``, or ``None`` for ``default()``."""
    if spec is None:
        return default()
    if isinstance(spec, BaseReducer):
        return spec
    return build_from_spec("reducer", REDUCERS, spec)
