"""Checkpoints: atomic writes, weights-only reads, RNG round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dmlgen.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from dmlgen.errors import CheckpointError


def test_atomic_save_round_trip_with_weights_only(tmp_path) -> None:
    state = {"format": CHECKPOINT_FORMAT, "w": torch.arange(4.0), "rng": rng_state(), "hist": [{"a": 1.0}]}
    path = tmp_path / "sub" / "last.ckpt"
    atomic_save(state, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["hist"] == [{"a": 1.0}]
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_failed_save_keeps_previous_file(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"format": CHECKPOINT_FORMAT, "v": torch.tensor(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"format": CHECKPOINT_FORMAT, "v": Unpicklable()}, path)
    assert load_checkpoint(path)["v"].item() == 1
    assert len(list(tmp_path.iterdir())) == 1


def test_load_rejects_code_foreign_and_corrupt_files(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"format": CHECKPOINT_FORMAT, "x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_checkpoint(evil)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a dmlgen checkpoint"):
        load_checkpoint(foreign)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt.ckpt"):
        load_checkpoint(corrupt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_rng_state_round_trip_through_a_file(tmp_path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "rng.ckpt"
    atomic_save({"format": CHECKPOINT_FORMAT, "rng": rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected

