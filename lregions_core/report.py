"""The evaluation report: one self-contained ``DIR/report.html`` (plots in ``DIR/report_files/``)
for a batch folder (``index.parquet`` + ``items/``) or an ablation folder (``ablation.parquet`` +
``cells/<cell>/``), local or on any fsspec store (``s3://...``). The page opens straight from
disk, or from a copy of the folder: every link and image is a relative path to a file of the
output folder, the CSS is inline, and nothing is fetched from elsewhere. All text that came from
a manifest or an error message is HTML-escaped.

A batch still running, or killed, has no ``index.parquet`` yet: the report is then made from its
index parts (see :mod:`lregions_core.index`) and shows every row finished so far.
"""

from __future__ import annotations

import html
import io
import json
import math
import numbers
import posixpath
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from lregions_core.index import INDEX, read_index
from lregions_core.metrics import METRICS
from lregions_core.stages import resolve_ref
from lregions_core.store import Store

SCORES = ("text_sim", "image_sim", "loss", "selection_score")
REGION_METHODS = "Proposal family x anchors x mode"
# Axes an ablation grid may vary. A bundle axis's values are named groups of settings (a proposal
# family, an anchor method, a preset's budget, a region-choice method); the report shows the name.
BUNDLE_AXES = ("proposals", "anchors", "budget", "method")
AXES = ("num_anchors", "num_proposals", "mode", "losses", *BUNDLE_AXES, "oracle_noise")
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
.item{margin:1em 0 1.6em}.muted{color:#777}
figure.layer img{background:repeating-conic-gradient(#ccc 0 25%,#fff 0 50%) 0 0/16px 16px}"""


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


class _Folder:
    """One report page's folder (``page``, relative to the output folder's :class:`Store`)
    and the files it may link to. Existence is checked by listing each folder once (one
    request per folder on an object store, not one per image)."""

    def __init__(self, store: Store, page: str = "") -> None:
        self.store, self.page = store, page
        self._listed: dict[str, set[str]] = {}

    def rel(self, path: str) -> str:
        """``path`` (relative to the page's folder) relative to the output folder."""
        return posixpath.normpath(posixpath.join(self.page, path)) if self.page else path

    def link(self, path: Any) -> str | None:
        """``path`` (relative to the page's folder) when it names an existing file of the
        output folder, else None."""
        if not isinstance(path, str) or not path or path.startswith("/") or "://" in path:
            return None
        rel = self.rel(path)
        try:
            self.store.path(rel)  # refuses anything outside the output folder
        except ValueError:
            return None
        folder, name = posixpath.split(rel)
        if folder not in self._listed:
            self._listed[folder] = set(self.store.listdir(folder))
        return posixpath.normpath(path) if name in self._listed[folder] else None

    def read_json(self, path: str) -> dict:
        try:
            return self.store.read_json(self.rel(path))
        except (OSError, ValueError):
            return {}

    def write(self, path: str, data: bytes) -> str:
        return self.store.write_bytes(self.rel(path), data)


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
def _ground_truths(ok: pd.DataFrame) -> str:
    """Which ground truth the background metrics of the ok rows used, with row counts, e.g.
    "target_mask: 2, chosen box (no ground truth): 1" (pie_* metrics need a target_mask,
    box_iou a target_box)."""
    if "ground_truth" not in ok or ok.empty:
        return ""
    names = ok["ground_truth"].map(lambda v: v if isinstance(v, str) and v
                                   else "chosen box (no ground truth)")
    return ", ".join(f"{name}: {n}" for name, n in names.value_counts(sort=False).items())


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
    summary["ground_truth"] = _ground_truths(ok)
    columns = _present(ok, [*SCORES, *METRICS])
    means = pd.DataFrame({
        "metric": columns,
        "mean": [float(pd.to_numeric(ok[c], errors="coerce").mean()) for c in columns],
        "n": [int(pd.to_numeric(ok[c], errors="coerce").notna().sum()) for c in columns],
    })
    # render and edit_scale: what made the final image and how many input pixels each editor
    # pixel covers over the edited region (1.0: the edit is at the photo's own resolution)
    shown = ("id", "prompt", "box", "render", "edit_scale", "ground_truth")
    items = ok[[c for c in shown if c in ok] + columns]
    items = items.reset_index(drop=True)
    failed = frame[frame["status"] != "ok"]
    failed = failed[[c for c in ("row", "id", "image", "error") if c in failed]]
    return {"Summary": pd.DataFrame([summary]), "Metric means": means, "Items": items,
            "Missing metrics": _missing(ok), "Failed rows": failed.reset_index(drop=True)}


def _candidate(folder: _Folder, item: str, i: int, cand: dict, chosen: Any, sel: Any) -> str:
    src = folder.link(resolve_ref("items", item, cand["image"])) if cand.get("image") else None
    scores = cand.get("scores") or {}
    lines = [f"#{i} a{_e(cand.get('anchor'))} p{_e(cand.get('proposal'))}"
             + (" mask" if cand.get("shape") == "mask" else "")
             + (" <b>chosen</b>" if i == chosen else ""),
             f"text {_e(scores.get('text_sim'))} img {_e(scores.get('image_sim'))}",
             f"loss {_e(cand.get('loss'))} sel {_e(sel)}"]
    image = _img(src, f"candidate {i}") if src else '<span class="muted">(no image)</span>'
    klass = "c chosen" if i == chosen else "c"
    return f'<figure class="{klass}">{image}<figcaption>{"<br>".join(lines)}</figcaption></figure>'


def _strip(folder: _Folder, row: pd.Series) -> str:
    """One item: input, overlay, each candidate with its scores, final image."""
    item_id = str(row["id"])
    item = f"items/{item_id}"
    result = folder.read_json(f"{item}/result.json")
    cands = result.get("candidates") or []
    selection = result.get("selection") or []
    chosen = result.get("chosen")
    figures = []
    source = resolve_ref("items", item_id, result["input"]) if result.get("input") else None
    for name, rel in (("input", source), ("overlay (boxes)", f"{item}/overlay.png")):
        src = folder.link(rel)
        if src:
            figures.append(f"<figure>{_img(src, name)}<figcaption>{name}</figcaption></figure>")
    for i, cand in enumerate(cands):
        sel = selection[i] if i < len(selection) else None
        figures.append(_candidate(folder, item_id, i, cand, chosen, sel))
    final = folder.link(row.get("final_path")) or folder.link(f"{item}/final.png")
    if final:
        shape = result.get("shape", "box")
        scale = result.get("edit_scale")
        rendered = (f"<br>{_e(result.get('render'))} render, edit scale {_e(scale)}"
                    if isinstance(scale, numbers.Real) else "")
        figures.append(f"<figure>{_img(final, 'final')}<figcaption>final, {_e(shape)} in box "
                       f"{_e(row.get('box'))}{rendered}</figcaption></figure>")
    layer = folder.link(resolve_ref("items", item_id, result["layer"])) if result.get("layer") \
        else None
    if layer:  # on a checkerboard, so the layer's transparency shows
        figures.append(f'<figure class="layer">{_img(layer, "edit layer")}'
                       f"<figcaption>edit layer (RGBA)</figcaption></figure>")
    for anchor, why in (result.get("mask_fallbacks") or {}).items():
        figures.append(f'<p class="muted">anchor {_e(anchor)}: {_e(why)}</p>')
    manifest = result.get("manifest_row") or {}
    source = row.get("source") if isinstance(row.get("source"), str) else manifest.get("source")
    return (f'<div class="item" id="item-{_e(row["id"])}"><h3>{_e(row["id"])}</h3>'
            f"<p>prompt: <b>{_e(row.get('prompt'))}</b>; source: {_e(source)}; "
            f"image: {_e(row.get('image'))}; ground truth: {_e(row.get('ground_truth'))}</p>"
            f'<div class="strip">{"".join(figures)}</div></div>')


def _batch_page(folder: _Folder, frame: pd.DataFrame, title: str) -> str:
    tables = _batch_tables(frame)
    body = [f"<h1>lregions batch report: {_e(title)}</h1>"]
    if (frame.get("metrics_weights", pd.Series(dtype=object)) == "random").any():
        body.append(f'<div class="banner">{_e(RANDOM_BANNER)}</div>')
    body += ["<h2>Summary</h2>", _table(tables["Summary"])]
    if len(tables["Missing metrics"]):
        body += ["<h3>Missing metrics (ok rows)</h3>", _table(tables["Missing metrics"])]
    body += ["<h2>Metrics (mean over ok rows)</h2>", _table(tables["Metric means"]),
             "<h2>Per item</h2>", _table(tables["Items"], {"id": lambda v: "#item-" + _href(v)}),
             "<h2>Items</h2>"]
    ok = frame[frame["status"] == "ok"]
    body += [_strip(folder, row) for _, row in ok.head(MAX_STRIPS).iterrows()]
    if len(ok) > MAX_STRIPS:
        body.append(f'<p class="muted">{len(ok) - MAX_STRIPS} more items not drawn.</p>')
    body.append("<h2>Failed rows</h2>")
    failed = tables["Failed rows"]
    body.append(_table(failed) if len(failed) else '<p class="muted">none</p>')
    return _page(f"lregions report: {title}", body)


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
    keys = [a for a in ("proposals", "anchors", "oracle_noise") if a in table]
    if keys:  # region methods side by side: every cell's mean, one row per family and anchors
        keys += [a for a in ("mode",) if a in table]
        metrics = _present(table, ["box_iou", "text_sim", "editor_requests"])
        by = table.groupby(keys, dropna=False)[metrics].mean(numeric_only=True).reset_index()
        out[REGION_METHODS] = by
        out[REGION_METHODS].attrs["note"] = "means over the other axes"
    return out


def _figure(width: float, height: float, panels: int = 1) -> tuple[Any, list[Any]]:
    """A matplotlib figure on the Agg canvas, outside pyplot's global state (nothing to leak)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _save(fig: Any, folder: _Folder, name: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    fig.clear()
    folder.write(f"{FILES}/{name}", buffer.getvalue())
    return f"{FILES}/{name}"


def _heatmaps(folder: _Folder, tables: dict[str, pd.DataFrame]) -> str | None:
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
    return _save(fig, folder, "anchors_proposals.png")


def _bars(folder: _Folder, frame: pd.DataFrame, key: str, name: str, title: str) -> str | None:
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
    return _save(fig, folder, name)


def _cost_curve(folder: _Folder, table: pd.DataFrame) -> str | None:
    """Every cell's mean box IoU against its mean editor calls per row: the region methods'
    quality for their cost, in one plot."""
    needed = {"box_iou", "editor_requests", "cell"}
    if not needed <= set(table.columns) or not table["box_iou"].notna().any():
        return None
    points = table.dropna(subset=["box_iou", "editor_requests"])
    fig, (ax,) = _figure(7.5, 4.8)
    ax.scatter(points["editor_requests"].astype(float), points["box_iou"].astype(float), s=22)
    for _, row in points.iterrows():
        ax.annotate(str(row["cell"]), (float(row["editor_requests"]), float(row["box_iou"])),
                    fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="editor calls per row (log)", ylabel="box IoU with the target",
           title="box IoU against editor calls, one point per cell")
    ax.grid(alpha=0.3)
    return _save(fig, folder, "iou_vs_calls.png")


def _ablation_page(folder: _Folder, table: pd.DataFrame, title: str) -> str:
    tables = _ablation_tables(table)
    ok = int(table.get("ok", pd.Series(dtype=int)).sum())
    failed = int(table.get("failed", pd.Series(dtype=int)).sum())
    body = [f"<h1>lregions ablation report: {_e(title)}</h1>",
            f"<p>{len(table)} cells, {ok} ok rows, {failed} failed rows.</p>"]
    cells = table.copy()
    for column in ("text_sim", "image_sim", "loss", "editor_requests", *METRICS):
        if column in cells and not cells[column].notna().any():
            cells = cells.drop(columns=column)
    reports = set()
    for cell in table.get("cell", []):
        try:
            _write(folder.store, folder.rel(f"cells/{cell}"))
            reports.add(cell)
        except FileNotFoundError:
            pass  # the cell has no index yet
        except (OSError, ValueError, KeyError) as exc:
            body.append(f'<p class="err">cell {_e(cell)}: report not written: {_e(exc)}</p>')
    link = {"cell": lambda v: _href("cells", v, "report.html") if v in reports else None}
    body += ["<h2>Cells (means over ok rows; each links to its own report)</h2>",
             _table(cells, link)]
    heat = _heatmaps(folder, tables)
    grids = [k for k in tables if k.startswith("Anchors x")]
    if grids:
        note = tables[grids[0]].attrs.get("note", "")
        body.append(f"<h2>Anchors x proposals</h2><p class='muted'>{_e(note)}</p>")
        body += [f"<h3>{_e(k.split(': ', 1)[1])}</h3>" + _table(tables[k]) for k in grids]
        body.append(_img(heat, "anchors x proposals heatmaps") if heat else "")
    curve = _cost_curve(folder, table)
    if curve:
        body += ["<h2>Box IoU against editor calls</h2>", _img(curve, "box IoU against calls")]
    if REGION_METHODS in tables:
        body += [(f"<h2>{REGION_METHODS}</h2>"
                  f"<p class='muted'>{_e(tables[REGION_METHODS].attrs['note'])}</p>"),
                 _table(tables[REGION_METHODS])]
    for heading, key, name in (("Learned vs random regions", "mode", "modes.png"),
                               ("Loss terms", "losses", "losses.png")):
        if heading in tables:
            bar = _bars(folder, tables[heading], key, name, heading.lower())
            body += [f"<h2>{heading}</h2><p class='muted'>{_e(tables[heading].attrs['note'])}</p>",
                     _table(tables[heading]), _img(bar, f"{heading}: box IoU") if bar else ""]
    return _page(f"lregions ablation: {title}", body)


# -- entry points -------------------------------------------------------------------------------
ABLATION = "ablation.parquet"


def _frame(store: Store, folder: str) -> tuple[str, pd.DataFrame]:
    """("ablation", its table) or ("batch", its index, partial while a run is unfinished)."""
    rel = posixpath.join(folder, ABLATION) if folder else ABLATION
    if store.exists(rel):
        return "ablation", store.read_parquet(rel)
    try:
        return "batch", read_index(store, folder)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{store.url_of(folder)} has no {INDEX}, index parts or {ABLATION}") from None


def summary_tables(out_dir: str) -> dict[str, pd.DataFrame]:
    """The report's summary tables by title (plain column/row frames, ready for ``to_json``).

    Batch folder: Summary, Metric means, Items, Missing metrics, Failed rows. Ablation folder:
    Cells, one "Anchors x proposals: <metric>" table per similarity metric, "Learned vs random
    regions" and (when the loss terms vary) "Loss terms".
    """
    kind, frame = _frame(Store(str(out_dir)), "")
    return _ablation_tables(frame) if kind == "ablation" else _batch_tables(frame)


def _write(store: Store, folder: str) -> str:
    kind, frame = _frame(store, folder)
    page_folder = _Folder(store, folder)
    title = posixpath.basename(store.path(folder))
    page = (_ablation_page(page_folder, frame, title) if kind == "ablation"
            else _batch_page(page_folder, frame, title))
    page_folder.write("report.html", page.encode("utf-8"))
    return store.url_of(page_folder.rel("report.html"))


def write_report(out_dir: str) -> str:
    """Write ``out_dir/report.html`` (and its plots under ``out_dir/report_files/``) for a batch
    or ablation folder, local or an fsspec URL; an ablation also gets one report per cell (make
    those from the ablation's folder: their images live in its shared cache). Returns the page's
    path or URL.

    Raises FileNotFoundError when the folder holds no index (merged or partial) and no
    ``ablation.parquet``.
    """
    return _write(Store(str(out_dir)), "")
