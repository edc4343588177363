"""Batch pipeline overhead on the tiny preset: seconds per row, the share of wall time spent
outside model compute (orchestration, Prefect's temporary server, I/O), and a second run's time
as a fraction of the first (everything reused).

    python benchmarks/bench_batch.py [--rows 100] [--preset tiny]

"Model compute" is the sum of the features and regions stages' seconds over rows (DINO, the
editor and the scorer run there; those stages' own small reads and writes count as compute).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket"]
PROMPTS = ["a red hat", "a bunch of flowers", "a small dog", "a green tree", "a blue car"]


def run(manifest: Path, out: Path, preset: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "edit", str(manifest), "--out",
                    str(out), "--preset", preset], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = folder / "m.csv"
        lines = ["image,prompt,seed"]
        for i in range(args.rows):
            lines.append(f"skimage:{PHOTOS[i % len(PHOTOS)]},{PROMPTS[(i // 4) % 5]},{i}")
        manifest.write_text("\n".join(lines) + "\n")
        first = run(manifest, folder / "out", args.preset)
        table = pd.read_parquet(folder / "out" / "index.parquet")
        second = run(manifest, folder / "out", args.preset)
    ok = int((table["status"] == "ok").sum())
    model = float(table["seconds_features"].fillna(0).sum() + table["seconds_regions"].fillna(0).sum())
    print("| rows | ok | first run (s) | s per row | model compute (s) | share outside model "
          "compute | second run (s) | second / first |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.rows} | {ok} | {first:.1f} | {first / args.rows:.2f} | {model:.1f} | "
          f"{1 - model / first:.2f} | {second:.1f} | {second / first:.3f} |")


if __name__ == "__main__":
    main()
