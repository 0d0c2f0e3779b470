"""Distances and similarities used by losses and miners (pytorch-metric-learning's composition).

A distance maps query embeddings ``(N, D)`` and reference embeddings ``(M, D)`` to a matrix ``(N, M)``.
``is_inverted`` says whether larger values mean *closer* (similarities) or *farther* (distances); losses
and miners never test the class, they go through :meth:`BaseDistance.margin` and
:meth:`BaseDistance.smallest_dist`, so a new distance works with every loss.

Numerical convention (methods.md §1.2.1) for the Euclidean case:
``d_ij = sqrt(max(|f_i|^2 + |f_j|^2 - 2 f_i.f_j, 1e-12))`` with the diagonal of a self-comparison set to
exactly 0; the clamp gives duplicates a zero gradient instead of NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import build_from_spec, check_bool, check_number

#: Lower clamp of the squared Euclidean distance (methods.md §1.2.1).
SQ_DIST_EPS = 1e-12


class _StepShare:
    """What one :func:`shared_gram_matrices` block shares: Gram matrices (values), differentiable distance
    matrices and the scaled-batch relations that derive both."""

    def __init__(self) -> None:
        self.grams: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        # id(x) -> (x, x's version, its distance matrix, the matrix's version when stored)
        self.distances: dict[int, tuple[Tensor, int, Tensor, int]] = {}
        # id(scaled) -> (scaled, scaled's version, source, factor): scaled = source * factor
        self.scaled: dict[int, tuple[Tensor, int, Tensor, Tensor]] = {}


_SHARED: ContextVar[_StepShare | None] = ContextVar("dmlgen_step_share", default=None)


@contextmanager
def shared_gram_matrices() -> Iterator[None]:
    """Within the block, a batch is multiplied by itself once, and a differentiable distance matrix of it
    is computed once for whoever asks for it after the first.

    A training step's miner, loss, regularizers and the head's mean-distance scaling each compare the same
    batch with itself; in MDR's recipe that is three ``(N, D) x (D, N)`` products of one batch in the forward
    pass and two in the backward (the scaling's and MDR's), a large share of the loss step
    (benchmarks/regularizer_speed.py). Inside the block :func:`gram_matrix` computes each product once, and
    :func:`shared_distance_matrix` hands out the graph node of an earlier :func:`euclidean_distance_matrix`,
    so autograd sums the consumers' gradients there and runs one backward product. The trainer opens one
    block per step; everything is dropped when it closes. Outside a block nothing is kept.
    """
    token = _SHARED.set(_StepShare())
    try:
        yield
    finally:
        _SHARED.reset(token)


def _gram_key(x: Tensor) -> tuple[Any, ...]:
    # The entry keeps its tensor alive, so the address cannot be reused by another tensor inside the block;
    # the version counter changes on every in-place write, and the autocast state sets the product's dtype.
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version,
            torch.is_autocast_enabled(x.device.type))


def gram_matrix(x: Tensor) -> Tensor:
    """``x @ x.T`` ``(N, N)`` of ``x (N, D)``, without a graph; inside :func:`shared_gram_matrices` computed
    once per tensor (the same storage, shape, strides, dtype and in-place version). Do not modify the result.
    """
    x = x.detach()
    share = _SHARED.get()
    if share is None:
        return x @ x.transpose(0, 1)
    key = _gram_key(x)
    entry = share.grams.get(key)
    if entry is None:
        entry = share.grams[key] = (x, x @ x.transpose(0, 1))
    return entry[1]


def share_scaled_batch(scaled: Tensor, source: Tensor, factor: Tensor) -> None:
    """Inside :func:`shared_gram_matrices`: ``scaled`` is ``source * factor`` (``factor`` a positive 0-dim
    tensor, differentiable or not). Its Gram matrix is then ``factor² gram_matrix(source)``, one pass instead
    of a product, and its distance matrix ``factor`` times the source's (:func:`shared_distance_matrix`), with
    the gradient through both. Outside a block: nothing."""
    share = _SHARED.get()
    if share is None:
        return
    detached = scaled.detach()
    share.grams[_gram_key(detached)] = (detached, gram_matrix(source).mul(factor.detach().square()))
    share.scaled[id(scaled)] = (scaled, scaled._version, source, factor)


def _record_distances(x: Tensor, dist: Tensor) -> None:
    share = _SHARED.get()
    if share is not None and dist.requires_grad:
        share.distances[id(x)] = (x, x._version, dist, dist._version)


def shared_distance_matrix(x: Tensor) -> Tensor | None:
    """Inside :func:`shared_gram_matrices`: the differentiable ``euclidean_distance_matrix(x)`` ``(N, N)``
    that this step has already built for this very tensor (its graph node, so gradients from every consumer
    meet in one backward product), or one derived from a :func:`share_scaled_batch` relation; ``None`` when
    there is none (then build your own). Only matrices with a graph are shared; do not modify the result.
    """
    share = _SHARED.get()
    if share is None:
        return None
    entry = share.distances.get(id(x))
    if entry is not None:
        tensor, version, dist, dist_version = entry
        # The same tensor, not written in place since (neither it nor, by a consumer, its matrix).
        if tensor is x and x._version == version and dist._version == dist_version:
            return dist
        return None
    relation = share.scaled.get(id(x))
    if relation is None:
        return None
    scaled, version, source, factor = relation
    if scaled is not x or x._version != version:
        return None
    source_dist = shared_distance_matrix(source)
    if source_dist is None or source_dist.dtype != x.dtype:
        return None
    dist = source_dist * factor
    _record_distances(x, dist)
    return dist


def _squared_distances(query: Tensor, ref: Tensor | None, normalize: bool) -> Tensor:
    """``|q|^2 + |r|^2 - 2 q.r`` ``(N, M)`` before the clamp, in a fresh buffer."""
    if ref is None:
        prod = gram_matrix(query)
        # The squared norms from the product's own diagonal: a duplicate pair then cancels to exactly 0 (a
        # separate reduction leaves ~1e-3 of rounding noise at fp32 norms of 10, a spurious distance).
        q2 = prod.diagonal().unsqueeze(1)  # (N, 1)
        if normalize:
            inv_norm = q2.sqrt().clamp_min(1e-12).reciprocal()
            prod = prod * (inv_norm * inv_norm.view(1, -1))  # cosines: a new buffer, the shared one stays
            q2 = q2 * inv_norm * inv_norm
        return (q2 + q2.view(1, -1)).sub_(prod, alpha=2.0)
    if normalize:
        query, ref = F.normalize(query, dim=1), F.normalize(ref, dim=1)
    q2 = (query * query).sum(dim=1, keepdim=True)  # (N, 1)
    r2 = (ref * ref).sum(dim=1).unsqueeze(0)  # (1, M)
    return (q2 + r2).sub_((query @ ref.transpose(0, 1)).mul_(2.0))  # two (N, M) buffers


def _clamped_root(sq: Tensor, same: bool) -> Tensor:
    dist = sq.clamp_min_(SQ_DIST_EPS).sqrt_()
    return dist.fill_diagonal_(0.0) if same else dist


def distance_values(query: Tensor, ref: Tensor | None = None, *, normalize: bool = False) -> Tensor:
    """The values of :func:`euclidean_distance_matrix` ``(N, M)`` without a graph (miners, statistics).

    ``normalize``: of the rows divided by ``max(|row|, 1e-12)`` (``F.normalize``'s values); a self-comparison
    then rescales the raw rows' shared :func:`gram_matrix` instead of multiplying the normalised rows.
    """
    return _clamped_root(_squared_distances(query, ref, normalize), ref is None)


def distances_and_active(query: Tensor, ref: Tensor | None = None, *, normalize: bool = False
                         ) -> tuple[Tensor, Tensor]:
    """:func:`distance_values` and the boolean ``(N, M)`` mask of the entries whose gradient passes the clamp,
    for closed-form backward passes built on them."""
    sq = _squared_distances(query, ref, normalize)
    active = sq >= SQ_DIST_EPS  # where clamp_min passes the gradient
    if ref is None:
        active.fill_diagonal_(False)
    return _clamped_root(sq, ref is None), active


@functools.cache
def clamped_distance(dtype: torch.dtype) -> float:
    """The value a clamped entry (a duplicate pair) takes in a ``dtype`` distance matrix: ``sqrt(1e-12)``
    rounded as that dtype rounds it; every entry whose gradient passes the clamp is at least this."""
    return float(torch.tensor(SQ_DIST_EPS, dtype=dtype).sqrt())


class _EuclideanDistanceMatrix(torch.autograd.Function):
    """The matrix of :func:`euclidean_distance_matrix` with a closed-form backward.

    With ``W = grad / d`` where the clamp is inactive (0 on clamped entries and on a self-comparison's
    diagonal): ``dq = q * W.sum(1) - W @ r`` and ``dr = r * W.sum(0) - W.T @ q``; for ``ref=None`` the two
    add up to one product ``(W + W.T) @ q``. Autograd through the expression takes an extra matrix product
    and a dozen ``(N, M)`` passes, which dominate a pair loss's cost.
    """

    @staticmethod
    def forward(ctx: Any, query: Tensor, ref: Tensor | None) -> Tensor:
        dist, active = distances_and_active(query, ref)
        ctx.save_for_backward(query, ref, dist, active)
        return dist

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        query, ref, dist, active = ctx.saved_tensors
        weights = torch.where(active, grad / dist, torch.zeros_like(grad))
        if ref is None:  # the diagonal is inactive, so its weight is already 0
            weights = weights + weights.transpose(0, 1)
            return query * weights.sum(dim=1, keepdim=True) - weights @ query, None
        grad_q = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_q = query * weights.sum(dim=1, keepdim=True) - weights @ ref
        if ctx.needs_input_grad[1]:
            grad_r = ref * weights.sum(dim=0).unsqueeze(1) - weights.transpose(0, 1) @ query
        return grad_q, grad_r


def euclidean_distance_matrix(query: Tensor, ref: Tensor | None = None) -> Tensor:
    """Non-squared Euclidean distances ``(N, M)`` between rows of ``query (N, D)`` and ``ref (M, D)``.

    ``sqrt(max(|q|^2 + |r|^2 - 2 q.r, 1e-12))``; ``ref=None`` compares ``query`` with itself and sets the
    diagonal to exactly 0. Entries at the clamp (duplicates) and the diagonal get a zero gradient. Inside
    :func:`shared_gram_matrices` a self-comparison with a graph is recorded for :func:`shared_distance_matrix`.
    """
    dist = _EuclideanDistanceMatrix.apply(query, ref)
    if ref is None:
        _record_distances(query, dist)
    return dist


def euclidean_distance_rows(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise non-squared Euclidean distance ``(T,)`` between ``x (T, D)`` and ``y (T, D)``."""
    diff = x - y
    return (diff * diff).sum(dim=1).clamp_min(SQ_DIST_EPS).sqrt()


class _L2Normalize(torch.autograd.Function):
    """``F.normalize(x, dim=1)`` with a one-pass backward ``(g - y (g . y)) / |x|`` (three passes over the
    ``(N, D)`` gradient instead of autograd's six: normalising is a large share of a loss's cost)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, eps: float) -> Tensor:
        norm = torch.linalg.vector_norm(x, 2, dim=1, keepdim=True).clamp_min(eps)
        y = x / norm
        ctx.save_for_backward(y, norm)
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        y, norm = ctx.saved_tensors
        dot = (grad * y).sum(dim=1, keepdim=True)
        # A row whose norm was clamped at eps was divided by a constant: no projection term.
        dot = dot.masked_fill(norm <= ctx.eps, 0.0)
        return (grad - y * dot) / norm, None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows of ``x (N, D)`` divided by ``max(|x_i|, eps)``: the values of ``F.normalize(x, dim=1)``."""
    return _L2Normalize.apply(x, eps)


class BaseDistance(torch.nn.Module):
    """A pairwise distance or similarity; subclasses implement :meth:`compute_mat` and :meth:`compute_rows`.

    Args:
        normalize_embeddings: L_p-normalise every row before comparing (PML's default: True).
        p: order of the norm used for normalisation (and of the distance, for :class:`LpDistance`).
        power: the matrix is raised to this power after it is computed.
    """

    #: True when larger values mean closer (a similarity).
    is_inverted: bool = False

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1) -> None:
        super().__init__()
        owner = type(self).__name__
        self.normalize_embeddings = check_bool(owner, "normalize_embeddings", normalize_embeddings)
        self.p = check_number(owner, "p", p, positive=True)
        self.power = check_number(owner, "power", power, positive=True)

    def forward(self, query: Tensor, ref: Tensor | None = None) -> Tensor:
        """Matrix ``(N, M)`` between ``query (N, D)`` and ``ref (M, D)``; ``ref=None`` means ``query`` itself."""
        q = self.maybe_normalize(query)
        r = None if ref is None else self.maybe_normalize(ref)
        mat = self.compute_mat(q, r)
        return mat if self.power == 1 else mat.pow(self.power)

    def pairwise(self, x: Tensor, y: Tensor) -> Tensor:
        """Row-wise values ``(T,)`` between ``x (T, D)`` and ``y (T, D)``, consistent with :meth:`forward`."""
        vals = self.compute_rows(self.maybe_normalize(x), self.maybe_normalize(y))
        return vals if self.power == 1 else vals.pow(self.power)

    def compute_mat(self, query: Tensor, ref: Tensor | None) -> Tensor:
        raise NotImplementedError

    def compute_rows(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def maybe_normalize(self, x: Tensor) -> Tensor:
        if not self.normalize_embeddings:
            return x
        return l2_normalize(x) if self.p == 2 else F.normalize(x, p=self.p, dim=1)

    def margin(self, x: Tensor | float, y: Tensor | float) -> Tensor:
        """How much farther ``x`` is than ``y``: ``x - y`` for distances, ``y - x`` for similarities."""
        return y - x if self.is_inverted else x - y  # type: ignore[return-value]

    def smallest_dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Element-wise the closer of ``x`` and ``y``."""
        return torch.maximum(x, y) if self.is_inverted else torch.minimum(x, y)

    def extra_repr(self) -> str:
        return f"normalize_embeddings={self.normalize_embeddings}, p={self.p:g}, power={self.power:g}"


class LpDistance(BaseDistance):
    """L_p distance (default: Euclidean between L2-normalised rows, non-squared). Smaller is closer."""

    is_inverted = False

    def compute_mat(self, query: Tensor, ref: Tensor | None) -> Tensor:
        if self.p == 2:
            return euclidean_distance_matrix(query, ref)
        mat = torch.cdist(query, query if ref is None else ref, p=self.p)
        if ref is None:
            eye = torch.eye(mat.shape[0], dtype=torch.bool, device=mat.device)
            mat = mat.masked_fill(eye, 0.0)
        return mat

    def compute_rows(self, x: Tensor, y: Tensor) -> Tensor:
        if self.p == 2:
            return euclidean_distance_rows(x, y)
        return torch.linalg.vector_norm(x - y, ord=self.p, dim=1)


class DotProductSimilarity(BaseDistance):
    """Inner product (of L2-normalised rows unless ``normalize_embeddings=False``). Larger is closer."""

    is_inverted = True

    def __init__(self, normalize_embeddings: bool = True, power: float = 1) -> None:
        super().__init__(normalize_embeddings=normalize_embeddings, p=2, power=power)

    def compute_mat(self, query: Tensor, ref: Tensor | None) -> Tensor:
        return query @ (query if ref is None else ref).transpose(0, 1)

    def compute_rows(self, x: Tensor, y: Tensor) -> Tensor:
        return (x * y).sum(dim=1)


class CosineSimilarity(DotProductSimilarity):
    """Cosine similarity: inner product of L2-normalised rows. Larger is closer."""

    def __init__(self, power: float = 1) -> None:
        super().__init__(normalize_embeddings=True, power=power)


DISTANCES: dict[str, type[BaseDistance]] = {
    "lp": LpDistance,
    "cosine": CosineSimilarity,
    "dot_product": DotProductSimilarity,
}

DistanceSpec = BaseDistance | str | Mapping[str, Any] | None


def build_distance(spec: DistanceSpec, *, default: type[BaseDistance] = LpDistance) -> BaseDistance:
    """A distance from an instance, a registry name (``"lp"``, ``"cosine"``, ``"dot_product"``), a mapping
    ``{"name": ..., **params}`` (as read from YAML), or ``None`` for ``default()``."""
    if spec is None:
        return default()
    if isinstance(spec, BaseDistance):
        return spec
    return build_from_spec("distance", DISTANCES, spec)
