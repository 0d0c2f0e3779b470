"""Index tuples exchanged between miners and losses, and the label-derived sets they come from.

Triplets are ``(a, p, n)``; pairs are ``(a1, p, a2, n)`` (positive pairs ``(a1[i], p[i])``, negative pairs
``(a2[j], n[j])``). Anchors index the query embeddings ``(N, D)``; positives and negatives index the
reference embeddings ``(M, D)`` (the query itself in self mode). All are int64 tensors on one device.

Nothing here builds an ``(N, M, M)`` tensor: all triplets are enumerated from the ``P`` positive pairs times
the ``M`` references, ``O(P * M)`` with ``P = N * (samples per class - 1)``.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor

from dmlgen.errors import DataError

Triplets = tuple[Tensor, Tensor, Tensor]
Pairs = tuple[Tensor, Tensor, Tensor, Tensor]
IndicesTuple = Union[Triplets, Pairs]


def empty_indices(n: int, device: torch.device) -> tuple[Tensor, ...]:
    """``n`` empty int64 tensors."""
    return tuple(torch.empty(0, dtype=torch.int64, device=device) for _ in range(n))


def all_triplets(pos_mask: Tensor, neg_mask: Tensor) -> Triplets:
    """Every ``(a, p, n)`` with ``pos_mask[a, p]`` and ``neg_mask[a, n]``, ordered by ``(a, p, n)``.

    Args:
        pos_mask, neg_mask: bool ``(N, M)``.
    """
    a, p = torch.where(pos_mask)
    pair_idx, n = torch.where(neg_mask[a])  # (P, M) rows: negatives of each pair's anchor
    return a[pair_idx], p[pair_idx], n


def sample_allowed(mask: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """For each row of a bool ``(R, M)`` mask with at least one True, ``k`` column indices ``(R, k)`` drawn
    uniformly with replacement among the True entries."""
    counts = mask.sum(dim=1, keepdim=True)  # (R, 1), >= 1
    gen_device = generator.device if generator is not None else mask.device
    u = torch.rand((mask.shape[0], k), generator=generator, device=gen_device, dtype=torch.float64)
    rank = (u.to(mask.device) * counts).long().minimum(counts - 1)  # 0-based rank among allowed entries
    # The (rank+1)-th True of a row is the first column whose running count reaches rank + 1.
    running = mask.long().cumsum(dim=1)
    return torch.searchsorted(running, rank + 1)


def sample_triplets(
    pos_mask: Tensor, neg_mask: Tensor, per_anchor: int, generator: torch.Generator | None = None
) -> Triplets:
    """``per_anchor`` random triplets for every anchor with a positive and a negative (PML's
    ``triplets_per_anchor=int``): positive and negative each uniform, with replacement."""
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    anchors = torch.where(valid)[0]
    if anchors.numel() == 0:
        return empty_indices(3, pos_mask.device)  # type: ignore[return-value]
    p = sample_allowed(pos_mask[anchors], per_anchor, generator)
    n = sample_allowed(neg_mask[anchors], per_anchor, generator)
    a = anchors.unsqueeze(1).expand(-1, per_anchor)
    return a.reshape(-1), p.reshape(-1), n.reshape(-1)


def pairs_to_triplets(pairs: Pairs, num_query: int, num_ref: int) -> Triplets:
    """Triplets ``(a, p, n)`` for every positive pair and negative pair that share their anchor (as PML,
    including repeats when a pair is listed twice), grouped by positive pair.

    Works on a per-anchor count matrix ``(num_query, num_ref)``: ``O(P * M)`` rather than PML's
    ``(P, Q)`` comparison of every positive pair with every negative pair.
    """
    a1, p, a2, n = pairs
    counts = torch.zeros((num_query, num_ref), dtype=torch.int64, device=a1.device)
    counts.index_put_((a2, n), torch.ones_like(a2), accumulate=True)
    rows = counts[a1]  # (P, M): how often each reference is a listed negative of the pair's anchor
    pair_idx, neg = torch.where(rows > 0)
    repeats = rows[pair_idx, neg]
    pair_idx, neg = pair_idx.repeat_interleave(repeats), neg.repeat_interleave(repeats)
    return a1[pair_idx], p[pair_idx], neg


def to_pairs(indices: IndicesTuple) -> Pairs:
    """Pairs from pairs or triplets: a triplet gives a positive pair ``(a, p)`` and a negative pair ``(a, n)``."""
    if len(indices) == 4:
        return indices  # type: ignore[return-value]
    a, p, n = indices
    return a, p, a, n


def to_triplets(indices: IndicesTuple, num_query: int, num_ref: int) -> Triplets:
    """Triplets from triplets or pairs (see :func:`pairs_to_triplets`)."""
    if len(indices) == 3:
        return indices  # type: ignore[return-value]
    return pairs_to_triplets(indices, num_query, num_ref)  # type: ignore[arg-type]


def check_indices_tuple(indices: Any, num_query: int, num_ref: int, device: torch.device) -> IndicesTuple:
    """Validate a miner's output: 3 or 4 one-dimensional integer tensors, matching lengths, in range.

    Returns them as int64 on ``device``; raises DataError naming the bad entry otherwise.
    """
    if not isinstance(indices, (tuple, list)) or len(indices) not in (3, 4):
        raise DataError(
            "indices_tuple: expected (anchors, positives, negatives) or (a1, positives, a2, negatives), "
            f"got {type(indices).__name__} of length {len(indices) if hasattr(indices, '__len__') else '?'}"
        )
    names = ("a", "p", "n") if len(indices) == 3 else ("a1", "p", "a2", "n")
    out = []
    for name, t in zip(names, indices):
        if not isinstance(t, Tensor) or t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise DataError(f"indices_tuple[{name}]: expected a 1-D integer tensor, got {t!r}")
        out.append(t.to(device=device, dtype=torch.int64))
    groups = [(0, 1, 2)] if len(out) == 3 else [(0, 1), (2, 3)]
    for group in groups:
        lengths = {names[i]: out[i].shape[0] for i in group}
        if len(set(lengths.values())) != 1:
            raise DataError(f"indices_tuple: lengths differ: {lengths}")
    for name, t in zip(names, out):
        limit = num_query if name.startswith("a") else num_ref
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
            raise DataError(
                f"indices_tuple[{name}]: values must lie in [0, {limit}), got [{int(t.min())}, {int(t.max())}]"
            )
    return tuple(out)  # type: ignore[return-value]
