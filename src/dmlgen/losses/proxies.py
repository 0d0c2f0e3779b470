"""Shared machinery of the losses with one learned vector per class (proxies) or per-class parameters.

A proxy loss compares samples with learned class vectors, so it needs neither pairs nor several classes
in a batch: :meth:`BaseProxyLoss.degenerate_reason` is always ``None``. Labels index the proxies and must
lie in ``[0, num_classes)`` (checked, :class:`~dmlgen.errors.DataError`).

Reference set: proxy losses have no query/reference asymmetry, so ``ref_emb`` / ``ref_labels`` hold *more
samples* (a memory bank, the other processes' share of a gathered batch) and the loss is that of the union
batch ``cat([embeddings, ref_emb])``. Pass the other samples only: a sample given twice counts twice.

Miner output: as in PML, an ``indices_tuple`` turns into per-sample weights, ``count(sample) / max count``
over every index it holds (samples it never names get weight 0); in reference mode anchors index
``embeddings`` and positives / negatives index ``ref_emb``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmlgen.errors import DataError

from ._checks import check_int
from .base import BaseMetricLoss
from .batch import MetricBatch
from .distances import DistanceSpec
from .indices import IndicesTuple
from .reducers import ReducerSpec


def check_class_labels(owner: str, labels: Tensor, num_classes: int) -> None:
    """DataError naming the offending label when ``labels`` leave ``[0, num_classes)``."""
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(
            f"{owner}: label {bad} is outside [0, {num_classes}) (num_classes={num_classes}); labels must be "
            "the training split's contiguous class ids, and num_classes its number of classes"
        )


class BaseProxyLoss(BaseMetricLoss):
    """A loss with proxies ``(num_classes, embedding_size)`` as a parameter; subclasses set ``init_proxies``.

    Args:
        num_classes: number of training classes (labels ``0 .. num_classes - 1``).
        embedding_size: D, the embeddings' dimension.
    """

    def __init__(
        self, num_classes: int, embedding_size: int, distance: DistanceSpec = None, reducer: ReducerSpec = None
    ) -> None:
        super().__init__(distance=distance, reducer=reducer)
        owner = type(self).__name__
        self.num_classes = check_int(owner, "num_classes", num_classes)
        self.embedding_size = check_int(owner, "embedding_size", embedding_size)
        self.proxies = torch.nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.init_proxies(self.proxies)

    def init_proxies(self, proxies: Tensor) -> None:
        """Initialise the proxies in place (global torch generator)."""
        raise NotImplementedError

    def degenerate_reason(self, batch: MetricBatch) -> str | None:
        # Every sample has its class proxy and the others: one sample or one class is a valid batch.
        return None

    def samples(self, batch: MetricBatch) -> tuple[Tensor, Tensor]:
        """Embeddings ``(S, D)`` and labels ``(S,)`` compared with the proxies (checked)."""
        if batch.self_ref:
            emb, labels = batch.embeddings, batch.labels
        else:
            emb = torch.cat([batch.embeddings, batch.ref_emb])
            labels = torch.cat([batch.labels, batch.ref_labels])
        owner = type(self).__name__
        if emb.shape[1] != self.embedding_size:
            raise DataError(
                f"{owner}: embeddings have {emb.shape[1]} dimensions but the proxies {self.embedding_size} "
                "(embedding_size)"
            )
        check_class_labels(owner, labels, self.num_classes)
        return emb, labels

    def proxies_as(self, emb: Tensor) -> Tensor:
        """The proxies in the embeddings' compute dtype (the parameter keeps its own dtype)."""
        return self.proxies.to(dtype=emb.dtype)

    @staticmethod
    def sample_weights(batch: MetricBatch, indices_tuple: IndicesTuple | None, num_samples: int) -> Tensor | None:
        """Per-sample weights ``(S,)`` from a miner's indices (see the module doc), or ``None`` for all 1."""
        if indices_tuple is None or all(t.numel() == 0 for t in indices_tuple):
            return None
        offset = 0 if batch.self_ref else batch.embeddings.shape[0]
        # Anchors (a, or a1 and a2) index the queries; the other entries index the reference set.
        anchor_slots = (0,) if len(indices_tuple) == 3 else (0, 2)
        parts = [t if i in anchor_slots else t + offset for i, t in enumerate(indices_tuple)]
        counts = torch.bincount(torch.cat(parts), minlength=num_samples)
        weights = counts.to(batch.embeddings.dtype)
        return weights / weights.max()
