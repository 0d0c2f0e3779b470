"""dmlgen.losses: metric losses composed of a distance, an optional miner and a reducer.

Protocol (pytorch-metric-learning's composition)::

    miner = build_miner("triplet_margin", margin=0.2, type_of_triplets="semihard")
    loss = build_loss("triplet_margin", margin=0.05)
    indices = miner(embeddings, labels)                  # (a, p, n) or (a1, p, a2, n), no grad
    value = loss(embeddings, labels, indices)            # 0-dim tensor
    value = loss(embeddings, labels, ref_emb=bank, ref_labels=bank_labels)  # anchors vs. a reference set
"""

from .base import BaseMetricLoss, DegenerateBatchWarning
from .batch import MetricBatch
from .distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance, build_distance
from .indices import IndicesTuple, Pairs, Triplets
from .miners import BaseMiner, MultiSimilarityMiner, TripletMarginMiner
from .multi_similarity import MultiSimilarityLoss
from .reducers import AvgNonZeroReducer, BaseReducer, LossTerm, MeanReducer, SumReducer, build_reducer
from .registry import LOSSES, MINERS, build_loss, build_miner
from .triplet import TripletMarginLoss

__all__ = [
    "LOSSES",
    "MINERS",
    "AvgNonZeroReducer",
    "BaseDistance",
    "BaseMetricLoss",
    "BaseMiner",
    "BaseReducer",
    "CosineSimilarity",
    "DegenerateBatchWarning",
    "DotProductSimilarity",
    "IndicesTuple",
    "LossTerm",
    "LpDistance",
    "MeanReducer",
    "MetricBatch",
    "MultiSimilarityLoss",
    "MultiSimilarityMiner",
    "Pairs",
    "SumReducer",
    "TripletMarginLoss",
    "TripletMarginMiner",
    "Triplets",
    "build_distance",
    "build_loss",
    "build_miner",
    "build_reducer",
]
