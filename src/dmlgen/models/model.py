"""EmbeddingModel: backbone + head, images ``(N, C, H, W)`` -> embeddings ``(N, D)``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dmlgen.errors import ConfigError, DataError

from .backbones import build_backbone
from .heads import EmbeddingHead


class EmbeddingModel(nn.Module):
    """``forward(images (N, C, H, W)) -> (N, D)``: ``head(backbone(images))``."""

    def __init__(self, backbone: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        out_features = getattr(backbone, "out_features", None)
        if out_features is not None and out_features != head.in_features:
            raise ConfigError(
                f"head takes {head.in_features} features but backbone "
                f"{getattr(backbone, 'name', type(backbone).__name__)} gives {out_features}"
            )
        self.backbone = backbone
        self.head = head

    @property
    def embedding_size(self) -> int:
        return self.head.embedding_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, D)``."""
        return self.head(self.backbone(images))

    @torch.no_grad()
    def embed(
        self,
        data: torch.Tensor | np.ndarray | Iterable[Any],
        batch_size: int = 256,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Embeddings ``(N, D)`` float32 on the CPU, in eval mode without gradients.

        ``data`` is an image tensor/array ``(N, C, H, W)`` (cut into ``batch_size`` chunks) or an iterable of
        batches (a DataLoader) whose items are image tensors or tuples starting with one (``(image, label,
        index)``). ``device`` defaults to the model's. The train/eval mode is restored afterwards.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size: must be a positive integer, got {batch_size!r}")
        if device is None:
            first = next(self.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data)
        if isinstance(data, torch.Tensor):
            if data.dim() != 4:
                raise DataError(f"embed: images must be (N, C, H, W), got shape {tuple(data.shape)}")
            batches: Iterable[Any] = data.split(batch_size) if len(data) else []
        else:
            batches = data

        was_training = self.training
        self.eval()
        try:
            chunks = []
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                if isinstance(images, np.ndarray):
                    images = torch.from_numpy(images)
                if not isinstance(images, torch.Tensor) or not images.is_floating_point():
                    kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
                    raise DataError(f"embed: a batch must be a float image tensor or start with one, got {kind}")
                chunks.append(self(images.to(device, torch.float32)).float().cpu())
        finally:
            self.train(was_training)
        if not chunks:
            return torch.empty(0, self.embedding_size)
        return torch.cat(chunks)

    def describe(self) -> dict[str, Any]:
        """Architecture summary stored in checkpoints (plain types) to detect weights of another model."""
        backbone = self.backbone
        return {
            "backbone": getattr(backbone, "name", type(backbone).__name__),
            "in_channels": getattr(backbone, "in_channels", None),
            "backbone_features": self.head.in_features,
            "embedding_size": self.head.embedding_size,
            "head_hidden": list(self.head.hidden_sizes),
            "head_batch_norm": self.head.batch_norm,
            "normalize": self.head.normalize,
            **({"scale_by_mean_distance": True} if self.head.scale_by_mean_distance else {}),
            "num_parameters": sum(p.numel() for p in self.parameters()),
        }


def build_model(
    backbone: str,
    embedding_size: int,
    *,
    in_channels: int | None = None,
    head_hidden: Sequence[int] = (),
    normalize: bool = True,
    weights: str | Path | None = None,
    imagenet: bool = False,
    freeze_bn: bool = False,
    head_batch_norm: bool = False,
    head_dropout: float = 0.0,
    scale_by_mean_distance: bool = False,
) -> EmbeddingModel:
    """Registered backbone ``backbone`` + :class:`EmbeddingHead` to ``embedding_size`` dimensions.

    ``in_channels=None`` takes the backbone's default (1 for ``convnet4``, 3 otherwise); ``weights``,
    ``imagenet`` and ``freeze_bn`` go to :func:`~dmlgen.models.backbones.build_backbone`.
    """
    module, out_features = build_backbone(
        backbone, in_channels=in_channels, weights=weights, imagenet=imagenet, freeze_bn=freeze_bn
    )
    head = EmbeddingHead(
        out_features, embedding_size, hidden_sizes=head_hidden, normalize=normalize, dropout=head_dropout,
        batch_norm=head_batch_norm, scale_by_mean_distance=scale_by_mean_distance,
    )
    return EmbeddingModel(module, head)


__all__ = ["EmbeddingModel", "build_model"]
