"""Base class of the metric losses: distance + optional miner output + reducer.

A subclass implements :meth:`BaseMetricLoss.compute_loss`, which receives a validated
:class:`~dmlgen.losses.batch.MetricBatch` (embeddings already >= fp32, autocast off) and the validated
``indices_tuple`` (or ``None``), and returns named :class:`~dmlgen.losses.reducers.LossTerm` s. The base class
reduces each term with the loss's reducer and sums them (PML's per-sub-loss reducers).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .batch import MetricBatch, full_precision
from .distances import BaseDistance, DistanceSpec, LpDistance, build_distance
from .indices import IndicesTuple, check_indices_tuple
from .reducers import BaseReducer, LossTerm, MeanReducer, ReducerSpec, build_reducer


#: :meth:`BaseMetricLoss.values_at` computes pairs row by row while they number at most N * M / this.
ROWWISE_FRACTION = 32


class DegenerateBatchWarning(UserWarning):
    """A batch from which the loss cannot form any comparison (one sample, one class): the loss is 0."""


_DEGENERATE_MESSAGES = {
    "single_sample": "the batch has a single sample",
    "single_class": "every sample (and reference) has the same label",
}


class BaseMetricLoss(torch.nn.Module):
    """``loss(embeddings (N, D), labels (N,), indices_tuple=None, ref_emb=None, ref_labels=None) -> ()``.

    Args:
        distance: a :class:`BaseDistance`, a registry name / mapping, or ``None`` for the class default.
        reducer: a :class:`BaseReducer`, a registry name / mapping, or ``None`` for the class default.

    With ``ref_emb`` (``(M, D)``, needs ``ref_labels (M,)``) anchors come from ``embeddings`` and positives
    and negatives from ``ref_emb`` (cross-batch memory, gathered batches). As in PML, reference ``j`` is
    then a positive of query ``j`` whenever the labels match, even if it holds the same sample; pass
    ``ref_emb=embeddings`` (the same object) for self-comparison. ``indices_tuple`` is a miner's output
    (triplets or pairs) and replaces the label-derived selection.
    """

    default_distance: type[BaseDistance] = LpDistance
    default_reducer: type[BaseReducer] = MeanReducer

    def __init__(self, distance: DistanceSpec = None, reducer: ReducerSpec = None) -> None:
        super().__init__()
        self.distance = build_distance(distance, default=self.default_distance)
        self.reducer = build_reducer(reducer, default=self.default_reducer)
        self._warned: set[str] = set()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        batch = MetricBatch.from_inputs(embeddings, labels, ref_emb, ref_labels)
        reason = self.degenerate_reason(batch)
        if reason is not None:
            self._warn_once(reason)
            return batch.zero()
        if indices_tuple is not None:
            indices_tuple = check_indices_tuple(
                indices_tuple, batch.embeddings.shape[0], batch.ref_emb.shape[0], batch.device
            )
        with full_precision(batch.device):
            terms = self.compute_loss(batch, indices_tuple)
            if not terms:
                return batch.zero()
            values = [self.reducer(term, batch) for term in terms.values()]
        return torch.stack(values).sum() if len(values) > 1 else values[0]

    def compute_loss(self, batch: MetricBatch, indices_tuple: IndicesTuple | None) -> dict[str, LossTerm]:
        """Named loss terms; an empty dict (or empty terms) means the empty loss."""
        raise NotImplementedError

    def degenerate_reason(self, batch: MetricBatch) -> str | None:
        """Why the batch admits no comparison at all, or ``None``. Proxy-based losses, which compare with
        learned class vectors rather than other samples, override this to return ``None``."""
        return batch.degenerate_reason()

    def _warn_once(self, reason: str) -> None:
        # Once per reason and loss instance: a training loop would otherwise repeat it every step.
        if reason in self._warned:
            return
        self._warned.add(reason)
        warnings.warn(
            f"{type(self).__name__}: {_DEGENERATE_MESSAGES.get(reason, reason)}; returning a zero loss "
            "(this warning is shown once)",
            DegenerateBatchWarning,
            stacklevel=2,
        )

    def values_at(self, batch: MetricBatch, *pairs: tuple[Tensor, Tensor]) -> list[Tensor]:
        """Distance values ``(T_k,)`` at each ``(query indices, reference indices)`` pair list.

        The same values as indexing the full ``(N, M)`` matrix (self-pairs in self mode are exactly 0 for a
        distance). When the pairs are few (a miner's triplets: O(N) pairs) they are computed row by row,
        O(T * D) instead of the O(N * M * D) matrix product and its backward.
        """
        total = sum(int(i.numel()) for i, _ in pairs)
        n, m = batch.embeddings.shape[0], batch.ref_emb.shape[0]
        if total * ROWWISE_FRACTION > n * m:
            mat = self.distance(batch.embeddings, batch.ref_or_none)
            return [mat[i, j] for i, j in pairs]
        dist = self.distance
        query = dist.maybe_normalize(batch.embeddings)
        ref = query if batch.self_ref else dist.maybe_normalize(batch.ref_emb)
        out = []
        for i, j in pairs:
            # index_select: its backward is an index_add, where indexing's accumulating index_put sorts the
            # indices first (1.6x as long for a miner's 768 triplets at 256 x 512 on one core).
            values = dist.compute_rows(query.index_select(0, i), ref.index_select(0, j))
            if dist.power != 1:
                values = values.pow(dist.power)
            if batch.self_ref and not dist.is_inverted:
                # The matrix convention: a sample's distance to itself is exactly 0 (not sqrt(1e-12)).
                values = values.masked_fill(i == j, 0.0)
            out.append(values)
        return out

    def wants_indices(self) -> bool:
        """Whether terms must carry their indices (the reducer weights elements by them)."""
        return self.reducer.needs_indices

    def _params_repr(self) -> dict[str, Any]:
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._params_repr().items())
