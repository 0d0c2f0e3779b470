"""Shared test fixtures for the loss and miner tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_batch(seed: int, n_classes: int = 5, m: int = 4, d: int = 8, dtype: torch.dtype = torch.float32,
               normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered embeddings (so mining finds easy, semi-hard and hard triplets) with m samples per class:
    ``(n_classes * m, d)`` embeddings and their labels, shuffled."""
    g = torch.Generator().manual_seed(seed)
    n = n_classes * m
    labels = torch.arange(n_classes).repeat_interleave(m)[torch.randperm(n, generator=g)]
    centers = torch.randn(n_classes, d, generator=g, dtype=torch.float64)
    x = 0.7 * centers[labels] + torch.randn(n, d, generator=g, dtype=torch.float64)
    x = F.normalize(x, dim=1) if normalized else 3.0 * x + 0.5
    return x.to(dtype), labels
