"""Fixtures shared by the training tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models run faster on one thread, and a loaded CI machine cannot slow them by oversubscription.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
