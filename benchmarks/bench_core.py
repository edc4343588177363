"""Cost of the method per image: editor calls and denoising steps per mode, next to the reference
implementation's (iterations + 1) x anchors inpaintings of 50 steps; and CPU time of the tiny
preset per image.

Editor-call counts of ``rgn`` depend on how fast the box policy settles, which depends on the
losses, and no real weights are available here. So the counts for the ``reference``, ``default``
and ``fast`` presets are measured with *their method settings* (anchors, proposals, iterations, steps) on
oracle world v2 items, where losses are meaningful; ``exhaustive``/``random`` counts do not depend
on losses at all. The oracle IoU column is the oracle world's box quality, not a photo metric.

    python benchmarks/bench_core.py [--items 20] [--tiny-images 4]
"""

from __future__ import annotations

import argparse
import time

from oracle_runs import Item, box_quality

from lregions_core import oracle
from lregions_core.config import REGION_CHOICE_KEYS, make_config, preset_settings
from lregions_core.pipeline import Models, edit_image

MODES = ("rgn", "exhaustive", "dino-random", "random")
# The method's settings (anchors, proposals, learner) and its steps, taken from the preset
# measured; the oracle preset supplies only the world (saliency, painter, exact judge, work size).
METHOD_KEYS = (*REGION_CHOICE_KEYS, "editor_steps")


def editor_cost(preset: str, items: int) -> list[str]:
    base = make_config(preset)
    reference_calls = (base.iterations + 1) * base.num_anchors
    world = {k: v for k, v in preset_settings("oracle").items() if k not in METHOD_KEYS}
    method = {k: getattr(base, k) for k in METHOD_KEYS}
    v2 = [oracle.make_item_v2(3000 + i) for i in range(items)]  # seeds no test uses
    runs = [Item(v.image, v.prompt, v.source_prompt, i, v.target_box) for i, v in enumerate(v2)]
    lines = []
    for mode in MODES:
        config = make_config("default", {**world, **method, "mode": mode})
        iou, calls, _ = box_quality(config, runs)
        steps = calls * base.editor_steps
        lines.append(
            f"| {preset} | {mode} | {calls:.1f} | {steps:.0f} | "
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
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}")
    print(f"\nEditor cost per image ({args.items} oracle items; method settings of each preset)\n")
    print("| preset | mode | editor calls | denoising steps | reference (calls x steps) "
          "| steps vs reference | oracle IoU |")
    print("|---|---|---|---|---|---|---|")
    for preset in ("reference", "default", "fast"):
        for line in editor_cost(preset, args.items):
            print(line, flush=True)
    print(f"\nTiny preset on CPU ({args.tiny_images} scikit-image photos, models loaded once)\n")
    print("| preset | mode | seconds per image | editor calls per image |")
    print("|---|---|---|---|")
    for line in tiny_timing(args.tiny_images):
        print(line)


if __name__ == "__main__":
    main()
