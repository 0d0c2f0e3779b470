"""RunLogger: TensorBoard scalars next to metrics.jsonl/epochs.csv."""

from __future__ import annotations

import pytest


def test_run_logger_writes_tensorboard_scalars(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmlgen.engine.logging import RunLogger

    logger = RunLogger(tmp_path, tensorboard=True)
    for step in range(1, 4):
        logger.scalars("train", {"loss": 1.0 / step, "lr": float("nan")}, step)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["train/loss"]  # non-finite values are not logged
    values = [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")]
    assert values == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]
