"""Contrastive loss (Hadsell et al. 2006), with PML's ``ContrastiveLoss`` semantics and defaults.

For a distance d (smaller is closer), over positive pairs and negative pairs::

    l_pos = [d_ap - pos_margin]_+        l_neg = [neg_margin - d_an]_+

and for a similarity s the hinges mirror (``[pos_margin - s_ap]_+``, ``[s_an - neg_margin]_+``), through
:meth:`BaseDistance.margin`. The two terms are reduced separately (default: mean over the non-zero pairs)
and summed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_number
from .base import BaseMetricLoss
from .batch import MetricBatch
from .distances import DistanceSpec, LpDistance
from .indices import IndicesTuple, to_pairs
from .reducers import AvgNonZeroReducer, LossTerm, ReducerSpec


class ContrastiveLoss(BaseMetricLoss):
    """Contrastive (pair) loss with a positive and a negative margin.

    Args:
        pos_margin: positives closer than this (distance) / more similar than this (similarity) cost nothing.
        neg_margin: negatives farther than this / less similar than this cost nothing.
        distance: default :class:`LpDistance` (L2-normalised, non-squared Euclidean).
        reducer: default :class:`AvgNonZeroReducer`, applied to the positive and the negative term apart.

    Without ``indices_tuple`` every positive and negative pair of the batch is used; with one, only its pairs
    (triplets are read as one positive and one negative pair each, repeats kept). Unlike PML, a single
    positive and a single negative pair still give a loss (PML returns 0 whenever every index tensor has at
    most one element); the empty loss is returned only when no pair is selected.

    Shapes: embeddings ``(N, D)``, labels ``(N,)`` -> scalar.
    """

    default_distance = LpDistance
    default_reducer = AvgNonZeroReducer

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        distance: DistanceSpec = None,
        reducer: ReducerSpec = None,
    ) -> None:
        super().__init__(distance=distance, reducer=reducer)
        owner = type(self).__name__
        self.pos_margin = check_number(owner, "pos_margin", pos_margin)
        self.neg_margin = check_number(owner, "neg_margin", neg_margin)

    def pair_values(self, pos_values: Tensor, neg_values: Tensor) -> tuple[Tensor, Tensor]:
        """Hinge losses of positive-pair and negative-pair values (any shapes)."""
        pos = F.relu(self.distance.margin(pos_values, self.pos_margin))
        neg = F.relu(self.distance.margin(self.neg_margin, neg_values))
        return pos, neg

    def compute_loss(self, batch: MetricBatch, indices_tuple: IndicesTuple | None) -> dict[str, LossTerm]:
        if indices_tuple is None:
            mat = self.distance(batch.embeddings, batch.ref_or_none)  # (N, M)
            pos_mask, neg_mask = batch.label_masks()
            if not bool(pos_mask.any()) and not bool(neg_mask.any()):
                return {}
            pos_all, neg_all = self.pair_values(mat, mat)
            # Dense terms (the pairs are the mask entries, row-major as PML's enumeration): no gather and no
            # index tensors unless a reducer needs them.
            pos_idx = neg_idx = None
            if self.wants_indices():
                pos_idx, neg_idx = torch.where(pos_mask), torch.where(neg_mask)
            return {
                "pos_loss": LossTerm(pos_all, "pos_pair", pos_idx, mask=pos_mask),
                "neg_loss": LossTerm(neg_all, "neg_pair", neg_idx, mask=neg_mask),
            }
        a1, p, a2, n = to_pairs(indices_tuple)
        if a1.numel() == 0 and a2.numel() == 0:
            return {}
        pos, neg = self.pair_values(*self.values_at(batch, (a1, p), (a2, n)))
        return {
            "pos_loss": LossTerm(pos, "pos_pair", (a1, p)),
            "neg_loss": LossTerm(neg, "neg_pair", (a2, n)),
        }

    def _params_repr(self) -> dict[str, Any]:
        return {"pos_margin": self.pos_margin, "neg_margin": self.neg_margin}
