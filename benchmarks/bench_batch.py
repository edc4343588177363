"""Batch pipeline costs, each ``lregions edit`` run in a fresh process (with Prefect's temporary
server) on generated manifests:

1. overhead: seconds per row on the tiny preset, the share of wall time outside model compute
   (orchestration, the temporary server, I/O), and a second run's time (everything reused);
2. memory: peak RSS of the batch process and seconds per row at two or more manifest lengths
   (oracle preset): memory must follow the rows in flight, not the manifest's length;
3. storage: bytes stored per item at the default work size (512 px) for each keep_candidates
   value, split into the item folder, the input, the DINO features and the candidate edits.

    python benchmarks/bench_batch.py [--rows 100] [--lengths 50,400] [--footprint-rows 8]
                                     [--only overhead,memory,storage]

"Model compute" is the sum of the features and regions stages' seconds over rows (DINO, the
editor and the scorer run there; those stages' own small reads and writes count as compute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket"]
PROMPTS = ["a red hat", "a bunch of flowers", "a small dog", "a green tree", "a blue car"]
ORACLE = ROOT / "manifests" / "oracle.csv"

# Runs `lregions edit` in this process and prints its own peak RSS (kB) last.
MEASURED = ("import resource, sys\nfrom flows.cli import main\ncode = main(sys.argv[1:])\n"
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "sys.exit(code)\n")


def run_edit(manifest: Path, out: Path, preset: str, *sets: str) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of one ``lregions edit`` process."""
    args = ["edit", str(manifest), "--out", str(out), "--preset", preset]
    for item in sets:
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"lregions {' '.join(args)} exited {done.returncode}:\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    peak = int(done.stdout.strip().splitlines()[-1].split()[1]) * 1024
    return seconds, peak


def photo_manifest(folder: Path, rows: int) -> Path:
    manifest = folder / f"photos-{rows}.csv"
    lines = ["image,prompt,seed"]
    for i in range(rows):
        lines.append(f"skimage:{PHOTOS[i % len(PHOTOS)]},{PROMPTS[(i // 4) % 5]},{i}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def oracle_manifest(folder: Path, rows: int) -> Path:
    """``rows`` oracle-world rows: the project's items again and again with new seeds and ids,
    so every row is new work."""
    base = pd.read_csv(ORACLE)
    base["image"] = [str((ORACLE.parent / p).resolve()) for p in base["image"]]
    copies = [base.assign(id=base["id"] + f"-{k}", seed=k) for k in range(-(-rows // len(base)))]
    frame = pd.concat(copies).head(rows)
    manifest = folder / f"oracle-{rows}.csv"
    frame.to_csv(manifest, index=False)
    return manifest


def overhead(folder: Path, rows: int) -> None:
    manifest = photo_manifest(folder, rows)
    first, _ = run_edit(manifest, folder / "overhead", "tiny")
    table = pd.read_parquet(folder / "overhead" / "index.parquet")
    second, _ = run_edit(manifest, folder / "overhead", "tiny")
    ok = int((table["status"] == "ok").sum())
    model = float(table["seconds_features"].fillna(0).sum()
                  + table["seconds_regions"].fillna(0).sum())
    print("\nOverhead (tiny preset)\n")
    print("| rows | ok | first run (s) | s per row | model compute (s) | share outside model "
          "compute | second run (s) | second / first |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {rows} | {ok} | {first:.1f} | {first / rows:.2f} | {model:.1f} | "
          f"{1 - model / first:.2f} | {second:.1f} | {second / first:.3f} |")


def memory(folder: Path, lengths: list[int]) -> None:
    print("\nMemory against manifest length (oracle preset, fresh process each)\n")
    print("| rows | ok | wall (s) | s per row | peak RSS (MiB) | peak RSS vs shortest |")
    print("|---|---|---|---|---|---|")
    first_peak = None
    for rows in lengths:
        out = folder / f"memory-{rows}"
        seconds, peak = run_edit(oracle_manifest(folder, rows), out, "oracle")
        ok = int((pd.read_parquet(out / "index.parquet")["status"] == "ok").sum())
        first_peak = first_peak or peak
        print(f"| {rows} | {ok} | {seconds:.1f} | {seconds / rows:.3f} | {peak / 2**20:.0f} | "
              f"{peak / first_peak:.2f} |")


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def storage(folder: Path, rows: int) -> None:
    """Bytes per item by keep_candidates, tiny preset at work_size 512 (the default)."""
    manifest = photo_manifest(folder, rows)
    print(f"\nStorage per item at work_size 512 ({rows} scikit-image photos, 9 candidates each; "
          "tiny preset: random-weight edits are noise, which PNG compresses worst)\n")
    print("| keep_candidates | item folder (kB) | input (kB) | features (kB) | candidates (kB) "
          "| total per item (kB) | total vs all |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for keep in ("all", "chosen", "none"):
        out = folder / f"storage-{keep}"
        run_edit(manifest, out, "tiny", "work_size=512", f"keep_candidates={json.dumps(keep)}")
        parts = {
            "item": _bytes((out / "items").rglob("*")),
            "input": _bytes((out / "cache" / "images").rglob("*")),
            "features": _bytes((out / "cache" / "features").rglob("*")),
            "candidates": _bytes((out / "cache" / "regions").rglob("*")),
        }
        total = sum(parts.values())
        base = base or total
        kb = {k: v / rows / 1000 for k, v in parts.items()}
        print(f"| {keep} | {kb['item']:.0f} | {kb['input']:.0f} | {kb['features']:.0f} | "
              f"{kb['candidates']:.0f} | {total / rows / 1000:.0f} | {total / base:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100, help="overhead: tiny-preset rows")
    parser.add_argument("--lengths", default="50,400", help="memory: oracle manifest lengths")
    parser.add_argument("--footprint-rows", type=int, default=8, help="storage: rows per run")
    parser.add_argument("--only", default="overhead,memory,storage")
    args = parser.parse_args()
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, cuda {torch.cuda.is_available()}")
    sections = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "overhead" in sections:
            overhead(folder, args.rows)
        if "memory" in sections:
            memory(folder, [int(n) for n in args.lengths.split(",")])
        if "storage" in sections:
            storage(folder, args.footprint_rows)


if __name__ == "__main__":
    main()
