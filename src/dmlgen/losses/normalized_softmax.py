"""Normalized softmax loss (Zhai & Wu 2019), with PML's ``NormalizedSoftmaxLoss`` semantics and defaults.

Cross-entropy over the classes with logits ``s(x, p_c / |p_c|) / temperature``: the proxies are always
L2-normalised, the samples too under the default (normalising) DotProductSimilarity, so the logits are
cosines over the temperature. With a distance the logits are ``-d / temperature``. Default reduction: mean
over the samples.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_number
from .batch import MetricBatch
from .distances import DistanceSpec, DotProductSimilarity, l2_normalize
from .indices import IndicesTuple
from .proxies import BaseProxyLoss
from .reducers import LossTerm, MeanReducer, ReducerSpec


class NormalizedSoftmaxLoss(BaseProxyLoss):
    """Normalized softmax cross-entropy with one learned proxy per class.

    Args:
        num_classes: number of training classes; labels must lie in ``[0, num_classes)``.
        embedding_size: D.
        temperature: divides the logits (> 0).
        distance: default :class:`DotProductSimilarity` (of L2-normalised rows: cosine).
        reducer: default :class:`MeanReducer`.

    Proxies start as PML's: standard normal entries. PML stores them transposed, ``W (D, C)``; here they are
    ``proxies (C, D)``, drawn in PML's order (the same seed gives ``W.T``). Give them their own learning rate
    (``loss.lr`` in a config). ``ref_emb`` adds samples (see :mod:`dmlgen.losses.proxies`); a miner's indices
    weight each sample's cross-entropy as in PML.

    Shapes: embeddings ``(N, D)``, labels ``(N,)`` -> scalar.
    """

    default_distance = DotProductSimilarity
    default_reducer = MeanReducer

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        temperature: float = 0.05,
        distance: DistanceSpec = None,
        reducer: ReducerSpec = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, distance=distance, reducer=reducer)
        self.temperature = check_number(type(self).__name__, "temperature", temperature, positive=True)

    def init_proxies(self, proxies: Tensor) -> None:
        # Filled as PML's (D, C) tensor, then transposed: under the same seed the proxies equal PML's W.T.
        with torch.no_grad():
            proxies.copy_(torch.nn.init.normal_(torch.empty(self.embedding_size, self.num_classes)).t())

    def logits(self, emb: Tensor) -> Tensor:
        """Class logits ``(S, C)`` of embeddings ``(S, D)``."""
        dist = self.distance
        proxies = self.proxies_as(emb)
        proxies = l2_normalize(proxies) if dist.p == 2 else F.normalize(proxies, p=dist.p, dim=1)
        # The distance's own normalisation would normalise the unit proxies a second time (as PML does).
        mat = dist.compute_mat(dist.maybe_normalize(emb), proxies)
        logits = (mat if dist.power == 1 else mat.pow(dist.power)) / self.temperature
        return logits if dist.is_inverted else -logits

    def compute_loss(self, batch: MetricBatch, indices_tuple: IndicesTuple | None) -> dict[str, LossTerm]:
        emb, labels = self.samples(batch)
        losses = F.cross_entropy(self.logits(emb), labels, reduction="none")
        weights = self.sample_weights(batch, indices_tuple, emb.shape[0])
        if weights is not None:
            losses = losses * weights
        samples = torch.arange(emb.shape[0], device=emb.device)
        return {"loss": LossTerm(losses, "element", (samples,))}

    def _params_repr(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "embedding_size": self.embedding_size,
                "temperature": self.temperature}
