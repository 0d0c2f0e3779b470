"""SLADE: self-training with feature-basis pair selection (Duan et al., CVPR 2021; methods.md §7).

No official code exists; equation-level details are [REC] and every unknown is a parameter (docs/slade.md).
Pieces, usable on their own:

- :func:`ema_value`: one EMA step with the first observation initialising and two gradient modes.
- :class:`FeatureBasis`: the basis ``W_a (C_l, D)`` (a bias-free classifier, Eq. 3), the cosine similarities
  of basis representations of unlabeled pairs (Eq. 4), the similarity-distribution loss with EMA Gaussian
  statistics (Eq. 5-6) and the thresholds ``T1 = mu+``, ``T2 = mu-`` (Eq. 7).
- :func:`select_confident_pairs`: the confident positive / negative pair masks, with or without cluster
  agreement; :func:`symmetric_pairs` turns them into a loss's pair indices.
- :func:`cluster_unlabeled` / :func:`save_pseudo_labels` / :func:`load_pseudo_labels`: k-means pseudo labels of
  the unlabeled set and their cache file (keyed by the teacher checkpoint's hash).
- :class:`SladeStudentMethod` (``method: {name: slade_student}``): one student stage, Eq. 9 with the basis
  warm-up.
- :class:`SladeSSLMethod` (``method: {name: slade_ssl}``): the teacher's self-supervised initialisation, a
  two-view contrastive loss (NT-Xent, SimCLR) over labeled ∪ unlabeled images.
- :class:`SladeMethod` (``method: {name: slade}``): the whole pipeline. It declares its stages (SSL ->
  teacher -> pseudo labels -> student, several rounds; :mod:`dmlgen.methods.stages`), which the engine's
  runner (:mod:`dmlgen.engine.pipeline`) executes; methods never import the engine.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch import Tensor, nn

from dmlgen.data.transforms import transform_config_from_dict
from dmlgen.data.unlabeled import DatasetStream, PooledDataset, RandomBatchSampler
from dmlgen.errors import CheckpointError, ConfigError, DataError
from dmlgen.torch_files import load_weights_only
from dmlgen.losses.base import BaseMetricLoss
from dmlgen.losses.contrastive import ContrastiveLoss
from dmlgen.losses.multi_similarity import MultiSimilarityLoss
from dmlgen.losses.ntxent import NTXentLoss
from dmlgen.losses.registry import LOSSES
from dmlgen.losses.triplet import TripletMarginLoss
from dmlgen.models import EmbeddingModel

from .base import Batch, MethodSetup, StepContext, TrainingMethod
from .clustering import kmeans_pseudo_labels, resolve_backend
from .samplers import ClusterBatchSampler
from .stages import Stage, StageContext

EmaGradMode = Literal["literal", "full"]
#: Losses whose value on the selected unlabeled pairs is defined by the pairs alone (no per-label
#: parameters such as proxies or a margin loss's β): the only ones SLADE's unlabeled term accepts.
PAIR_LOSSES: tuple[type[BaseMetricLoss], ...] = (ContrastiveLoss, MultiSimilarityLoss, TripletMarginLoss,
                                                 NTXentLoss)
PSEUDO_LABELS_KIND = "slade-pseudo-labels"


# ------------------------------------------------------------------------------------------- EMA
def ema_value(stored: Tensor, batch: Tensor, beta: float, initialized: bool,
              grad_mode: EmaGradMode = "literal") -> Tensor:
    """The EMA estimate after observing ``batch`` (0-dim), methods.md §7.2 item 4 (Eq. 6).

    ``initialized=False``: the first observation initialises, the value is ``batch`` (full gradient).
    Otherwise ``(1 - beta) * batch + beta * stored`` with ``stored`` gradient-free; the gradient that reaches
    ``batch`` is ``(1 - beta)`` times the upstream one in ``"literal"`` mode, and undamped (``1``) in ``"full"``
    mode, which has the same forward value.
    """
    if not initialized:
        return batch
    value = (1.0 - beta) * batch + beta * stored.detach()
    if grad_mode == "literal":
        return value
    if grad_mode != "full":
        raise ConfigError(f"ema_grad_mode: {grad_mode!r} is not one of 'literal', 'full'")
    # Same number, gradient of `batch` with weight 1: the straight-through form value.detach() + (b - b.detach()).
    return value.detach() + (batch - batch.detach())


# ------------------------------------------------------------------------------------------ basis
def upper_pairs(n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Row and column indices ``(M,)`` of the ``M = n (n - 1) / 2`` pairs ``i < j``, row-major."""
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    return i, j


class FeatureBasis(nn.Module):
    """SLADE's feature basis (methods.md §7.2): ``W_a (C_l, D)``, EMA statistics and pair thresholds.

    Args:
        emb_dim: embedding size D.
        num_classes: number of labeled classes C_l (the basis is a bias-free classifier over them).
        ema_beta: β of the EMA (0.99), in [0, 1).
        sd_margin: m_sd of the similarity-distribution loss ([UNK], required).
        ema_grad_mode: ``"literal"`` or ``"full"`` (:func:`ema_value`).

    Buffers (all 0-dim, saved with the run): ``mu_pos``, ``var_pos``, ``mu_neg``, ``var_neg`` (float32) and
    ``seen_pos``, ``seen_neg`` (bool). They change only in training mode.
    """

    def __init__(self, emb_dim: int, num_classes: int, *, ema_beta: float = 0.99, sd_margin: float = 0.5,
                 ema_grad_mode: EmaGradMode = "literal") -> None:
        super().__init__()
        if emb_dim < 1 or num_classes < 2:
            raise ConfigError(f"FeatureBasis: emb_dim >= 1 and num_classes >= 2 needed, got {emb_dim}, {num_classes}")
        if not 0.0 <= ema_beta < 1.0:
            raise ConfigError(f"FeatureBasis: ema_beta must be in [0, 1), got {ema_beta}")
        if ema_grad_mode not in ("literal", "full"):
            raise ConfigError(f"FeatureBasis: ema_grad_mode {ema_grad_mode!r} is not one of 'literal', 'full'")
        self.weight = nn.Parameter(torch.empty(num_classes, emb_dim))
        # nn.Linear's default initialisation (the basis is a bias-free linear classifier).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.ema_beta = float(ema_beta)
        self.sd_margin = float(sd_margin)
        self.ema_grad_mode: EmaGradMode = ema_grad_mode
        for name in ("mu_pos", "var_pos", "mu_neg", "var_neg"):
            self.register_buffer(name, torch.zeros(()))
        self.register_buffer("seen_pos", torch.zeros((), dtype=torch.bool))
        self.register_buffer("seen_neg", torch.zeros((), dtype=torch.bool))

    def forward(self, embeddings: Tensor) -> Tensor:
        """Basis representation ``r = W_a f``: ``(N, D) -> (N, C_l)``; also the CE logits of Eq. 3."""
        return embeddings.float() @ self.weight.T

    def similarities(self, embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eq. 4: ``s_ij = cos(r_i, r_j)`` over the pairs ``i < j`` of ``embeddings (N, D)``.

        Returns ``(s (M,), i (M,), j (M,))`` with ``M = N (N - 1) / 2``.
        """
        r = F.normalize(self(embeddings), dim=1, eps=1e-12)
        i, j = upper_pairs(r.shape[0], r.device)
        return (r[i] * r[j]).sum(dim=1), i, j

    def _side(self, values: Tensor, side: str) -> tuple[Tensor, Tensor]:
        """EMA mean and variance of one side after this batch's ``values (m,)``; stored values if ``m == 0``."""
        mu_buf, var_buf = getattr(self, f"mu_{side}"), getattr(self, f"var_{side}")
        seen = getattr(self, f"seen_{side}")
        if values.numel() == 0:
            return mu_buf.detach().clone(), var_buf.detach().clone()
        batch_mu = values.mean()
        batch_var = (values - batch_mu).pow(2).mean()  # biased (population) variance [LIB]
        initialized = bool(seen)
        mu = ema_value(mu_buf, batch_mu, self.ema_beta, initialized, self.ema_grad_mode)
        var = ema_value(var_buf, batch_var, self.ema_beta, initialized, self.ema_grad_mode)
        if self.training:  # methods.md §1.2.5: running statistics change only while training
            with torch.no_grad():
                mu_buf.copy_(mu.detach())
                var_buf.copy_(var.detach())
                seen.fill_(True)
        return mu, var

    def sd_loss(self, s: Tensor, same: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Eq. 5-6: ``[mu- - mu+ + m_sd]_+ + (var+ + var-)`` from the EMA statistics after this batch.

        ``s (M,)``: pair similarities; ``same (M,)`` bool: the pair shares its pseudo label (G+) or not (G-).
        Zero (in the graph of ``s``) until both sides have been seen. Returns the loss and the statistics.
        """
        if s.shape != same.shape:
            raise DataError(f"FeatureBasis.sd_loss: similarities {tuple(s.shape)} and mask {tuple(same.shape)}")
        mu_p, var_p = self._side(s[same], "pos")
        mu_n, var_n = self._side(s[~same], "neg")
        stats = {"mu_pos": float(mu_p.detach()), "var_pos": float(var_p.detach()), "mu_neg": float(mu_n.detach()),
                 "var_neg": float(var_n.detach()),
                 "pos_pairs": float(same.sum()), "neg_pairs": float((~same).sum())}
        if not (bool(self.seen_pos) and bool(self.seen_neg)):
            return s.sum() * 0, stats
        loss = F.relu(mu_n - mu_p + self.sd_margin) + (var_p + var_n)
        return loss, stats

    def thresholds(self) -> tuple[float, float] | None:
        """``(T1, T2) = (mu+, mu-)``, or None while a side is unseen or the bands overlap (``mu+ <= mu-``)."""
        if not (bool(self.seen_pos) and bool(self.seen_neg)):
            return None
        t1, t2 = float(self.mu_pos), float(self.mu_neg)
        return (t1, t2) if t1 > t2 else None

    def extra_repr(self) -> str:
        return (f"num_classes={self.weight.shape[0]}, emb_dim={self.weight.shape[1]}, ema_beta={self.ema_beta}, "
                f"sd_margin={self.sd_margin}, ema_grad_mode={self.ema_grad_mode!r}")


def select_confident_pairs(s: Tensor, same: Tensor, thresholds: tuple[float, float] | None, *,
                           require_cluster_agreement: bool = False) -> tuple[Tensor, Tensor]:
    """Eq. 7: confident positive and negative masks ``(M,)`` over pairs with similarities ``s (M,)``.

    Positive: ``s >= T1`` (and the same pseudo label when ``require_cluster_agreement``); negative:
    ``s <= T2`` (and different pseudo labels). ``thresholds=None`` (a side unseen, or ``mu+ <= mu-``) selects
    nothing [LIB]. ``same (M,)`` bool: whether each pair shares its pseudo label.
    """
    if thresholds is None:
        empty = torch.zeros_like(same, dtype=torch.bool)
        return empty, empty.clone()
    t1, t2 = thresholds
    pos, neg = s >= t1, s <= t2
    if require_cluster_agreement:
        pos, neg = pos & same, neg & ~same
    return pos, neg


def symmetric_pairs(i: Tensor, j: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss pair indices ``(a1, p, a2, n)`` from upper-triangle pairs ``(i, j)`` and their masks, in both
    orders (``(i, j)`` and ``(j, i)``), so per-anchor losses see each pair from both ends; a pair loss's mean
    over both orders equals its mean over the unordered pairs."""
    pi, pj, ni, nj = i[pos], j[pos], i[neg], j[neg]
    return torch.cat([pi, pj]), torch.cat([pj, pi]), torch.cat([ni, nj]), torch.cat([nj, ni])


# ------------------------------------------------------------------------------------ pseudo labels
def cluster_unlabeled(features: Tensor | np.ndarray, num_clusters: int, *, backend: str = "auto", seed: int = 0,
                      n_iter: int = 20, n_init: int = 1) -> Tensor:
    """k-means pseudo labels ``(N,)`` int64 of the teacher's embeddings of the unlabeled set (methods.md §7.1
    step 2: plain L2-normalised features, no class standardisation).

    Raises DataError for an empty set or ``num_clusters`` outside ``2..N`` (named as the config key).
    """
    n = int(features.shape[0])
    if n == 0:
        raise DataError("SLADE pseudo labels: the unlabeled set is empty; check data.unlabeled")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 2 <= num_clusters <= n:
        raise DataError(f"SLADE pseudo labels: num_clusters={num_clusters!r} but the unlabeled set has {n} images; "
                        f"need 2 <= K <= {n} (lower num_clusters or add unlabeled images)")
    assign, _ = kmeans_pseudo_labels(features, num_clusters, l2_normalize=True,
                                     backend=backend,  # type: ignore[arg-type]
                                     seed=seed, n_iter=n_iter, n_init=n_init)
    return assign


def labels_digest(labels: np.ndarray | Tensor) -> str:
    """SHA-1 of an int64 label array (identifies the pseudo labels a student trained with)."""
    arr = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    return hashlib.sha1(arr.astype(np.int64).tobytes()).hexdigest()


def pseudo_label_record(labels: Tensor, meta: dict[str, Any]) -> dict[str, Any]:
    """The content of a pseudo-label file: ``kind``, ``labels (N,)`` int64 and plain ``meta`` (teacher hash, K,
    backend, purity, ...); written by the pipeline's ``ctx.save`` or :func:`save_pseudo_labels`."""
    return {"kind": PSEUDO_LABELS_KIND, "labels": labels.detach().cpu().long(), "meta": dict(meta)}


def save_pseudo_labels(path: str | Path, labels: Tensor, meta: dict[str, Any]) -> Path:
    """Write :func:`pseudo_label_record` with ``torch.save`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": 1, **pseudo_label_record(labels, meta)}, tmp)
    tmp.replace(path)
    return path


def load_pseudo_labels(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``(labels (N,) int64, meta)`` of a pseudo-label file (read with ``weights_only=True``, no code runs)."""
    path = Path(path)
    obj = load_weights_only(path, "pseudo-label file")
    if not isinstance(obj, dict) or obj.get("kind") != PSEUDO_LABELS_KIND or not isinstance(obj.get("labels"), Tensor):
        raise CheckpointError(f"{path} is not a SLADE pseudo-label file")
    labels = obj["labels"].long().numpy()
    if labels.ndim != 1 or (labels.size and labels.min() < 0):
        raise CheckpointError(f"pseudo-label file {path}: labels must be (N,) ints >= 0")
    return labels, dict(obj.get("meta", {}))


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load the whole model (backbone and head) of a dmlgen checkpoint into ``model``; mismatches name the file."""
    path = Path(path)
    obj = load_weights_only(path, "init checkpoint")
    state = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"init checkpoint {path} holds no model weights (a dmlgen best.ckpt / last.ckpt)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"init checkpoint {path} does not fit this model: {exc}".split("\n")[0]) from None


# -------------------------------------------------------------------------------------------- student
@dataclass
class SladeStudentParams:
    """``method.params`` of ``method: {name: slade_student}`` (one student stage, methods.md §7.2-7.3).

    Inputs (the ``slade`` pipeline fills them in): ``pseudo_labels``: the file written by the pseudo-label
    stage; ``init_checkpoint``: a dmlgen checkpoint whose whole model (backbone and head) initialises the
    student (``student_init: teacher``), or null (the configured model, e.g. ``model.weights``).
    Data: ``pseudo_labels``: see above;
    ``batch_unlabeled``: unlabeled images per step, drawn ``random``-ly or ``cluster_balanced``
    (``per_cluster`` per pseudo label) by ``unlabeled_sampler``; the labeled part of a step is the class
    stream's batch (``data.classes_per_batch * data.samples_per_class``). Loss (Eq. 9):
    ``L_rank(labeled) + lambda_unlabeled * L_rank(selected unlabeled pairs) + lambda_basis * L_basis``
    with ``L_basis = CE + sd_weight * L_SD`` and the SD margin ``sd_margin``. ``basis_warmup_steps``:
    optimiser steps at the start of the stage that train the basis alone on detached embeddings. Basis
    statistics: ``ema_beta``, ``ema_grad_mode``; selection: ``require_cluster_agreement``. ``basis_lr`` /
    ``basis_weight_decay``: the basis's optimiser group (null lr: ``optimizer.lr``).

    λ1, λ2, m_sd and the warm-up length are unpublished ([UNK]) and must be given.
    """

    pseudo_labels: str | None = None
    init_checkpoint: str | None = None
    batch_unlabeled: int = 32
    unlabeled_sampler: Literal["random", "cluster_balanced"] = "random"
    per_cluster: int = 4
    lambda_unlabeled: float | None = None
    lambda_basis: float | None = None
    sd_margin: float | None = None
    sd_weight: float = 1.0
    basis_warmup_steps: int | None = None
    ema_beta: float = 0.99
    ema_grad_mode: Literal["literal", "full"] = "literal"
    require_cluster_agreement: bool = False
    basis_lr: float | None = None
    basis_weight_decay: float = 0.0

    def validate(self) -> None:
        key = "method.params."
        for name in ("lambda_unlabeled", "lambda_basis", "sd_margin", "basis_warmup_steps"):
            if getattr(self, name) is None:
                raise ConfigError(f"{key}{name}: required (the paper does not publish it, methods.md §7.3); "
                                  "set it explicitly")

        def check(name: str, ok: bool, need: str) -> None:
            if not ok:
                raise ConfigError(f"{key}{name}: {need}, got {getattr(self, name)!r}")

        check("batch_unlabeled", self.batch_unlabeled >= 2, "must be >= 2 (pairs need two images)")
        check("per_cluster", self.per_cluster >= 2, "must be >= 2")
        assert self.lambda_unlabeled is not None and self.lambda_basis is not None and self.sd_margin is not None
        check("lambda_unlabeled", math.isfinite(self.lambda_unlabeled) and self.lambda_unlabeled >= 0, "must be >= 0")
        check("lambda_basis", math.isfinite(self.lambda_basis) and self.lambda_basis > 0,
              "must be > 0 (the basis selects the unlabeled pairs; it must train)")
        check("sd_margin", math.isfinite(self.sd_margin), "must be a finite number")
        check("sd_weight", math.isfinite(self.sd_weight) and self.sd_weight >= 0, "must be >= 0")
        assert self.basis_warmup_steps is not None
        check("basis_warmup_steps", self.basis_warmup_steps >= 0, "must be >= 0")
        check("ema_beta", 0.0 <= self.ema_beta < 1.0, "must be in [0, 1)")
        check("basis_lr", self.basis_lr is None or self.basis_lr > 0, "must be > 0 or null")
        check("basis_weight_decay", self.basis_weight_decay >= 0, "must be >= 0")


def _unlabeled_split(info: MethodSetup, method: str) -> Any:
    splits = info.splits
    unlabeled = getattr(splits, "unlabeled", None) if splits is not None else None
    if unlabeled is None:
        raise ConfigError(f"method {method}: needs unlabeled images; add a data.unlabeled section "
                          "(docs/slade.md)")
    return unlabeled


class SladeStudentMethod(TrainingMethod):
    """``method: {name: slade_student}``: the SLADE student (methods.md §7.2, Eq. 9).

    Each step takes the class stream's labeled batch ``B^l`` and an unlabeled batch ``B^u`` (stream
    ``unlabeled``, with the pseudo labels of its images), embeds both in one forward pass and:

    - warm-up (the first ``basis_warmup_steps`` optimiser steps of the stage): ``lambda_basis * L_basis`` on
      detached embeddings, so only the basis trains and its statistics settle before any pair is mined;
    - afterwards: ``L_rank(f_l, y_l) + lambda_unlabeled * L_rank(f_u; P_u, N_u) + lambda_basis * L_basis``.

    ``L_rank`` is the configured loss (``loss:``, with its miner on the labeled batch; on the unlabeled batch
    without a miner, on the selected pairs ``P_u`` / ``N_u`` in both orders). ``L_basis = CE(W_a f_l, y_l) +
    sd_weight * L_SD(s_u)``. Logged per epoch: each term, the EMA statistics, the selected pair counts,
    the share of warm-up steps and of steps whose bands overlapped (``mu+ <= mu-``: nothing selected); when
    the unlabeled pool has hidden labels (a benchmark protocol), also how many selected pairs they confirm
    (``selected_pos_true`` / ``selected_neg_true``, diagnostics that never enter the objective).
    """

    name = "slade_student"
    custom_step = True

    def __init__(self, params: SladeStudentParams) -> None:
        super().__init__(params)
        self.params: SladeStudentParams = params
        self.info: MethodSetup | None = None
        self.pseudo_labels: Tensor | None = None
        self.pseudo_meta: dict[str, Any] = {}
        self.stream: DatasetStream | None = None
        self.hidden_labels: Tensor | None = None
        self._overlap_warned = False

    def setup(self, info: MethodSetup, model: EmbeddingModel) -> None:
        p = self.params
        unlabeled = _unlabeled_split(info, self.name)
        if info.has_regularizers:
            raise ConfigError("method slade_student: regularizers (MDR / LSD) are not combined with it; remove "
                              "the regularizers section")
        if p.pseudo_labels is None:
            raise ConfigError("method.params.pseudo_labels: the student needs the pseudo labels of the unlabeled "
                              "set; `dmlgen train` with a SLADE pipeline writes them (docs/slade.md)")
        labels, meta = load_pseudo_labels(p.pseudo_labels)
        if len(labels) != len(unlabeled):
            raise CheckpointError(f"pseudo-label file {p.pseudo_labels} labels {len(labels)} images, the unlabeled "
                                  f"set has {len(unlabeled)}; recompute the pseudo labels")
        if p.batch_unlabeled > len(unlabeled):
            raise ConfigError(f"method.params.batch_unlabeled: {p.batch_unlabeled} > the {len(unlabeled)} unlabeled "
                              "images; lower it")
        if p.init_checkpoint is not None:
            # A resumed run loads its own last.ckpt over these weights afterwards.
            load_model_weights(model, p.init_checkpoint)
        self.info = info
        self.pseudo_labels = torch.from_numpy(labels)
        self.pseudo_meta = meta
        hidden = getattr(unlabeled, "hidden_labels", None)
        # Diagnostics only (how many selected pairs are right); never part of the objective.
        self.hidden_labels = None if hidden is None else torch.from_numpy(np.asarray(hidden, dtype=np.int64))
        self._modules["basis"] = FeatureBasis(model.embedding_size, info.num_classes, ema_beta=p.ema_beta,
                                              sd_margin=float(p.sd_margin),  # type: ignore[arg-type]
                                              ema_grad_mode=p.ema_grad_mode)
        # A seed of its own, so the unlabeled stream never mirrors the class stream.
        seed = info.seed + 7_919
        if p.unlabeled_sampler == "random":
            sampler: Any = RandomBatchSampler(len(unlabeled), p.batch_unlabeled, info.steps_per_epoch, seed=seed)
        else:
            sampler = ClusterBatchSampler(labels, p.batch_unlabeled, info.steps_per_epoch,
                                          per_cluster=p.per_cluster, random_pick_p=0.0, seed=seed)
        self.stream = DatasetStream(sampler, unlabeled)

    def param_groups(self, model: EmbeddingModel) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": list(self._modules["basis"].parameters()), "name": "basis",
                                 "weight_decay": self.params.basis_weight_decay}
        if self.params.basis_lr is not None:
            group["lr"] = self.params.basis_lr
        return [group]

    def streams(self) -> dict[str, Any]:
        return {} if self.stream is None else {"unlabeled": self.stream}

    def on_epoch_start(self, ctx: StepContext) -> None:
        loss = getattr(ctx.criterion, "loss", ctx.criterion)
        if not isinstance(loss, PAIR_LOSSES):
            raise ConfigError(f"method slade_student: loss {type(loss).__name__} cannot score the selected "
                              "unlabeled pairs (it has per-class parameters); use contrastive, multi_similarity, "
                              "triplet_margin or ntxent")
        if ctx.epoch == 0:
            ctx.log("slade_student", pseudo_labels=self.params.pseudo_labels, init=self.params.init_checkpoint,
                    num_clusters=self.pseudo_meta.get("num_clusters"), source=self.pseudo_meta.get("source"),
                    unlabeled_images=len(self.pseudo_labels) if self.pseudo_labels is not None else 0)

    def global_step(self, ctx: StepContext) -> int:
        assert self.info is not None
        return ctx.epoch * self.info.steps_per_epoch + ctx.step

    def in_warmup(self, ctx: StepContext) -> bool:
        """Whether this step belongs to the basis warm-up (the first ``basis_warmup_steps`` of the stage)."""
        return self.global_step(ctx) < int(self.params.basis_warmup_steps or 0)

    def train_step(self, ctx: StepContext, batch: Batch, extra: dict[str, Batch]) -> tuple[float, dict[str, float]]:
        p = self.params
        assert self.pseudo_labels is not None
        basis: FeatureBasis = self._modules["basis"]  # type: ignore[assignment]
        images_l, labels_l, _ = batch
        images_u, _, index_u = extra["unlabeled"]
        labels_l = labels_l.to(ctx.device)
        pseudo = self.pseudo_labels[index_u.long()].to(ctx.device)
        n_l = images_l.shape[0]
        warm = self.in_warmup(ctx)
        images = torch.cat([images_l, images_u]).to(ctx.device, non_blocking=True)
        # One forward pass over B^l ∪ B^u (BN sees the mixed batch). In warm-up nothing reaches the model.
        with torch.set_grad_enabled(not warm), torch.autocast(device_type=ctx.device.type, dtype=torch.float16,
                                                              enabled=ctx.use_amp):
            emb = ctx.model(images)
        emb = emb.float()  # loss maths in fp32 (methods.md §1.2)
        f_l, f_u = emb[:n_l], emb[n_l:]
        ce = F.cross_entropy(basis(f_l), labels_l)
        s, i, j = basis.similarities(f_u)
        index_dev = index_u.long().to(ctx.device)
        distinct = index_dev[i] != index_dev[j]
        if not bool(distinct.all()):
            # A pseudo-label cluster smaller than per_cluster is drawn with repeats: two copies of one image
            # say nothing about the metric (s = 1 without augmentation) and would inflate mu+; leave them out.
            s, i, j = s[distinct], i[distinct], j[distinct]
        same = pseudo[i] == pseudo[j]
        sd, stats = basis.sd_loss(s, same)
        l_basis = ce + p.sd_weight * sd
        logs = {"loss_ce": float(ce.detach()), "loss_sd": float(sd.detach()), "mu_pos": stats["mu_pos"],
                "mu_neg": stats["mu_neg"], "var_pos": stats["var_pos"], "var_neg": stats["var_neg"],
                "warmup": float(warm)}
        lam1, lam2 = float(p.lambda_unlabeled), float(p.lambda_basis)  # type: ignore[arg-type]
        if warm:
            loss = lam2 * l_basis
            with torch.no_grad():  # logged only, so that the epoch means cover every step alike
                l_lab = ctx.criterion(f_l, labels_l)
            logs.update(loss_labeled=float(l_lab), loss_unlabeled=0.0, selected_pos=0.0, selected_neg=0.0,
                        overlap=0.0)
            if self.hidden_labels is not None:
                logs.update(selected_pos_true=0.0, selected_neg_true=0.0)
        else:
            thresholds = basis.thresholds()
            pos, neg = select_confident_pairs(s.detach(), same, thresholds,
                                              require_cluster_agreement=p.require_cluster_agreement)
            overlap = thresholds is None and bool(basis.seen_pos) and bool(basis.seen_neg)
            if overlap and not self._overlap_warned:
                self._overlap_warned = True
                ctx.log("slade_overlap", epoch=ctx.epoch + 1, step=ctx.step + 1, mu_pos=stats["mu_pos"],
                        mu_neg=stats["mu_neg"], message="mu+ <= mu-: the similarity bands overlap, no unlabeled "
                        "pair is selected until they separate")
            l_lab = ctx.criterion(f_l, labels_l)
            if bool(pos.any()) or bool(neg.any()):
                pairs = symmetric_pairs(i, j, pos, neg)
                # Distinct dummy labels: the pairs alone define the selection (PAIR_LOSSES ignore the labels
                # when given pairs), and distinct labels keep the single-class guard quiet.
                dummy = torch.arange(f_u.shape[0], device=f_u.device)
                l_unl = ctx.criterion.loss(f_u, dummy, pairs)  # type: ignore[union-attr,operator]
            else:
                l_unl = f_u.sum() * 0  # stays in the graph (methods.md §1.2.4)
            loss = l_lab + lam1 * l_unl + lam2 * l_basis
            logs.update(loss_labeled=float(l_lab.detach()), loss_unlabeled=float(l_unl.detach()),
                        selected_pos=float(pos.sum()), selected_neg=float(neg.sum()), overlap=float(overlap))
            if self.hidden_labels is not None:
                # Reporting only: selected pairs whose hidden labels agree with the selection (precision =
                # the epoch mean of these counts over the epoch mean of selected_pos / selected_neg).
                hidden = self.hidden_labels[index_u.long()].to(ctx.device)
                truly_same = hidden[i] == hidden[j]
                logs.update(selected_pos_true=float((pos & truly_same).sum()),
                            selected_neg_true=float((neg & ~truly_same).sum()))
        ctx.optimizer_step(loss)
        if warm and self.global_step(ctx) + 1 == int(p.basis_warmup_steps or 0):
            ctx.log("slade_warmup_done", step=self.global_step(ctx) + 1,
                    **{k: stats[k] for k in ("mu_pos", "mu_neg", "var_pos", "var_neg")})
        return float(loss.detach()), logs

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.pseudo_labels is not None:
            state["pseudo_labels_sha1"] = labels_digest(self.pseudo_labels)
        if self.stream is not None:
            state["stream"] = self.stream.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        mine = labels_digest(self.pseudo_labels) if self.pseudo_labels is not None else None
        if state.get("pseudo_labels_sha1") != mine:
            raise CheckpointError("the checkpoint was trained with other pseudo labels than "
                                  f"{self.params.pseudo_labels}; the run cannot resume with these")
        if self.stream is not None:
            if "stream" not in state:
                raise CheckpointError("the checkpoint's method state lacks the unlabeled stream")
            self.stream.load_state_dict(state["stream"])


# ------------------------------------------------------------------------------------------------ SSL
@dataclass
class SladeSSLParams:
    """``method.params`` of ``method: {name: slade_ssl}`` (the teacher's self-supervised initialisation).

    ``batch_size``: images per step, each seen in two augmented views (``data.train_transforms`` drawn
    twice with different seeds); ``include_labeled``: the pool is labeled ∪ unlabeled images (the paper,
    methods.md §7.1) or the unlabeled images only. The loss is the configured ``loss:`` over the 2B views with
    "same image" as the label: ``ntxent`` gives SimCLR's NT-Xent.
    """

    batch_size: int = 128
    include_labeled: bool = True

    def validate(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(f"method.params.batch_size: must be >= 2 (negatives are the other images), got "
                              f"{self.batch_size}")


class SladeSSLMethod(TrainingMethod):
    """``method: {name: slade_ssl}``: contrastive self-supervised training on labeled ∪ unlabeled images.

    Two extra streams (``view1``, ``view2``) draw the *same* random images of the pool; the engine loads
    each stream with augmentation seeds of its own, so they are two independent augmentations of every
    image. One forward pass over both views; ``loss(cat(z1, z2), cat(ids, ids))``. The class stream's labeled
    batch is not used (no label enters this stage). Why NT-Xent and not the paper's SwAV: it needs no
    prototypes, queue or Sinkhorn step, works with the in-batch negatives of a CPU-sized batch, and its
    positives are exactly the two views; see docs/slade.md.
    """

    name = "slade_ssl"
    custom_step = True

    def __init__(self, params: SladeSSLParams) -> None:
        super().__init__(params)
        self.params: SladeSSLParams = params
        self.views: dict[str, DatasetStream] = {}

    def setup(self, info: MethodSetup, model: EmbeddingModel) -> None:
        unlabeled = _unlabeled_split(info, self.name)
        if info.has_regularizers:
            raise ConfigError("method slade_ssl: regularizers are not combined with it; remove the regularizers "
                              "section")
        assert info.splits is not None
        pool = PooledDataset([info.splits.train, unlabeled] if self.params.include_labeled else [unlabeled])
        if self.params.batch_size > len(pool):
            raise ConfigError(f"method.params.batch_size: {self.params.batch_size} > the {len(pool)} images of the "
                              "pool; lower it")
        seed = info.seed + 15_485_863
        # Identical plans (same seed): the two streams yield the same indices, augmented differently.
        self.views = {name: DatasetStream(RandomBatchSampler(len(pool), self.params.batch_size,
                                                             info.steps_per_epoch, seed=seed), pool)
                      for name in ("view1", "view2")}

    def streams(self) -> dict[str, Any]:
        return dict(self.views)

    def on_epoch_start(self, ctx: StepContext) -> None:
        loss = getattr(ctx.criterion, "loss", ctx.criterion)
        if not isinstance(loss, PAIR_LOSSES):
            raise ConfigError(f"method slade_ssl: loss {type(loss).__name__} has per-class parameters and cannot "
                              "take view ids as labels; use ntxent (SimCLR) or another pair loss")

    def train_step(self, ctx: StepContext, batch: Batch, extra: dict[str, Batch]) -> tuple[float, dict[str, float]]:
        v1, _, idx1 = extra["view1"]
        v2, _, idx2 = extra["view2"]
        if not torch.equal(idx1, idx2):
            raise CheckpointError("the two view streams of slade_ssl drew different images; the run state is "
                                  "inconsistent")
        b = v1.shape[0]
        images = torch.cat([v1, v2]).to(ctx.device, non_blocking=True)
        with torch.autocast(device_type=ctx.device.type, dtype=torch.float16, enabled=ctx.use_amp):
            z = ctx.model(images)
        ids = torch.arange(b, device=ctx.device)
        loss = ctx.criterion(z.float(), torch.cat([ids, ids]))
        ctx.optimizer_step(loss)
        with torch.no_grad():  # how often a view's nearest other view is its partner (a training diagnostic)
            zn = F.normalize(z.detach().float(), dim=1)
            sim = zn @ zn.T
            sim.fill_diagonal_(-math.inf)
            partner = torch.cat([ids + b, ids])
            top1 = float((sim.argmax(dim=1) == partner).float().mean())
        return float(loss.detach()), {"view_top1": top1}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["views"] = {name: stream.state_dict() for name, stream in self.views.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        views = state.get("views", {})
        for name, stream in self.views.items():
            if name not in views:
                raise CheckpointError(f"the checkpoint's method state lacks the {name} stream")
            stream.load_state_dict(views[name])


# ------------------------------------------------------------------------------------------- pipeline
@dataclass
class SladeSSLStageParams:
    """``method.params.ssl`` of the ``slade`` pipeline: the teacher's self-supervised initialisation.

    ``epochs`` x ``steps_per_epoch`` steps (null: one pass over the pool per epoch) of ``batch_size`` images
    in two views, NT-Xent with ``temperature``, learning rate ``lr`` (null: ``optimizer.lr``). ``head_hidden``:
    hidden sizes of the SSL stage's head, which acts as SimCLR's projection head and is dropped afterwards (the
    teacher takes the backbone only). ``train_transforms``: the views' augmentation (null:
    ``data.train_transforms``); ``include_labeled``: pool labeled ∪ unlabeled images (else unlabeled only).
    """

    epochs: int = 3
    steps_per_epoch: int | None = None
    batch_size: int = 128
    temperature: float = 0.1
    lr: float | None = None
    head_hidden: list[int] = field(default_factory=list)
    train_transforms: dict[str, Any] | None = None
    include_labeled: bool = True

    def check(self) -> None:
        """Run by :meth:`SladeParams.validate` (an error raised while the optional section is converted would
        be reported only as "not a valid SladeSSLStageParams | None")."""
        key = "method.params.ssl."
        for name, low in (("epochs", 1), ("steps_per_epoch", 1), ("batch_size", 2)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{key}{name}: must be >= {low}, got {value}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"{key}temperature: must be > 0, got {self.temperature}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"{key}lr: must be > 0 or null, got {self.lr}")
        if any(h < 1 for h in self.head_hidden):
            raise ConfigError(f"{key}head_hidden: positive sizes, got {self.head_hidden}")
        transform_config_from_dict(self.train_transforms, prefix=f"{key}train_transforms")


@dataclass
class SladeParams(SladeStudentParams):
    """``method.params`` of ``method: {name: slade}``: the whole SLADE pipeline (methods.md §7.1).

    Every :class:`SladeStudentParams` field (the student's loss, basis and sampling; ``pseudo_labels`` and
    ``init_checkpoint`` are filled in per round and must stay unset here), plus: ``ssl`` (the self-supervised
    stage, :class:`SladeSSLStageParams`, or null for none), ``teacher_epochs`` / ``student_epochs`` (null:
    ``train.epochs``), ``num_clusters`` K of the k-means pseudo labels ([UNK], required), ``rounds`` of
    self-training (the student of round r is the teacher of round r + 1), ``student_init`` (``teacher``: the
    round's teacher model, backbone and head; ``ssl``: the SSL backbone, a fresh head), and the clustering
    ``cluster_backend`` / ``cluster_iterations`` / ``cluster_n_init``.
    """

    ssl: SladeSSLStageParams | None = field(default_factory=SladeSSLStageParams)
    teacher_epochs: int | None = None
    student_epochs: int | None = None
    num_clusters: int | None = None
    rounds: int = 1
    student_init: Literal["teacher", "ssl"] = "teacher"
    cluster_backend: Literal["auto", "faiss", "sklearn", "torch"] = "auto"
    cluster_iterations: int = 20
    cluster_n_init: int = 1

    def validate(self) -> None:
        super().validate()
        if self.ssl is not None:
            self.ssl.check()
        key = "method.params."
        for name in ("pseudo_labels", "init_checkpoint"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{key}{name}: set by the pipeline for each student round; remove it")
        if self.num_clusters is None:
            raise ConfigError(f"{key}num_clusters: required (K of the k-means pseudo labels is not published, "
                              "methods.md §7.3); set it explicitly")
        if self.num_clusters < 2:
            raise ConfigError(f"{key}num_clusters: must be >= 2, got {self.num_clusters}")
        for name in ("teacher_epochs", "student_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{key}{name}: must be >= 1 or null, got {value}")
        if self.rounds < 1:
            raise ConfigError(f"{key}rounds: must be >= 1, got {self.rounds}")
        if self.student_init == "ssl" and self.ssl is None:
            raise ConfigError(f"{key}student_init: 'ssl' needs the ssl stage (method.params.ssl is null)")
        if self.cluster_iterations < 1 or self.cluster_n_init < 1:
            raise ConfigError(f"{key}cluster_iterations / cluster_n_init: must be >= 1")

    def student_params(self) -> dict[str, Any]:
        """The :class:`SladeStudentParams` fields as plain data (``pseudo_labels`` / ``init_checkpoint`` unset)."""
        return {f.name: getattr(self, f.name) for f in fields(SladeStudentParams)}


#: Run-config keys that do not change a stage's result (left out of its hash, like a resume allows).
_NOT_HASHED = ("name", "out_dir", "train.device", "train.log_every", "data.num_workers", "eval.batch_size")
_INPUT = "<stage:{}>"


def _drop(raw: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for key in keys:
        node: Any = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _fill_inputs(raw: Any, ctx: StageContext) -> Any:
    """``raw`` with every ``"<stage:NAME>"`` string replaced by the path of stage NAME's output."""
    if isinstance(raw, dict):
        return {k: _fill_inputs(v, ctx) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_fill_inputs(v, ctx) for v in raw]
    if isinstance(raw, str) and raw.startswith("<stage:") and raw.endswith(">"):
        return str(ctx.input_path(raw[len("<stage:"):-1]))
    return raw


class SladeMethod(TrainingMethod):
    """``method: {name: slade}``: the SLADE pipeline, run by ``dmlgen train`` stage by stage (methods.md §7.1).

    Stages (each in ``<out_dir>/<stage>/``, skipped when up to date, resumed when interrupted):

    1. ``ssl`` (optional, train): :class:`SladeSSLMethod` on labeled ∪ unlabeled images.
    2. ``teacher`` (train): the configured loss on the labeled images (``method: standard``), its backbone
       initialised from ``ssl``.
    3. for r = 1..rounds: ``pseudo<r>`` (task): the teacher's (r = 1) or the previous student's embeddings of
       the unlabeled images, k-means into K pseudo labels, cached with that checkpoint's hash; their purity
       (NMI against the hidden labels, when the pool has them) is logged; ``student<r>`` (train):
       :class:`SladeStudentMethod` with those pseudo labels, initialised per ``student_init``.

    The pipeline's result is the last student's (``<out_dir>/best.ckpt``). Each stage's run config is this
    config with its own ``method`` (and epochs; the SSL stage also its loss, transforms and head).
    """

    name = "slade"
    custom_step = False
    pipeline = True

    def __init__(self, params: SladeParams) -> None:
        super().__init__(params)
        self.params: SladeParams = params

    def stages(self, cfg: Any) -> list[Stage]:
        """The stage list for the run config ``cfg`` (see the class docstring)."""
        p = self.params
        if cfg.regularizers:
            raise ConfigError("method slade: regularizers (MDR / LSD) are not combined with it; remove the "
                              "regularizers section")
        if cfg.data.unlabeled is None:
            raise ConfigError("method slade: needs unlabeled images; add a data.unlabeled section (docs/slade.md)")
        if not issubclass(LOSSES.get(cfg.loss.name, BaseMetricLoss), PAIR_LOSSES):
            raise ConfigError(f"method slade: loss {cfg.loss.name!r} cannot score the selected unlabeled pairs (it has "
                              "per-class parameters); use contrastive, multi_similarity, triplet_margin or ntxent")
        base = _drop(cfg.to_dict(), ("name", "out_dir"))
        base["method"] = {"name": "standard", "params": {}}
        train_epochs = int(base["train"]["epochs"])
        stages: list[Stage] = []
        if p.ssl is not None:
            ssl_raw = self._ssl_config(base)
            stages.append(Stage("ssl", "train", _drop(ssl_raw, _NOT_HASHED),
                                run_config=lambda ctx, raw=ssl_raw: self._ssl_run_config(ctx, raw),
                                description=f"self-supervised NT-Xent on labeled + unlabeled images, "
                                            f"{p.ssl.epochs} epoch(s)"))
        teacher = copy.deepcopy(base)
        teacher["train"]["epochs"] = p.teacher_epochs or train_epochs
        if p.ssl is not None:
            teacher["model"].update(weights=_INPUT.format("ssl"), imagenet=False)
        stages.append(self._train_stage("teacher", teacher, ("ssl",) if p.ssl is not None else (),
                                         "ranking loss on the labeled images"))
        source = "teacher"
        for r in range(1, p.rounds + 1):
            pseudo = f"pseudo{r}"
            pconfig = {"round": r, "source": source, "num_clusters": p.num_clusters, "backend": p.cluster_backend,
                       "iterations": p.cluster_iterations, "n_init": p.cluster_n_init,
                       "seed": int(base["train"]["seed"]) + r, "data": _drop(base["data"], ("num_workers",))}
            stages.append(Stage(pseudo, "task", pconfig, inputs=(source,),
                                run=lambda ctx, c=pconfig: self._pseudo_labels(ctx, c),
                                description=f"k-means pseudo labels (K={p.num_clusters}) from {source}'s embeddings"))
            student = copy.deepcopy(base)
            student["train"]["epochs"] = p.student_epochs or train_epochs
            params = p.student_params()
            params["pseudo_labels"] = _INPUT.format(pseudo)
            inputs: tuple[str, ...] = (pseudo,)
            if p.student_init == "teacher":
                params["init_checkpoint"] = _INPUT.format(source)
                inputs += (source,)
            else:
                student["model"].update(weights=_INPUT.format("ssl"), imagenet=False)
                inputs += ("ssl",)
            student["method"] = {"name": "slade_student", "params": params}
            name = f"student{r}"
            stages.append(self._train_stage(name, student, inputs, f"round {r}: labeled + confident unlabeled "
                                            f"pairs, initialised from {inputs[-1]}"))
            source = name
        return stages

    @staticmethod
    def _train_stage(name: str, raw: dict[str, Any], inputs: tuple[str, ...], description: str) -> Stage:
        return Stage(name, "train", _drop(raw, _NOT_HASHED), inputs=inputs,
                     run_config=lambda ctx: SladeMethod._checked(ctx, raw), description=description)

    def _ssl_config(self, base: dict[str, Any]) -> dict[str, Any]:
        """The SSL stage's run config (steps per epoch still ``None`` when they follow the pool size)."""
        ssl = self.params.ssl
        assert ssl is not None
        raw = copy.deepcopy(base)
        raw["method"] = {"name": "slade_ssl", "params": {"batch_size": ssl.batch_size,
                                                         "include_labeled": ssl.include_labeled}}
        raw["loss"] = {"name": "ntxent", "params": {"temperature": ssl.temperature}, "miner": None, "lr": None}
        raw["model"]["head_hidden"] = list(ssl.head_hidden)
        raw["train"]["epochs"] = ssl.epochs
        raw["train"]["max_steps_per_epoch"] = ssl.steps_per_epoch
        if ssl.lr is not None:
            raw["optimizer"]["lr"] = ssl.lr
        if ssl.train_transforms is not None:
            raw["data"]["train_transforms"] = dict(ssl.train_transforms)
        # slade_ssl ignores the class stream's labeled batch (no label enters this stage): the smallest batches
        # (2 classes x 2 images) keep loading it cheap, and their number bounds the steps of an epoch.
        raw["data"]["classes_per_batch"], raw["data"]["samples_per_class"] = 2, 2
        return raw

    def _ssl_run_config(self, ctx: StageContext, raw: dict[str, Any]) -> dict[str, Any]:
        ssl = self.params.ssl
        assert ssl is not None
        raw = self._checked(ctx, raw)
        if raw["train"]["max_steps_per_epoch"] is None:
            pool = len(ctx.splits.unlabeled) + (len(ctx.splits.train) if ssl.include_labeled else 0)
            raw["train"]["max_steps_per_epoch"] = max(pool // ssl.batch_size, 1)  # one pass over the pool
        return raw

    @staticmethod
    def _checked(ctx: StageContext, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` with its input paths, after the checks that need the data (before any training starts)."""
        SladeMethod.check_unlabeled(ctx)
        return _fill_inputs(raw, ctx)

    @staticmethod
    def check_unlabeled(ctx: StageContext) -> None:
        """Fail before a stage trains when the unlabeled set cannot give K clusters or a batch."""
        method = ctx.config.method.parsed_params()
        unlabeled = getattr(ctx.splits, "unlabeled", None)
        if unlabeled is None or len(unlabeled) == 0:
            raise DataError("method slade: the unlabeled set is empty; check data.unlabeled")
        n = len(unlabeled)
        if method.num_clusters > n:
            raise DataError(f"method.params.num_clusters: K={method.num_clusters} clusters of the {n} unlabeled "
                            f"images; need K <= {n} (lower num_clusters or add unlabeled images)")
        if method.batch_unlabeled > n:
            raise ConfigError(f"method.params.batch_unlabeled: {method.batch_unlabeled} > the {n} unlabeled images; "
                              "lower it")

    def _pseudo_labels(self, ctx: StageContext, c: dict[str, Any]) -> Path:
        """Task stage ``pseudo<r>``: embed the unlabeled images with the source model, k-means, save, report."""
        self.check_unlabeled(ctx)
        splits = ctx.splits
        plain = splits.unlabeled.with_transform(getattr(splits.test, "transform", None))  # no augmentation
        source_path = ctx.input_path(c["source"])
        model = ctx.load_model(source_path)
        emb, _ = ctx.embed(model, plain, desc=f"embedding unlabeled ({c['source']})")
        labels = cluster_unlabeled(emb, int(c["num_clusters"]), backend=c["backend"], seed=int(c["seed"]),
                                   n_iter=int(c["iterations"]), n_init=int(c["n_init"]))
        sizes = torch.bincount(labels, minlength=int(c["num_clusters"]))
        hidden = splits.unlabeled.hidden_labels
        meta: dict[str, Any] = {
            "round": c["round"], "source": c["source"], "source_sha256": ctx.input_sha256(c["source"]),
            "num_clusters": int(c["num_clusters"]), "backend": resolve_backend(c["backend"]),
            "unlabeled_images": len(labels), "empty_clusters": int((sizes == 0).sum()),
            "smallest": int(sizes[sizes > 0].min()), "largest": int(sizes.max()),
            # Purity against labels training never saw (Omniglot alphabets / classes moved to the pool).
            "nmi": None if hidden is None else float(normalized_mutual_info_score(hidden, labels.numpy())),
            "hidden_classes": None if hidden is None else int(len(np.unique(hidden))),
        }
        ctx.log("pseudo_labels", **meta)
        (ctx.folder / "pseudo_labels.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return ctx.save(pseudo_label_record(labels, meta), "pseudo_labels.pt")


__all__ = [
    "PAIR_LOSSES",
    "FeatureBasis",
    "SladeMethod",
    "SladeParams",
    "SladeSSLMethod",
    "SladeSSLParams",
    "SladeSSLStageParams",
    "SladeStudentMethod",
    "SladeStudentParams",
    "cluster_unlabeled",
    "ema_value",
    "labels_digest",
    "load_model_weights",
    "load_pseudo_labels",
    "pseudo_label_record",
    "save_pseudo_labels",
    "select_confident_pairs",
    "symmetric_pairs",
    "upper_pairs",
]
