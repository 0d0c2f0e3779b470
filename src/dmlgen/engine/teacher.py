"""The previous epoch's model as a teacher (LSD, methods.md §2.6 and §4.2)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EpochSnapshotTeacher(nn.Module):
    """A frozen copy of the student, refreshed at the end of every epoch.

    ``teacher(images) -> (N, D)`` runs the snapshot without gradients, in eval mode (BatchNorm uses its
    running statistics and updates nothing; dropout is off), so the teacher is deterministic. ``valid`` is
    False until the first :meth:`refresh`; the snapshot never shares tensors with the student.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.register_buffer("valid", torch.zeros((), dtype=torch.bool))

    def train(self, mode: bool = True) -> EpochSnapshotTeacher:
        """The snapshot always stays in eval mode, whatever the surrounding module does."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def refresh(self, student: nn.Module) -> None:
        """Copy the student's current weights and buffers in (by value) and mark the teacher valid."""
        self.model.load_state_dict(student.state_dict())
        self.valid.fill_(True)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return result


__all__ = ["EpochSnapshotTeacher"]
