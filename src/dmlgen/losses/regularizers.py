"""Regularizers that plug into any metric loss: MDR (Kim & Park 2021) and LSD (Zeng et al. 2022).

A regularizer is a module ``reg(embeddings (N, D), labels (N,), teacher_embeddings=None) -> ()`` whose
value the training loop adds as ``weight_at(epoch, num_epochs) * value + reg.penalty()``. The weight
schedule belongs to the regularizer (LSD's weight grows with the epoch; MDR's is constant), so the loop
stays generic. ``needs_teacher`` tells the loop to run the previous epoch's model on the same batch and
pass its embeddings (LSD); while the weight is 0 the loop skips both the teacher and the regularizer.

The functional cores (:func:`mdr_loss`, :func:`lsd_loss`) are plain functions of tensors; the modules hold
the learnable levels, the running statistics and the hyper-parameters (methods.md §3 and §4).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from dmlgen.errors import ConfigError

from ._checks import build_named, check_bool, check_number
from .batch import full_precision
from .distances import clamped_distance, distance_values, shared_distance_matrix

#: Floor of the running standard deviation of distances (methods.md §3.1, step 3).
MDR_SIGMA_FLOOR = 1e-6


def _at_least_fp32(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (methods.md §1.2.2); fp32 and fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class Regularizer(nn.Module):
    """Base class: ``forward(embeddings, labels, teacher_embeddings=None) -> ()`` (unweighted).

    Args:
        weight: the regularizer's weight (λ for MDR, α for LSD).
    """

    needs_teacher: bool = False

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = check_number(type(self).__name__, "weight", weight)
        if self.weight < 0:
            raise ConfigError(f"{type(self).__name__}: weight must be >= 0, got {weight!r}")

    def weight_at(self, epoch: int, num_epochs: int) -> float:
        """The weight of the value at 0-based ``epoch`` of ``num_epochs``; 0 means "skip this epoch"."""
        del epoch, num_epochs
        return self.weight

    def penalty(self) -> Tensor | None:
        """A term on the regularizer's own parameters (added unweighted), or None."""
        return None


# ----------------------------------------------------------------------------------------------------- MDR
def mdr_loss(distances: Tensor, mean: Tensor, std: Tensor, levels: Tensor) -> Tensor:
    """Multi-level distance regularization (methods.md §3.1, steps 4–6).

    Args:
        distances: (N, N) symmetric pairwise distances; only the off-diagonal entries are used.
        mean, std: 0-dim running statistics of the distances (no gradient flows into them).
        levels: (K,) levels in units of ``std``.

    Returns:
        0-dim mean over ordered pairs of ``min_k |(d_ij - mean) / std - levels_k|``.
    """
    # A symmetric matrix has the same mean over its N(N-1)/2 upper-triangle entries as over its N(N-1)
    # ordered pairs; reading half of them halves the gather and the scatter of the backward pass, which
    # dominate this loss after the distance matrix (benchmarks/regularizer_speed.py).
    n = distances.shape[0]
    rows, cols = torch.triu_indices(n, n, offset=1, device=distances.device)
    z = (distances[rows, cols] - mean) / std.clamp_min(MDR_SIGMA_FLOOR)
    return (z.unsqueeze(1) - levels.unsqueeze(0)).abs().amin(dim=1).mean()


def _level_sum_coefficients(order: list[int]) -> list[list[float]]:
    """``A (K, K)`` with ``A @ (Σ sign, Σ sign side_0, ..., Σ sign side_K-2)`` = the per-level sums of sign, in
    the levels' own order; ``order[r]`` is the level of rank ``r`` (ascending)."""
    k = len(order)

    def at_least(rank: int) -> list[float]:  # coefficients of the Σ sign over the pairs of rank >= `rank`
        row = [0.0] * k
        if rank == 0:
            row[0] = 1.0
        elif rank < k:  # [nearest >= rank] = (1 + side_rank-1) / 2
            row[0] += 0.5
            row[rank] += 0.5
        return row

    rows: list[list[float]] = [[] for _ in range(k)]
    for rank, level in enumerate(order):
        rows[level] = [a - b for a, b in zip(at_least(rank), at_least(rank + 1))]
    return rows


def _mdr_signs(dist: Tensor, levels: Tensor, mean: Tensor, std: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, float]:
    """The value of :func:`mdr_loss` on ``dist (N, N)`` (read only) and what its gradient needs.

    Returns ``(value, sign, level_sums, σ)``: ``sign (N, N)`` of ``r_ij = z_ij - s_k*`` (``k*`` the nearest
    level), 0 on the diagonal; ``level_sums (K,)`` the sums of ``sign`` over the pairs nearest to each level.
    Then with ``P = N(N-1)`` ordered pairs, ``dL/dd_ij = sign_ij / (σ P)`` and ``dL/ds_k = -level_sums_k / P``.
    """
    n, k = dist.shape[0], levels.shape[0]
    # The K + 2 scalars as Python numbers, in one transfer: the scalar arithmetic below as 0-dim tensor ops
    # cost about as much as the (N, N) passes (benchmarks/regularizer_speed.py).
    mu, std_value, *level_values = torch.cat([mean.view(1), std.view(1), levels.detach()]).tolist()
    sigma = max(std_value, MDR_SIGMA_FLOOR)
    order = sorted(range(k), key=level_values.__getitem__)
    # Work in distance units: level s_k sits at t_k = mean + σ s_k, so z = (d - mean) / σ is never formed.
    # With the levels sorted, the nearest target is t_0 + Σ_k h_k (1 + sign(d - m_k)) over the midpoints
    # m_k and half-steps h_k: sign passes instead of index tensors and gathers.
    targets = [mu + sigma * level_values[i] for i in order]
    midpoints = [(a + b) / 2 for a, b in zip(targets, targets[1:])]
    half_steps = [(b - a) / 2 for a, b in zip(targets, targets[1:])]
    residual = torch.sub(dist, targets[0] + sum(half_steps))  # σ (z - s_nearest), once the sides are in
    sides = []  # sign(d - m_k), (N, N) each
    for midpoint, half_step in zip(midpoints, half_steps):
        side = torch.sub(dist, midpoint).sign_()
        residual.sub_(side, alpha=half_step)
        sides.append(side.view(-1))
    sign = residual.sign().fill_diagonal_(0.0)  # the N self-pairs are not pairs
    flat = sign.view(-1)
    value = torch.dot(flat, residual.view(-1)).mul_(1.0 / (sigma * n * (n - 1)))  # mean |residual| / σ
    # Σ sign over the pairs nearest to each level: [nearest >= k] sums minus [nearest >= k+1] sums.
    sums = torch.stack([flat.sum()] + [torch.dot(flat, side) for side in sides])
    coefficients = torch.tensor(_level_sum_coefficients(order), dtype=sums.dtype, device=sums.device)
    return value, sign, (coefficients @ sums).to(levels.dtype), sigma


class _MDRFromDistances(torch.autograd.Function):
    """:func:`mdr_loss` of a differentiable distance matrix ``(N, N)`` with the closed-form gradient
    ``sign / (σ P)`` (:func:`_mdr_signs`): one pass, and the distance matrix's own backward (shared with
    the other consumers of the same matrix) turns it into the embeddings' gradient."""

    @staticmethod
    def forward(ctx: Any, dist: Tensor, levels: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        value, sign, level_sums, sigma = _mdr_signs(dist, levels, mean, std)
        ctx.save_for_backward(sign, level_sums)
        ctx.sigma = sigma
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        sign, level_sums = ctx.saved_tensors
        n = sign.shape[0]
        per_pair = 1.0 / (n * (n - 1))
        grad_dist = sign * (grad * (per_pair / ctx.sigma)) if ctx.needs_input_grad[0] else None
        grad_levels = level_sums * (grad * -per_pair) if ctx.needs_input_grad[1] else None
        return grad_dist, grad_levels, None, None


class _MDRFromEmbeddings(torch.autograd.Function):
    """:func:`mdr_loss` of the embeddings' distance matrix, with the gradient in closed form.

    With :func:`_mdr_signs`' ``dL/dd_ij = sign_ij / (σ P)``, through ``d_ij = |x_i - x_j|`` (a symmetric
    matrix) ``dL/dx = 2 (x W.sum(1) - W x) / (σ P)`` with ``W = sign / d`` where the distance clamp is
    inactive: one product and a few passes, cheaper than a distance matrix's generic backward when nothing
    else in the step needs it. Autograd through the gather, the level broadcast and the ``amin`` costs more
    than the distance matrix itself (benchmarks/regularizer_speed.py).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, levels: Tensor, dist: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        value, sign, level_sums, sigma = _mdr_signs(dist, levels, mean, std)
        # sign / d where the clamp passes the gradient, else 0. The diagonal's sign is 0 already and its d of 0
        # becomes 1 (dist is this call's scratch copy: the caller is done with it). A pair at the clamp's value
        # (a duplicate) is rare: one min pass finds whether any is there, and only then sign(d - floor), 1 above
        # the clamp and 0 at it, masks them (three passes; a boolean mask took 3x as long).
        floor = clamped_distance(dist.dtype)
        dist.fill_diagonal_(1.0)
        if float(dist.amin()) <= floor:
            sign.mul_(torch.sub(dist, floor).sign_())
        weights = sign.div_(dist)
        ctx.save_for_backward(x, weights, level_sums)
        ctx.sigma = sigma
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        x, weights, level_sums = ctx.saved_tensors
        n = weights.shape[0]
        per_pair = 1.0 / (n * (n - 1))
        grad_x = grad_levels = None
        if ctx.needs_input_grad[1]:
            grad_levels = level_sums * (grad * -per_pair)
        if ctx.needs_input_grad[0]:
            # 2 grad / (σ P) (x W.sum(1) - W x), in the product's buffer (no second (N, D) buffer).
            grad_x = (weights @ x).addcmul_(x, weights.sum(dim=1, keepdim=True), value=-1.0)
            grad_x.mul_(grad * (-2.0 * per_pair / ctx.sigma))
        return grad_x, grad_levels, None, None, None


class MDRRegularizer(Regularizer):
    """Multi-level Distance Regularization: pull every pairwise distance to the nearest learnable level.

    Args:
        weight: λ (methods.md §3.3: 0.6 CUB, 0.2 Cars196, 0.1 SOP and In-Shop).
        levels: initial levels in σ-units (default (-3, 0, 3)); learnable.
        momentum: of the running mean/std of distances (0.9: new = 0.9 old + 0.1 batch).
        level_penalty: ν of the penalty ν Σ s_k² on the levels (0.01).
        stats_include_diagonal: the official statistics include the N zero self-distances (True, the
            default, as the published λ and levels were tuned with it); False uses the N(N-1) pairs only,
            which gives a smaller σ and so larger normalised distances (methods.md §3.1).

    Buffers ``running_mean``, ``running_std`` and ``initialized`` are updated in training mode only, the
    first update copies the batch statistics, and all three are saved in ``state_dict``.
    """

    def __init__(
        self,
        weight: float = 0.1,
        levels: tuple[float, ...] | list[float] = (-3.0, 0.0, 3.0),
        momentum: float = 0.9,
        level_penalty: float = 0.01,
        stats_include_diagonal: bool = True,
    ) -> None:
        super().__init__(weight)
        owner = type(self).__name__
        if isinstance(levels, (str, bytes)) or not isinstance(levels, (list, tuple)) or not levels:
            raise ConfigError(f"{owner}: levels must be a non-empty list of numbers, got {levels!r}")
        values = [check_number(owner, "levels", v) for v in levels]
        self.momentum = check_number(owner, "momentum", momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{owner}: momentum must be in [0, 1), got {momentum!r}")
        self.level_penalty = check_number(owner, "level_penalty", level_penalty)
        if self.level_penalty < 0:
            raise ConfigError(f"{owner}: level_penalty must be >= 0, got {level_penalty!r}")
        self.stats_include_diagonal = check_bool(owner, "stats_include_diagonal", stats_include_diagonal)
        self.levels = nn.Parameter(torch.tensor(values, dtype=torch.float32))
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("running_std", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def batch_statistics(self, distances: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and unbiased std of the (N, N) ``distances``: all N² entries, or the N(N-1) pairs."""
        if self.stats_include_diagonal:
            values = distances.detach().flatten()
        else:
            n = distances.shape[0]
            values = distances.detach()[~torch.eye(n, dtype=torch.bool, device=distances.device)]
        mean = values.mean()
        # Two-pass on the centred values (torch.std took 3x and torch.std_mean 4x as long: torch 2.14, CPU).
        centred = values - mean
        return mean, (torch.dot(centred, centred) / max(values.numel() - 1, 1)).sqrt()

    @torch.no_grad()
    def _update_statistics(self, distances: Tensor) -> None:
        batch_mean, batch_std = self.batch_statistics(distances)
        if not bool(self.initialized):
            self.running_mean.copy_(batch_mean)
            self.running_std.copy_(batch_std)
            self.initialized.fill_(True)
        else:
            # momentum * old + (1 - momentum) * new, one op each
            self.running_mean.lerp_(batch_mean.to(self.running_mean.dtype), 1 - self.momentum)
            self.running_std.lerp_(batch_std.to(self.running_std.dtype), 1 - self.momentum)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None,
                teacher_embeddings: Tensor | None = None) -> Tensor:
        """``embeddings (N, D)`` -> 0-dim L_MDR (labels are not used: MDR is label-free)."""
        del labels, teacher_embeddings
        if embeddings.ndim != 2:
            raise ConfigError(f"MDRRegularizer: embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
        if embeddings.shape[0] < 2:  # no pair: an empty loss that keeps the graph (methods.md §1.2.4)
            return embeddings.sum() * 0.0
        with full_precision(embeddings.device):
            x = _at_least_fp32(embeddings)
            # The step's distance matrix of this batch when another consumer built one (the head's
            # mean-distance scaling, a loss on the full matrix): its backward product then serves both.
            shared = shared_distance_matrix(x)
            distances = distance_values(x.detach()) if shared is None else shared.detach()
            if self.training:
                self._update_statistics(distances)
            if self.training or bool(self.initialized):  # training has just initialised them
                mean, std = self.running_mean, self.running_std
            else:  # evaluated before any training step: this batch's statistics, not stored
                mean, std = self.batch_statistics(distances)
            # The values of mdr_loss(euclidean_distance_matrix(x), ...), with a cheaper backward.
            levels, mean, std = self.levels.to(x.dtype), mean.to(x.dtype), std.to(x.dtype)
            if shared is not None:
                return _MDRFromDistances.apply(shared, levels, mean, std)
            return _MDRFromEmbeddings.apply(x, levels, distances, mean, std)

    def penalty(self) -> Tensor | None:
        if self.level_penalty == 0:
            return None
        return self.level_penalty * self.levels.pow(2).sum()

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, momentum={self.momentum}, level_penalty={self.level_penalty}, "
                f"stats_include_diagonal={self.stats_include_diagonal}")


# ----------------------------------------------------------------------------------------------------- LSD
def lsd_loss(
    student: Tensor, teacher: Tensor, tau: float, *, include_self: bool = True,
    neg_scale: float = 1.0, labels: Tensor | None = None,
) -> Tensor:
    """Listwise self-distillation, KL(teacher ‖ student) of row-wise softmax over similarities (§4.1).

    Args:
        student: (N, D) L2-normalised student embeddings (gradients flow).
        teacher: (N, D) L2-normalised teacher embeddings of the same batch (detached here).
        tau: softmax temperature.
        include_self: each anchor's list holds itself too (the official setting); False masks it.
        neg_scale: multiplies the similarities of pairs with different labels (needs ``labels``);
            1 is the canonical loss.
        labels: (N,) class ids, only for ``neg_scale != 1``.

    Returns:
        0-dim ``(1/N) Σ_i Σ_j pT_ij (log pT_ij - log pS_ij)``.
    """
    s = student @ student.T
    t = (teacher @ teacher.T).detach()
    if neg_scale != 1.0:
        if labels is None:
            raise ConfigError("lsd: neg_scale != 1 needs the batch labels")
        neg = labels.unsqueeze(0) != labels.unsqueeze(1)
        s = torch.where(neg, s * neg_scale, s)
        t = torch.where(neg, t * neg_scale, t)
    s, t = s / tau, t / tau
    if not include_self:
        eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        s = s.masked_fill(eye, float("-inf"))
        t = t.masked_fill(eye, float("-inf"))
    log_p_s = F.log_softmax(s, dim=1)
    p_t = F.softmax(t, dim=1)
    if not include_self:
        # kl_div would evaluate 0 * (-inf) on the masked diagonal; those entries contribute exactly 0.
        log_p_s = log_p_s.masked_fill(eye, 0.0)
    return F.kl_div(log_p_s, p_t, reduction="batchmean")


class ListwiseSelfDistillation(Regularizer):
    """Listwise Self-Distillation: distil the previous epoch's similarity lists into the current model.

    Args:
        weight: α (200 in the official code, 50 in its README example; methods.md §4.3).
        tau: softmax temperature τ (1.0).
        include_self: keep each anchor in its own list (official: True).
        neg_scale: optional scaling of negative similarities before the softmax (1.0 = canonical).
        normalize: L2-normalise student and teacher embeddings first, so both share one scale (an
            un-normalised embedding makes the softmax arbitrarily sharp; methods.md §4.4).

    The weight at 0-based epoch e of E is ``(e / E) * α * τ²``: zero for the whole first epoch (the loop
    then runs no teacher), constant within an epoch.
    """

    needs_teacher = True

    def __init__(self, weight: float = 50.0, tau: float = 1.0, include_self: bool = True,
                 neg_scale: float = 1.0, normalize: bool = True) -> None:
        super().__init__(weight)
        owner = type(self).__name__
        self.tau = check_number(owner, "tau", tau, positive=True)
        self.include_self = check_bool(owner, "include_self", include_self)
        self.neg_scale = check_number(owner, "neg_scale", neg_scale, positive=True)
        self.normalize = check_bool(owner, "normalize", normalize)

    def weight_at(self, epoch: int, num_epochs: int) -> float:
        if num_epochs < 1:
            raise ConfigError(f"ListwiseSelfDistillation: num_epochs must be >= 1, got {num_epochs}")
        return (epoch / num_epochs) * self.weight * self.tau**2

    def forward(self, embeddings: Tensor, labels: Tensor | None = None,
                teacher_embeddings: Tensor | None = None) -> Tensor:
        """``embeddings (N, D)`` (student) and ``teacher_embeddings (N, D)`` -> 0-dim L_LSD."""
        if teacher_embeddings is None:
            raise ConfigError("ListwiseSelfDistillation needs the teacher's embeddings of the same batch")
        if teacher_embeddings.shape != embeddings.shape:
            raise ConfigError(
                f"ListwiseSelfDistillation: teacher embeddings {tuple(teacher_embeddings.shape)} do not match "
                f"the student's {tuple(embeddings.shape)}"
            )
        n = embeddings.shape[0]
        if n < 2 and not self.include_self or n < 1:
            return embeddings.sum() * 0.0
        with full_precision(embeddings.device):
            student = _at_least_fp32(embeddings)
            teacher = _at_least_fp32(teacher_embeddings.detach())
            if self.normalize:
                student = F.normalize(student, dim=1, eps=1e-12)
                teacher = F.normalize(teacher, dim=1, eps=1e-12)
            return lsd_loss(student, teacher, self.tau, include_self=self.include_self,
                            neg_scale=self.neg_scale, labels=labels)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, tau={self.tau}, include_self={self.include_self}, "
                f"neg_scale={self.neg_scale}, normalize={self.normalize}")


REGULARIZERS: dict[str, type[Regularizer]] = {
    "mdr": MDRRegularizer,
    "lsd": ListwiseSelfDistillation,
}


def build_regularizer(name: str, **params: Any) -> Regularizer:
    """The regularizer registered as ``name`` (``"mdr"``, ``"lsd"``) built with ``params``."""
    return build_named("regularizer", REGULARIZERS, name, params)


__all__ = [
    "REGULARIZERS",
    "ListwiseSelfDistillation",
    "MDRRegularizer",
    "Regularizer",
    "build_regularizer",
    "lsd_loss",
    "mdr_loss",
]
