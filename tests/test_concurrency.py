"""First use of several stages at the same moment, from several threads, in a fresh process: no
import deadlock, no row lost, one model load per process and settings.

Without one lock for first imports (lregions_core.loading), a row fails with ``deadlock
detected by _ModuleLock('torchvision.ops.misc')`` when the regions stage's first RoIAlign imports
torchvision.ops while another task thread's CLIP load imports open_clip (which imports
torchvision.models, and the two import each other). Only a fresh process has not imported them
yet, so each round runs in a new interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3  # without the import lock, every round of this script failed (6 of 6)

SCRIPT = r"""
import json, sys, threading
from PIL import Image
from lregions_core import stages
from lregions_core.config import make_config
from lregions_core.manifest import ManifestRow
from lregions_core.metrics import shared_evaluator
from lregions_core.pipeline import shared_models
from lregions_core.store import Store

out = sys.argv[1]
store = Store(out)
tiny, oracle = make_config("tiny"), make_config("oracle")
# Inputs prepared with PIL only, so nothing heavy is imported before the threads start.
photo = Image.new("RGB", (96, 64), (120, 80, 40))
photo.paste((30, 60, 220), (20, 16, 44, 40))  # the oracle world's "blue" object
store.write_png("cache/images/photo.png", photo)
store.write_png("items/done/final.png", photo)
store.write_json("items/done/result.json", {"box": [8, 8, 40, 40], "input": "../../cache/images/photo.png"})

def planned(config, row):
    state = {"image_hash": "photo", "image_path": "cache/images/photo.png"}
    state.update(stages.plan(row, "photo", config))
    return state

row = ManifestRow(row=1, id="done", image="photo.png", prompt="a red hat", source="a blue cat")
# The oracle world's features are cached already (as on a resumed run), so the regions thread
# goes straight to its first RoIAlign. (Computing them imports only scikit-image.)
cached = planned(oracle, row)
cached.update(stages.features(cached, oracle, store, lambda: shared_models(oracle)))
models_seen = []

def ingest():  # a scikit-image sample: the first import of skimage.data
    stages.ingest(ManifestRow(row=2, id="cat", image="skimage:chelsea", prompt="x"), store)

def features():  # tiny DINO, CLIP and SD: timm, open_clip (torchvision), diffusers
    stages.features(planned(tiny, row), tiny, store, lambda: models_seen.append(shared_models(tiny)) or models_seen[-1])

def regions():  # region learning on cached features: the first torchvision.ops RoIAlign
    stages.regions(row, dict(cached), oracle, store, lambda: shared_models(oracle))

def evaluate():  # CLIP, DINO and LPIPS (torchvision.models) and skimage.metrics
    state = {**planned(tiny, row), "result": store.read_json("items/done/result.json")}
    stages.evaluate(row, state, tiny, store, lambda: shared_evaluator(tiny))

jobs = [ingest, features, features, regions, evaluate]
barrier = threading.Barrier(len(jobs))
errors = []

def run(job):
    barrier.wait()
    try:
        job()
    except BaseException as exc:
        errors.append(f"{job.__name__}: {type(exc).__name__}: {exc}")

threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"errors": errors, "models": len({id(m) for m in models_seen}),
                  "features_calls": len(models_seen)}))
"""


def test_first_use_of_stages_from_many_threads_at_once(tmp_path):
    for round_ in range(ROUNDS):
        out = tmp_path / f"round{round_}"
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["errors"] == [], (round_, report["errors"])
        # the two features threads asked for the models at once: one load, one set of models
        assert report["features_calls"] >= 1 and report["models"] == 1, report
        assert (out / "cache" / "regions").is_dir()  # the oracle regions stage finished
