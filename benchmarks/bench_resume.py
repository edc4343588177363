"""Kill and resume: a 40-row ``tiny`` batch is killed with SIGKILL (its whole process group, the
temporary Prefect server included) once some of its items are written, then the same command is
run again in a fresh process; every row must end ``ok``. Each cycle starts on an empty output
folder and kills at a different moment (after more items each cycle).

    python benchmarks/bench_resume.py [--cycles 5] [--rows 40]

Prints, per cycle, how many items were written when the kill came, the resumed run's exit
status, seconds and ``ok`` rows, and at the end how many cycles ended with every row ok.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket"]
PROMPTS = ["a red hat", "a bunch of flowers", "a small dog", "a green tree", "a blue car",
           "a yellow balloon", "a wooden chair", "a snowy mountain", "a glass of milk", "a clock"]


def manifest(folder: Path, rows: int) -> Path:
    lines = ["id,image,prompt,source"]
    for i in range(rows):
        photo = PHOTOS[i % len(PHOTOS)]
        lines.append(f"r{i:03d},skimage:{photo},{PROMPTS[i % len(PROMPTS)]} {i},a {photo}")
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def command(path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "edit", str(path), "--out", str(out),
            "--preset", "tiny"]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def finished_items(out: Path) -> int:
    return len(list((out / "items").glob("*/result.json"))) if (out / "items").is_dir() else 0


def kill_after(path: Path, out: Path, items: int, timeout: float = 600) -> int:
    """Start the batch, SIGKILL its process group once ``items`` items are written; returns
    how many there were at the kill."""
    child = subprocess.Popen(command(path, out), cwd=ROOT, env=environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while finished_items(out) < items:
            if child.poll() is not None:
                raise RuntimeError(f"the batch ended (exit {child.returncode}) before {items} "
                                   "items were written")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{items} items not written in {timeout} s")
            time.sleep(0.05)
        return finished_items(out)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args()
    whole = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = manifest(Path(tmp), args.rows)
        print(f"{'cycle':>5}{'killed at':>11}{'exit':>6}{'resume s':>10}{'ok rows':>9}")
        for cycle in range(args.cycles):
            out = Path(tmp) / f"out{cycle}"
            at = kill_after(path, out, 4 + cycle * (args.rows - 8) // max(1, args.cycles - 1))
            start = time.perf_counter()
            done = subprocess.run(command(path, out), cwd=ROOT, env=environment(),
                                  capture_output=True, text=True, check=False)
            seconds = time.perf_counter() - start
            table = pd.read_parquet(out / "index.parquet")
            ok = int((table["status"] == "ok").sum())
            whole += ok == args.rows and len(table) == args.rows
            print(f"{cycle + 1:>5}{at:>11}{done.returncode:>6}{seconds:>10.1f}"
                  f"{ok:>5}/{len(table)}")
            if ok != args.rows:
                print(table.loc[table["status"] != "ok", ["id", "error"]].to_string())
    print(f"{whole} of {args.cycles} cycles ended with all {args.rows} rows ok")


if __name__ == "__main__":
    main()
