"""Reading torch files safely: ``torch.load(weights_only=True)`` with errors that name the file.

Every layer reads torch files (checkpoints, backbone weights, pseudo-label files), so this sits beside
:mod:`dmlgen.errors`, below all of them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dmlgen.errors import CheckpointError


def load_weights_only(path: str | Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """The object stored in ``path``, unpickled with ``weights_only=True`` (tensors and plain data only).

    ``what`` names the file's role in messages (e.g. ``"checkpoint"``, ``"weights file"``). A missing file, a
    corrupt one and one that holds other Python objects are :class:`CheckpointError`; dmlgen never retries with
    ``weights_only=False``, which would run code from the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            # torch's own message suggests weights_only=False, i.e. running the file's code: never do that.
            raise CheckpointError(
                f"{what} {path} holds Python objects other than tensors and plain data ({found.group(1)}); "
                "dmlgen refuses to load it because unpickling them could run code from the file"
            ) from None
        # A corrupt or foreign file: torch's reason without its advice to drop weights_only.
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = reason.group(1).strip() if reason else text.split("\n")[0]
        raise CheckpointError(f"{what} {path} cannot be read ({type(exc).__name__}: {detail})") from None


__all__ = ["load_weights_only"]
