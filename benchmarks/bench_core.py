"""Cost of the method per image: editor calls and denoising steps per mode, next to the reference
implementation's (iterations + 1) x anchors inpaintings of 50 steps; and CPU time of the tiny
preset per image.

Editor-call counts of ``rgn`` depend on the losses, and no real weights are available here. So
the counts for the ``reference``, ``default`` and ``fast`` presets are measured with *their
method settings* (anchors, proposals, learner, steps) on oracle world v2 items (seeds 3000..,
the narrower generator), where losses are meaningful; ``exhaustive``/``random`` counts do not
depend on losses at all. ``rgn + prior`` starts the search from a region prior fitted on other
items (``--prior-items`` calibration items, seeds 7000..). The oracle IoU column is the oracle
world's box quality, not a photo metric.

    python benchmarks/bench_core.py [--items 20] [--tiny-images 4] [--prior-items 300]
"""

from __future__ import annotations

import argparse
import time

from oracle_runs import box_quality, fit_prior, v2_items, world_config

from lregions_core.config import make_config
from lregions_core.pipeline import Models, edit_image

MODES = ("rgn", "exhaustive", "dino-random", "random")
# The items today's figures are measured on: v2 seeds no test uses, the narrower generator.
ITEM_SEEDS = 3000
def editor_cost(preset: str, items: int, prior: str | None) -> list[str]:
    base = make_config(preset)
    reference_calls = (base.iterations + 1) * base.num_anchors
    runs = v2_items(range(ITEM_SEEDS, ITEM_SEEDS + items), wide=False)
    lines = []
    for mode in MODES:
        variants = [("", {})]
        if mode == "rgn" and prior and base.estimator == "bayes":
            variants.append((" + prior", {"region_prior": prior}))
        for label, extra in variants:
            iou, calls, _ = box_quality(world_config(preset, mode=mode, **extra), runs)
            steps = calls * base.editor_steps
            lines.append(
                f"| {preset} | {mode}{label} | {calls:.1f} | {steps:.0f} | "
                f"{reference_calls} x 50 = {reference_calls * 50} | "
                f"{steps / (reference_calls * 50):.2f} | {iou:.3f} |"
            )
    return lines


def tiny_timing(images: int) -> list[str]:
    from PIL import Image
    from skimage import data

    names = ["chelsea", "coffee", "astronaut", "rocket", "camera", "cat"][:images]
    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]
    lines = []
    for mode in MODES:
        config = make_config("tiny", {"mode": mode})
        models = Models.load(config)
        edit_image(photos[0], "a red hat", config=config, models=models)  # warm-up: load models
        start = time.perf_counter()
        requests = 0
        for photo in photos:
            requests += edit_image(photo, "a red hat", config=config, models=models).editor_requests
        per = (time.perf_counter() - start) / len(photos)
        lines.append(f"| tiny | {mode} | {per:.2f} | {requests / len(photos):.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--tiny-images", type=int, default=4)
    parser.add_argument("--prior-items", type=int, default=300,
                        help="calibration items of the region prior (0: no prior rows)")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}")
    print(f"\nEditor cost per image ({args.items} oracle items; method settings of each preset)\n")
    print("| preset | mode | editor calls | denoising steps | reference (calls x steps) "
          "| steps vs reference | oracle IoU |")
    print("|---|---|---|---|---|---|---|")
    prior = None
    if args.prior_items:  # fitted on other items (seeds 7000..)
        import tempfile

        prior = tempfile.mkdtemp(prefix="lregions-prior-default-")
        fit_prior("default", args.prior_items, prior)
    for preset in ("reference", "default", "fast"):  # fast has default's proposals: one prior
        for line in editor_cost(preset, args.items, prior):
            print(line, flush=True)
    print(f"\nTiny preset on CPU ({args.tiny_images} scikit-image photos, models loaded once)\n")
    print("| preset | mode | seconds per image | editor calls per image |")
    print("|---|---|---|---|")
    for line in tiny_timing(args.tiny_images):
        print(line)


if __name__ == "__main__":
    main()
