"""Write the oracle-world manifest: generated images with a known target box.

    python manifests/make_oracle.py [--items 24] [--out manifests]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from lregions_core import oracle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    out = Path(args.out)
    (out / "oracle").mkdir(parents=True, exist_ok=True)
    with open(out / "oracle.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "prompt", "source", "seed", "target_box"])
        for i in range(args.items):
            item = oracle.make_item(i)
            name = f"oracle/item{i:03d}.png"
            item.image.save(out / name)
            writer.writerow([f"item{i:03d}", name, item.prompt, item.source_prompt, i,
                             ",".join(str(v) for v in item.target_box)])


if __name__ == "__main__":
    main()
