"""The library's command line (``python -m lregions_core.cli``): the commands that need no
Prefect and no server. The ``lregions`` command (:mod:`flows.cli`) adds the batch commands to
these.

``edit-image IMAGE PROMPT --out DIR``  one edit, with every candidate and a result.json
``presets``                            the presets and what they set
``download --preset NAME``             fetch every weight a preset needs (for offline nodes)
``report DIR``                         (re)write a batch or ablation folder's report.html
``verify DIR [--repair] [--json]``     decode every file of a batch folder; remove the damage
``ingest FORMAT SOURCE --out CSV``     a manifest from a benchmark or photo set (exit 1 when
                                       some source records were rejected)
``fit-regions MANIFEST --out PRIOR``   a region prior fitted on exhaustive runs of the rows

Exit status: 0 success, 1 the work failed (unreadable image, missing weights) or ``verify``
found damage, 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from lregions_core.config import ConfigError, load_preset, make_config, preset_names, run_config


def _cmd_edit_image(args: argparse.Namespace) -> int:
    from lregions_core.images import load_image
    from lregions_core.pipeline import edit_image
    from lregions_core.store import Store

    config = run_config(args.preset, args.mode, args.set)
    image = load_image(args.image)
    result = edit_image(
        image, args.prompt, source_prompt=args.source, config=config, seed=args.seed
    )
    out = Store(args.out)  # every file written atomically
    for i, cand in enumerate(result.candidates):
        out.write_png(f"candidates/{i:02d}.png", cand.image)
    if config.keep_layers:
        out.write_png("layer.png", result.layer)
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
        f"{record['shape']} in box {result.box} from anchor {record['anchor']}, "
        f"{result.editor_requests} edits "
        f"({result.denoise_steps} denoising steps) -> {out.path('final.png')}"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from lregions_core.report import write_report

    try:
        print(write_report(args.dir))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    """Decode every file of a batch output folder; with ``--repair``, remove the damaged items'
    result.json and the damaged files so the next run redoes exactly those items. Exit 0 when
    everything is whole, 1 when something is damaged."""
    from lregions_core import lease, verify
    from lregions_core.index import INDEX, PARTS
    from lregions_core.store import Store

    store = Store(args.dir)
    if not store.exists(INDEX) and not store.exists(PARTS):
        raise ConfigError(f"no {INDEX} and no index parts in {store.url_of('')} (not a batch "
                          "output folder)")
    # A repair removes files: never while a batch writes to the folder (it holds the lease).
    holding = lease.hold(args.dir, command="lregions verify --repair") if args.repair else (
        contextlib.nullcontext())
    try:
        with holding:
            found = verify.verify(store)
            removed = verify.repair(store, found) if args.repair else None
    except lease.LeaseError as exc:
        print(f"lregions: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:  # no index: not a batch output folder
        raise ConfigError(f"{exc} (not a batch output folder)") from None
    if args.json:
        print(json.dumps({**found.to_dict(), "ok": not found.damage, "removed": removed}))
    else:
        for line in verify.lines(found):
            print(line)
        for line in verify.repair_lines(removed) if removed is not None else ():
            print(line)
    return 1 if found.damage else 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    """Write a manifest from a benchmark or photo set (:mod:`lregions_core.ingest`); print each
    rejected record with its reason. Exit 0 when every source record became a row, else 1."""
    from lregions_core.ingest import IngestError, ingest

    try:
        done = ingest(args.format, args.source, args.out, limit=args.limit,
                      prompts=args.prompts, prompt=args.prompt, width=args.width)
    except IngestError as exc:  # the source as a whole is unusable: a usage error
        raise ConfigError(str(exc)) from None
    for reject in done.rejected:
        print(f"rejected {reject['record']} (id {reject['id']}): {reject['reason']}")
    print(f"{len(done.rows)} rows -> {done.manifest}; {len(done.written)} new image/mask files"
          + (f"; {len(done.rejected)} rejected -> {done.rejected_path}" if done.rejected else ""))
    return 1 if done.rejected else 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        doc = load_preset(name)
        print(f"{name}: {doc.get('description', '')}")
        if doc.get("base"):
            print(f"    (the {doc['base']} preset's settings, then these)")
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


def _cmd_fit_regions(args: argparse.Namespace) -> int:
    """Edit every proposal of each manifest row (``exhaustive``), fit a region prior on the
    losses and write it to ``--out``; rows that fail are named and skipped."""
    from lregions_core.images import ImageLoadError, load_image, to_working
    from lregions_core.manifest import read_manifest
    from lregions_core.pipeline import Models, calibration_photo
    from lregions_core.region_prior import fit, prompt_embedding, save_prior

    config = make_config(args.preset, None, args.set)
    rows = [row for row in read_manifest(args.manifest) if row.error is None]
    rows = rows[: args.limit] if args.limit else rows
    models = Models.load(config)
    photos, failed, text_dims = [], 0, 0
    for i, row in enumerate(rows, 1):
        try:
            image = load_image(row.image)
            photos.append(calibration_photo(config, models, image, row.prompt, row.source,
                                            config.seed if row.seed is None else row.seed))
            if len(photos) == 1:  # the prompt embedding's width (the descriptions' last columns)
                work = to_working(image, config.work_size, config.work_multiple)
                text = prompt_embedding(models.scorer.prepare(work, row.prompt, row.source))
                text_dims = 0 if text is None else text.size
        except (ImageLoadError, ValueError) as exc:
            failed += 1
            print(f"skipped row {row.row} ({row.id}): {exc}", file=sys.stderr)
        if i % 25 == 0 or i == len(rows):
            print(f"calibrated {len(photos)} of {i} rows", flush=True)
    prior = fit(photos, config, seed=args.seed, text_dims=text_dims)
    meta = save_prior(prior, args.out)
    print(f"region prior -> {args.out} (digest {meta['digest']}): {meta['photos']} photos, "
          f"{meta['boxes']} boxes; within-anchor correlation on {meta['heldout_photos']} "
          f"held-out photos {meta['heldout_correlation']:.3f}. Use it with "
          f"--set region_prior={args.out} --set estimator=bayes")
    return 1 if failed else 0


def config_args(p: argparse.ArgumentParser) -> None:
    """``--preset`` and ``--set KEY=VALUE`` (shared by every command that builds a config)."""
    p.add_argument("--preset", default="default", help=f"one of: {', '.join(preset_names())}")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting (JSON values), repeatable",
    )


MODE_CHOICES = ["rgn", "exhaustive", "random", "dino-random"]


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser(prog: str = "lregions") -> tuple[argparse.ArgumentParser, Any]:
    """The parser of the library's commands, and its subcommand group (the application adds
    its commands to it)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Text-driven local image editing via learnable regions."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit-image", help="edit one image")
    p.add_argument("image", help="path, fsspec URL, or skimage:NAME (e.g. skimage:chelsea)")
    p.add_argument("prompt", help='what the edited region should show, e.g. "a red hat"')
    p.add_argument("--source", help="caption of what is edited (for the directional loss)")
    p.add_argument("--out", required=True, help="output folder (local path or fsspec URL)")
    p.add_argument("--mode", choices=MODE_CHOICES)
    p.add_argument("--seed", type=int)
    config_args(p)
    p.set_defaults(run=_cmd_edit_image)

    p = sub.add_parser("report", help="write DIR/report.html for a batch or ablation folder")
    p.add_argument("dir")
    p.set_defaults(run=_cmd_report)

    p = sub.add_parser("verify", help="decode every file of a batch output folder DIR and "
                       "name what is damaged (exit 1); --repair makes the next run redo it")
    p.add_argument("dir", help="batch output folder (local path or fsspec URL)")
    p.add_argument("--repair", action="store_true", help="remove the damaged items' "
                   "result.json and the damaged files (nothing else), so the next "
                   "`lregions edit` redoes exactly those items")
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    p.set_defaults(run=_cmd_verify)

    from lregions_core.ingest import FORMATS

    p = sub.add_parser("ingest", help="write a manifest CSV from a benchmark or photo set")
    p.add_argument("format", choices=FORMATS)
    p.add_argument("source", help="tedbench/pie-bench: the benchmark folder; emu-edit/magicbrush:"
                   " a Parquet file or folder; unsplash: photos.tsv000 (or its folder); "
                   "folder: the images' folder")
    p.add_argument("--out", required=True, help="manifest CSV to write (local); images and "
                   "masks go to images/ and masks/ beside it")
    p.add_argument("--limit", type=positive_int, help="only the first N source records")
    p.add_argument("--prompts", help="unsplash: CSV photo_id,prompt[,source]; "
                   "folder: CSV image,prompt[,source]")
    p.add_argument("--prompt", help="unsplash: one prompt for every photo")
    p.add_argument("--width", type=positive_int, help="unsplash: fetch photos W px wide")
    p.set_defaults(run=_cmd_ingest)

    p = sub.add_parser("fit-regions", help="fit a region prior on a manifest: every proposal "
                       "of each row is edited (exhaustive), then the prior is fitted and saved")
    p.add_argument("manifest", help="CSV manifest of calibration rows (a few hundred)")
    p.add_argument("--out", required=True, help="folder or fsspec URL for prior.safetensors "
                   "and prior.json")
    p.add_argument("--limit", type=positive_int, help="only the first N valid rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit (split and weights)")
    config_args(p)
    p.set_defaults(run=_cmd_fit_regions)

    p = sub.add_parser("presets", help="list presets")
    p.set_defaults(run=_cmd_presets)

    p = sub.add_parser("download", help="download every weight a preset needs")
    config_args(p)
    p.set_defaults(run=_cmd_download)
    return parser, sub


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; errors become messages and exit statuses."""
    from lregions_core.images import ImageLoadError
    from lregions_core.manifest import ManifestError
    from lregions_core.models.weights import WeightsUnavailableError

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, ManifestError) as exc:
        print(f"lregions: error: {exc}", file=sys.stderr)
        return 2
    except (ImageLoadError, WeightsUnavailableError, ValueError) as exc:
        print(f"lregions: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return run(build_parser("python -m lregions_core.cli")[0], argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
