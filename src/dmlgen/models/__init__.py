"""dmlgen.models: backbones (fixed-name registry), embedding heads and the EmbeddingModel.

::

    model = build_model("resnet18", 128, in_channels=3, imagenet=True, freeze_bn=True)
    embeddings = model(images)                  # (N, C, H, W) -> (N, 128), unit rows
    embeddings = model.embed(loader, device="cuda")   # eval mode, no grad, (N, 128) on the CPU
"""

from .backbones import BACKBONES, Backbone, BackboneSpec, available_backbones, build_backbone
from .heads import EmbeddingHead
from .model import EmbeddingModel, build_model

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "EmbeddingHead",
    "EmbeddingModel",
    "available_backbones",
    "build_backbone",
    "build_model",
]
