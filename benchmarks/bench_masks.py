"""Box against object-mask edits in the oracle world, where the target's pixels are known:
``region_shape`` box / mask / auto with the ``oracle`` preset, through the batch stages (so the
learned boxes are computed once and reused by mask and auto), optionally with a noisy judge.

Per setting: the share of changed pixels outside the target, the changed pixels' IoU with the
target, the background error inside the box but outside the target (MSE, 0..1 scale), how often
the final edit is a mask edit, editor calls per item (boxes and masks) and the masks stage's
seconds per item; then mask and auto as ratios to box.

    python benchmarks/bench_masks.py [--manifest manifests/oracle.csv] [--items N] [--noise 0.1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lregions_core.batch import new_state, run_all
from lregions_core.config import make_config
from lregions_core.manifest import read_manifest
from lregions_core.store import Store

SHAPES = ("box", "mask", "auto")
MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def measure(rows, shape: str, noise: float, out: str) -> dict[str, float]:
    config = make_config("oracle", {"region_shape": shape, "oracle_noise": noise})
    start = time.perf_counter()
    states = run_all([new_state(r) for r in rows], config, Store(out))
    seconds = time.perf_counter() - start
    failed = [s["error"] for s in states if s["status"] != "ok"]
    if failed:
        raise SystemExit(f"{len(failed)} rows failed, first: {failed[0]}")

    def mean(name: str) -> float:
        values = [s["evaluation"]["metrics"][name] for s in states]
        return float(np.mean([v for v in values if v is not None]))

    return {
        "outside": mean("changed_outside"),
        "iou": mean("changed_iou"),
        "box_bg_mse": mean("box_bg_mse"),
        "mask_share": float(np.mean([s["result"]["shape"] == "mask" for s in states])),
        "calls": float(np.mean([s["result"]["editor_requests"] for s in states])),
        "masks_s": float(np.mean([s["seconds"].get("masks", 0.0) for s in states])),
        "wall_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(MANIFESTS / "oracle.csv"))
    parser.add_argument("--items", type=int, default=None, help="first N rows (default: all)")
    parser.add_argument("--noise", type=float, default=0.0, help="oracle_noise of the judge")
    args = parser.parse_args()
    rows = read_manifest(args.manifest)[: args.items]
    print(f"{len(rows)} items of {args.manifest}, oracle preset, oracle_noise={args.noise}")
    found = {}
    with tempfile.TemporaryDirectory() as out:
        for shape in SHAPES:
            found[shape] = measure(rows, shape, args.noise, out)
    print("| region_shape | changed outside target | changed IoU with target | "
          "box background MSE | mask chosen | editor calls/item | masks s/item |")
    print("|---|---|---|---|---|---|---|")
    for shape, m in found.items():
        print(f"| {shape} | {m['outside']:.3f} | {m['iou']:.3f} | {m['box_bg_mse']:.4f} | "
              f"{m['mask_share']:.2f} | {m['calls']:.1f} | {m['masks_s']:.3f} |")
    box = found["box"]
    for shape in ("mask", "auto"):
        m = found[shape]
        print(f"{shape}/box: changed outside x{m['outside'] / box['outside']:.2f}, "
              f"IoU x{m['iou'] / box['iou']:.2f}, box background MSE "
              f"x{m['box_bg_mse'] / box['box_bg_mse']:.2f}, editor calls "
              f"x{m['calls'] / box['calls']:.2f}")


if __name__ == "__main__":
    main()
