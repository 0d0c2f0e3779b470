"""Triplet margin loss (same semantics and defaults as pytorch-metric-learning's ``TripletMarginLoss``).

For a triplet (a, p, n) and a distance d (smaller is closer): ``l = [d_ap - d_an + margin]_+``; for a
similarity s: ``l = [s_an - s_ap + margin]_+``. ``smooth_loss`` uses softplus instead of the hinge; ``swap``
replaces d_an by the closer of d_an and d_pn. Default reduction: mean over the triplets with l > 0.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor


from ._checks import check_bool, check_generator, check_number, check_triplets_per_anchor
from .base import BaseMetricLoss
from .batch import MetricBatch
from .distances import BaseDistance, DistanceSpec, LpDistance
from .indices import IndicesTuple, sample_triplets, to_triplets
from .reducers import AvgNonZeroReducer, LossTerm, ReducerSpec


def triplet_margin_values(
    ap: Tensor, an: Tensor, distance: BaseDistance, margin: float, smooth: bool = False
) -> Tensor:
    """Per-triplet losses from anchor-positive and anchor-negative values (any broadcastable shapes)."""
    violation = distance.margin(ap, an) + margin
    return F.softplus(violation) if smooth else F.relu(violation)


class TripletMarginLoss(BaseMetricLoss):
    """Triplet margin loss.

    Args:
        margin: desired gap between the anchor-negative and anchor-positive distances.
        swap: use the positive-negative distance when it is smaller than the anchor-negative one.
        smooth_loss: softplus(violation) instead of relu(violation).
        triplets_per_anchor: ``"all"`` (every valid triplet) or an int: that many random triplets per anchor
            (uniform positive and negative, with replacement), drawn from ``generator``. Ignored when an
            ``indices_tuple`` is given.
        distance: default :class:`LpDistance` (L2-normalised, non-squared Euclidean).
        reducer: default :class:`AvgNonZeroReducer`.
        generator: random source for ``triplets_per_anchor=int``.

    Shapes: embeddings ``(N, D)``, labels ``(N,)`` -> scalar.
    """

    default_distance = LpDistance
    default_reducer = AvgNonZeroReducer

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        triplets_per_anchor: int | Literal["all"] = "all",
        distance: DistanceSpec = None,
        reducer: ReducerSpec = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(distance=distance, reducer=reducer)
        owner = type(self).__name__
        self.margin = check_number(owner, "margin", margin)
        self.swap = check_bool(owner, "swap", swap)
        self.smooth_loss = check_bool(owner, "smooth_loss", smooth_loss)
        self.triplets_per_anchor = check_triplets_per_anchor(owner, triplets_per_anchor)
        self.generator = check_generator(owner, generator)

    def compute_loss(self, batch: MetricBatch, indices_tuple: IndicesTuple | None) -> dict[str, LossTerm]:
        if indices_tuple is None and self.triplets_per_anchor == "all":
            return self._all_triplets(batch, self.distance(batch.embeddings, batch.ref_or_none))
        if indices_tuple is None:
            pos, neg = batch.label_masks()
            a, p, n = sample_triplets(pos, neg, int(self.triplets_per_anchor), self.generator)
        else:
            a, p, n = to_triplets(indices_tuple, batch.embeddings.shape[0], batch.ref_emb.shape[0])
        if a.numel() == 0:
            return {}
        if self.swap and batch.self_ref:
            ap, an, pn = self.values_at(batch, (a, p), (a, n), (p, n))
        else:
            ap, an = self.values_at(batch, (a, p), (a, n))
            if self.swap:
                # Positives and negatives index the reference set: compare reference rows with each other.
                pn = self.distance.pairwise(batch.ref_emb[p], batch.ref_emb[n])
        if self.swap:
            an = self.distance.smallest_dist(an, pn)
        losses = triplet_margin_values(ap, an, self.distance, self.margin, self.smooth_loss)
        return {"loss": LossTerm(losses, "triplet", (a, p, n))}

    def _all_triplets(self, batch: MetricBatch, mat: Tensor) -> dict[str, LossTerm]:
        # One row per positive pair (P of them) against every reference: (P, M) values, then keep the
        # negatives. Same elements, in the same (a, p, n) order, as enumerating the triplets, without
        # materialising index triples or an (N, M, M) mask.
        pos, neg = batch.label_masks()
        a, p = torch.where(pos)
        if a.numel() == 0:
            return {}
        ap = mat[a, p].unsqueeze(1)  # (P, 1)
        an = mat.index_select(0, a)  # (P, M); backward by index_add, not a sorting index_put
        if self.swap:
            an = self.distance.smallest_dist(an, self._rows_from_ref(batch, mat, p))
        values = triplet_margin_values(ap, an, self.distance, self.margin, self.smooth_loss)
        selected = neg[a]  # (P, M): is column n a negative of the pair's anchor
        indices = None
        if self.wants_indices():
            pair_idx, n = torch.where(selected)
            indices = (a[pair_idx], p[pair_idx], n)
        # A dense term: gathering the (P, M) selection and scattering its gradient back cost more than the loss.
        return {"loss": LossTerm(values, "triplet", indices, mask=selected)}

    def _rows_from_ref(self, batch: MetricBatch, mat: Tensor, ref_rows: Tensor) -> Tensor:
        """Values ``(len(ref_rows), M)`` between the given reference rows and the whole reference set."""
        if batch.self_ref:
            return mat[ref_rows]
        uniq, inverse = torch.unique(ref_rows, return_inverse=True)
        return self.distance(batch.ref_emb[uniq], batch.ref_emb)[inverse]

    def _params_repr(self) -> dict[str, Any]:
        return {
            "margin": self.margin,
            "swap": self.swap,
            "smooth_loss": self.smooth_loss,
            "triplets_per_anchor": self.triplets_per_anchor,
        }
