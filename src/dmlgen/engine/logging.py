"""Run logs: a JSONL event stream, a per-epoch CSV and (when installed) TensorBoard scalars."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    """Appends to ``metrics.jsonl`` and ``epochs.csv`` in ``out_dir``; resumed runs keep appending."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.csv_path = self.out_dir / "epochs.csv"
        self._jsonl = self.jsonl_path.open("a", buffering=1)
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self._writer = None
            else:
                self._writer = SummaryWriter(log_dir=str(self.out_dir / "tb"))

    def event(self, kind: str, **fields: Any) -> None:
        record = {"event": kind, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        self._jsonl.write(json.dumps(record) + "\n")

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def write_epochs(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite ``epochs.csv`` from the whole history (the checkpoint's), so resumed runs never duplicate
        or lose a row."""
        header: list[str] = []
        for r in rows:
            header.extend(k for k in r if k not in header)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows({k: _clean(v) for k, v in r.items()} for r in rows)
        tmp.replace(self.csv_path)

    def close(self) -> None:
        self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
