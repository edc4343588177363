"""Write an oracle-world manifest: generated images with a known target box.

    python manifests/make_oracle.py [--world v1|v2|v2-wide] [--items N] [--out manifests]

``v1`` (24 items, ``oracle.csv``) is the simpler world, the regression set; ``v2`` (36
items, ``oracle_v2.csv``) is the harder one: sizes 150 to 1024 px, aspect ratios up to 3:1, thin
bars to large blobs, up to four distractors, targets on the border, textured backgrounds (the
generator's narrow items; ``v2-wide`` adds shades of the target's colour, second targets and
occluders, as the generator does by default). Item
``k`` is generated from seed ``k``. The presets' proposals were compared on this manifest
(docs/benchmarks/regions.md); the search settings were chosen on seeds 1000..1099 and the
region-choice targets are tested on seeds 2000..2099 (``tests/test_regions_v2.py``).
"""

from __future__ import annotations

import argparse
import csv
import functools
from pathlib import Path

from lregions_core import oracle

WORLDS = {  # world: (generator, default items, manifest name, image folder)
    "v1": (oracle.make_item, 24, "oracle.csv", "oracle"),
    "v2": (functools.partial(oracle.make_item_v2, wide=False), 36, "oracle_v2.csv", "oracle_v2"),
    "v2-wide": (oracle.make_item_v2, 36, "oracle_v2_wide.csv", "oracle_v2_wide"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="v1")
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    make, default_items, manifest, folder = WORLDS[args.world]
    out = Path(args.out)
    (out / folder).mkdir(parents=True, exist_ok=True)
    with open(out / manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "prompt", "source", "seed", "target_box"])
        for i in range(default_items if args.items is None else args.items):
            item = make(i)
            name = f"{folder}/item{i:03d}.png"
            item.image.save(out / name, optimize=True)
            writer.writerow([f"item{i:03d}", name, item.prompt, item.source_prompt, i,
                             ",".join(str(v) for v in item.target_box)])


if __name__ == "__main__":
    main()
