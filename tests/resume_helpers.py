"""Killing a real ``lregions edit`` process at a chosen moment, for the resume tests.

The batch runs in a child process (its own Prefect temporary server) through a small wrapper that
makes one moment long enough to hit: it writes a marker file, then sleeps, at that moment:

- ``before-any-row``: the first ingest task starts (no row has finished);
- ``mid-chunk``: a chunk's outputs stage has written two items (its index part is not written);
- ``during-merge``: the index merge has read its first part (``index.parquet`` half written).

The test waits for the marker and SIGKILLs the child's whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOMENTS = ("before-any-row", "mid-chunk", "during-merge")

WRAPPER = r"""
import sys, time
from pathlib import Path
moment, marker = sys.argv[1], Path(sys.argv[2])

def pause():
    marker.write_text(moment)
    time.sleep(600)  # the test kills us here

if moment == "before-any-row":
    import lregions_core.batch as batch  # the ingest task calls batch.ingest_rows: patched
    batch.ingest_rows = lambda *args: pause()
elif moment == "mid-chunk":
    import lregions_core.stages as stages
    real_outputs, written = stages.outputs, []
    def outputs(*args, **kwargs):
        found = real_outputs(*args, **kwargs)
        written.append(1)
        if len(written) == 6:  # chunks of 4: the 2nd chunk has written 2 of its 4 items
            pause()
        return found
    stages.outputs = outputs
elif moment == "during-merge":
    import lregions_core.index as index
    real_read, merging = index._read, []
    real_merge = index.merge
    def merge(*args):
        merging.append(1)
        return real_merge(*args)
    def read(store, rel):
        table = real_read(store, rel)
        if merging and "index-parts" in rel:
            pause()
        return table
    index.merge, index._read = merge, read

from flows.cli import main
sys.exit(main(sys.argv[3:]))
"""


def kill_at(moment: str, args: list[str], marker: Path, env: dict | None = None,
            timeout: float = 300) -> None:
    """Run ``lregions edit ARGS`` in a child process and SIGKILL it (and its whole process
    group) once it reaches ``moment``."""
    assert moment in MOMENTS
    child_env = {**os.environ, **(env or {})}
    child_env.pop("PREFECT_API_URL", None)  # the child runs its own temporary server
    child = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, moment, str(marker), "edit", *args], cwd=ROOT,
        env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if child.poll() is not None:
                raise AssertionError(f"the batch ended before {moment}: "
                                     f"{child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{moment} not reached in {timeout} s")
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        child.stderr.close()
