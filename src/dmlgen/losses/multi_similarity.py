"""Multi-similarity loss (Wang et al. 2019), as pytorch-metric-learning's ``MultiSimilarityLoss``.

Per anchor i, with similarities s (CosineSimilarity by default) to its positives P_i and negatives N_i:

    l_i = 1/alpha * log(1 + sum_{p in P_i} exp(-alpha (s_ip - base)))
        + 1/beta  * log(1 + sum_{n in N_i} exp( beta (s_in - base)))

The "1 +" is an implicit zero logit in a log-sum-exp, so an anchor without positives (negatives) gets 0 for
that half and no NaN. With a distance instead of a similarity the signs flip (through
:meth:`BaseDistance.margin`). Default reduction: mean over all N anchors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dmlgen.errors import DataError

from ._checks import check_number
from .base import BaseMetricLoss
from .batch import MetricBatch
from .distances import BaseDistance, CosineSimilarity, DistanceSpec
from .indices import IndicesTuple, to_pairs
from .reducers import LossTerm, MeanReducer, ReducerSpec


def logsumexp_with_zero(logits: Tensor, mask: Tensor) -> Tensor:
    """``log(1 + sum_j mask_ij * exp(logits_ij))`` per row ``(N,)`` of ``(N, M)`` inputs.

    Disallowed logits become -inf and an explicit 0 logit is appended, so every row has a finite
    maximum: no NaN in value or gradient even for rows with nothing allowed (methods.md §1.2.3).
    """
    masked = logits.masked_fill(~mask, float("-inf"))
    zeros = logits.new_zeros((logits.shape[0], 1))
    return torch.logsumexp(torch.cat([masked, zeros], dim=1), dim=1)


def multi_similarity_values(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    distance: BaseDistance,
    alpha: float,
    beta: float,
    base: float,
) -> Tensor:
    """Per-anchor multi-similarity losses ``(N,)`` from a matrix ``(N, M)`` and bool masks ``(N, M)``."""
    pos_exp = distance.margin(mat, base)  # base - s for a similarity: large when a positive is far
    neg_exp = distance.margin(base, mat)  # s - base: large when a negative is close
    pos_loss = logsumexp_with_zero(alpha * pos_exp, pos_mask) / alpha
    neg_loss = logsumexp_with_zero(beta * neg_exp, neg_mask) / beta
    return pos_loss + neg_loss


class MultiSimilarityLoss(BaseMetricLoss):
    """Multi-similarity loss.

    Args:
        alpha: scale of the positive terms (> 0).
        beta: scale of the negative terms (> 0).
        base: similarity offset shared by both terms.
        distance: default :class:`CosineSimilarity`.
        reducer: default :class:`MeanReducer` (mean over all anchors, including those with a zero loss).

    Given an ``indices_tuple`` (pairs, or triplets read as pairs), only those pairs enter the sums.
    Unlike PML, one positive pair and one negative pair still give a loss (PML returns 0 whenever every
    index tensor has at most one element); the empty loss is returned only when no pair is selected.

    Shapes: embeddings ``(N, D)``, labels ``(N,)`` -> scalar.
    """

    default_distance = CosineSimilarity
    default_reducer = MeanReducer

    def __init__(
        self,
        alpha: float = 2,
        beta: float = 50,
        base: float = 0.5,
        distance: DistanceSpec = None,
        reducer: ReducerSpec = None,
    ) -> None:
        super().__init__(distance=distance, reducer=reducer)
        owner = type(self).__name__
        self.alpha = check_number(owner, "alpha", alpha, positive=True)
        self.beta = check_number(owner, "beta", beta, positive=True)
        self.base = check_number(owner, "base", base)

    def compute_loss(self, batch: MetricBatch, indices_tuple: IndicesTuple | None) -> dict[str, LossTerm]:
        if indices_tuple is None:
            pos_mask, neg_mask = batch.label_masks()
        else:
            pos_mask, neg_mask = self._masks_from_pairs(batch, to_pairs(indices_tuple))
        if not bool(pos_mask.any()) and not bool(neg_mask.any()):
            return {}
        mat = self.distance(batch.embeddings, batch.ref_or_none)
        losses = multi_similarity_values(
            mat, pos_mask, neg_mask, self.distance, self.alpha, self.beta, self.base
        )
        anchors = torch.arange(losses.shape[0], device=losses.device)
        return {"loss": LossTerm(losses, "element", (anchors,))}

    @staticmethod
    def _masks_from_pairs(
        batch: MetricBatch, pairs: tuple[Tensor, Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        a1, p, a2, n = pairs
        shape = (batch.embeddings.shape[0], batch.ref_emb.shape[0])
        pos_mask = torch.zeros(shape, dtype=torch.bool, device=batch.device)
        neg_mask = torch.zeros(shape, dtype=torch.bool, device=batch.device)
        pos_mask[a1, p] = True
        neg_mask[a2, n] = True
        both = pos_mask & neg_mask
        if bool(both.any()):
            i, j = (int(v) for v in torch.nonzero(both)[0])
            raise DataError(f"indices_tuple: pair ({i}, {j}) is given both as a positive and as a negative")
        return pos_mask, neg_mask

    def _params_repr(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "base": self.base}
