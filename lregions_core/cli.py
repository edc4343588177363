"""``lregions``: command line of the library.

``lregions edit-image IMAGE PROMPT --out DIR``  one edit, with every candidate and a result.json
``lregions presets``                            the presets and what they set
``lregions download --preset NAME``             fetch every weight a preset needs (for offline nodes)

Exit status: 0 success, 1 the work failed (unreadable image, missing weights), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lregions_core.config import ConfigError, load_preset, make_config, preset_names


def _cmd_edit_image(args: argparse.Namespace) -> int:
    from lregions_core.images import load_image
    from lregions_core.pipeline import edit_image
    from lregions_core.store import Store

    config = make_config(args.preset, {"mode": args.mode} if args.mode else None, args.set)
    image = load_image(args.image)
    result = edit_image(
        image, args.prompt, source_prompt=args.source, config=config, seed=args.seed
    )
    out = Store(args.out)  # every file written atomically
    for i, cand in enumerate(result.candidates):
        out.write_png(f"candidates/{i:02d}.png", cand.image)
    out.write_png("final.png", result.image)
    record = {
        "image": args.image,
        "prompt": args.prompt,
        "source": args.source,
        "seed": config.seed if args.seed is None else args.seed,
        "preset": args.preset,
        "config": config.to_dict(),
        "config_hash": config.digest(),
        **result.summary(),
    }
    out.write_json("result.json", record)
    print(
        f"box {result.box} from anchor {record['anchor']}, {result.editor_requests} edits "
        f"({result.denoise_steps} denoising steps) -> {out.path('final.png')}"
    )
    return 0


def prefect_defaults() -> None:
    """Settings that make Prefect's temporary local server start reliably on a fresh, offline
    machine (see shared/docs/ENVIRONMENT.md); a user's own settings win."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _cmd_edit(args: argparse.Namespace) -> int:
    """The batch pipeline (a Prefect flow; the application around this library)."""
    from lregions_core.manifest import read_manifest

    make_config(args.preset, {"mode": args.mode} if args.mode else None, args.set)  # usage check
    total = len(read_manifest(args.manifest))  # usage errors before any work
    prefect_defaults()
    from rich.progress import Progress

    from flows.batch_edit import batch_edit
    from tasks.stages import PROGRESS

    with Progress(transient=False) as bar:
        job = bar.add_task("editing", total=total)
        PROGRESS.append(lambda state: bar.advance(job))
        try:
            summary = batch_edit(manifest=args.manifest, out=args.out, preset=args.preset,
                                 mode=args.mode, sets=list(args.set), chunk_size=args.chunk_size)
        finally:
            PROGRESS.clear()
    print(
        f"{summary['ok']} ok, {summary['failed']} failed, {summary['reused']} reused from cache, "
        f"{summary['seconds']:.1f} s -> {summary['index']}"
    )
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0 if summary["failed"] == 0 else 1


def _cmd_ablate(args: argparse.Namespace) -> int:
    """An ablation grid (a Prefect flow); the grid file format is in flows/ablate.py."""
    from lregions_core.manifest import read_manifest

    read_manifest(args.manifest)  # usage errors before any work
    prefect_defaults()
    from flows.ablate import ablate, cell_overrides, cells, load_grid

    grid = load_grid(args.grid)
    for cell in cells(grid):  # every cell's settings must be valid before any work
        make_config(args.preset or grid.get("preset", "default"),
                    {**grid.get("set", {}), **cell_overrides(cell)}, args.set)
    summary = ablate(manifest=args.manifest, out=args.out, grid=grid, preset=args.preset,
                     sets=list(args.set), chunk_size=args.chunk_size)
    print(f"{summary['cells']} cells, {summary['ok']} ok, {summary['failed']} failed, "
          f"{summary['seconds']:.1f} s -> {summary['table']}")
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0 if summary["failed"] == 0 else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from lregions_core.report import write_report

    if not (Path(args.dir) / "index.parquet").exists() and not (
        Path(args.dir) / "ablation.parquet"
    ).exists():
        raise ConfigError(f"{args.dir} has no index.parquet or ablation.parquet")
    print(write_report(args.dir))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        doc = load_preset(name)
        print(f"{name}: {doc.get('description', '')}")
        for key, value in doc.get("set", {}).items():
            print(f"    {key} = {json.dumps(value)}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from lregions_core.models.download import download_preset_weights

    config = make_config(args.preset, None, args.set)
    lines = download_preset_weights(config)
    for line in lines or ["nothing to download for this preset"]:
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lregions", description="Text-driven local image editing via learnable regions."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="default", help=f"one of: {', '.join(preset_names())}")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE",
            help="override one setting (JSON values), repeatable",
        )

    p = sub.add_parser("edit-image", help="edit one image")
    p.add_argument("image", help="path, fsspec URL, or skimage:NAME (e.g. skimage:chelsea)")
    p.add_argument("prompt", help='what the edited region should show, e.g. "a red hat"')
    p.add_argument("--source", help="caption of what is edited (for the directional loss)")
    p.add_argument("--out", required=True, help="output folder (local path or fsspec URL)")
    p.add_argument("--mode", choices=["rgn", "exhaustive", "random", "dino-random"])
    p.add_argument("--seed", type=int)
    config_args(p)
    p.set_defaults(run=_cmd_edit_image)

    p = sub.add_parser("edit", help="edit every row of a CSV manifest (Prefect batch flow)")
    p.add_argument("manifest", help="CSV with columns image, prompt [, source, id, seed, target_box]")
    p.add_argument("--out", required=True, help="output folder (local path or fsspec URL)")
    p.add_argument("--mode", choices=["rgn", "exhaustive", "random", "dino-random"])
    p.add_argument("--chunk-size", type=int, default=8, help="rows per task run")
    config_args(p)
    p.set_defaults(run=_cmd_edit)

    p = sub.add_parser("ablate", help="run an ablation grid over a manifest (Prefect flow)")
    p.add_argument("manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--grid", required=True, help="YAML grid file (see flows/ablate.py)")
    p.add_argument("--preset", default=None, help="base preset (default: the grid's, else default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--chunk-size", type=int, default=8)
    p.set_defaults(run=_cmd_ablate)

    p = sub.add_parser("report", help="write DIR/report.html for a batch or ablation folder")
    p.add_argument("dir")
    p.set_defaults(run=_cmd_report)

    p = sub.add_parser("presets", help="list presets")
    p.set_defaults(run=_cmd_presets)

    p = sub.add_parser("download", help="download every weight a preset needs")
    config_args(p)
    p.set_defaults(run=_cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lregions_core.images import ImageLoadError
    from lregions_core.manifest import ManifestError
    from lregions_core.models.weights import WeightsUnavailableError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, ManifestError) as exc:
        print(f"lregions: error: {exc}", file=sys.stderr)
        return 2
    except (ImageLoadError, WeightsUnavailableError, ValueError) as exc:
        print(f"lregions: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
