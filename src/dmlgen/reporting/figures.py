"""PNG pictures for the HTML report: training curves, embedding map, spectrum, thumbnails.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, so no global state and no
display needed); thumbnails with Pillow. Every function returns PNG bytes, inlined as ``data:`` URIs.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from dmlgen.errors import DataError

DPI = 100
# Colour-blind-safe pair for correct / incorrect marks (also used by the page's borders).
CORRECT_COLOUR = "#1a9850"
WRONG_COLOUR = "#d73027"
QUERY_COLOUR = "#2c7bb6"


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes (checked by their signature)."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise DataError("data_uri: the bytes are not a PNG image")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No "Software" text chunk: the page carries pictures only, not the plotting library's name and URL.
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(int(_float(r.get("epoch"))), _float(r.get(key))) for r in history
            if key in r and not math.isnan(_float(r.get("epoch")))]
    x = np.array([e for e, _ in rows], dtype=np.int64)
    y = np.array([v for _, v in rows], dtype=np.float64)
    return x, y


def training_curves_png(history: Sequence[Mapping[str, Any]], *, selected_epoch: int | None = None,
                        val_keys: Sequence[str] = ("val_map@r",)) -> bytes | None:
    """Training loss and validation metrics per epoch side by side, the selected epoch marked by a dashed
    line. None without any epoch."""
    if not history:
        return None
    loss_x, loss_y = _series(history, "train_loss")
    val = [(k, *_series(history, k)) for k in dict.fromkeys(val_keys)]
    val = [(k, x, y) for k, x, y in val if len(x) and np.isfinite(y).any()]
    panels = 1 + (1 if val else 0)
    fig = _new_figure(5.0 * panels, 3.2)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    ax = axes[0]
    ax.plot(loss_x, loss_y, marker="o", color="#4d4d4d", label="train loss")
    ax.set_title("training loss (mean per epoch)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if val:
        ax = axes[1]
        for key, x, y in val:
            ax.plot(x, y, marker="o", label=key.removeprefix("val_"))
        ax.set_title("validation (held-out training classes)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("score")
        ax.legend(loc="best", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        if selected_epoch is not None and selected_epoch > 0:
            ax.axvline(selected_epoch, color=QUERY_COLOUR, linestyle="--", linewidth=1,
                       label=f"selected epoch {selected_epoch}")
        if len(loss_x) <= 20:
            ax.set_xticks(sorted(set(loss_x.tolist()) | ({selected_epoch} if selected_epoch else set())))
    fig.tight_layout()
    return _png(fig)


def embedding_map_png(xy: np.ndarray, labels: np.ndarray, names: Sequence[str], *, title: str) -> bytes:
    """Scatter plot of 2-D points coloured by class; a legend names the classes when there are <= 20."""
    xy = np.asarray(xy, dtype=np.float64)
    labels = np.asarray(labels)
    classes = list(dict.fromkeys(labels.tolist()))
    fig = _new_figure(7.0, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    # Qualitative maps while the classes fit them (tab10's colours are the more distinct), hue steps beyond.
    qualitative = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else None
    cmap = colormaps[qualitative or "hsv"]
    for i, c in enumerate(classes):
        sel = labels == c
        colour = cmap(i if qualitative else i / len(classes))
        name = names[i] if i < len(names) else str(c)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=12, color=colour, alpha=0.85, linewidths=0, label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=1.5, frameon=False,
                  title="class", title_fontsize=8)
    fig.tight_layout()
    return _png(fig)


def spectrum_png(spectrum: np.ndarray) -> bytes:
    """The normalised singular values (descending, summing to 1) on a log scale, with the uniform level."""
    p = np.asarray(spectrum, dtype=np.float64)
    fig = _new_figure(5.0, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.semilogy(np.arange(1, len(p) + 1), np.maximum(p, 1e-12), marker=".", color="#4d4d4d")
    ax.axhline(1.0 / len(p), color=QUERY_COLOUR, linestyle="--", linewidth=1, label="flat spectrum (1/m)")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("share of the spectrum")
    ax.set_title("normalised singular values of the test embeddings", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def metric_bars_png(rows: Mapping[str, Mapping[str, Any]], metric: str) -> bytes | None:
    """Horizontal bars of one metric across runs (missing values left out); None when no run has it."""
    items = [(name, _float(m.get(metric))) for name, m in rows.items()]
    items = [(n, v) for n, v in items if math.isfinite(v)]
    if not items:
        return None
    fig = _new_figure(6.0, 0.9 + 0.35 * len(items))
    ax = fig.add_subplot(1, 1, 1)
    names = [n for n, _ in items]
    values = [v for _, v in items]
    ax.barh(range(len(items)), values, color=QUERY_COLOUR)
    ax.set_yticks(range(len(items)), names, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.4f}", va="center", fontsize=8)
    ax.set_xlabel(metric)
    ax.set_xlim(0, max(values) * 1.2 if max(values) > 0 else 1)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def curves_overlay_png(histories: Mapping[str, Sequence[Mapping[str, Any]]], key: str, *, title: str) -> bytes | None:
    """One line per run of ``key`` (an epochs.csv column) against the epoch; None when no run has it."""
    series = {name: _series(h, key) for name, h in histories.items()}
    series = {n: (x, y) for n, (x, y) in series.items() if len(x) and np.isfinite(y).any()}
    if not series:
        return None
    fig = _new_figure(6.0, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- thumbnails
def to_uint8_image(image: Any) -> np.ndarray:
    """An image as ``(H, W)`` or ``(H, W, 3)`` uint8: arrays ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)``
    (C in 1, 3, 4), uint8, bool or float in [0, 1] (other float ranges are min-max scaled), or PIL."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L" if image.mode in ("1", "L", "I", "F") else "RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise DataError(f"cannot show an image of shape {np.asarray(image).shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    arr = arr.astype(np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if lo < 0.0 or hi > 1.0:  # e.g. a normalised tensor: stretch to the full range
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.clip(np.round(np.nan_to_num(arr) * 255.0), 0, 255).astype(np.uint8)


def thumbnail(image: Any, size: int) -> np.ndarray:
    """A ``(size, size, 3)`` uint8 thumbnail: the image scaled to fit (small images enlarged with nearest
    neighbours so strokes stay sharp), centred on white."""
    arr = to_uint8_image(image)
    pil = Image.fromarray(arr).convert("RGB")
    w, h = pil.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    pil = pil.resize(new, resample)
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(pil, ((size - new[0]) // 2, (size - new[1]) // 2))
    return np.asarray(canvas)


def array_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a ``(H, W)`` or ``(H, W, 3)`` uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
