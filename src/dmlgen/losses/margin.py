"""Margin loss with a learnable boundary beta per class (Wu et al. 2017; methods.md §2.3).

For a triplet t = (a, p, n) with distances d (smaller is closer) and the anchor's class boundary
beta = beta_{y_a}::

    l_t = [d_ap - beta + alpha]_+ + [beta - d_an + alpha]_+

(mirrored through :meth:`BaseDistance.margin` for a similarity), and by default

    L = sum_t l_t / #{t : either hinge > 0}     (sum_t l_t = 0 when no triplet is active)

the reference code's normaliser ("active triplets": it adds two boolean tensors, a logical OR).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor


from ._checks import check_bool, check_choice, check_generator, check_int, check_number, check_triplets_per_anchor
from .base import BaseMetricLoss
from .batch import MetricBatch
from .distances import DistanceSpec, LpDistance
from .indices import IndicesTuple, sample_triplets, to_triplets
from .proxies import check_class_labels
from .reducers import DivisorReducer, LossTerm, ReducerSpec


class MarginLoss(BaseMetricLoss):
    """Margin loss.

    Args:
        margin: alpha, the half-width of the band around beta (default 0.2).
        nu: weight of the beta regulariser ``nu * beta_{y_a}`` per triplet (default 0: none).
        beta: initial boundary beta_0 (default 1.2).
        num_classes: one beta per class (labels must lie in ``[0, num_classes)``); ``None``: one shared beta.
        learn_beta: beta is a parameter (trained with the loss's own learning rate, ``loss.lr`` in a config;
            the references use Adam, lr 5e-4, no weight decay); otherwise a fixed buffer.
        denominator: ``"active_triplets"`` (default, faithful to the reference code: triplets with at least
            one active hinge) or ``"active_hinges"`` (active positive hinges + active negative hinges, PML).
        triplets_per_anchor: ``"all"`` (every valid triplet) or an int: that many random triplets per anchor
            (uniform positive and negative, with replacement). Ignored when an ``indices_tuple`` is given;
            the usual miner is :class:`~dmlgen.losses.miners.DistanceWeightedMiner` (``one_per_anchor``).
        distance: default :class:`LpDistance` (L2-normalised, non-squared Euclidean).
        reducer: default :class:`DivisorReducer` (sum over triplets / the chosen denominator).
        generator: random source for ``triplets_per_anchor=int``.

    Differences from PML's ``MarginLoss``: PML divides by the number of active *hinges* (here
    ``denominator="active_hinges"``, which then matches PML, the beta regulariser included) and defaults to
    ``learn_beta=False``. From the reference code: the distance is ``sqrt(max(|.|^2, 1e-12))`` rather than
    ``sqrt(|.|^2 + 1e-8)`` (a difference below 1e-8 for d > 0.5), and the regulariser is divided by the
    same denominator as the hinges, as in PML (the reference adds ``nu * sum_t beta`` undivided).

    Shapes: embeddings ``(N, D)``, labels ``(N,)`` -> scalar.
    """

    default_distance = LpDistance
    default_reducer = DivisorReducer
    DENOMINATORS = ("active_triplets", "active_hinges")

    def __init__(
        self,
        margin: float = 0.2,
        nu: float = 0.0,
        beta: float = 1.2,
        num_classes: int | None = None,
        learn_beta: bool = True,
        denominator: str = "active_triplets",
        triplets_per_anchor: int | Literal["all"] = "all",
        distance: DistanceSpec = None,
        reducer: ReducerSpec = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(distance=distance, reducer=reducer)
        owner = type(self).__name__
        self.margin = check_number(owner, "margin", margin)
        self.nu = check_number(owner, "nu", nu)
        beta0 = check_number(owner, "beta", beta)
        self.num_classes = None if num_classes is None else check_int(owner, "num_classes", num_classes)
        self.learn_beta = check_bool(owner, "learn_beta", learn_beta)
        self.denominator = check_choice(owner, "denominator", denominator, self.DENOMINATORS)
        self.triplets_per_anchor = check_triplets_per_anchor(owner, triplets_per_anchor)
        self.generator = check_generator(owner, generator)
        initial = torch.full((self.num_classes or 1,), beta0)
        if self.learn_beta:
            self.beta = torch.nn.Parameter(initial)
        else:
            self.register_buffer("beta", initial)

    def triplets(self, batch: MetricBatch, indices_tuple: IndicesTuple | None) -> tuple[Tensor, Tensor, Tensor]:
        """The triplets the loss uses: the miner's, all valid ones, or ``triplets_per_anchor`` random ones."""
        if indices_tuple is not None:
            return to_triplets(indices_tuple, batch.embeddings.shape[0], batch.ref_emb.shape[0])
        pos, neg = batch.label_masks()
        if self.triplets_per_anchor == "all":
            # Same (a, p, n) order as PML's enumeration; O(P * M) with P positive pairs.
            a, p = torch.where(pos)
            pair_idx, n = torch.where(neg[a])
            return a[pair_idx], p[pair_idx], n
        return sample_triplets(pos, neg, int(self.triplets_per_anchor), self.generator)

    def compute_loss(self, batch: MetricBatch, indices_tuple: IndicesTuple | None) -> dict[str, LossTerm]:
        if self.num_classes is not None:
            check_class_labels(type(self).__name__, batch.labels, self.num_classes)
        a, p, n = self.triplets(batch, indices_tuple)
        if a.numel() == 0:
            return {}
        beta = self.beta.to(batch.embeddings.dtype)
        beta = beta[batch.labels[a]] if self.num_classes is not None else beta.expand(a.shape[0])
        ap, an = self.values_at(batch, (a, p), (a, n))
        pos_hinge = F.relu(self.distance.margin(ap, beta) + self.margin)
        neg_hinge = F.relu(self.distance.margin(beta, an) + self.margin)
        pos_active, neg_active = pos_hinge > 0, neg_hinge > 0
        if self.denominator == "active_triplets":
            divisor = (pos_active | neg_active).sum()
        else:
            divisor = pos_active.sum() + neg_active.sum()
        terms = {"margin_loss": LossTerm(pos_hinge + neg_hinge, "triplet", (a, p, n), divisor)}
        if self.learn_beta and self.nu != 0:
            if self.num_classes is None:
                terms["beta_reg_loss"] = LossTerm(self.nu * beta[0], "already_reduced")
            else:
                terms["beta_reg_loss"] = LossTerm(self.nu * beta, "element", (a,), divisor)
        return terms

    def _params_repr(self) -> dict[str, Any]:
        return {
            "margin": self.margin,
            "nu": self.nu,
            "num_classes": self.num_classes,
            "learn_beta": self.learn_beta,
            "denominator": self.denominator,
            "triplets_per_anchor": self.triplets_per_anchor,
        }
