"""Every region learner on one held-out evaluation: box IoU against editor calls.

Item sets (oracle world v2, the wide generator; seeds disjoint):

* tuning: seeds 1000..1099 (the presets' search settings were chosen on these);
* calibration: seeds 7000.. (``--calibration`` items; the region priors are fitted on these);
* evaluation: seeds 20000.. (``--items``, default 200; used for nothing else).

For each preset's method (its anchors, proposals and learner, run in the oracle world) and
each judge (exact, and ``oracle_noise`` = 0.1, a judge about as unreliable as CLIP), it reports
mean box IoU with the target, the paired difference from ``exhaustive`` with the exact judge
(mean and its standard error over items), editor calls per item, and writes one plot of IoU
against calls with every learner on it.

    python benchmarks/bench_regions.py [--items 200] [--calibration 300] \\
        [--plot docs/images/regions-iou-vs-calls.png] [--json /tmp/regions.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from oracle_runs import box_quality_items, fit_prior, v2_items, world_config

from lregions_core import oracle

TUNING_SEEDS = range(1000, 1100)
EVALUATION_START = 20000
NOISE = oracle.CLIP_LIKE_NOISE

# (preset, learner label, settings over the preset's method); "{prior}" is the preset's prior.
LEARNERS = [
    ("oracle", "exhaustive", {"mode": "exhaustive"}),
    ("oracle", "bayes (preset)", {}),
    ("oracle", "bayes + prior", {"region_prior": "{prior}"}),
    ("oracle", "dino-random", {"mode": "dino-random"}),
    ("default", "exhaustive", {"mode": "exhaustive"}),
    ("default", "bayes (preset)", {}),
    ("default", "bayes + prior", {"region_prior": "{prior}"}),
    ("default", "prior alone (1 edit per anchor)", {"region_prior": "{prior}", "rgn_budget": 9}),
    ("default", "objectness alone (1 edit per anchor)", {"rgn_budget": 9}),
    ("default", "bayes, uniform start", {"rgn_init": "uniform"}),
    ("default", "bayes, thompson", {"rgn_acquisition": "thompson"}),
    ("default", "bayes, no halving", {"rgn_halving": 1.0}),
    ("default", "bayes, no confidence stop", {"rgn_confidence": 0.0}),
    ("default", "bayes, rgn_noise=0", {"rgn_noise": 0.0}),
    ("default", "regression learner", {"estimator": "regression"}),
    ("fast", "bayes (preset)", {}),
    ("fast", "bayes + prior", {"region_prior": "{prior}"}),
    ("reference", "exhaustive", {"mode": "exhaustive"}),
    ("reference", "reference learner", {}),
]
# A preset with the proposals of another shares its bound (exhaustive does not depend on the
# learner or the budget).
SAME_PROPOSALS = {"fast": "default"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--plot", default=None, help="PNG of IoU against editor calls")
    parser.add_argument("--json", default=None, help="every figure, as JSON")
    parser.add_argument("--only", default=None, help="comma-separated presets to run")
    args = parser.parse_args()
    items = v2_items(range(EVALUATION_START, EVALUATION_START + args.items))
    presets = sorted({p for p, _, _ in LEARNERS}) if not args.only else args.only.split(",")
    folder = Path(tempfile.mkdtemp(prefix="lregions-priors-"))
    priors = {}
    for preset in presets:
        if any(p == preset and "{prior}" in json.dumps(s) for p, _, s in LEARNERS):
            start = time.perf_counter()
            priors[preset] = str(folder / f"prior-{preset}")
            meta = fit_prior(preset, args.calibration, priors[preset])
            print(f"prior for {preset}: {meta['photos']} calibration photos, within-anchor "
                  f"correlation on {meta['heldout_photos']} held-out of them "
                  f"{meta['heldout_correlation']:.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    print(f"\n{args.items} evaluation items (v2 seeds {EVALUATION_START}..{EVALUATION_START + args.items - 1}); "
          "difference: paired, against exhaustive with the exact judge (mean +- standard error)\n")
    print("| preset | learner | judge | box IoU | vs exhaustive | editor calls | calls vs exhaustive |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    bounds: dict[str, tuple[np.ndarray, float]] = {}
    for preset, label, settings in LEARNERS:
        if preset not in presets:
            continue
        settings = json.loads(json.dumps(settings).replace("{prior}", priors.get(preset, "")))
        for judge, noise in (("exact", 0.0), ("noise 0.1", NOISE)):
            config = world_config(preset, **settings, oracle_noise=noise)
            ious, calls, seconds = box_quality_items(config, items)
            if label == "exhaustive" and noise == 0.0:
                bounds[preset] = (ious, float(calls.mean()))
            bound, bound_calls = bounds.get(SAME_PROPOSALS.get(preset, preset), (None, None))
            diff = "" if bound is None else (
                f"{(ious - bound).mean():+.3f} +- {(ious - bound).std(ddof=1) / np.sqrt(len(ious)):.3f}"
                f" ({ious.mean() / bound.mean():.2f})")
            ratio = "" if bound_calls is None else f"{calls.mean() / bound_calls:.2f}"
            print(f"| {preset} | {label} | {judge} | {ious.mean():.3f} | {diff} | "
                  f"{calls.mean():.1f} | {ratio} |", flush=True)
            rows.append({"preset": preset, "learner": label, "judge": judge,
                         "iou": float(ious.mean()), "calls": float(calls.mean()),
                         "seconds": seconds, "ious": ious.tolist(), "per_item_calls": calls.tolist()})
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    if args.plot:
        plot(rows, args.plot, args.items)


def plot(rows: list[dict], path: str, items: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"oracle": "tab:blue", "default": "tab:orange", "fast": "tab:green",
               "reference": "tab:red"}
    markers = {"exhaustive": "s", "regression learner": "^", "reference learner": "v",
               "dino-random": "x"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, judge in zip(axes, ("exact", "noise 0.1")):
        for row in (r for r in rows if r["judge"] == judge):
            marker = markers.get(row["learner"], "o" if "prior" not in row["learner"] else "D")
            ax.scatter(row["calls"], row["iou"], c=colours[row["preset"]], marker=marker, s=40)
            ax.annotate(f"{row['preset']}: {row['learner']}", (row["calls"], row["iou"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axvline(19.8, color="grey", lw=0.5, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("editor calls per photo (log)")
        ax.set_title(f"{judge} judge")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean box IoU with the target ({items} held-out v2 items)")
    fig.suptitle("Region learners in the oracle world: box IoU against editor calls "
                 "(dashed: 0.2 of the reference's 99 edits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot -> {path}")


if __name__ == "__main__":
    main()
