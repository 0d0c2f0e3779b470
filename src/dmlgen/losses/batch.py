"""Validated loss input shared by losses, miners and reducers.

:class:`MetricBatch` converts ``(embeddings, labels, ref_emb, ref_labels)`` once: shapes are checked (DataError
naming the argument), labels become int64 on the embeddings' device and low-precision embeddings are
up-cast, so that every distance, softmax and reduction runs in at least fp32 (methods.md §1.2.2).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dmlgen.errors import DataError


def _as_tensor(name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise DataError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")


def _check_embeddings(name: str, emb: Tensor) -> None:
    if emb.ndim != 2:
        raise DataError(f"{name}: expected shape (N, D), got {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise DataError(f"{name}: expected a floating-point tensor, got dtype {emb.dtype}")
    if emb.shape[0] == 0:
        raise DataError(f"{name}: empty batch, shape {tuple(emb.shape)}")


def _check_labels(name: str, labels: Any, n: int, device: torch.device) -> Tensor:
    labels = _as_tensor(name, labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"{name}: expected shape ({n},) to match the embeddings, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"{name}: expected integer labels, got dtype {labels.dtype}")
    return labels.to(device=device, dtype=torch.int64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


def full_precision(device: torch.device) -> AbstractContextManager[Any]:
    """Disable autocast so that the loss-side maths stays in the dtype :class:`MetricBatch` chose."""
    return torch.autocast(device_type=device.type, enabled=False)


@dataclass(frozen=True)
class MetricBatch:
    """Query embeddings ``(N, D)`` with labels ``(N,)`` compared with reference embeddings ``(M, D)``.

    In self mode (no ``ref_emb``) the reference *is* the query: ``ref_emb is embeddings``, ``M == N`` and a
    sample is never its own positive. Embeddings are in the compute dtype (>= fp32); ``sources`` keeps the
    caller's tensors so that an empty loss stays in their autograd graph.
    """

    embeddings: Tensor
    labels: Tensor
    ref_emb: Tensor
    ref_labels: Tensor
    self_ref: bool
    sources: tuple[Tensor, ...]

    @classmethod
    def from_inputs(
        cls, embeddings: Any, labels: Any, ref_emb: Any = None, ref_labels: Any = None
    ) -> MetricBatch:
        """Validate and convert; ``ref_emb`` needs ``ref_labels`` unless it is ``embeddings`` itself."""
        emb = _as_tensor("embeddings", embeddings)
        _check_embeddings("embeddings", emb)
        lab = _check_labels("labels", labels, emb.shape[0], emb.device)
        dtype = compute_dtype(emb.dtype)
        query = emb.to(dtype)
        self_ref = ref_emb is None or (ref_emb is embeddings and (ref_labels is None or ref_labels is labels))
        if self_ref:
            return cls(query, lab, query, lab, True, (emb,))
        ref = _as_tensor("ref_emb", ref_emb)
        _check_embeddings("ref_emb", ref)
        if ref.shape[1] != emb.shape[1]:
            raise DataError(
                f"ref_emb: embedding size {ref.shape[1]} does not match embeddings' {emb.shape[1]}"
            )
        if ref.device != emb.device:
            raise DataError(f"ref_emb: on device {ref.device}, embeddings on {emb.device}")
        if ref_labels is None:
            raise DataError("ref_labels: required when ref_emb is given")
        rlab = _check_labels("ref_labels", ref_labels, ref.shape[0], emb.device)
        ref_c = ref.to(compute_dtype(torch.promote_types(ref.dtype, emb.dtype)))
        query = emb.to(ref_c.dtype)
        return cls(query, lab, ref_c, rlab, False, (emb, ref))

    @property
    def ref_or_none(self) -> Tensor | None:
        """``None`` in self mode (what a distance expects), else the reference embeddings."""
        return None if self.self_ref else self.ref_emb

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def label_masks(self) -> tuple[Tensor, Tensor]:
        """Boolean ``(N, M)`` masks: positives (same label, never the sample itself) and negatives."""
        same = self.labels.unsqueeze(1) == self.ref_labels.unsqueeze(0)
        if self.self_ref:
            eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
            return same & ~eye, ~same
        return same, ~same

    def zero(self) -> Tensor:
        """A 0-dim zero (compute dtype) that stays in every input's graph (methods.md §1.2.4)."""
        # Sum in the compute dtype: an fp16 sum of large embeddings can overflow to inf, and inf * 0 = NaN.
        out = self.sources[0].to(self.embeddings.dtype).sum() * 0
        for src in self.sources[1:]:
            out = out + src.to(self.embeddings.dtype).sum() * 0
        return out

    def degenerate_reason(self) -> str | None:
        """``"single_sample"`` or ``"single_class"`` when no pair of different labels can be formed."""
        if self.self_ref and self.embeddings.shape[0] == 1:
            return "single_sample"
        first = self.labels[0]
        if bool((self.labels == first).all()) and bool((self.ref_labels == first).all()):
            return "single_class"
        return None
