"""Deployment: search indexes over a gallery of images, and model export (TorchScript, ONNX, safetensors).

``index``: :func:`~dmlgen.deploy.index.build_index` embeds an image folder with a trained checkpoint and
writes an index folder (exact, or faiss IVF / HNSW); :func:`~dmlgen.deploy.index.search` embeds query
images with the same model and returns the top-k gallery images. ``export``: the eval-mode embedding model
as TorchScript or ONNX (each checked against the PyTorch model) and its weights as safetensors.

This layer sits above ``engine`` (it loads checkpoints with :func:`dmlgen.engine.run.load_trained_model`);
nothing below imports it.
"""

from dmlgen.deploy.export import ExportError, export_onnx, export_torchscript, save_weights_safetensors
from dmlgen.deploy.index import (
    INDEX_KINDS,
    EmbeddingIndex,
    SearchResult,
    approximate_recall,
    build_index,
    load_index,
    model_identity,
    search,
)

__all__ = [
    "INDEX_KINDS",
    "EmbeddingIndex",
    "ExportError",
    "SearchResult",
    "approximate_recall",
    "build_index",
    "export_onnx",
    "export_torchscript",
    "load_index",
    "model_identity",
    "save_weights_safetensors",
    "search",
]
