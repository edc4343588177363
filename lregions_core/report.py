"""The evaluation report: one self-contained ``DIR/report.html`` (plots in ``DIR/report_files/``)
for a batch folder (``index.parquet`` + ``items/``) or an ablation folder (``ablation.parquet`` +
``cells/<cell>/``). The page opens straight from disk: every link and image is a relative path
inside the folder, the CSS is inline, and nothing is fetched from elsewhere. All text that came
from a manifest or an error message is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from lregions_core.metrics import METRICS

SCORES = ("text_sim", "image_sim", "loss", "selection_score")
AXES = ("num_anchors", "num_proposals", "mode", "losses")  # an ablation grid's axes
MODE_ORDER = ("rgn", "exhaustive", "dino-random", "random")
RANDOM_BANNER = "metrics computed with RANDOM weights (tiny preset): numbers are meaningless"
MAX_STRIPS = 500  # items drawn with their images; the per-item table always lists every row
FILES = "report_files"
CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#c62828;color:#fff;padding:.6em 1em;font-weight:bold;margin:.8em 0}
.strip{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}
figure{margin:0;padding:3px;border:1px solid #ddd;font-size:11px;text-align:center}
figure img{display:block;height:160px}figure.c img{height:96px;image-rendering:pixelated}
figure.chosen{outline:3px solid #d22;background:#fff0f0}.err{color:#b00}
.item{margin:1em 0 1.6em}.muted{color:#777}"""


# -- small helpers ------------------------------------------------------------------------------
def _e(value: Any) -> str:
    """HTML-escaped text; missing values as an en dash."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value), quote=True)


def _href(*parts: str) -> str:
    """A relative URL from path segments, escaped for an HTML attribute."""
    return html.escape("/".join(quote(str(p), safe="") for p in parts), quote=True)


def _local(out_dir: str | Path) -> Path:
    """The folder as a local path; remote fsspec URLs cannot hold a page opened from disk."""
    text = str(out_dir)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise OSError(f"the HTML report needs a local folder, not {text}")
    return Path(text)


def _inside(root: Path, rel: Any) -> str | None:
    """``rel`` as a POSIX path when it names an existing file inside ``root``, else None."""
    if not isinstance(rel, str) or not rel or rel.startswith("/"):
        return None
    target = (root / rel).resolve()
    if not target.is_file() or root.resolve() not in target.parents:
        return None
    return target.relative_to(root.resolve()).as_posix()


def _img(src: str, alt: str) -> str:
    """An image at a relative POSIX path (percent-encoded, then attribute-escaped)."""
    return f'<img src="{html.escape(quote(src, safe="/"), quote=True)}" alt="{_e(alt)}">'


def _present(frame: pd.DataFrame, columns: tuple[str, ...] | list[str]) -> list[str]:
    """Those of ``columns`` that ``frame`` has with at least one number."""
    return [c for c in columns if c in frame.columns
            and pd.to_numeric(frame[c], errors="coerce").notna().any()]


def _table(frame: pd.DataFrame, links: dict[str, Any] | None = None) -> str:
    """``frame`` as an HTML table; ``links`` maps a column to ``value -> relative href``
    (already escaped) or None for no link."""
    links = links or {}
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, record):
            numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
            text, href = _e(value), links[column](value) if column in links else None
            if href:
                text = f'<a href="{href}">{text}</a>'
            cells.append(f'<td class="n">{text}</td>' if numeric else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _missing(frame: pd.DataFrame) -> pd.DataFrame:
    """Why metrics are missing (the ``metrics_missing`` JSON of ``frame``): reason, metrics, rows."""
    found: dict[tuple[str, str], int] = {}
    for raw in frame.get("metrics_missing", pd.Series(dtype=object)).dropna():
        try:
            missing = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (ValueError, TypeError):
            missing = {"(unreadable)": str(raw)}
        for metric, reason in (missing or {}).items():
            found[(str(metric), str(reason))] = found.get((str(metric), str(reason)), 0) + 1
    groups: dict[tuple[str, int], list[str]] = {}
    for (metric, reason), rows in sorted(found.items()):
        groups.setdefault((reason, rows), []).append(metric)
    return pd.DataFrame([{"reason": r, "metrics": ", ".join(m), "rows": n}
                         for (r, n), m in groups.items()], columns=["reason", "metrics", "rows"])


# -- batch folders ------------------------------------------------------------------------------
def _batch_tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    ok = frame[frame["status"] == "ok"]
    summary = {
        "rows": len(frame), "ok": len(ok), "failed": len(frame) - len(ok),
        "reused": int(frame["reused"].eq(True).sum()) if "reused" in frame else 0,
        "config_hash": ", ".join(sorted({str(h) for h in frame.get("config_hash", [])
                                         if isinstance(h, str)})),
        "metrics_weights": ", ".join(sorted({str(w) for w in frame.get("metrics_weights", [])
                                             if isinstance(w, str)})),
    }
    columns = _present(ok, [*SCORES, *METRICS])
    means = pd.DataFrame({
        "metric": columns,
        "mean": [float(pd.to_numeric(ok[c], errors="coerce").mean()) for c in columns],
        "n": [int(pd.to_numeric(ok[c], errors="coerce").notna().sum()) for c in columns],
    })
    items = ok[[c for c in ("id", "prompt", "box") if c in ok] + columns].reset_index(drop=True)
    failed = frame[frame["status"] != "ok"]
    failed = failed[[c for c in ("row", "id", "image", "error") if c in failed]]
    return {"Summary": pd.DataFrame([summary]), "Metric means": means, "Items": items,
            "Missing metrics": _missing(ok), "Failed rows": failed.reset_index(drop=True)}


def _candidate(root: Path, item: str, i: int, cand: dict, chosen: Any, sel: Any) -> str:
    src = _inside(root, f"{item}/candidates/{i:02d}.png")
    scores = cand.get("scores") or {}
    lines = [f"#{i} a{_e(cand.get('anchor'))} p{_e(cand.get('proposal'))}"
             + (" <b>chosen</b>" if i == chosen else ""),
             f"text {_e(scores.get('text_sim'))} img {_e(scores.get('image_sim'))}",
             f"loss {_e(cand.get('loss'))} sel {_e(sel)}"]
    image = _img(src, f"candidate {i}") if src else '<span class="muted">(no image)</span>'
    klass = "c chosen" if i == chosen else "c"
    return f'<figure class="{klass}">{image}<figcaption>{"<br>".join(lines)}</figcaption></figure>'


def _strip(root: Path, row: pd.Series) -> str:
    """One item: input, overlay, each candidate with its scores, final image."""
    item = f"items/{row['id']}"
    try:
        result = json.loads((root / item / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = {}
    cands = result.get("candidates") or [{} for _ in (root / item / "candidates").glob("*.png")]
    selection = result.get("selection") or []
    chosen = result.get("chosen")
    figures = []
    for name, rel in (("input", f"{item}/input.png"), ("overlay (boxes)", f"{item}/overlay.png")):
        src = _inside(root, rel)
        if src:
            figures.append(f"<figure>{_img(src, name)}<figcaption>{name}</figcaption></figure>")
    for i, cand in enumerate(cands):
        sel = selection[i] if i < len(selection) else None
        figures.append(_candidate(root, item, i, cand, chosen, sel))
    final = _inside(root, row.get("final_path")) or _inside(root, f"{item}/final.png")
    if final:
        figures.append(f"<figure>{_img(final, 'final')}<figcaption>final, box "
                       f"{_e(row.get('box'))}</figcaption></figure>")
    manifest = result.get("manifest_row") or {}
    source = row.get("source") if isinstance(row.get("source"), str) else manifest.get("source")
    return (f'<div class="item" id="item-{_e(row["id"])}"><h3>{_e(row["id"])}</h3>'
            f"<p>prompt: <b>{_e(row.get('prompt'))}</b>; source: {_e(source)}; "
            f"image: {_e(row.get('image'))}</p>"
            f'<div class="strip">{"".join(figures)}</div></div>')


def _batch_page(root: Path, frame: pd.DataFrame) -> str:
    tables = _batch_tables(frame)
    body = [f"<h1>lregions batch report: {_e(root.name)}</h1>"]
    if (frame.get("metrics_weights", pd.Series(dtype=object)) == "random").any():
        body.append(f'<div class="banner">{_e(RANDOM_BANNER)}</div>')
    body += ["<h2>Summary</h2>", _table(tables["Summary"])]
    if len(tables["Missing metrics"]):
        body += ["<h3>Missing metrics (ok rows)</h3>", _table(tables["Missing metrics"])]
    body += ["<h2>Metrics (mean over ok rows)</h2>", _table(tables["Metric means"]),
             "<h2>Per item</h2>", _table(tables["Items"], {"id": lambda v: "#item-" + _href(v)}),
             "<h2>Items</h2>"]
    ok = frame[frame["status"] == "ok"]
    body += [_strip(root, row) for _, row in ok.head(MAX_STRIPS).iterrows()]
    if len(ok) > MAX_STRIPS:
        body.append(f'<p class="muted">{len(ok) - MAX_STRIPS} more items not drawn.</p>')
    body.append("<h2>Failed rows</h2>")
    failed = tables["Failed rows"]
    body.append(_table(failed) if len(failed) else '<p class="muted">none</p>')
    return _page(f"lregions report: {root.name}", body)


# -- ablation folders ---------------------------------------------------------------------------
def _full_losses(table: pd.DataFrame) -> str | None:
    """The loss setting with the most terms (the paper's full objective)."""
    values = [v for v in table.get("losses", pd.Series(dtype=object)).dropna().unique()]
    return max(values, key=lambda v: len(str(v).split("+"))) if values else None


def _subset(table: pd.DataFrame, axis: str) -> tuple[pd.DataFrame, str]:
    """The cells that compare fairly along ``axis`` ("grid", "mode" or "losses"): the learned mode
    and the full loss set unless that is the axis, then only settings run for every ``axis``
    value. Returns them with a note saying what was fixed."""
    notes = []
    if axis != "mode" and "mode" in table and table["mode"].nunique() > 1 and (
        "rgn" in set(table["mode"])
    ):
        table, notes = table[table["mode"] == "rgn"], notes + ["mode = rgn"]
    full = _full_losses(table)
    if axis != "losses" and full is not None and table["losses"].nunique() > 1:
        table, notes = table[table["losses"] == full], notes + [f"losses = {full}"]
    others = [a for a in AXES if a in table and a != axis]
    if axis in table and others:
        counts = table.groupby(others, dropna=False)[axis].transform("nunique")
        if (counts == table[axis].nunique()).any() and (counts < table[axis].nunique()).any():
            table = table[counts == table[axis].nunique()]
            notes.append(f"only settings run for every {axis}")
    return table, ("; ".join(notes) or "all cells")


def _pair(table: pd.DataFrame) -> list[str]:
    """Text/image similarity columns: the CLIP metrics when present, else the edit's scores."""
    clip = _present(table, ["clip_text_image", "clip_image_image"])
    return clip if clip else _present(table, ["text_sim", "image_sim"])


def _ablation_tables(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out: dict[str, pd.DataFrame] = {"Cells": table.reset_index(drop=True)}
    grid, note = _subset(table, "grid")
    if {"num_anchors", "num_proposals"} <= set(grid.columns) and (
        grid["num_anchors"].nunique() > 1 or grid["num_proposals"].nunique() > 1
    ):
        for metric in _pair(grid):
            pivot = grid.pivot_table(index="num_anchors", columns="num_proposals", values=metric,
                                     aggfunc="mean")
            pivot.columns = [f"proposals={c}" for c in pivot.columns]
            out[f"Anchors x proposals: {metric}"] = pivot.reset_index()
            out[f"Anchors x proposals: {metric}"].attrs["note"] = note
    for axis, title in (("mode", "Learned vs random regions"), ("losses", "Loss terms")):
        if axis not in table or (axis == "losses" and table[axis].nunique() < 2):
            continue
        cells, note = _subset(table, axis)
        metrics = _present(cells, ["box_iou", "text_sim", "image_sim", *_pair(cells), "loss"])
        by = cells.groupby(axis)[list(dict.fromkeys(metrics))].mean(numeric_only=True)
        order = [m for m in MODE_ORDER if m in by.index] + sorted(set(by.index) - set(MODE_ORDER))
        out[title] = (by.loc[order] if axis == "mode" else by).reset_index()
        out[title].attrs["note"] = note
    return out


def _figure(width: float, height: float, panels: int = 1) -> tuple[Any, list[Any]]:
    """A matplotlib figure on the Agg canvas, outside pyplot's global state (nothing to leak)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _save(fig: Any, root: Path, name: str) -> str:
    (root / FILES).mkdir(exist_ok=True)
    fig.savefig(root / FILES / name, format="png")
    fig.clear()
    return f"{FILES}/{name}"


def _heatmaps(root: Path, tables: dict[str, pd.DataFrame]) -> str | None:
    grids = {k.split(": ", 1)[1]: v for k, v in tables.items() if k.startswith("Anchors x")}
    if not grids:
        return None
    fig, axes = _figure(4.2 * len(grids), 3.4, len(grids))
    for ax, (metric, pivot) in zip(axes, grids.items()):
        values = pivot.drop(columns="num_anchors").to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
        ax.set_xticks(range(values.shape[1]), [c.split("=")[1] for c in pivot.columns[1:]])
        ax.set_yticks(range(values.shape[0]), [str(v) for v in pivot["num_anchors"]])
        ax.set(xlabel="proposals", ylabel="anchors", title=metric)
        for (y, x), v in np.ndenumerate(values):
            if np.isfinite(v):
                dark = image.norm(v) < 0.6
                ax.text(x, y, f"{v:.3g}", ha="center", va="center", fontsize=9,
                        color="w" if dark else "k")
        fig.colorbar(image, ax=ax)
    return _save(fig, root, "anchors_proposals.png")


def _bars(root: Path, frame: pd.DataFrame, key: str, name: str, title: str) -> str | None:
    metrics = [c for c in ("box_iou", "text_sim") if c in frame and frame[c].notna().any()]
    if not metrics or frame.empty:
        return None
    fig, (ax,) = _figure(1.2 + 1.3 * len(frame), 3.2)
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(frame))]
        ax.bar(xs, frame[metric].astype(float), width, label=metric)
    ax.set_xticks(range(len(frame)), [str(v) for v in frame[key]])
    ax.axhline(0, color="k", linewidth=0.6)
    ax.set(title=title, xlabel=key)
    ax.legend(fontsize=8)
    return _save(fig, root, name)


def _ablation_page(root: Path, table: pd.DataFrame) -> str:
    tables = _ablation_tables(table)
    ok = int(table.get("ok", pd.Series(dtype=int)).sum())
    failed = int(table.get("failed", pd.Series(dtype=int)).sum())
    body = [f"<h1>lregions ablation report: {_e(root.name)}</h1>",
            f"<p>{len(table)} cells, {ok} ok rows, {failed} failed rows.</p>"]
    cells = table.copy()
    for column in ("text_sim", "image_sim", "loss", "editor_requests", *METRICS):
        if column in cells and not cells[column].notna().any():
            cells = cells.drop(columns=column)
    reports = set()
    for cell in table.get("cell", []):
        if (root / "cells" / str(cell) / "index.parquet").is_file():
            try:
                write_report(root / "cells" / str(cell))
                reports.add(cell)
            except (OSError, ValueError, KeyError) as exc:
                body.append(f'<p class="err">cell {_e(cell)}: report not written: {_e(exc)}</p>')
    link = {"cell": lambda v: _href("cells", v, "report.html") if v in reports else None}
    body += ["<h2>Cells (means over ok rows; each links to its own report)</h2>",
             _table(cells, link)]
    heat = _heatmaps(root, tables)
    grids = [k for k in tables if k.startswith("Anchors x")]
    if grids:
        note = tables[grids[0]].attrs.get("note", "")
        body.append(f"<h2>Anchors x proposals</h2><p class='muted'>{_e(note)}</p>")
        body += [f"<h3>{_e(k.split(': ', 1)[1])}</h3>" + _table(tables[k]) for k in grids]
        body.append(_img(heat, "anchors x proposals heatmaps") if heat else "")
    for title, key, name in (("Learned vs random regions", "mode", "modes.png"),
                             ("Loss terms", "losses", "losses.png")):
        if title in tables:
            bar = _bars(root, tables[title], key, name, title.lower())
            body += [f"<h2>{title}</h2><p class='muted'>{_e(tables[title].attrs['note'])}</p>",
                     _table(tables[title]), _img(bar, f"{title}: box IoU") if bar else ""]
    return _page(f"lregions ablation: {root.name}", body)


# -- entry points -------------------------------------------------------------------------------
def summary_tables(out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The report's summary tables by title (plain column/row frames, ready for ``to_json``).

    Batch folder: Summary, Metric means, Items, Missing metrics, Failed rows. Ablation folder: Cells, one
    "Anchors x proposals: <metric>" table per similarity metric, "Learned vs random regions" and
    (when the loss terms vary) "Loss terms".
    """
    root = _local(out_dir)
    if (root / "ablation.parquet").is_file():
        return _ablation_tables(pd.read_parquet(root / "ablation.parquet"))
    return _batch_tables(pd.read_parquet(root / "index.parquet"))


def write_report(out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` (and its plots under ``out_dir/report_files/``) for a batch
    or ablation folder; an ablation also gets one report per cell. Returns the page's path.

    Raises OSError for a remote (non-``file://``) folder and FileNotFoundError when the folder
    holds neither ``index.parquet`` nor ``ablation.parquet``.
    """
    root = _local(out_dir)
    if (root / "ablation.parquet").is_file():
        page = _ablation_page(root, pd.read_parquet(root / "ablation.parquet"))
    elif (root / "index.parquet").is_file():
        page = _batch_page(root, pd.read_parquet(root / "index.parquet"))
    else:
        raise FileNotFoundError(f"{root} has no index.parquet or ablation.parquet")
    target = root / "report.html"
    tmp = root / f".report.html.{os.getpid()}.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target
