"""Proxy-anchor loss (Kim et al. 2020), with PML's ``ProxyAnchorLoss`` semantics and defaults.

With similarities s(x, p_c) (CosineSimilarity by default) between the S samples and the C proxies::

    L = 1/|C+| sum_{c in C+} log(1 + sum_{x: y_x = c}  exp(-alpha (s(x, p_c) - margin)))
      + 1/C    sum_{c}       log(1 + sum_{x: y_x != c} exp( alpha (s(x, p_c) + margin)))

C+ is the set of proxies with a positive sample in the batch. With a distance the signs flip (through
:meth:`BaseDistance.margin`). The "1 +" is an explicit zero logit, so a proxy with no sample gets 0, never NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._checks import check_number
from .batch import MetricBatch
from .distances import CosineSimilarity, DistanceSpec
from .indices import IndicesTuple
from .multi_similarity import logsumexp_with_zero
from .proxies import BaseProxyLoss
from .reducers import DivisorReducer, LossTerm, ReducerSpec


class ProxyAnchorLoss(BaseProxyLoss):
    """Proxy-anchor loss with one learned proxy per class.

    Args:
        num_classes: number of training classes; labels must lie in ``[0, num_classes)``.
        embedding_size: D.
        margin: delta in the formula (> 0 pulls positives past it).
        alpha: scale (> 0).
        distance: default :class:`CosineSimilarity`.
        reducer: default :class:`DivisorReducer` (the positive term divided by |C+|, the negative by C).

    Proxies start as PML's: ``kaiming_normal_(mode="fan_out")`` on the ``(C, D)`` tensor, i.e. N(0, 2 / C).
    Give them their own learning rate (``loss.lr`` in a config; the paper uses 100x the model's).
    ``ref_emb`` adds samples (see :mod:`dmlgen.losses.proxies`); a miner's indices weight the samples as in
    PML (the weight w enters each logit as ``w - 1``).

    Shapes: embeddings ``(N, D)``, labels ``(N,)`` -> scalar.
    """

    default_distance = CosineSimilarity
    default_reducer = DivisorReducer

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32,
        distance: DistanceSpec = None,
        reducer: ReducerSpec = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, distance=distance, reducer=reducer)
        owner = type(self).__name__
        self.margin = check_number(owner, "margin", margin)
        self.alpha = check_number(owner, "alpha", alpha, positive=True)

    def init_proxies(self, proxies: Tensor) -> None:
        torch.nn.init.kaiming_normal_(proxies, mode="fan_out")

    def compute_loss(self, batch: MetricBatch, indices_tuple: IndicesTuple | None) -> dict[str, LossTerm]:
        emb, labels = self.samples(batch)
        sim = self.distance(emb, self.proxies_as(emb)).transpose(0, 1)  # (C, S): one row per proxy
        proxies = torch.arange(self.num_classes, device=sim.device)
        pos_mask = labels.unsqueeze(0) == proxies.unsqueeze(1)  # (C, S): sample s belongs to proxy c
        pos_logits = self.alpha * self.distance.margin(sim, self.margin)
        neg_logits = self.alpha * self.distance.margin(-self.margin, sim)
        weights = self.sample_weights(batch, indices_tuple, emb.shape[0])
        if weights is not None:
            shift = (weights - 1).unsqueeze(0)  # PML's additive miner weights
            pos_logits, neg_logits = pos_logits + shift, neg_logits + shift
        pos_term = logsumexp_with_zero(pos_logits, pos_mask)  # (C,)
        neg_term = logsumexp_with_zero(neg_logits, ~pos_mask)
        with_pos = pos_mask.any(dim=1).sum()
        return {
            "pos_loss": LossTerm(pos_term, "element", (proxies,), divisor=with_pos),
            "neg_loss": LossTerm(neg_term, "element", (proxies,), divisor=float(self.num_classes)),
        }

    def _params_repr(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "embedding_size": self.embedding_size,
                "margin": self.margin, "alpha": self.alpha}
