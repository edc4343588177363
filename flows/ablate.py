"""Ablation grid: the batch stages for every cell of a grid over anchors, proposals, mode and loss
terms. Cells share one cache, so each image's DINO features are computed once for the whole grid
(and a cell that differs only in selection or evaluation settings reuses the edits).

Grid file (YAML)::

    preset: oracle            # base preset (the command's --preset wins when given)
    set: {iterations: 10}     # base overrides
    grid:
      num_anchors: [4, 8]
      num_proposals: [4, 7]
      mode: [rgn, dino-random, random, exhaustive]
      losses: [clip+dir+str, clip]   # loss terms switched on (others get weight 0)
      oracle_noise: [0.0, 0.1]       # the oracle judge's noise (oracle preset only)
      # Named bundles of settings: a proposal family and an anchor method per value.
      proposals:
        - {name: square, proposal_aspects: [1], proposal_spacing: linear}
        - {name: fit-3, proposal_aspects: [0.333, 1, 3], proposal_spacing: geometric}
      anchors:
        - {name: nms, anchor_rule: nms, anchor_refine: false}
        - {name: peaks, anchor_rule: peaks, anchor_refine: true}
"""

from __future__ import annotations

import itertools
import re
import time
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.batch_edit import hold_output, publish_report
from flows.chunks import run_chunks
from lregions_core import index
from lregions_core.config import ConfigError, make_config
from lregions_core.lease import Lease
from lregions_core.manifest import read_manifest
from lregions_core.metrics import METRICS
from lregions_core.report import AXES, BUNDLE_AXES
from lregions_core.store import Store

LOSS_TERMS = ("clip", "dir", "str")
SHORT = {"num_anchors": "a", "num_proposals": "p", "mode": "", "losses": "L-", "proposals": "P-",
         "anchors": "A-", "budget": "B-", "method": "M-", "oracle_noise": "n"}


def load_grid(path: str) -> dict:
    """Read and check a grid file; problems are usage errors (ConfigError)."""
    import fsspec
    import yaml

    try:
        with fsspec.open(path, "r", encoding="utf-8") as handle:
            grid = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read grid {path}: {exc}") from None
    if not isinstance(grid, dict) or not isinstance(grid.get("grid"), dict) or not grid["grid"]:
        raise ConfigError(f"grid {path}: expected a mapping with a non-empty 'grid' mapping")
    unknown = sorted(set(grid["grid"]) - set(AXES))
    if unknown:
        raise ConfigError(f"grid {path}: unknown axes {unknown}; use {list(AXES)}")
    for axis, values in grid["grid"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid {path}: axis {axis!r} needs a non-empty list")
    for axis in BUNDLE_AXES:
        names = []
        for value in grid["grid"].get(axis, []):
            if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not (
                set(value) - {"name"}
            ):
                raise ConfigError(f"grid {path}: each {axis!r} value needs a name and settings, "
                                  f"got {value!r}")
            clash = sorted((set(value) - {"name"}) & set(grid["grid"]))
            if clash:
                raise ConfigError(f"grid {path}: {axis} {value['name']!r} sets {clash}, "
                                  "which are axes of their own")
            names.append(value["name"])
        if len(set(names)) < len(names):
            raise ConfigError(f"grid {path}: {axis} names must be distinct, got {names}")
    for losses in grid["grid"].get("losses", []):
        terms = str(losses).split("+")
        if not terms or any(t not in LOSS_TERMS for t in terms):
            raise ConfigError(f"grid {path}: losses {losses!r} must join {LOSS_TERMS} with '+'")
    return grid


def cells(grid: dict) -> list[dict[str, Any]]:
    axes = list(grid["grid"])
    return [dict(zip(axes, values)) for values in itertools.product(*grid["grid"].values())]


def cell_overrides(cell: dict[str, Any]) -> dict[str, Any]:
    """The settings one cell changes: plain axes as they are, loss terms as weights, bundles
    (a proposal family, an anchor method, a budget, a method) as their settings."""
    changes = {k: v for k, v in cell.items() if k != "losses" and k not in BUNDLE_AXES}
    for axis in BUNDLE_AXES:
        if axis in cell:
            changes.update({k: v for k, v in cell[axis].items() if k != "name"})
    if "losses" in cell:
        terms = str(cell["losses"]).split("+")
        changes.update({f"w_{t}": 1.0 if t in terms else 0.0 for t in LOSS_TERMS})
    return changes


def cell_id(cell: dict[str, Any]) -> str:
    text = "_".join(f"{SHORT[k]}{v['name'] if k in BUNDLE_AXES else v}" for k, v in cell.items())
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


@flow(name="lregions-ablate", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def ablate(
    manifest: str,
    out: str,
    grid: dict,
    preset: str | None = None,
    sets: list[str] | None = None,
    chunk_size: int = 8,
    report: bool = True,
    wait_lock: float = 0.0,
) -> dict:
    """Run every cell of ``grid`` over ``manifest``; write ``OUT/ablation.parquet`` (cell x
    metric means) and each cell's ``OUT/cells/<cell>/index.parquet``. The whole grid runs under
    the output folder's lease: another run holding ``out`` makes this one fail at once, or after
    waiting ``wait_lock`` seconds."""
    started = time.perf_counter()
    rows = read_manifest(manifest)
    with hold_output(out, wait_lock) as held:
        return _run_grid(rows, out, grid, preset, sets, chunk_size, report, held, started)


def _run_grid(rows: list, out: str, grid: dict, preset: str | None, sets: list[str] | None,
              chunk_size: int, report: bool, held: Lease, started: float) -> dict:
    """The cells of :func:`ablate`, one after the other, under its lease ``held``."""
    import pandas as pd

    store = Store(out)
    table = []
    for cell in cells(grid):
        config = make_config(preset or grid.get("preset", "default"),
                             {**grid.get("set", {}), **cell_overrides(cell)}, sets or [])
        name = cell_id(cell)
        folder = f"cells/{name}"
        run_id, done = index.begin_run(store, folder,
                                       index.fingerprint(rows, config, chunk_size=chunk_size))
        run_chunks(rows, config, out, run_id=run_id, folder=folder, items=f"{folder}/items",
                   chunk_size=chunk_size, done_parts=done)
        held.check()
        index.merge(store, folder, run_id)
        frame = index.read_index(store, folder)
        ok = frame[frame["status"] == "ok"]
        means = {m: float(ok[m].mean()) if ok[m].notna().any() else None
                 for m in ["text_sim", "image_sim", "loss", "editor_requests", *METRICS]}
        table.append({"cell": name, "num_anchors": config.num_anchors,
                      "num_proposals": config.num_proposals, "mode": config.mode,
                      "losses": "+".join(t for t in LOSS_TERMS if getattr(config, f"w_{t}") > 0),
                      **{axis: cell[axis]["name"] for axis in BUNDLE_AXES if axis in cell},
                      **({"oracle_noise": config.oracle_noise} if "oracle_noise" in cell else {}),
                      "rows": len(frame), "ok": len(ok), "failed": len(frame) - len(ok),
                      "reused": int(frame["reused"].sum()),
                      "config_hash": config.digest(), **means})
        print(f"cell {name}: {len(ok)}/{len(frame)} ok")
    store.write_parquet("ablation.parquet", pd.DataFrame(table))
    summary = {"cells": len(table), "rows": len(rows) * len(table),
               "ok": int(sum(c["ok"] for c in table)),
               "failed": int(sum(c["failed"] for c in table)),
               "reused": int(sum(c["reused"] for c in table)),
               "seconds": round(time.perf_counter() - started, 2),
               "table": store.url_of("ablation.parquet")}
    if report:
        summary["report"] = publish_report(out, summary)
    return summary
