"""Fixed-name registries: ``build_loss(name, **params)``, ``build_miner(name, **params)``.

Names are fixed strings (configs never import code). Parameters are checked against the factory's
signature: an unknown key raises :class:`~dmlgen.errors.ConfigError` naming it and listing the accepted
keys; values are checked by the constructors. ``distance`` and ``reducer`` may be instances, names
(``"lp"``, ``"cosine"``, ``"dot_product"``; ``"mean"``, ``"avg_non_zero"``, ``"sum"``) or mappings
``{"name": ..., **params}`` as read from YAML.
"""

from __future__ import annotations

from typing import Any

from dmlgen.errors import ConfigError

from ._checks import build_named
from .base import BaseMetricLoss
from .contrastive import ContrastiveLoss
from .distances import DISTANCES, BaseDistance, DistanceSpec, build_distance
from .margin import MarginLoss
from .miners import BaseMiner, BatchHardMiner, DistanceWeightedMiner, MultiSimilarityMiner, TripletMarginMiner
from .multi_similarity import MultiSimilarityLoss
from .normalized_softmax import NormalizedSoftmaxLoss
from .ntxent import NTXentLoss
from .proxy_anchor import ProxyAnchorLoss
from .reducers import REDUCERS, BaseReducer, ReducerSpec, build_reducer
from .triplet import TripletMarginLoss

LOSSES: dict[str, type[BaseMetricLoss]] = {
    "triplet_margin": TripletMarginLoss,
    "multi_similarity": MultiSimilarityLoss,
    "contrastive": ContrastiveLoss,
    "margin": MarginLoss,
    "proxy_anchor": ProxyAnchorLoss,
    "normalized_softmax": NormalizedSoftmaxLoss,
    "ntxent": NTXentLoss,
}

MINERS: dict[str, type[BaseMiner]] = {
    "triplet_margin": TripletMarginMiner,
    "multi_similarity": MultiSimilarityMiner,
    "batch_hard": BatchHardMiner,
    "distance_weighted": DistanceWeightedMiner,
}


def build_loss(name: str, **params: Any) -> BaseMetricLoss:
    """The loss registered as ``name`` (``"triplet_margin"``, ``"multi_similarity"``, ``"contrastive"``,
    ``"margin"``, ``"proxy_anchor"``, ``"normalized_softmax"``, ``"ntxent"``) built with ``params``."""
    return build_named("loss", LOSSES, name, params)


def build_miner(name: str | None, **params: Any) -> BaseMiner | None:
    """The miner registered as ``name`` (``"triplet_margin"``, ``"multi_similarity"``, ``"batch_hard"``,
    ``"distance_weighted"``), or ``None`` for no miner (then ``params`` must be empty)."""
    if name is None:
        if params:
            raise ConfigError(f"miner None takes no parameters, got {', '.join(map(repr, params))}")
        return None
    return build_named("miner", MINERS, name, params)


__all__ = [
    "DISTANCES",
    "LOSSES",
    "MINERS",
    "REDUCERS",
    "BaseDistance",
    "BaseReducer",
    "DistanceSpec",
    "ReducerSpec",
    "build_distance",
    "build_loss",
    "build_miner",
    "build_reducer",
]
