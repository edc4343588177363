"""What each lever of the region learner is worth: the ``oracle`` preset's ``rgn`` on oracle
world v2, with one setting at a time put back to its reference value (and all of them at once),
as mean box IoU with the target and editor calls per item, next to ``exhaustive``.

    python benchmarks/bench_levers.py [--manifest manifests/oracle_v2.csv] [--items 36]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from oracle_runs import Item, box_quality

from lregions_core.config import Config, make_config
from lregions_core.images import load_image
from lregions_core.manifest import read_manifest
from lregions_core.oracle import CLIP_LIKE_NOISE

LEARNER = ("estimator", "rgn_steps", "tau", "rgn_sampling", "rgn_final", "rgn_context")
REFERENCE = {key: getattr(Config(), key) for key in LEARNER}  # the reference's learner
ROWS = [  # (lever, settings changed from the oracle preset)
    ("oracle preset (all levers)", {}),
    ("mode=exhaustive (upper bound)", {"mode": "exhaustive"}),
    *[(f"{k}={REFERENCE[k]} (reference)", {k: REFERENCE[k]}) for k in LEARNER],
    ("estimator=regression-anchor (no sharing across anchors)",
     {"estimator": "regression-anchor"}),
    ("rgn_final=blend", {"rgn_final": "blend"}),
    ("+ stop when settled (rgn_settle=0.9, rgn_warmup=3)", {"rgn_settle": 0.9, "rgn_warmup": 3}),
    ("+ stop after 3 tries without a better loss (rgn_patience=3)", {"rgn_patience": 3}),
    ("+ stop anchors far behind the best (rgn_focus=1.0, rgn_warmup=3)",
     {"rgn_focus": 1.0, "rgn_warmup": 3}),
    ("all learner levers at reference", dict(REFERENCE)),
    (f"oracle preset, oracle_noise={CLIP_LIKE_NOISE}", {"oracle_noise": CLIP_LIKE_NOISE}),
    (f"mode=exhaustive, oracle_noise={CLIP_LIKE_NOISE}",
     {"mode": "exhaustive", "oracle_noise": CLIP_LIKE_NOISE}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(Path(__file__).parents[1] / "manifests"
                                                  / "oracle_v2.csv"))
    parser.add_argument("--items", type=int, default=36)
    args = parser.parse_args()
    manifest = read_manifest(args.manifest)
    rows = [Item(load_image(row.image), row.prompt, row.source, row.seed, row.target_box)
            for row in manifest[: args.items]]
    print(f"{len(rows)} items of {args.manifest}\n")
    print("| lever | box IoU | editor calls | seconds |")
    print("|---|---|---|---|")
    for name, settings in ROWS:
        config = make_config("oracle", {"mode": "rgn", **settings})
        iou, calls, seconds = box_quality(config, rows)
        print(f"| {name} | {iou:.3f} | {calls:.1f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
