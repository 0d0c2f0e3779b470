"""Self-contained HTML reports: one file, every picture an inline PNG, no external URL, no script.

- :func:`write_reports`: ``report.md`` and ``report.html`` of a training run (the end of ``dmlgen train``
  and ``dmlgen report RUN_DIR``). The page holds the test metrics and the selected epoch, training curves
  (loss and validation MAP@R per epoch), a retrieval gallery (the worst queries first, each with its
  nearest neighbours marked correct or incorrect), a 2-D map of the test embeddings coloured by class and
  the diagnostics ρ (spectral decay) and π (density ratio) of methods.md §1.6.
- :func:`write_compare_report`: one page comparing several runs (a metrics table, bars, curves).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import dmlgen
from dmlgen.errors import DataError, DmlgenError
from dmlgen.reporting import figures as F
from dmlgen.reporting.collect import DIAGNOSTIC_PREFIXES, ReportOptions, RunVisuals, collect_run_visuals
from dmlgen.reporting.markdown import metrics_table, ordered_metric_names, write_run_report

__all__ = [
    "load_run_files",
    "read_epochs_csv",
    "render_compare_html",
    "render_run_html",
    "write_compare_report",
    "write_html_report",
    "write_reports",
]

HTML_NAME = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 auto;max-width:1280px;
padding:16px 24px;color:#222;background:#fff}
h1{font-size:1.6em;margin:0.2em 0}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:0.5em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3}td.num{text-align:right;
font-variant-numeric:tabular-nums}td.best{font-weight:bold}
.meta{color:#555;font-size:0.92em}.meta li{margin:2px 0}
.note{color:#555;font-size:0.88em}
img.figure{max-width:100%;height:auto;border:1px solid #eee}
nav a{margin-right:1em}
.gallery{display:flex;flex-direction:column;gap:10px}
.grow{display:flex;align-items:flex-start;gap:6px;padding:6px;border:1px solid #eee;border-radius:4px}
.ghead{width:150px;font-size:0.8em;flex:none}
figure.thumb{margin:0;text-align:center;font-size:0.72em;width:74px;flex:none}
figure.thumb img{display:block;border:4px solid #999;margin:0 auto}
figure.query img{border-color:#2c7bb6}
figure.ok img{border-color:#1a9850}figure.bad img{border-color:#d73027}
figure.ok figcaption b{color:#1a9850}figure.bad figcaption b{color:#d73027}
figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.sep{width:2px;align-self:stretch;background:#ddd;flex:none}
"""


# --------------------------------------------------------------------------- run files
def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_epochs_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``epochs.csv`` with numbers parsed (``nan``/``inf`` as floats); ``[]`` when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [{k: _number(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def load_run_files(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """``(test_metrics.json, epochs.csv rows, config.yaml)`` of a finished run folder; DataError naming the
    missing or unreadable file otherwise."""
    import yaml

    run = Path(run_dir)
    needed = [run / "config.yaml", run / "test_metrics.json"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise DataError(f"{run} is not a finished training run: missing {', '.join(missing)}")
    try:
        config = yaml.safe_load(needed[0].read_text(encoding="utf-8"))
        result = json.loads(needed[1].read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise DataError(f"cannot read the run files in {run}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(result, dict):
        raise DataError(f"{run}: config.yaml and test_metrics.json must each hold a mapping")
    return result, read_epochs_csv(run / "epochs.csv"), config


# --------------------------------------------------------------------------- small HTML pieces
def _fmt(name: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return escape(str(value))
    if isinstance(value, (int, float)):
        v = float(value)
        if (name.startswith(("num_", "val_num_")) or name.endswith("_steps") or name in ("epoch", "rank")) \
                and v.is_integer():
            return str(int(v))
        if math.isnan(v):
            return "nan"
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"  # learning rates such as 1e-6 stay readable
    return escape(str(value))


def _table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str], *, first: str = "",
           best: Mapping[str, str] | None = None) -> str:
    """An HTML table, one row per entry of ``rows``; ``best`` maps a column to the row name to bold."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for name, values in rows.items():
        cells = []
        for c in columns:
            v = values.get(c, "")
            cls = "num" + (" best" if best and best.get(c) == name else "")
            cells.append(f'<td class="{cls}">{_fmt(c, v)}</td>')
        body.append(f"<tr><th>{escape(str(name))}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>{escape(first)}</th>{head}</tr>{''.join(body)}</table>"


def _img(png: bytes, alt: str, cls: str = "figure", size: int | None = None) -> str:
    dims = f' width="{size}" height="{size}"' if size else ""
    return f'<img class="{cls}" src="{F.data_uri(png)}" alt="{escape(alt, quote=True)}"{dims}>'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


# --------------------------------------------------------------------------- run report
def _selected_row(history: Sequence[Mapping[str, Any]], epoch: Any) -> dict[str, Any] | None:
    for row in history:
        if str(row.get("epoch")) == str(epoch):
            return dict(row)
    return None


def _setup_items(result: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    splits = result.get("splits", {}) or {}
    model, loss, data = config.get("model", {}) or {}, config.get("loss", {}) or {}, config.get("data", {}) or {}
    miner = loss.get("miner") or {}
    items = [
        f"Data: <code>{escape(str(data.get('dataset')))}</code>; train {splits.get('train_images')} images / "
        f"{splits.get('train_classes')} classes, validation {splits.get('val_images')} / "
        f"{splits.get('val_classes')}, test {splits.get('test_images')} / {splits.get('test_classes')} "
        "(class-disjoint)" + (f", gallery {splits.get('gallery_images')} images" if "gallery_images" in splits else "")
        + ".",
        f"Model: <code>{escape(str(model.get('backbone')))}</code> &rarr; {escape(str(model.get('embedding_size')))}-d"
        f"{' (L2-normalised)' if model.get('normalize') else ''}.",
        f"Loss: <code>{escape(str(loss.get('name')))}</code> {escape(str(loss.get('params') or ''))}"
        + (f"; miner <code>{escape(str(miner.get('name')))}</code> {escape(str(miner.get('params') or ''))}"
           if miner else "") + ".",
    ]
    regs = config.get("regularizers") or []
    if regs:
        items.append("Regularizers: " + ", ".join(f"<code>{escape(str(r.get('name')))}</code> weight "
                                                  f"{escape(str(r.get('weight')))}" for r in regs) + ".")
    method = config.get("method")
    if isinstance(method, Mapping) and method.get("name"):
        items.append(f"Method: <code>{escape(str(method.get('name')))}</code>.")
    if result.get("selection_metric") is None:
        items.append(f"Reported checkpoint: epoch {escape(str(result.get('selected_epoch')))}, the last one "
                     "(no validation split; test data never selects).")
    else:
        items.append(f"Selected checkpoint: epoch {escape(str(result.get('selected_epoch')))} by validation "
                     f"<code>{escape(str(result.get('selection_metric')))}</code> = "
                     f"{_fmt('', result.get('val_score'))} (test data never used for selection).")
    return items


def _gallery_html(vis: RunVisuals) -> str:
    if not vis.rows:
        return '<p class="note">No gallery (gallery_queries is 0 or no query has a same-class reference).</p>'
    size = vis.options.thumb_size
    dist = "similarity" if vis.metric in ("cosine", "inner_product") else "distance"
    out = ['<div class="gallery">']
    for pos, row in enumerate(vis.rows, 1):
        hit = f"first correct at rank {row.first_hit}" if row.first_hit else "no correct neighbour in the ranked depth"
        head = (f'<div class="ghead"><b>#{pos}</b> query {row.query.index}<br>class '
                f"<code>{escape(row.query.class_name)}</code><br>AP@R {row.ap_at_r:.3f} (R = {row.num_relevant})"
                f"<br>{hit}</div>")
        cells = [head, f'<figure class="thumb query" data-role="query">{_img(F.array_png(row.query.image), "query", "", size)}'
                       f"<figcaption>query</figcaption></figure>", '<div class="sep"></div>']
        for rank, nb in enumerate(row.neighbours, 1):
            cls, mark, word = ("ok", "&#10003;", "correct") if nb.correct else ("bad", "&#10007;", "incorrect")
            alt = f"neighbour {rank}: {word}, class {nb.class_name}"
            cells.append(
                f'<figure class="thumb {cls}" data-correct="{int(bool(nb.correct))}" '
                f'title="class {escape(nb.class_name, quote=True)}, {dist} {nb.distance:.4f}">'
                f"{_img(F.array_png(nb.image), alt, '', size)}"
                f"<figcaption><b>{mark}</b> {rank} &middot; {nb.distance:.3f}</figcaption>"
                f"<figcaption>{escape(nb.class_name)}</figcaption></figure>"
            )
        out.append(f'<div class="grow" data-query="{row.query.index}">{"".join(cells)}</div>')
    out.append("</div>")
    return "".join(out)


def _diagnostics_html(vis: RunVisuals) -> str:
    d = vis.diagnostics
    rho = {k: v for k, v in d.items() if k.startswith("rho@")}
    pi = {k: d[k] for k in ("pi_intra", "pi_inter", "pi_ratio") if k in d}
    parts = []
    if rho:
        cols = sorted(rho, key=lambda k: int(k.split("@")[1]) if k.split("@")[1].lstrip("-").isdigit() else 0)
        parts.append(_table({"ρ (spectral decay)": {**rho, **({"rank": d["rank"]} if "rank" in d else {})}},
                            cols + (["rank"] if "rank" in d else [])))
    if pi:
        parts.append(_table({"π (density)": pi}, list(pi)))
    parts.append(
        '<p class="note">ρ@k = KL(uniform &#8214; normalised singular values of the uncentred test embeddings, '
        "the k-1 largest dropped); ρ@-1 = KL the other way on the whole spectrum. Lower = flatter spectrum, "
        "more directions in use. π = mean intra-class cosine distance / mean distance between class means; "
        f"lower = denser classes relative to their separation (methods.md §1.6). Source: "
        f"{escape(vis.diagnostics_source)}.</p>"
    )
    if vis.spectrum is not None and len(vis.spectrum) > 1:
        parts.append(_img(F.spectrum_png(vis.spectrum), "normalised singular value spectrum"))
    return "".join(parts)


def render_run_html(result: Mapping[str, Any], history: Sequence[Mapping[str, Any]], config: Mapping[str, Any],
                    visuals: RunVisuals | None, *, title: str | None = None) -> str:
    """The run report page as one HTML string (no external resources)."""
    name = str(config.get("name") or "run")
    title = title or f"Run report: {name}"
    test = dict(result.get("test") or {})
    selected = result.get("selected_epoch")
    sel_row = _selected_row(history, selected)
    body = [f"<h1>{escape(title)}</h1>",
            f'<ul class="meta">{"".join(f"<li>{i}</li>" for i in _setup_items(result, config))}</ul>',
            '<nav><a href="#metrics">metrics</a><a href="#curves">training curves</a>'
            '<a href="#gallery">retrieval gallery</a><a href="#map">embedding map</a>'
            '<a href="#diagnostics">diagnostics</a></nav>']

    body.append('<h2 id="metrics">Test metrics (unseen classes, evaluated once)</h2>')
    cols = [c for c in ordered_metric_names(list(test)) if not c.startswith(DIAGNOSTIC_PREFIXES) and c != "rank"]
    body.append(_table({"test": test}, cols))
    if sel_row is not None:
        body.append(f"<p>Selected epoch {escape(str(selected))} (training and validation):</p>")
        body.append(_table({str(selected): sel_row}, [c for c in sel_row if c != "epoch"], first="epoch"))

    body.append('<h2 id="curves">Training curves</h2>')
    select = result.get("selection_metric")
    val_keys = ["val_map@r"] + ([f"val_{select}"] if select and select != "map@r" else [])
    curves = F.training_curves_png(history, selected_epoch=selected if isinstance(selected, int) else None,
                                   val_keys=val_keys)
    if curves is None:
        body.append('<p class="note">No epochs recorded (epochs.csv is empty or missing).</p>')
    else:
        body.append(_img(curves, "training loss and validation MAP@R per epoch"))
        if not any(k.startswith("val_") for r in history for k in r):
            body.append('<p class="note">No validation split: only the loss is drawn.</p>')

    body.append('<h2 id="gallery">Retrieval gallery: the worst queries first</h2>')
    if visuals is None:
        body.append('<p class="note">Not drawn (no best.ckpt).</p>')
    else:
        mode = "leave-one-out within the test split" if visuals.leave_one_out else "queries against the gallery"
        sample = (f"all {visuals.num_pool}" if visuals.num_pool == visuals.num_test
                  else f"a seeded sample of {visuals.num_pool} of the {visuals.num_test}")
        body.append(
            f'<p class="note">{sample} test queries ranked by their AP@R ({mode}, {escape(visuals.metric)} '
            f"distance, ties by index); {visuals.num_lone} lone queries without a same-class reference left out; "
            f"mean AP@R of the ranked queries {visuals.pool_map_at_r:.4f}. Shown: the {len(visuals.rows)} worst "
            f"(lowest AP@R, then latest first correct neighbour), each with its {visuals.options.neighbours} "
            "nearest neighbours; green &#10003; = same class as the query, red &#10007; = another class; the "
            "numbers are rank &middot; distance.</p>")
        body.append(_gallery_html(visuals))

    body.append('<h2 id="map">2-D map of the test embeddings</h2>')
    if visuals is None or visuals.map_xy is None or visuals.map_class_names is None:
        body.append('<p class="note">Not drawn (map_points is 0, too few points, or no best.ckpt).</p>')
    else:
        names = visuals.map_class_names
        n_classes = len(set(names.tolist()))
        title_map = f"{visuals.map_method}: {len(names)} test embeddings of {n_classes} classes"
        ordered = list(dict.fromkeys(names.tolist()))
        body.append(_img(F.embedding_map_png(visuals.map_xy, names, ordered, title=title_map),
                         "2-D map of the test embeddings coloured by class"))
        body.append(f'<p class="note">Method: {escape(visuals.map_method)}. Points: {len(names)} of '
                    f"{visuals.num_test} (classes drawn at random, at most {visuals.options.map_classes or 'all'}; "
                    f"then an even share of each class's points, at most {visuals.options.map_points}); "
                    "one colour per class.</p>")

    body.append('<h2 id="diagnostics">Diagnostics: ρ and π</h2>')
    if visuals is not None:
        body.append(_diagnostics_html(visuals))
    else:
        diag = {k: v for k, v in test.items() if k.startswith(DIAGNOSTIC_PREFIXES)}
        body.append(_table({"test": diag}, list(diag)) if diag else '<p class="note">Not computed.</p>')

    note = f"dmlgen {dmlgen.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}"
    if visuals is not None:
        opts = visuals.options
        note += (f"; gallery {opts.gallery_queries} queries x {opts.neighbours} neighbours from a pool of "
                 f"{opts.query_pool or 'all'}, map {opts.map_points} points / {opts.map_classes or 'all'} classes "
                 f"({opts.map_method}), seed {opts.seed}"
                 + (f"; reused from report_cache.npz: {', '.join(visuals.from_cache)}" if visuals.from_cache else ""))
    body.append(f'<p class="note">Regenerate with <code>dmlgen report RUN_DIR</code>. {escape(note)}.</p>')
    return _page(title, "\n".join(body))


def _markdown_extras(visuals: RunVisuals | None) -> list[str]:
    lines = ["HTML report: [report.html](report.html) (self-contained; adds the training curves, the retrieval "
             "gallery and the 2-D embedding map).", ""]
    if visuals is None:
        return lines
    d = visuals.diagnostics
    diag = {k: v for k, v in d.items() if k.startswith(DIAGNOSTIC_PREFIXES) or k == "rank"}
    if diag:
        lines += ["## Diagnostics (methods.md §1.6)", "", metrics_table({"test": diag}), "",
                  f"Source: {visuals.diagnostics_source}.", ""]
    if visuals.rows:
        lines += [f"## Worst queries ({len(visuals.rows)} of {visuals.num_pool} ranked by AP@R)", "",
                  "| # | query | class | AP@R | R | first correct | neighbours (✓ correct, ✗ incorrect) |",
                  "|---:|---:|---|---:|---:|---:|---|"]
        for pos, row in enumerate(visuals.rows, 1):
            marks = "".join("✓" if nb.correct else "✗" for nb in row.neighbours)
            lines.append(f"| {pos} | {row.query.index} | {row.query.class_name} | {row.ap_at_r:.4f} | "
                         f"{row.num_relevant} | {row.first_hit or '-'} | {marks} |")
        lines.append("")
    return lines


def write_html_report(run_dir: str | Path, result: Mapping[str, Any] | None = None,
                      history: Sequence[Mapping[str, Any]] | None = None, config: Mapping[str, Any] | None = None,
                      *, options: ReportOptions | None = None, device: str = "auto", progress: bool = False,
                      visuals: RunVisuals | None = None) -> Path:
    """Write ``RUN_DIR/report.html``; whatever is not given is read from the run folder
    (``test_metrics.json``, ``epochs.csv``, ``config.yaml``). Returns the path."""
    run = Path(run_dir)
    if result is None or config is None:
        r, h, c = load_run_files(run)
        result, config = result if result is not None else r, config if config is not None else c
        history = history if history is not None else h
    if history is None:
        history = read_epochs_csv(run / "epochs.csv")
    if visuals is None:
        visuals = collect_run_visuals(run, options, test_metrics=dict(result.get("test") or {}), device=device,
                                      progress=progress)
    path = run / HTML_NAME
    try:
        path.write_text(render_run_html(result, history, config, visuals), encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def write_reports(run_dir: str | Path, result: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                  config: Mapping[str, Any], *, html: bool = True, options: ReportOptions | None = None,
                  device: str = "auto", progress: bool = False, strict: bool = True) -> list[Path]:
    """``report.md`` and (with ``html``) ``report.html`` of a run folder; returns the paths written.

    ``strict=False`` (the end of training) turns a failure of the HTML part into a warning on stderr, so a
    finished run keeps its results and report.md; ``dmlgen report RUN_DIR`` retries it.
    """
    run = Path(run_dir)
    md = write_run_report(run, result, history, config)
    if not html:
        return [md]
    try:
        visuals = collect_run_visuals(run, options, test_metrics=dict(result.get("test") or {}), device=device,
                                      progress=progress)
        page = write_html_report(run, result, history, config, visuals=visuals)
    except (DmlgenError, ImportError, OSError) as exc:
        if strict:
            raise
        print(f"warning: report.html not written ({exc}); retry with: dmlgen report {run}", file=sys.stderr)
        return [md]
    md = write_run_report(run, result, history, config, extra=_markdown_extras(visuals))
    return [md, page]


# --------------------------------------------------------------------------- comparison
# Diagnostics and counts are shown, never ranked: lower ρ / π is not uniformly better.
_UNRANKED = DIAGNOSTIC_PREFIXES + ("num_", "rank")


def render_compare_html(results: Mapping[str, Mapping[str, Any]], *,
                        histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                        title: str = "Comparison", notes: Sequence[str] = (),
                        bar_metrics: Sequence[str] = ("map@r", "recall@1")) -> str:
    """A comparison page: one table row per run (best value of each score column in bold), bars of
    ``bar_metrics`` and, with ``histories`` (epochs.csv rows per run), the validation MAP@R and loss curves."""
    columns: list[str] = []
    for metrics in results.values():
        columns.extend(k for k in metrics if k not in columns)
    columns = ordered_metric_names(columns)
    best: dict[str, str] = {}
    for c in columns:
        if c.startswith(_UNRANKED):
            continue
        scored = [(float(m[c]), n) for n, m in results.items()
                  if isinstance(m.get(c), (int, float)) and math.isfinite(float(m[c]))]
        if len(scored) > 1:
            best[c] = max(scored, key=lambda t: t[0])[1]
    body = [f"<h1>{escape(title)}</h1>"]
    if notes:
        body.append(f'<ul class="meta">{"".join(f"<li>{escape(n)}</li>" for n in notes)}</ul>')
    body += ["<h2>Metrics</h2>", _table(results, columns, first="run", best=best),
             '<p class="note">Bold: the highest value of each score column (diagnostics and counts are not '
             "ranked).</p>"]
    bars = [(m, F.metric_bars_png(results, m)) for m in bar_metrics]
    bars = [(m, png) for m, png in bars if png is not None]
    if bars:
        body.append("<h2>Scores</h2>")
        body += [_img(png, f"{m} per run") for m, png in bars]
    if histories:
        curves = [F.curves_overlay_png(histories, "val_map@r", title="validation MAP@R per epoch"),
                  F.curves_overlay_png(histories, "train_loss", title="training loss per epoch")]
        curves = [png for png in curves if png is not None]
        if curves:
            body.append("<h2>Training curves</h2>")
            body += [_img(png, "curves per run") for png in curves]
    body.append(f'<p class="note">dmlgen {dmlgen.__version__}, {escape(time.strftime("%Y-%m-%d %H:%M:%S"))}.</p>')
    return _page(title, "\n".join(body))


def write_compare_report(out_dir: str | Path, results: Mapping[str, Mapping[str, Any]], *,
                         histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                         title: str = "Comparison", notes: Sequence[str] = (),
                         bar_metrics: Sequence[str] = ("map@r", "recall@1"), name: str = HTML_NAME) -> Path:
    """Write ``OUT_DIR/report.html`` (or ``name``) comparing runs: ``results`` maps a run name to its
    metrics (floats, or preformatted strings such as ``"0.512 ± 0.004"``); ``histories`` optionally maps run
    names to their ``epochs.csv`` rows (:func:`read_epochs_csv`). Returns the path."""
    if not results:
        raise DataError("write_compare_report: no runs to compare")
    out = Path(out_dir)
    path = out / name
    try:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(render_compare_html(results, histories=histories, title=title, notes=notes,
                                            bar_metrics=bar_metrics), encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
