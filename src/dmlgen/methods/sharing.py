"""Sharing Matters (Milbich, Roth et al., TPAMI 2022) with the MIC option (Roth et al., ICCV 2019): methods.md §5.

A second L2-normalised head on the same backbone learns characteristics *shared across* classes, from
inter-class ("shared") triplets whose positive pair joins two different classes; a gradient-reversal
decorrelation keeps the class and shared embeddings apart. Pieces, usable on their own:

- :class:`TwoHeadModel`: backbone -> class head ``c`` and shared head ``s`` (both unit rows); ``forward``
  is the test-time embedding: ``c`` (``eval_embedding="class"``) or the re-normalised weighted
  concatenation ``normalize([w_c c, w_s s])`` (``"concat"``).
- :class:`SharedTripletSampler`: the inter-class triplets of §5.2, variants ``random_groups`` (A),
  ``diva_standard`` (B), ``diva_full`` (C), ``diva_random`` (D) and ``mic_clusters`` (§5.6), on a numerically
  safe distance-weighted sampler (:func:`distance_weighted_probabilities`: clamped distances, masked
  softmax, no NaN, rows without a candidate skipped).
- :class:`GradientReversal` / :func:`grad_reverse` and :class:`Decorrelation` (§2.4).
- :class:`SharingMethod`: the training method behind ``method: {name: sharing, params: {...}}``
  (:class:`SharingParams`), with both update modes of §5.4 and the MIC re-clustering schedule.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlgen.data.samplers import ClassBalancedBatchSampler
from dmlgen.errors import CheckpointError, ConfigError, DataError
from dmlgen.losses.margin import MarginLoss
from dmlgen.losses.miners import DistanceWeightedMiner
from dmlgen.models import EmbeddingModel
from dmlgen.models.heads import EmbeddingHead

from .base import Batch, MethodSetup, StepContext, TrainingMethod
from .clustering import BACKENDS, kmeans_pseudo_labels, resolve_backend
from .samplers import ClusterBatchSampler, SurrogateGroupBatchSampler

VARIANTS = ("random_groups", "diva_standard", "diva_full", "diva_random", "mic_clusters")
#: Variants whose shared triplets come from the class batch's own labels (DiVA).
CLASS_LABEL_VARIANTS = ("diva_standard", "diva_full", "diva_random")
#: Lower clamp of squared distances (methods.md §1.2.1) and of 1 - d^2/4 (§2.2).
_SQ_EPS = 1e-12


# ----------------------------------------------------------------------------------------------- model
class TwoHeadModel(EmbeddingModel):
    """Backbone + class head + shared head (methods.md §2.6 ``MultiHead``, §5.1).

    ``forward(images (N, C, H, W))`` is the test-time embedding ``(N, D_eval)``; :meth:`forward_heads` gives
    both heads ``((N, D_c), (N, D_s))``. ``eval_embedding``: ``"class"`` (the reference, default) or
    ``"concat"``: ``normalize(cat(w_c * c, w_s * s))`` with ``eval_weights = (w_c, w_s)``.
    """

    EVAL_EMBEDDINGS = ("class", "concat")

    def __init__(self, backbone: nn.Module, head: EmbeddingHead, shared_head: EmbeddingHead,
                 eval_embedding: str = "class", eval_weights: tuple[float, float] = (1.0, 1.0)) -> None:
        super().__init__(backbone, head)
        if not (head.normalize and shared_head.normalize):
            raise ConfigError("TwoHeadModel: both heads must L2-normalise (model.normalize: true)")
        if shared_head.in_features != head.in_features:
            raise ConfigError(f"TwoHeadModel: shared head takes {shared_head.in_features} features, the backbone "
                              f"gives {head.in_features}")
        self.shared_head = shared_head
        self.eval_embedding = eval_embedding
        self.eval_weights = eval_weights

    @property
    def eval_embedding(self) -> str:
        return self._eval_embedding

    @eval_embedding.setter
    def eval_embedding(self, value: str) -> None:
        if value not in self.EVAL_EMBEDDINGS:
            raise ConfigError(f"eval_embedding: {value!r} is not one of {', '.join(self.EVAL_EMBEDDINGS)}")
        self._eval_embedding = value

    @property
    def eval_weights(self) -> tuple[float, float]:
        return self._eval_weights

    @eval_weights.setter
    def eval_weights(self, value: Any) -> None:
        weights = tuple(float(w) for w in value)
        if len(weights) != 2 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) == 0:
            raise ConfigError(f"eval_weights: two finite weights >= 0, not both 0, got {list(value)!r}")
        self._eval_weights = weights  # type: ignore[assignment]

    @property
    def embedding_size(self) -> int:
        extra = self.shared_head.embedding_size if self.eval_embedding == "concat" else 0
        return self.head.embedding_size + extra

    def forward_heads(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, C, H, W)`` -> class and shared embeddings, unit rows."""
        features = self.backbone(images)
        return self.head(features), self.shared_head(features)

    def combine(self, class_emb: Tensor, shared_emb: Tensor) -> Tensor:
        """The test-time embedding from both heads' outputs."""
        if self.eval_embedding == "class":
            return class_emb
        w_c, w_s = self.eval_weights
        return F.normalize(torch.cat([w_c * class_emb, w_s * shared_emb], dim=1), dim=1, eps=1e-12)

    def forward(self, images: Tensor) -> Tensor:
        if self.eval_embedding == "class":
            return self.head(self.backbone(images))  # the shared head is not run
        return self.combine(*self.forward_heads(images))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(shared_embedding_size=self.shared_head.embedding_size, eval_embedding=self.eval_embedding,
                   eval_weights=list(self.eval_weights))
        return out


# --------------------------------------------------------------------------------------- decorrelation
class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-lambda_`` (methods.md §2.4)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambda_: float) -> Tensor:  # type: ignore[override]
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return -ctx.lambda_ * grad, None


def grad_reverse(x: Tensor, lambda_: float = 1.0) -> Tensor:
    """``x`` unchanged; gradients through it are multiplied by ``-lambda_``."""
    return GradientReversal.apply(x, lambda_)  # type: ignore[no-any-return]


class Decorrelation(nn.Module):
    """Adversarial decorrelation of two embeddings (methods.md §2.4, the reference's ``AdvLoss``).

    With ``direction="shared_to_class"`` (source s, target c; ``"class_to_shared"`` swaps them) and the
    MLP R = Linear(D_source, hidden) -> ReLU -> Linear(hidden, D_target)::

        L = -(1/B) sum_i (1/D_target) sum_k ( GRL(target)_ik * normalize(R(GRL(source)))_ik )^2

    R minimises L (it learns to predict the target from the source); through the gradient reversals the
    heads and the backbone receive the reversed gradient and decorrelate. ``detach_target`` stops gradients
    into the target instead of reversing them. Inputs ``(B, D)`` are the unit-norm embeddings; the value is
    O(1/D_target), hence the large weights (hundreds to thousands).
    """

    DIRECTIONS = ("shared_to_class", "class_to_shared")

    def __init__(self, class_dim: int, shared_dim: int, hidden: int = 512, *, direction: str = "shared_to_class",
                 grl_on_source: bool = True, grl_on_target: bool = True, detach_target: bool = False,
                 grl_lambda: float = 1.0) -> None:
        super().__init__()
        if direction not in self.DIRECTIONS:
            raise ConfigError(f"Decorrelation: direction {direction!r} is not one of {', '.join(self.DIRECTIONS)}")
        self.direction = direction
        source_dim, target_dim = (shared_dim, class_dim) if direction == "shared_to_class" else (class_dim, shared_dim)
        self.net = nn.Sequential(nn.Linear(source_dim, hidden), nn.ReLU(), nn.Linear(hidden, target_dim))
        self.grl_on_source = bool(grl_on_source)
        self.grl_on_target = bool(grl_on_target)
        self.detach_target = bool(detach_target)
        self.grl_lambda = float(grl_lambda)

    def forward(self, class_emb: Tensor, shared_emb: Tensor) -> Tensor:
        """``(B, D_c)``, ``(B, D_s)`` -> 0-dim loss (fp32)."""
        source, target = (shared_emb, class_emb) if self.direction == "shared_to_class" else (class_emb, shared_emb)
        source, target = source.float(), target.float()
        if self.detach_target:
            target = target.detach()
        elif self.grl_on_target:
            target = grad_reverse(target, self.grl_lambda)
        if self.grl_on_source:
            source = grad_reverse(source, self.grl_lambda)
        prediction = F.normalize(self.net(source), dim=1, eps=1e-12)
        return -(target * prediction).pow(2).mean()

    def extra_repr(self) -> str:
        return (f"direction={self.direction!r}, grl_on_source={self.grl_on_source}, grl_on_target="
                f"{self.grl_on_target}, detach_target={self.detach_target}, grl_lambda={self.grl_lambda}")


# ------------------------------------------------------------------------------------ shared triplets
def unit_distances(embeddings: Tensor) -> Tensor:
    """Euclidean distances ``(N, N)`` float64 between the L2-normalised, detached rows; diagonal exactly 0."""
    x = F.normalize(embeddings.detach().double(), dim=1, eps=1e-12)
    sq = (x * x).sum(1, keepdim=True) + (x * x).sum(1).unsqueeze(0) - 2.0 * x @ x.T
    dist = sq.clamp_min(_SQ_EPS).sqrt()
    return dist.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0.0)


def distance_weighted_probabilities(dist: Tensor, allowed: Tensor, dim: int, *, lower: float = 0.5,
                                    upper: float | None = None) -> Tensor:
    """Rows of a distance-weighted sampling distribution over the ``allowed`` columns (methods.md §2.2).

    ``dist (R, M)`` are distances between unit vectors in ``dim`` dimensions, ``allowed (R, M)`` bool. Weights
    are the inverse sphere density with ``d`` clamped at ``lower`` and ``1 - d^2/4`` at 1e-6
    (:meth:`DistanceWeightedMiner.log_weights`); candidates with ``d >= upper`` are cut, and a row whose
    candidates were all cut falls back to uniform over them. Disallowed logits are -inf, each row is a
    softmax with its maximum subtracted, and a row without any allowed entry is all zero (never NaN).
    Returns float64 ``(R, M)``: each row sums to 1 or is 0.
    """
    # The miner validates lower / upper and owns the clamps, the cut-off fall-back and the masked softmax.
    return DistanceWeightedMiner(lower=lower, upper=upper).probabilities_from_distances(dist, allowed, dim)


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One column per row of ``probs (R, M)`` (every row with positive mass)."""
    if probs.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=probs.device)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class SharedTriplets(NamedTuple):
    """Triplet indices ``(T,)`` each, and the per-sample labels ``(N,)`` that index the shared margin loss's β."""

    anchors: Tensor
    positives: Tensor
    negatives: Tensor
    loss_labels: Tensor

    @property
    def indices(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.anchors, self.positives, self.negatives


class SharedTripletSampler:
    """Inter-class triplets for the shared head (methods.md §5.2, §5.6); one triplet per usable anchor.

    ``variant``:

    - ``random_groups`` (A): positive uniform over the other members of the anchor's surrogate group;
      negative distance-weighted over samples of another group **and** another class. β by surrogate id.
    - ``diva_standard`` (B): negative distance-weighted over y != y_a; positive uniform over
      y not in {y_a, y_n}. β by class.
    - ``diva_full`` (C): as B with a distance-weighted positive.
    - ``diva_random`` (D): the batch's labels permuted, then a uniform positive with the anchor's permuted
      label and a distance-weighted negative with another permuted label. β by permuted label.
    - ``mic_clusters``: positive uniform with the anchor's cluster id, negative distance-weighted over other
      cluster ids. β by cluster id.

    ``cross_class_positives``: also require y_p != y_a. Default (``None``): on for A (a random group rarely
    repeats a class; the rule of §5.2 is that positive pairs are cross-class), off for D and MIC, as in
    their references (DiVA reports the unfiltered permutation works slightly better). B and C are
    cross-class by construction.

    Anchors without an allowed negative or positive are skipped (e.g. B and C on a batch with fewer than
    3 classes, where the references crash); the result may be empty. Distances use a detached, normalised
    copy; ``lower`` / ``upper`` as :func:`distance_weighted_probabilities` (the reference: 0.5 / none).
    """

    def __init__(self, variant: str = "random_groups", *, lower: float = 0.5, upper: float | None = None,
                 cross_class_positives: bool | None = None, generator: torch.Generator | None = None) -> None:
        if variant not in VARIANTS:
            raise ConfigError(f"SharedTripletSampler: variant {variant!r} is not one of {', '.join(VARIANTS)}")
        DistanceWeightedMiner(lower=lower, upper=upper)  # the same validation of lower / upper
        self.variant = variant
        self.lower = lower
        self.upper = upper
        if cross_class_positives is None:
            cross_class_positives = variant == "random_groups"
        self.cross_class_positives = bool(cross_class_positives)
        self.generator = generator

    @property
    def needs_groups(self) -> bool:
        return self.variant in ("random_groups", "mic_clusters")

    def __call__(self, embeddings: Tensor, labels: Tensor, groups: Tensor | None = None) -> SharedTriplets:
        """``embeddings (N, D)``, class ``labels (N,)``, surrogate / cluster ``groups (N,)`` (A and MIC)."""
        if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
            raise DataError(f"SharedTripletSampler: embeddings (N, D) and labels (N,) expected, got "
                            f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
        device = embeddings.device
        labels = labels.to(device)
        if self.needs_groups:
            if groups is None or groups.shape != labels.shape:
                raise DataError(f"SharedTripletSampler: variant {self.variant!r} needs group ids (N,)")
            groups = groups.to(device)
        with torch.no_grad():
            return self._sample(embeddings, labels, groups)

    def _sample(self, embeddings: Tensor, labels: Tensor, groups: Tensor | None) -> SharedTriplets:
        n, dim = embeddings.shape
        device = embeddings.device
        dist = unit_distances(embeddings)
        not_self = ~torch.eye(n, dtype=torch.bool, device=device)
        other_class = labels.unsqueeze(0) != labels.unsqueeze(1)
        if self.variant == "diva_random":
            perm = torch.randperm(n, generator=self.generator, device=self._gen_device(device)).to(device)
            loss_labels = labels[perm]
        elif self.needs_groups:
            assert groups is not None
            loss_labels = groups
        else:
            loss_labels = labels
        same_tag = loss_labels.unsqueeze(0) == loss_labels.unsqueeze(1)
        if self.variant == "random_groups":
            neg_allowed = ~same_tag & other_class
        elif self.variant in ("diva_standard", "diva_full"):
            neg_allowed = other_class
        else:  # diva_random, mic_clusters: another (permuted / cluster) label
            neg_allowed = ~same_tag
        anchors = torch.where(neg_allowed.any(dim=1))[0]
        neg_probs = distance_weighted_probabilities(dist[anchors], neg_allowed[anchors], dim, lower=self.lower,
                                                    upper=self.upper)
        negatives = _draw(neg_probs, self.generator)
        if self.variant in ("diva_standard", "diva_full"):
            # y_p not in {y_a, y_n}: a third class.
            pos_allowed = other_class[anchors] & (labels.unsqueeze(0) != labels[negatives].unsqueeze(1))
        else:
            pos_allowed = (same_tag & not_self)[anchors]
            if self.cross_class_positives:
                pos_allowed = pos_allowed & other_class[anchors]
        keep = pos_allowed.any(dim=1)
        anchors, negatives, pos_allowed = anchors[keep], negatives[keep], pos_allowed[keep]
        if self.variant == "diva_full":
            probs = distance_weighted_probabilities(dist[anchors], pos_allowed, dim, lower=self.lower,
                                                    upper=self.upper)
        else:
            probs = pos_allowed.double()
            probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1.0)
        positives = _draw(probs, self.generator)
        return SharedTriplets(anchors, positives, negatives, loss_labels)

    def _gen_device(self, device: torch.device) -> torch.device:
        return self.generator.device if self.generator is not None else device


# -------------------------------------------------------------------------------------------- params
@dataclass
class SharingParams:
    """``method.params`` of ``method: {name: sharing}`` (methods.md §5). Defaults: the alternating reference.

    Shared triplets: ``shared_sampling`` (variant, see :class:`SharedTripletSampler`), ``lower``/``upper``
    (distance-weighted sampler; reference 0.5 / none), ``cross_class_positives`` (null: per variant),
    ``group_size`` and ``num_ids`` (variant A's stream). Shared margin loss (§2.3, β per surrogate id /
    label / cluster): ``margin`` α, ``beta`` β₀, ``nu``, ``denominator``, ``beta_lr`` (Adam group, no weight
    decay). ``shared_weight``: weight of the shared loss (α_shared in ``summed`` mode; 1 in the reference's
    alternating mode). ``update_mode``: ``alternating`` (two optimiser steps: class batch, then shared batch)
    or ``summed`` (one step on the sum). ``shared_step_prob``: probability that an iteration has its shared
    part (MIC's task_p, 0.8 on CUB; 1 otherwise). Decorrelation (§2.4): ``adv_weight`` λ_adv / ρ (0 turns
    it off), ``adv_hidden``, ``adv_lr``, ``adv_weight_decay``, ``adv_direction``, ``grl_on_source``,
    ``grl_on_target``, ``detach_target``, ``grl_lambda``. Heads: ``shared_embedding_size`` (null: the class
    head's ``model.embedding_size``); test time: ``eval_embedding`` ``class`` | ``concat`` with
    ``eval_weights`` [w_class, w_shared]. MIC (``shared_sampling: mic_clusters``): ``num_clusters``,
    ``recluster_every`` (epochs; the reference's counter of 3 re-clusters every 4th epoch; 0: never),
    ``cluster_features`` for the initial clustering (``backbone``: the backbone's pooled features;
    ``resnet_layer1``: MIC's ResNet layer1 output average-pooled with kernel 18, stride 12; ``shared``),
    ``standardize`` (``mean`` | ``mstd`` | ``none``; initial clustering only), ``cluster_backend``,
    ``cluster_iterations``, ``cluster_n_init``, ``random_pick_p``.
    """

    shared_sampling: Literal["random_groups", "diva_standard", "diva_full", "diva_random",
                             "mic_clusters"] = "random_groups"
    update_mode: Literal["alternating", "summed"] = "alternating"
    shared_weight: float = 1.0
    shared_step_prob: float = 1.0
    shared_embedding_size: int | None = None
    lower: float = 0.5
    upper: float | None = None
    cross_class_positives: bool | None = None
    group_size: int = 4
    num_ids: int = 196
    margin: float = 0.2
    beta: float = 1.2
    nu: float = 0.0
    denominator: Literal["active_triplets", "active_hinges"] = "active_triplets"
    beta_lr: float = 5e-4
    adv_weight: float = 500.0
    adv_hidden: int = 512
    adv_lr: float = 1e-5
    adv_weight_decay: float = 1e-6
    adv_direction: Literal["shared_to_class", "class_to_shared"] = "shared_to_class"
    grl_on_source: bool = True
    grl_on_target: bool = True
    detach_target: bool = False
    grl_lambda: float = 1.0
    eval_embedding: Literal["class", "concat"] = "class"
    eval_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    num_clusters: int = 30
    recluster_every: int = 4
    cluster_features: Literal["backbone", "resnet_layer1", "shared"] = "backbone"
    standardize: Literal["mean", "mstd", "none"] = "mean"
    cluster_backend: Literal["auto", "faiss", "sklearn", "torch"] = "auto"
    cluster_iterations: int = 20
    cluster_n_init: int = 1
    random_pick_p: float = 0.2

    def validate(self) -> None:
        key = "method.params."

        def check(name: str, ok: bool, need: str) -> None:
            if not ok:
                raise ConfigError(f"{key}{name}: {need}, got {getattr(self, name)!r}")

        check("shared_weight", math.isfinite(self.shared_weight) and self.shared_weight > 0,
              "must be > 0 (0 switches the shared loss off: train `method: {name: standard}` for the plain "
              "baseline instead)")
        check("shared_step_prob", 0.0 < self.shared_step_prob <= 1.0, "must be in (0, 1]")
        check("shared_embedding_size", self.shared_embedding_size is None or self.shared_embedding_size >= 1,
              "must be a positive integer or null")
        check("lower", 0.0 <= self.lower < 2.0, "must be in [0, 2)")
        check("upper", self.upper is None or self.upper > self.lower, f"must be > lower ({self.lower}) or null")
        check("group_size", self.group_size >= 2, "must be >= 2 (a group needs a positive pair)")
        check("num_ids", self.num_ids >= 3, "must be >= 3 (each group avoids the previous two ids)")
        check("beta_lr", self.beta_lr > 0, "must be > 0")
        check("adv_weight", math.isfinite(self.adv_weight) and self.adv_weight >= 0, "must be >= 0")
        check("adv_hidden", self.adv_hidden >= 1, "must be >= 1")
        check("adv_lr", self.adv_lr > 0, "must be > 0")
        check("adv_weight_decay", self.adv_weight_decay >= 0, "must be >= 0")
        check("grl_lambda", self.grl_lambda >= 0, "must be >= 0")
        check("eval_weights", len(self.eval_weights) == 2 and all(math.isfinite(w) and w >= 0
                                                                  for w in self.eval_weights)
              and sum(self.eval_weights) > 0, "must be two weights >= 0 [w_class, w_shared], not both 0")
        check("num_clusters", self.num_clusters >= 2, "must be >= 2")
        check("recluster_every", self.recluster_every >= 0, "must be >= 0 (0: never re-cluster)")
        check("cluster_iterations", self.cluster_iterations >= 1, "must be >= 1")
        check("cluster_n_init", self.cluster_n_init >= 1, "must be >= 1")
        check("random_pick_p", 0.0 <= self.random_pick_p < 1.0, "must be in [0, 1)")
        if self.cluster_backend not in BACKENDS:  # pragma: no cover - the Literal already checks
            raise ConfigError(f"{key}cluster_backend: {self.cluster_backend!r}")


# ------------------------------------------------------------------------------------------- method
class _Features(nn.Module):
    """A view of a :class:`TwoHeadModel` that returns the features clustered by MIC."""

    def __init__(self, model: TwoHeadModel, source: str) -> None:
        super().__init__()
        self.model = model
        self.source = source

    def forward(self, images: Tensor) -> Tensor:
        if self.source == "shared":
            return self.model.forward_heads(images)[1]
        if self.source == "backbone":
            return self.model.backbone(images)
        body = self.model.backbone.body  # resnet_layer1: checked at setup
        x = body.maxpool(body.relu(body.bn1(body.conv1(images))))
        x = body.layer1(x)
        # MIC's pooling: at 224 px layer1 is 256 x 56 x 56 -> 256 x 4 x 4 = 4096 features.
        return F.avg_pool2d(x, kernel_size=18, stride=12).flatten(1)


class SharingMethod(TrainingMethod):
    """``method: {name: sharing}``: class head trained by the configured loss, shared head by inter-class
    triplets with a margin loss, decorrelation between them (methods.md §5).

    Per iteration, ``update_mode: alternating`` (reference) takes two optimiser steps: the class batch
    ``(x, y)`` with ``L_class(c) + λ_adv L_adv(c, s)``, then the shared batch with
    ``shared_weight * L_shared(s') + λ_adv L_adv(c', s')``. ``summed`` takes one step on
    ``L_class(c) + λ_adv L_adv(c, s) + shared_weight * L_shared(...)``; for the DiVA variants the shared
    triplets come from the class batch itself (as DiVA), for A and MIC from the shared stream's batch,
    whose decorrelation term ``λ_adv L_adv(c', s')`` is added too.

    Data streams: A: :class:`SurrogateGroupBatchSampler`; MIC: :class:`ClusterBatchSampler`; DiVA variants in
    alternating mode: a second class-balanced stream with its own seed; in summed mode none. The shared
    stream uses the training split's augmentation (the reference drops the flip there; not modelled).
    """

    name = "sharing"
    custom_step = True

    def __init__(self, params: SharingParams) -> None:
        super().__init__(params)
        self.params: SharingParams = params
        self.sampler = SharedTripletSampler(params.shared_sampling, lower=params.lower, upper=params.upper,
                                            cross_class_positives=params.cross_class_positives)
        self.stream: Any = None
        self.cluster_labels: Tensor | None = None
        self.info: MethodSetup | None = None

    # ------------------------------------------------------------------ model and modules
    def wrap_model(self, model: EmbeddingModel) -> TwoHeadModel:
        p = self.params
        head = model.head
        if not head.normalize or head.scale_by_mean_distance:
            raise ConfigError("method sharing: both heads are L2-normalised (methods.md §5.1); set "
                              "model.normalize: true and model.scale_by_mean_distance: false")
        shared = EmbeddingHead(head.in_features, p.shared_embedding_size or head.embedding_size,
                               hidden_sizes=head.hidden_sizes, normalize=True, dropout=head.dropout,
                               batch_norm=head.batch_norm)
        return TwoHeadModel(model.backbone, head, shared, eval_embedding=p.eval_embedding,
                            eval_weights=tuple(p.eval_weights))  # type: ignore[arg-type]

    def setup(self, info: MethodSetup, model: EmbeddingModel) -> None:
        p = self.params
        if not isinstance(model, TwoHeadModel):
            raise ConfigError("method sharing: the model must come from SharingMethod.wrap_model")
        if info.has_regularizers:
            raise ConfigError("method sharing: regularizers (MDR / LSD) are not combined with it yet; remove "
                              "the regularizers section")
        variant = p.shared_sampling
        if variant in ("diva_standard", "diva_full") and info.classes_per_batch < 3:
            raise ConfigError(f"method.params.shared_sampling: {variant!r} draws the positive from a third class; "
                              f"data.classes_per_batch must be >= 3, got {info.classes_per_batch}")
        num_images = len(info.train_labels)
        if variant == "mic_clusters":
            if p.num_clusters > num_images:
                raise ConfigError(f"method.params.num_clusters: {p.num_clusters} clusters > {num_images} training "
                                  "images; lower it")
            if p.cluster_features == "resnet_layer1" and not hasattr(getattr(model.backbone, "body", None),
                                                                     "layer1"):
                raise ConfigError("method.params.cluster_features: 'resnet_layer1' needs a ResNet backbone; use "
                                  "'backbone' or 'shared'")
            resolve_backend(p.cluster_backend)  # a missing faiss fails now, not after an epoch
        self.info = info
        num_labels = {"random_groups": p.num_ids, "mic_clusters": p.num_clusters}.get(variant, info.num_classes)
        self._modules["shared_loss"] = MarginLoss(margin=p.margin, nu=p.nu, beta=p.beta, num_classes=num_labels,
                                                  learn_beta=True, denominator=p.denominator)
        self._modules["decorrelation"] = Decorrelation(
            model.head.embedding_size, model.shared_head.embedding_size, p.adv_hidden, direction=p.adv_direction,
            grl_on_source=p.grl_on_source, grl_on_target=p.grl_on_target, detach_target=p.detach_target,
            grl_lambda=p.grl_lambda)
        # The shared stream's seed differs from the class stream's so that the two never coincide.
        seed = info.seed + 104_729
        if variant == "random_groups":
            self.stream = SurrogateGroupBatchSampler(num_images, info.batch_size, info.steps_per_epoch,
                                                     group_size=p.group_size, num_ids=p.num_ids, seed=seed)
        elif variant == "mic_clusters":
            self.stream = ClusterBatchSampler(None, info.batch_size, info.steps_per_epoch, per_cluster=p.group_size,
                                              random_pick_p=p.random_pick_p, seed=seed)
        elif p.update_mode == "alternating":
            with warnings.catch_warnings():  # single-image classes: already refused or dropped with the splits
                warnings.simplefilter("ignore")
                self.stream = ClassBalancedBatchSampler(info.train_labels, classes_per_batch=info.classes_per_batch,
                                                        samples_per_class=info.samples_per_class, seed=seed)
        else:
            self.stream = None

    def param_groups(self, model: EmbeddingModel) -> list[dict[str, Any]]:
        assert isinstance(model, TwoHeadModel)
        p = self.params
        return [
            {"params": [q for q in model.shared_head.parameters() if q.requires_grad], "name": "shared_head"},
            {"params": list(self._modules["shared_loss"].parameters()), "lr": p.beta_lr, "weight_decay": 0.0,
             "name": "shared_beta"},
            {"params": list(self._modules["decorrelation"].parameters()), "lr": p.adv_lr,
             "weight_decay": p.adv_weight_decay, "name": "decorrelation"},
        ]

    def streams(self) -> dict[str, Any]:
        return {} if self.stream is None else {"shared": self.stream}

    # ------------------------------------------------------------------ MIC clustering
    def on_epoch_start(self, ctx: StepContext) -> None:
        p = self.params
        if p.shared_sampling != "mic_clusters":
            return
        epoch = ctx.epoch
        # Epoch 1 (or no labels yet): the initial clustering; later epochs on the re-clustering schedule. Decided
        # by the epoch, not by the labels held, so a run resumed at the start of an epoch does the same.
        initial = epoch == 0 or self.cluster_labels is None
        if not initial and not (p.recluster_every and epoch % p.recluster_every == 0):
            return
        model = ctx.model
        assert isinstance(model, TwoHeadModel) and self.info is not None
        # First clustering: the network as initialised, standardised by class; later: the shared embedding.
        source = p.cluster_features if initial else "shared"
        features, labels = ctx.embed_train(_Features(model, source))
        standardize: Any = p.standardize if initial and p.standardize != "none" else None
        assign, _ = kmeans_pseudo_labels(features, p.num_clusters, standardize_by_class=standardize,
                                         labels=labels, l2_normalize=True, backend=p.cluster_backend,
                                         seed=self.info.seed + epoch, n_iter=p.cluster_iterations,
                                         n_init=p.cluster_n_init)
        self.set_cluster_labels(assign)
        sizes = torch.bincount(assign, minlength=p.num_clusters)
        ctx.log("clusters", epoch=epoch + 1, source=source, standardize=standardize or "none",
                num_clusters=p.num_clusters, empty_clusters=int((sizes == 0).sum()),
                smallest=int(sizes[sizes > 0].min()), largest=int(sizes.max()),
                backend=resolve_backend(p.cluster_backend))

    def set_cluster_labels(self, assign: Tensor) -> None:
        """Pseudo labels ``(N,)`` of the training images for the MIC stream."""
        self.cluster_labels = assign.detach().cpu().long()
        self.stream.set_cluster_labels(self.cluster_labels.numpy())

    # ------------------------------------------------------------------ the step
    def shared_loss(self, shared_emb: Tensor, labels: Tensor, groups: Tensor | None) -> tuple[Tensor, int]:
        """Margin loss on inter-class triplets of ``shared_emb (B, D_s)``; returns it and the triplet count."""
        triplets = self.sampler(shared_emb, labels, groups)
        value = self._modules["shared_loss"](shared_emb, triplets.loss_labels, triplets.indices)
        return value, int(triplets.anchors.numel())

    def _forward(self, ctx: StepContext, images: Tensor) -> tuple[Tensor, Tensor]:
        model = ctx.model
        with torch.autocast(device_type=ctx.device.type, dtype=torch.float16, enabled=ctx.use_amp):
            c, s = model.forward_heads(images.to(ctx.device, non_blocking=True))  # type: ignore[operator]
        return c.float(), s.float()  # loss maths in fp32 (methods.md §1.2)

    def _slot_groups(self, ctx: StepContext, batch: Batch) -> Tensor | None:
        """Surrogate / cluster ids of the shared batch, recomputed from its sampler and checked against it."""
        if not self.sampler.needs_groups:
            return None
        indices, groups = self.stream.batch(ctx.epoch, ctx.step)
        if not np.array_equal(indices, batch[2].numpy()):
            raise CheckpointError("the shared stream's batch differs from its plan; the run state is inconsistent")
        return torch.from_numpy(groups).to(ctx.device)

    def train_step(self, ctx: StepContext, batch: Batch, extra: dict[str, Batch]) -> tuple[float, dict[str, float]]:
        p = self.params
        adv = self._modules["decorrelation"]
        # Drawn first, from the step's seeded generator: whether this iteration has its shared part.
        with_shared = p.shared_step_prob >= 1.0 or bool(torch.rand(()) < p.shared_step_prob)
        images, labels, _ = batch
        labels = labels.to(ctx.device)
        c, s = self._forward(ctx, images)
        class_loss = ctx.criterion(c, labels)
        adv_loss = adv(c, s) if p.adv_weight > 0 else c.sum() * 0
        first = class_loss + p.adv_weight * adv_loss
        logs = {"class_loss": float(class_loss.detach()), "adv_loss": float(adv_loss.detach()),
                "shared_steps": float(with_shared)}
        if p.update_mode == "alternating":
            ctx.optimizer_step(first)
            total = float(first.detach())
            if with_shared:
                shared_value, count, adv2 = self._shared_part(ctx, extra["shared"])
                second = p.shared_weight * shared_value + p.adv_weight * adv2
                ctx.optimizer_step(second)
                total += float(second.detach())
                logs.update(shared_loss=float(shared_value.detach()), shared_triplets=float(count))
            return total, logs
        objective = first
        if with_shared:
            if p.shared_sampling in CLASS_LABEL_VARIANTS:
                shared_value, count = self.shared_loss(s, labels, None)
            else:
                shared_value, count, adv2 = self._shared_part(ctx, extra["shared"])
                objective = objective + p.adv_weight * adv2
            objective = objective + p.shared_weight * shared_value
            logs.update(shared_loss=float(shared_value.detach()), shared_triplets=float(count))
        ctx.optimizer_step(objective)
        return float(objective.detach()), logs

    def _shared_part(self, ctx: StepContext, batch: Batch) -> tuple[Tensor, int, Tensor]:
        """Shared loss, triplet count and decorrelation term on the shared stream's batch."""
        groups = self._slot_groups(ctx, batch)
        c2, s2 = self._forward(ctx, batch[0])
        value, count = self.shared_loss(s2, batch[1].to(ctx.device), groups)
        adv2 = self._modules["decorrelation"](c2, s2) if self.params.adv_weight > 0 else c2.sum() * 0
        return value, count, adv2

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["cluster_labels"] = self.cluster_labels
        if self.stream is not None:
            state["stream"] = self.stream.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        labels = state.get("cluster_labels")
        if self.params.shared_sampling == "mic_clusters":
            if labels is not None:
                if self.info is not None and labels.shape != (len(self.info.train_labels),):
                    raise CheckpointError(f"the checkpoint's cluster labels have shape {tuple(labels.shape)}, the "
                                          f"training split {len(self.info.train_labels)} images")
                self.set_cluster_labels(labels)
            else:
                self.cluster_labels = None
        if self.stream is not None:
            if "stream" not in state:
                raise CheckpointError("the checkpoint's method state lacks the shared stream")
            self.stream.load_state_dict(state["stream"])


__all__ = [
    "CLASS_LABEL_VARIANTS",
    "VARIANTS",
    "Decorrelation",
    "GradientReversal",
    "SharedTripletSampler",
    "SharedTriplets",
    "SharingMethod",
    "SharingParams",
    "TwoHeadModel",
    "distance_weighted_probabilities",
    "grad_reverse",
    "unit_distances",
]
