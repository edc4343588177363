"""How finely the final image's edit is rendered: ``edit_scale`` (input pixels per editor pixel
over the edited region; 1.0 = the photo's own resolution) of ``final_render`` "upsample" (the
working edit upsampled to the input) and "region" (the chosen region edited again from a crop of
the input, :func:`lregions_core.images.render_geometry`), side by side, for editors whose own
resolution is 512 (SD 2 inpainting, aMUSEd) and 1024 (SDXL inpainting, FLUX.1 Fill).

The figure is geometric: it depends on the input's size, the box and the editor's own size, not
on any model, so no model runs. Photos of 1000 to 6000 pixels on the longer side in landscape
and portrait aspect ratios; on each, anchors at random places and every box of the ``default``
preset's proposal family around them (6 sizes from 0.0625 to 0.4375 of the shorter side, half
size, geometric, x 3 width:height ratios: the boxes the region network chooses among), mapped
to the input as the pipeline maps the chosen box, with the preset's feather and
``render_context``. The working image is the editor's own size, as in the presets (``work_size``
512 for the 512 editors, 1024 in the ``sdxl`` and ``flux`` presets), multiple 64. The region
column is what the pipeline renders before the scores compare the two: the region render where
it is finer than the upsampled edit, else the upsampled edit.

    python benchmarks/bench_render.py [--anchors 8] [--context 0.25] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np

from lregions_core.anchors import make_proposals
from lregions_core.config import make_config
from lregions_core.images import (
    input_box,
    paste_region,
    render_geometry,
    upsample_scale,
    working_size,
)

LONG_SIDES = (1000, 1500, 2000, 3000, 4000, 5000, 6000)
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3)  # width / height: landscape and portrait
NATIVES = (512, 1024)


def photo_sizes() -> list[tuple[int, int]]:
    sizes = []
    for long_side in LONG_SIDES:
        for aspect in ASPECTS:
            if aspect >= 1:
                sizes.append((long_side, round(long_side / aspect)))
            else:
                sizes.append((round(long_side * aspect), long_side))
    return sizes


def measure(native: int, anchors: int, context: float, seed: int) -> list[dict]:
    """One record per (photo, box): the long side, the proposal's size index, both scales."""
    config = make_config("default")
    rng = np.random.default_rng(seed)
    records = []
    for size in photo_sizes():
        work = working_size(*size, native, config.work_multiple)
        centres = rng.uniform(0.1, 0.9, (anchors, 2)) * np.array(work, dtype=np.float64)
        boxes = make_proposals(centres, work, config.num_proposals, config.proposal_min,
                               config.proposal_max, aspects=config.proposal_aspects,
                               spacing=config.proposal_spacing)
        up = upsample_scale(size, work)
        for per_anchor in boxes:
            for k, box_work in enumerate(per_anchor):
                box = input_box(size, box_work, work)
                if box is None:
                    continue
                cover = paste_region(size, box_work, work, config.feather)
                geometry = render_geometry(size, box, cover, native, config.work_multiple,
                                           context)
                records.append({"long": max(size), "size_index": k // len(config.proposal_aspects),
                                "upsample": up, "region": min(geometry.edit_scale, up),
                                "canvas": geometry.canvas})
    return records


def _stats(values: list[float]) -> str:
    return f"{np.median(values):6.2f} {np.max(values):6.2f}"


def report(results: dict[int, list[dict]]) -> None:
    natives = list(results)
    head = "".join(f" | native {n:4d}: upsample  region  " for n in natives)
    sub = "".join(" |  median  worst median  worst" for _ in natives)
    print(f"{'photos (long side)':>22}{head}\n{'':>22}{sub}")

    def row(label: str, keep) -> None:
        cells = ""
        for n in natives:
            chosen = [r for r in results[n] if keep(r)]
            cells += (f" | {_stats([r['upsample'] for r in chosen])}"
                      f" {_stats([r['region'] for r in chosen])}")
        print(f"{label:>22}{cells}")

    for long_side in LONG_SIDES:
        row(f"{long_side} px", lambda r, s=long_side: r["long"] == s)
    row("all, 1000-6000 px", lambda r: True)
    print("\nby box size (all photos; size 0 = half size 0.0625 of the shorter side, "
          "5 = 0.4375):")
    sizes = sorted({r["size_index"] for r in results[natives[0]]})
    for index in sizes:
        row(f"box size {index}", lambda r, i=index: r["size_index"] == i)
    for n in natives:
        canvases = {tuple(r["canvas"]) for r in results[n]}
        longest = max(max(c) for c in canvases)
        count = len(results[n])
        print(f"\nnative {n}: {count} boxes; region canvases up to {longest} px on the longer "
              f"side; region at the photo's own resolution (edit_scale 1.0) for "
              f"{sum(r['region'] == 1.0 for r in results[n]) / count:.1%} of boxes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", type=int, default=8, help="random anchors per photo")
    parser.add_argument("--context", type=float, default=make_config("default").render_context,
                        help="render_context (fraction of the box's longer side, each side)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"edit_scale (input px per editor px over the edited region; 1.0 = the photo's own "
          f"resolution), render_context {args.context}, {args.anchors} anchors per photo x "
          f"the default preset's 18 proposals, {len(photo_sizes())} photo sizes\n")
    report({n: measure(n, args.anchors, args.context, args.seed) for n in NATIVES})


if __name__ == "__main__":
    main()
