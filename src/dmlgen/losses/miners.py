"""Miners: choose which triplets or pairs a loss sees (pytorch-metric-learning's semantics).

``miner(embeddings (N, D), labels (N,), ref_emb=None, ref_labels=None)`` runs under ``no_grad`` with autocast
off and returns int64 index tensors: triplets ``(a, p, n)`` or pairs ``(a1, p, a2, n)`` (see
:mod:`dmlgen.losses.indices`). Pass the result to a loss as ``indices_tuple``. A batch from which no
comparison can be formed gives empty tensors; the loss then warns and returns its zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_choice, check_number
from .batch import MetricBatch, full_precision
from .distances import BaseDistance, CosineSimilarity, DistanceSpec, LpDistance, build_distance
from .indices import IndicesTuple, empty_indices


class BaseMiner(torch.nn.Module):
    """Base miner; subclasses implement :meth:`mine` and set :attr:`output_size` (3 or 4)."""

    default_distance: type[BaseDistance] = LpDistance
    output_size: int = 3

    def __init__(self, distance: DistanceSpec = None) -> None:
        super().__init__()
        self.distance = build_distance(distance, default=self.default_distance)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> IndicesTuple:
        batch = MetricBatch.from_inputs(embeddings, labels, ref_emb, ref_labels)
        if batch.degenerate_reason() is not None:
            return empty_indices(self.output_size, batch.device)  # type: ignore[return-value]
        with torch.no_grad(), full_precision(batch.device):
            return self.mine(batch)

    def mine(self, batch: MetricBatch) -> IndicesTuple:
        raise NotImplementedError


class TripletMarginMiner(BaseMiner):
    """Triplets by their margin m = d_an - d_ap (s_ap - s_an for a similarity), as PML:

    - ``"all"``: m <= margin (the triplet violates the margin);
    - ``"hard"``: m <= margin and m <= 0 (the negative is at least as close as the positive);
    - ``"semihard"``: m <= margin and m > 0;
    - ``"easy"``: m > margin.

    Args:
        margin: the margin (PML's default 0.2).
        type_of_triplets: one of the above (PML's default ``"all"``).
        distance: default :class:`LpDistance`.
    """

    TYPES = ("all", "hard", "semihard", "easy")
    output_size = 3

    def __init__(
        self, margin: float = 0.2, type_of_triplets: str = "all", distance: DistanceSpec = None
    ) -> None:
        super().__init__(distance=distance)
        owner = type(self).__name__
        self.margin = check_number(owner, "margin", margin)
        self.type_of_triplets = check_choice(owner, "type_of_triplets", type_of_triplets, self.TYPES)

    def mine(self, batch: MetricBatch) -> IndicesTuple:
        pos, neg = batch.label_masks()
        a, p = torch.where(pos)
        if a.numel() == 0:
            return empty_indices(3, batch.device)  # type: ignore[return-value]
        mat = self.distance(batch.embeddings, batch.ref_or_none)
        # (P, M): one row per positive pair, one column per candidate negative.
        triplet_margin = self.distance.margin(mat[a], mat[a, p].unsqueeze(1))
        if self.type_of_triplets == "easy":
            keep = triplet_margin > self.margin
        else:
            keep = triplet_margin <= self.margin
            if self.type_of_triplets == "hard":
                keep &= triplet_margin <= 0
            elif self.type_of_triplets == "semihard":
                keep &= triplet_margin > 0
        pair_idx, n = torch.where(keep & neg[a])
        return a[pair_idx], p[pair_idx], n

    def extra_repr(self) -> str:
        return f"margin={self.margin}, type_of_triplets={self.type_of_triplets!r}"


class MultiSimilarityMiner(BaseMiner):
    """Pairs that are informative relative to the anchor's hardest opposite pair (PML's semantics).

    With a similarity s: keep a positive if ``s_ap - epsilon < max_n s_an`` and a negative if
    ``s_an + epsilon > min_p s_ap``; with a distance the inequalities mirror. Returns pairs
    ``(a1, p, a2, n)``, ordered by anchor then reference index (PML orders by value; compare as sets).

    Args:
        epsilon: the slack (PML's default 0.1).
        distance: default :class:`CosineSimilarity`.
    """

    default_distance = CosineSimilarity
    output_size = 4

    def __init__(self, epsilon: float = 0.1, distance: DistanceSpec = None) -> None:
        super().__init__(distance=distance)
        self.epsilon = check_number(type(self).__name__, "epsilon", epsilon)

    def mine(self, batch: MetricBatch) -> IndicesTuple:
        pos, neg = batch.label_masks()
        mat = self.distance(batch.embeddings, batch.ref_or_none)
        inf = torch.tensor(float("inf"), dtype=mat.dtype, device=mat.device)
        eps = self.epsilon
        # Rows without negatives (positives) get -inf/+inf extremes, which no comparison passes.
        if self.distance.is_inverted:
            hardest_neg = torch.where(neg, mat, -inf).amax(dim=1, keepdim=True)  # most similar negative
            easiest_pos = torch.where(pos, mat, inf).amin(dim=1, keepdim=True)  # least similar positive
            hard_pos = pos & (mat - eps < hardest_neg)
            hard_neg = neg & (mat + eps > easiest_pos)
        else:
            hardest_neg = torch.where(neg, mat, inf).amin(dim=1, keepdim=True)
            easiest_pos = torch.where(pos, mat, -inf).amax(dim=1, keepdim=True)
            hard_pos = pos & (mat + eps > hardest_neg)
            hard_neg = neg & (mat - eps < easiest_pos)
        a1, p = torch.where(hard_pos)
        a2, n = torch.where(hard_neg)
        return a1, p, a2, n

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"
