"""Embedding head: backbone features ``(N, F)`` -> embeddings ``(N, D)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmlgen.errors import ConfigError
from dmlgen.losses.distances import euclidean_distance_matrix, share_scaled_batch


def _check_positive(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}: must be a positive integer, got {value!r}")
    return value


class EmbeddingHead(nn.Module):
    """Linear layer (or a small MLP) to the embedding size, optionally L2-normalised.

    Layers: for each ``h`` in ``hidden_sizes``: [Dropout] -> Linear(h) -> [BatchNorm1d] -> ReLU; then
    [Dropout] -> Linear(embedding_size). Dropout (when ``dropout > 0``) acts on the input of every linear
    layer; BatchNorm only follows hidden layers (``batch_norm=True``). With ``normalize=True`` every
    output row has unit L2 norm. With ``scale_by_mean_distance=True`` (MDR's "learning without L2 norm",
    methods.md §3.2) a training batch is divided by its mean pairwise distance, gradients flowing through
    the divisor, so its mean off-diagonal distance is 1; evaluation returns the unscaled output.
    """

    def __init__(
        self,
        in_features: int,
        embedding_size: int,
        hidden_sizes: Sequence[int] = (),
        normalize: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
        scale_by_mean_distance: bool = False,
    ) -> None:
        super().__init__()
        if normalize and scale_by_mean_distance:
            raise ConfigError("head: scale_by_mean_distance replaces the L2 normalisation; use normalize=False")
        self.in_features = _check_positive("in_features", in_features)
        self.embedding_size = _check_positive("embedding_size", embedding_size)
        if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence):
            raise ConfigError(f"head hidden_sizes: must be a list of positive integers, got {hidden_sizes!r}")
        self.hidden_sizes = tuple(_check_positive("head hidden size", h) for h in hidden_sizes)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"head dropout: must be in [0, 1), got {dropout!r}")
        self.normalize = bool(normalize)
        self.dropout = float(dropout)
        self.batch_norm = bool(batch_norm)
        self.scale_by_mean_distance = bool(scale_by_mean_distance)

        layers: list[nn.Module] = []
        width = self.in_features
        for hidden in self.hidden_sizes:
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            layers.append(nn.Linear(width, hidden))
            if self.batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU(inplace=True))
            width = hidden
        if self.dropout > 0:
            layers.append(nn.Dropout(self.dropout))
        layers.append(nn.Linear(width, self.embedding_size))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, in_features)`` -> ``(N, embedding_size)``, unit rows when ``normalize``."""
        out = self.layers(features)
        if self.scale_by_mean_distance and self.training:
            return scale_by_mean_distance(out)
        # eps keeps an all-zero row finite (it stays zero) instead of producing NaN.
        return F.normalize(out, p=2.0, dim=1, eps=1e-12) if self.normalize else out

    def extra_repr(self) -> str:
        extra = ", scale_by_mean_distance=True" if self.scale_by_mean_distance else ""
        return f"normalize={self.normalize}{extra}"


def scale_by_mean_distance(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x (N, D) / mean_{j != k} |x_j - x_k|`` (not detached); a batch of one row is returned as is."""
    n = x.shape[0]
    if n < 2:
        return x
    # The Gram-based matrix (zero diagonal, clamped duplicates: methods.md §1.2.1) with its closed-form
    # backward: the (N, N, D) difference tensor took 150x as long at 256 x 512 (benchmarks/regularizer_speed.py).
    mean_distance = euclidean_distance_matrix(x).sum() / (n * (n - 1))
    scaled = x / (mean_distance + eps)
    # The miner reuses the product, and MDR this distance matrix (one backward product for the two).
    share_scaled_batch(scaled, x, 1.0 / (mean_distance + eps))
    return scaled


__all__ = ["EmbeddingHead", "scale_by_mean_distance"]
