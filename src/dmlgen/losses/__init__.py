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
from .contrastive import ContrastiveLoss
from .distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance, build_distance
from .indices import IndicesTuple, Pairs, Triplets
from .margin import MarginLoss
from .miners import BaseMiner, BatchHardMiner, DistanceWeightedMiner, MultiSimilarityMiner, TripletMarginMiner
from .multi_similarity import MultiSimilarityLoss
from .normalized_softmax import NormalizedSoftmaxLoss
from .ntxent import NTXentLoss
from .proxies import BaseProxyLoss
from .proxy_anchor import ProxyAnchorLoss
from .reducers import (
    AvgNonZeroReducer,
    BaseReducer,
    DivisorReducer,
    LossTerm,
    MeanReducer,
    SumReducer,
    build_reducer,
)
from .registry import LOSSES, MINERS, build_loss, build_miner
from .triplet import TripletMarginLoss

__all__ = [
    "LOSSES",
    "MINERS",
    "AvgNonZeroReducer",
    "BaseDistance",
    "BaseMetricLoss",
    "BaseMiner",
    "BaseProxyLoss",
    "BaseReducer",
    "BatchHardMiner",
    "ContrastiveLoss",
    "CosineSimilarity",
    "DegenerateBatchWarning",
    "DistanceWeightedMiner",
    "DivisorReducer",
    "DotProductSimilarity",
    "IndicesTuple",
    "LossTerm",
    "LpDistance",
    "MarginLoss",
    "MeanReducer",
    "MetricBatch",
    "MultiSimilarityLoss",
    "MultiSimilarityMiner",
    "NormalizedSoftmaxLoss",
    "NTXentLoss",
    "Pairs",
    "ProxyAnchorLoss",
    "SumReducer",
    "TripletMarginLoss",
    "TripletMarginMiner",
    "Triplets",
    "build_distance",
    "build_loss",
    "build_miner",
    "build_reducer",
]
