"""Miners: choose which triplets or pairs a loss sees (pytorch-metric-learning's semantics).

``miner(embeddings (N, D), labels (N,), ref_emb=None, ref_labels=None)`` runs under ``no_grad`` with autocast
off and returns int64 index tensors: triplets ``(a, p, n)`` or pairs ``(a1, p, a2, n)`` (see
:mod:`dmlgen.losses.indices`). Pass the result to a loss as ``indices_tuple``. A batch from which no
comparison can be formed gives empty tensors; the loss then warns and returns its zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dmlgen.errors import ConfigError

from ._checks import check_choice, check_number
from .batch import MetricBatch, full_precision
from .distances import (
    BaseDistance,
    CosineSimilarity,
    DistanceSpec,
    LpDistance,
    build_distance,
    distance_values,
)
from .indices import IndicesTuple, empty_indices, sample_allowed


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


class BatchHardMiner(BaseMiner):
    """The hardest positive and the hardest negative of every anchor (PML's ``BatchHardMiner``).

    For a distance: the farthest positive and the closest negative; for a similarity: the least and the most
    similar. Anchors without a positive or without a negative are left out. Returns triplets ``(a, p, n)``,
    one per kept anchor, in anchor order; ties go to the lowest reference index.

    Args:
        distance: default :class:`LpDistance`.
    """

    output_size = 3

    def mine(self, batch: MetricBatch) -> IndicesTuple:
        pos, neg = batch.label_masks()
        mat = self.distance(batch.embeddings, batch.ref_or_none)
        inf = torch.tensor(float("inf"), dtype=mat.dtype, device=mat.device)
        if self.distance.is_inverted:
            p = torch.where(pos, mat, inf).argmin(dim=1)  # least similar positive
            n = torch.where(neg, mat, -inf).argmax(dim=1)  # most similar negative
        else:
            p = torch.where(pos, mat, -inf).argmax(dim=1)  # farthest positive
            n = torch.where(neg, mat, inf).argmin(dim=1)  # closest negative
        a = torch.where(pos.any(dim=1) & neg.any(dim=1))[0]
        return a, p[a], n[a]


class DistanceWeightedMiner(BaseMiner):
    """Distance-weighted negative sampling (Wu et al. 2017; methods.md §2.2).

    Works on a detached, L2-normalised copy of the embeddings (whatever the loss then uses). A candidate
    negative n of anchor a at Euclidean distance d gets the log-weight

        log w(d) = (2 - D) log max(d, lower) - ((D - 3) / 2) log max(1 - max(d, lower)^2 / 4, 1e-6)

    (the inverse density of distances between uniform points on the unit sphere in D dimensions). Allowed
    candidates are the label-valid negatives with ``d < upper``; the negative is drawn from the softmax of the
    log-weights over them (disallowed logits are -inf, so no row can underflow to all zeros and d = 2 gives
    no NaN). When the cut-off removes every label-valid negative of an anchor, its negative is uniform over
    the label-valid ones; an anchor without any negative is skipped.

    Args:
        lower: lower clamp of d in the weights (PML's ``cutoff``).
        upper: cut-off; candidates with ``d >= upper`` are not drawn (PML's ``nonzero_loss_cutoff``).
            ``None``: no cut-off.
        layout: ``"all_pos_pairs"``: every ordered positive pair (a, p) gets one negative (MDR);
            ``"one_per_anchor"``: every anchor with a positive gets one uniform positive and one negative
            (margin loss). PML instead gives each anchor as many random positives as its class has members.
        generator: random source of the draws (``None``: torch's global generator).

    Returns triplets ``(a, p, n)``. PML's DistanceWeightedMiner draws from the same per-anchor distribution
    whenever the cut-off leaves a candidate (it has no 1 - d^2/4 clamp and no uniform fall-back).
    """

    LAYOUTS = ("all_pos_pairs", "one_per_anchor")
    #: Lower clamp of 1 - d^2/4 inside the log (methods.md §2.2).
    MIN_SPHERE_TERM = 1e-6
    output_size = 3

    def __init__(
        self,
        lower: float = 0.5,
        upper: float | None = 1.4,
        layout: str = "all_pos_pairs",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(distance=LpDistance())
        owner = type(self).__name__
        self.lower = check_number(owner, "lower", lower)
        if not 0 <= self.lower < 2:
            raise ConfigError(f"{owner}: lower must lie in [0, 2), got {lower!r}")
        self.upper = None if upper is None else check_number(owner, "upper", upper, positive=True)
        if self.upper is not None and self.upper <= self.lower:
            raise ConfigError(f"{owner}: upper must be > lower ({self.lower}) or null, got {upper!r}")
        self.layout = check_choice(owner, "layout", layout, self.LAYOUTS)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigError(f"{owner}: generator must be a torch.Generator, got {generator!r}")
        self.generator = generator

    def log_weights(self, dist: Tensor, dim: int) -> Tensor:
        """Log-weights of Euclidean distances ``dist`` between unit vectors in ``dim`` dimensions (clamped)."""
        d = dist.clamp_min(self.lower)
        sphere = (1.0 - 0.25 * d * d).clamp_min(self.MIN_SPHERE_TERM)
        return (2.0 - dim) * torch.log(d) - ((dim - 3) / 2.0) * torch.log(sphere)

    def probabilities(
        self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor | None = None, ref_labels: Tensor | None = None
    ) -> Tensor:
        """The negative-sampling distribution, float64 ``(N, M)``: row a sums to 1 when anchor a has a
        negative, else is all zero."""
        batch = MetricBatch.from_inputs(embeddings, labels, ref_emb, ref_labels)
        with torch.no_grad(), full_precision(batch.device):
            _, neg = batch.label_masks()
            return self._probabilities(batch, neg)

    def _probabilities(self, batch: MetricBatch, neg: Tensor) -> Tensor:
        # The matrix in the compute dtype (from the step's shared Gram matrix of the raw rows when comparing the
        # batch with itself), the weights in float64: log-weights span thousands in 512-d, where fp32 rounding
        # alone would move probabilities by ~1e-4.
        ref = None if batch.self_ref else batch.ref_emb.detach()
        dist = distance_values(batch.embeddings.detach(), ref, normalize=True)
        return self.probabilities_from_distances(dist.double(), neg, batch.embeddings.shape[1])

    def probabilities_from_distances(self, dist: Tensor, candidates: Tensor, dim: int) -> Tensor:
        """The sampling distribution float64 ``(R, M)`` over the ``candidates (R, M)`` (bool) of each row, from
        distances ``dist (R, M)`` between unit vectors in ``dim`` dimensions: each row sums to 1, or is all zero
        when it has no candidate (never NaN)."""
        dist = dist.double()
        logits = self.log_weights(dist, dim)
        allowed = candidates if self.upper is None else candidates & (dist < self.upper)
        # Cut-off removed every candidate of the row: uniform over its label-valid candidates (MDR).
        fallback = candidates.any(dim=1) & ~allowed.any(dim=1)
        if bool(fallback.any()):
            logits = torch.where(fallback.unsqueeze(1), torch.zeros_like(logits), logits)
            allowed = torch.where(fallback.unsqueeze(1), candidates, allowed)
        logits = logits.masked_fill(~allowed, -math.inf)
        # Rows with nothing allowed keep a finite shift (0) and come out all zero instead of NaN.
        row_max = logits.amax(dim=1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        w = torch.exp(logits - row_max)
        total = w.sum(dim=1, keepdim=True)
        return w / torch.where(total > 0, total, torch.ones_like(total))

    def _draw(self, probs: Tensor) -> Tensor:
        """One column index per row of ``probs (R, M)`` (rows summing to 1), by the inverse CDF."""
        cdf = probs.cumsum(dim=1)
        total = cdf[:, -1:]
        device = self.generator.device if self.generator is not None else probs.device
        u = torch.rand((probs.shape[0], 1), generator=self.generator, device=device, dtype=torch.float64)
        u = u.to(probs.device) * total
        idx = torch.searchsorted(cdf, u, right=True)  # first column whose CDF exceeds u: probability > 0
        # u rounded up to the total would give M: take the last column with a positive probability instead.
        last = (cdf < total).sum(dim=1, keepdim=True)
        return torch.minimum(idx, last).squeeze(1)

    def mine(self, batch: MetricBatch) -> IndicesTuple:
        pos, neg = batch.label_masks()
        has_neg = neg.any(dim=1)
        if self.layout == "all_pos_pairs":
            a, p = torch.where(pos & has_neg.unsqueeze(1))
        else:
            a = torch.where(pos.any(dim=1) & has_neg)[0]
            p = sample_allowed(pos[a], 1, self.generator).squeeze(1) if a.numel() else a
        if a.numel() == 0:
            return empty_indices(3, batch.device)  # type: ignore[return-value]
        probs = self._probabilities(batch, neg)
        # One independent draw per (a, p) row: in all_pos_pairs an anchor's row repeats once per positive.
        n = self._draw(probs[a])
        return a, p, n

    def extra_repr(self) -> str:
        return f"lower={self.lower}, upper={self.upper}, layout={self.layout!r}"
