"""NT-Xent (normalised temperature-scaled cross-entropy; SimCLR, Chen et al. 2020), PML's ``NTXentLoss`` semantics.

For every positive pair ``(a, p)`` with logits ``z = s / tau`` (a similarity ``s``; for a distance ``z = -d / tau``)::

    l_ap = -log( exp(z_ap) / (exp(z_ap) + sum_{n in N(a)} exp(z_an)) )

``N(a)`` are the anchor's negatives (other labels, or the pairs an ``indices_tuple`` gives); other positives of
the anchor are *not* in the denominator (as PML's). The pair losses are reduced by the reducer (default: mean
over positive pairs).

Self-supervised use (SLADE's teacher initialisation, methods.md §7.1): two augmented views of ``B`` images,
``emb = cat(z1, z2)`` ``(2B, D)`` and ``labels = cat(arange(B), arange(B))``: each view's only positive is the
other view of its image and the ``2B - 2`` other views are its negatives, which is SimCLR's loss exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dmlgen.errors import DataError

from ._checks import check_number
from .base import BaseMetricLoss
from .batch import MetricBatch
from .distances import CosineSimilarity, DistanceSpec
from .indices import IndicesTuple, to_pairs
from .reducers import LossTerm, MeanReducer, ReducerSpec


class NTXentLoss(BaseMetricLoss):
    """NT-Xent / InfoNCE over positive pairs.

    Args:
        temperature: tau > 0 (PML's default 0.07; SimCLR uses 0.1-0.5).
        distance: default :class:`CosineSimilarity`; with a distance the logits are ``-d / tau``.
        reducer: default :class:`MeanReducer` over positive pairs.

    Numerics: each pair's log-sum-exp subtracts the pair's own maximum (its positive logit or its anchor's
    largest negative logit), so the sum inside the log is >= 1: no overflow, no log(0), and no NaN for an
    anchor without negatives (its pairs cost log(1) = 0 with zero gradient).

    Shapes: embeddings ``(N, D)``, labels ``(N,)`` -> scalar.
    """

    default_distance = CosineSimilarity
    default_reducer = MeanReducer

    def __init__(self, temperature: float = 0.07, distance: DistanceSpec = None, reducer: ReducerSpec = None) -> None:
        super().__init__(distance=distance, reducer=reducer)
        self.temperature = check_number(type(self).__name__, "temperature", temperature, positive=True)

    def compute_loss(self, batch: MetricBatch, indices_tuple: IndicesTuple | None) -> dict[str, LossTerm]:
        if indices_tuple is None:
            pos_mask, neg_mask = batch.label_masks()
        else:
            a1, p, a2, n = to_pairs(indices_tuple)
            shape = (batch.embeddings.shape[0], batch.ref_emb.shape[0])
            pos_mask = torch.zeros(shape, dtype=torch.bool, device=batch.device)
            neg_mask = torch.zeros(shape, dtype=torch.bool, device=batch.device)
            pos_mask[a1, p] = True
            neg_mask[a2, n] = True
        a, p = torch.where(pos_mask)
        if a.numel() == 0:
            return {}
        mat = self.distance(batch.embeddings, batch.ref_or_none)  # (N, M)
        logits = (mat if self.distance.is_inverted else -mat) / self.temperature
        rows = logits.index_select(0, a)  # (P, M): each positive pair's anchor row (backward by index_add)
        negatives = neg_mask[a]
        z_pos = logits[a, p]  # (P,)
        neg_max = rows.masked_fill(~negatives, float("-inf")).amax(dim=1)
        shift = torch.maximum(z_pos, neg_max).detach()  # finite: z_pos is
        # Masked entries become exp(-inf) = 0 *before* exp, so a large non-negative logit cannot overflow.
        neg_sum = torch.exp((rows - shift.unsqueeze(1)).masked_fill(~negatives, float("-inf"))).sum(dim=1)
        losses = torch.log(torch.exp(z_pos - shift) + neg_sum) - (z_pos - shift)
        return {"loss": LossTerm(losses, "pos_pair", (a, p))}

    def _params_repr(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


def ntxent_views(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """``(cat(z1, z2) (2B, D), labels (2B,))`` for :class:`NTXentLoss` from two views ``(B, D)`` of ``B`` images."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise DataError(f"ntxent_views: two views of the same shape (B, D) expected, got {tuple(z1.shape)} and "
                        f"{tuple(z2.shape)}")
    ids = torch.arange(z1.shape[0], device=z1.device)
    return torch.cat([z1, z2]), torch.cat([ids, ids])


__all__ = ["NTXentLoss", "ntxent_views"]
