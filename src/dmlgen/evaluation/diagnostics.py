"""Generalization diagnostics of an embedding (methods.md §1.6, after Roth et al., ICML 2020).

- Spectral decay ρ: how unevenly the variance of the **uncentred** embeddings spreads over directions
  (KL divergence between the uniform distribution and the normalised singular values; lower = flatter).
- π-ratio: mean intra-class cosine distance over mean distance between class means (lower = denser
  classes relative to their separation), computed from per-class sums in O(N·D + C·D) memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dmlgen.errors import ConfigError, DataError

__all__ = [
    "density_ratio",
    "numerical_rank",
    "singular_value_spectrum",
    "spectral_decay",
    "spectral_decays",
]

# Floor of the normalised spectrum (§1.6 item 7): zero singular values would make ρ infinite.
P_FLOOR = 1e-12
# Rows normalised per step in density_ratio; bounds the fp64 working set to chunk x D.
_CHUNK = 8192


def _checked(embeddings: Any, name: str = "embeddings") -> torch.Tensor:
    """Any (N, D) array-like -> detached CPU tensor of its own dtype, checked non-empty, real and finite."""
    x = embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else torch.as_tensor(np.asarray(embeddings))
    if x.ndim != 2:
        raise DataError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{name} is empty (shape {tuple(x.shape)})")
    if x.is_complex() or x.dtype == torch.bool:
        raise DataError(f"{name} must be real numbers, got dtype {x.dtype}")
    if x.is_floating_point():
        bad = ~torch.isfinite(x).all(dim=1)
        if bad.any():
            raise DataError(f"{name}: {int(bad.sum())} of {x.shape[0]} rows contain NaN or inf")
    return x


def _as_embeddings(embeddings: Any, name: str = "embeddings") -> torch.Tensor:
    """Any (N, D) array-like -> checked CPU fp64 tensor (SVD runs in fp64, methods.md §1.2)."""
    return _checked(embeddings, name).to(torch.float64)


def _svdvals(embeddings: Any) -> torch.Tensor:
    """Exact singular values of the uncentred (N, D) embeddings, fp64, descending, length min(N, D)."""
    return torch.linalg.svdvals(_as_embeddings(embeddings))


def _normalised(s: torch.Tensor) -> torch.Tensor:
    total = s.sum()
    if not total > 0:
        raise DataError("embeddings are all zero: the singular value spectrum is undefined")
    p = (s / total).clamp_min(P_FLOOR)
    return p / p.sum()


def _rho_from_svdvals(s: torch.Tensor, mode: int) -> float:
    if isinstance(mode, bool) or not isinstance(mode, (int, np.integer)):
        raise ConfigError(f"spectral decay mode must be an integer, got {mode!r}")
    if mode == 0:
        raise ConfigError("spectral decay mode 0 is the spectrum itself: use singular_value_spectrum()")
    if mode < 0:
        p = _normalised(s)
        return float(math.log(len(p)) + (p * p.log()).sum())  # KL(p || u)
    if mode > len(s):
        raise DataError(f"spectral decay mode {mode} needs at least {mode} singular values, the embeddings have "
                        f"{len(s)} (min(N, D))")
    p = _normalised(s[mode - 1:])
    return float(-math.log(len(p)) - p.log().mean())  # KL(u || p)


def spectral_decay(embeddings: Any, mode: int = 1) -> float:
    """Spectral decay ρ of (N, D) embeddings (methods.md §1.6, key ``rho@<mode>``).

    Mode k >= 1 drops the k-1 largest singular values and returns KL(u || p); mode < 0 returns KL(p || u)
    on the full spectrum. p is the normalised singular values, floored at 1e-12, so a rank-deficient input
    gives a large but finite ρ. Unitless, >= 0; 0 means a perfectly flat spectrum.
    """
    return _rho_from_svdvals(_svdvals(embeddings), mode)


def spectral_decays(embeddings: Any, modes: Sequence[int] = (-1, 1, 2, 10)) -> dict[str, float]:
    """``{"rho@<k>": ρ_k for k in modes, "rank": numerical rank}`` from one SVD of the (N, D) embeddings.

    A mode k > min(N, D) has no spectrum left to measure and is left out (tiny evaluation sets); asking
    :func:`spectral_decay` for it directly is an error.
    """
    x = _as_embeddings(embeddings)
    s = torch.linalg.svdvals(x)
    out = {f"rho@{k}": _rho_from_svdvals(s, k) for k in modes if k <= len(s)}
    out["rank"] = float(_rank_from_svdvals(s, max(x.shape)))
    return out


def _rank_from_svdvals(s: torch.Tensor, n_max: int) -> int:
    # numpy.linalg.matrix_rank's default tolerance.
    tol = s.max() * n_max * torch.finfo(torch.float64).eps
    return int((s > tol).sum())


def numerical_rank(embeddings: Any) -> int:
    """Rank of the (N, D) embeddings (singular values above s_max · max(N, D) · eps, in fp64)."""
    x = _as_embeddings(embeddings)
    return _rank_from_svdvals(torch.linalg.svdvals(x), max(x.shape))


def singular_value_spectrum(embeddings: Any) -> np.ndarray:
    """Mode 0 of §1.6: the normalised singular values p (min(N, D),) float64, descending, summing to 1."""
    return _normalised(_svdvals(embeddings)).numpy()


def density_ratio(embeddings: Any, labels: Any, intra_include_self: bool = False) -> dict[str, float]:
    """π-ratio of (N, D) embeddings with (N,) integer labels (methods.md §1.6).

    On L2-normalised rows x̂ with cosine distance δ(a, b) = 1 - a·b:
    ``pi_intra`` = mean over classes with >= 2 samples of the mean δ over pairs i != j in the class
    (all n² pairs, self included, when ``intra_include_self``); ``pi_inter`` = mean δ between the
    normalised class means over pairs c != c'; ``pi_ratio`` = intra / inter. All in [0, 2] (ratio: >= 0).

    Both means come from per-class sum vectors S_c (Σ_{i,j∈c} x̂_i·x̂_j = ‖S_c‖²), never an N x N matrix.
    """
    x = _checked(embeddings)  # converted to fp64 chunk by chunk below
    y = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"labels must have shape ({len(x)},) to match the embeddings, got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"labels must be integers, got dtype {y.dtype}")
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"density_ratio needs at least 2 classes for the inter-class distance, got "
                        f"{len(classes)} (label {classes.tolist()})")

    sums = torch.zeros(len(classes), x.shape[1], dtype=torch.float64)
    sq_norms = torch.zeros(len(classes), dtype=torch.float64)  # Σ‖x̂_i‖² per class (1 each, up to rounding)
    for start in range(0, len(x), _CHUNK):
        block = x[start:start + _CHUNK].to(torch.float64)
        norms = block.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            raise DataError(f"embeddings: {int((norms == 0).sum())} rows are all zero and have no direction "
                            f"(first: row {start + int((norms[:, 0] == 0).nonzero()[0])})")
        unit = block / norms
        idx = inverse[start:start + _CHUNK]
        sums.index_add_(0, idx, unit)
        sq_norms.index_add_(0, idx, (unit * unit).sum(dim=1))

    n = counts.to(torch.float64)
    dots = (sums * sums).sum(dim=1)  # Σ_{i,j in c} x̂_i·x̂_j, self pairs included
    multi = counts >= 2
    if not multi.any():
        raise DataError("density_ratio needs a class with at least 2 samples for the intra-class distance")
    if intra_include_self:
        intra_c = 1.0 - dots[multi] / n[multi] ** 2
    else:
        intra_c = 1.0 - (dots[multi] - sq_norms[multi]) / (n[multi] * (n[multi] - 1.0))
    intra = float(intra_c.clamp(0.0, 2.0).mean())

    mean_norms = sums.norm(dim=1, keepdim=True)
    if (mean_norms[:, 0] == 0).any():
        bad = classes[mean_norms[:, 0] == 0].tolist()
        raise DataError(f"density_ratio: the normalised vectors of class(es) {bad[:10]} sum to zero, so their "
                        f"mean has no direction")
    mu = sums / mean_norms
    total = mu.sum(dim=0)
    c = float(len(classes))
    # Σ_{c != c'} μ̂_c·μ̂_c' = ‖Σ_c μ̂_c‖² - Σ_c ‖μ̂_c‖²
    cross = (total @ total) - (mu * mu).sum()
    inter = float(min(max(1.0 - float(cross) / (c * (c - 1.0)), 0.0), 2.0))
    if inter <= 0.0:
        raise DataError("density_ratio: all class means coincide (inter-class distance 0); "
                        "the embedding has collapsed")
    return {"pi_intra": intra, "pi_inter": inter, "pi_ratio": intra / inter}
