"""Markdown reports: metric tables and the end-of-run summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Column order of the usual retrieval/clustering metrics; others follow alphabetically.
PREFERRED_ORDER = (
    "recall@1", "recall@2", "recall@4", "recall@8", "recall@10", "recall@100", "precision@1", "r_precision",
    "map@r", "nmi", "ami", "rho@1", "rho@2", "rho@10", "rho@-1", "pi_ratio", "pi_intra", "pi_inter",
)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def ordered_metric_names(names: Sequence[str]) -> list[str]:
    """Usual metrics first in a fixed order, counts (``num_*``) last."""
    first = [n for n in PREFERRED_ORDER if n in names]
    rest = sorted(n for n in names if n not in first and not n.startswith("num_"))
    counts = sorted(n for n in names if n.startswith("num_"))
    return first + rest + counts


def _cell(name: str, value: Any) -> str:
    # Counts (num_*, *_steps) read better as integers than as 200.0000.
    if (name.startswith(("num_", "val_num_")) or name.endswith("_steps") or name == "rank") \
            and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return _fmt(value)


def metrics_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table: one row per entry of ``rows`` (name -> metrics), one column per metric."""
    if columns is None:
        seen: list[str] = []
        for metrics in rows.values():
            seen.extend(k for k in metrics if k not in seen)
        columns = ordered_metric_names(seen)
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(c, metrics.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _selection_line(result: Mapping[str, Any]) -> str:
    epoch = result.get("selected_epoch")
    if result.get("selection_metric") is None:
        return f"- Reported checkpoint: epoch {epoch}, the last one (no validation split; test data never selects)."
    return (f"- Selected checkpoint: epoch {epoch} by validation `{result.get('selection_metric')}` = "
            f"{_fmt(result.get('val_score'))} (test data never used for selection).")


def write_run_report(out_dir: str | Path, result: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                     config: Mapping[str, Any], extra: Sequence[str] = ()) -> Path:
    """``report.md`` of a training run: setup, test metrics of the selected checkpoint, epoch table.

    ``extra``: Markdown lines placed after the test metrics (the HTML report's link, diagnostics and worst
    queries, see :func:`dmlgen.reporting.html.write_reports`)."""
    out_dir = Path(out_dir)
    splits = result.get("splits", {})
    model, loss, data = config.get("model", {}), config.get("loss", {}), config.get("data", {})
    miner = loss.get("miner") or {}
    lines = [
        f"# Run report: {config.get('name', out_dir.name)}",
        "",
        f"- Data: `{data.get('dataset')}`; train {splits.get('train_images')} images / "
        f"{splits.get('train_classes')} classes, validation {splits.get('val_images')} / {splits.get('val_classes')},"
        f" test {splits.get('test_images')} / {splits.get('test_classes')} (class-disjoint).",
        f"- Model: `{model.get('backbone')}` -> {model.get('embedding_size')}-d"
        f"{' (L2-normalised)' if model.get('normalize') else ''}.",
        f"- Loss: `{loss.get('name')}` {loss.get('params') or ''}"
        f"{'; miner `' + miner.get('name') + '` ' + str(miner.get('params') or '') if miner else ''}.",
        _selection_line(result),
        "",
        "## Test metrics (unseen classes, evaluated once)",
        "",
        metrics_table({"test": result.get("test", {})}),
        "",
        *extra,
    ]
    skipped = result.get("skipped_images") or []
    if skipped:
        lines += [f"## Skipped image files ({len(skipped)})", "",
                  "Left out before training (`data.on_corrupt_image: skip`):", ""]
        lines += [f"- `{item['path']}`: {item['reason']}" for item in skipped[:50]]
        if len(skipped) > 50:
            lines.append(f"- ... and {len(skipped) - 50} more (all in test_metrics.json)")
        lines.append("")
    dropped = result.get("dropped_classes") or []
    if dropped:
        lines += [f"## Dropped training classes ({len(dropped)})", "",
                  "A single image each (`data.single_image_classes: drop`): "
                  + ", ".join(f"`{c}`" for c in dropped[:50]) + (" ..." if len(dropped) > 50 else ""), ""]
    if history:
        cols = [c for c in history[-1] if c != "epoch"]
        lines += ["## Epochs", "", metrics_table({str(r.get("epoch")): r for r in history}, cols), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
