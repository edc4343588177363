"""The region prior (:mod:`lregions_core.region_prior`): storage and its checks, the fit on
oracle-world calibration photos (it ranks held-out photos' boxes better than chance, and better
than a prior fitted on shuffled losses), ``lregions fit-regions``, and a prior that reaches
real Prefect workers through an S3 URL (moto's server) and chooses there exactly the boxes a
one-process batch with the same prior in a local folder chooses."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lregions_core import oracle
from lregions_core.config import make_config
from lregions_core.region_prior import (
    BASE_COLUMNS,
    META_FILE,
    PRIOR_SETTINGS,
    WEIGHTS_FILE,
    PriorMismatchError,
    describe,
    fit,
    load_prior,
    relevant_anchors,
    save_prior,
)

ROOT = Path(__file__).resolve().parents[1]
ORACLE_V2 = ROOT / "manifests" / "oracle_v2.csv"
CALIBRATION_SEEDS = range(7000, 7040)  # oracle world v2 items no other test uses


@pytest.fixture(scope="module")
def config():
    return make_config("oracle")


@pytest.fixture(scope="module")
def models(config):
    from lregions_core.pipeline import Models

    return Models.load(config)


@pytest.fixture(scope="module")
def calibration(config, models) -> list[tuple[np.ndarray, np.ndarray]]:
    """(description, losses) of every proposal of 40 oracle items, every proposal edited."""
    from lregions_core.pipeline import calibration_photo

    photos = []
    for seed in CALIBRATION_SEEDS:
        item = oracle.make_item_v2(seed)
        photos.append(calibration_photo(config, models, item.image, item.prompt,
                                        item.source_prompt, seed))
    return photos


@pytest.fixture(scope="module")
def prior(calibration, config):
    return fit(calibration, config, seed=0)


def _shuffled(photos, seed: int = 0):
    """The same photos with each anchor's losses permuted among its boxes: nothing about a box
    tells its loss any more."""
    rng = np.random.default_rng(seed)
    return [(d, np.stack([rng.permutation(row) for row in losses])) for d, losses in photos]


# -- storage --------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path, prior, calibration, config):
    location = str(tmp_path / "prior")
    meta = save_prior(prior, location)
    blob = (tmp_path / "prior" / WEIGHTS_FILE).read_bytes()
    assert meta["digest"] == hashlib.sha256(blob).hexdigest()[:16]
    assert json.loads((tmp_path / "prior" / META_FILE).read_text()) == meta

    loaded = load_prior(location)
    assert loaded.digest == meta["digest"]
    assert loaded.meta["source"] == location
    assert loaded.meta["settings"] == {key: getattr(config, key) for key in PRIOR_SETTINGS}
    assert loaded.weight == prior.weight and 0.0 <= loaded.weight <= 0.95
    for description, _ in calibration[:5]:
        assert np.array_equal(loaded.predict(description), prior.predict(description))
    assert load_prior(location) is loaded  # read once per process
    loaded.check(config)  # the settings it was fitted with: accepted

    # an fsspec URL stores the same bytes under the same digest
    url = f"memory://lregions-prior-test/{uuid.uuid4().hex}"
    assert save_prior(prior, url)["digest"] == meta["digest"]
    remote = load_prior(url)
    assert remote.digest == meta["digest"] and remote.meta["source"] == url
    assert np.array_equal(remote.predict(calibration[0][0]), prior.predict(calibration[0][0]))


def test_tampered_weights_are_refused(tmp_path, prior):
    folder = tmp_path / "prior"
    meta = save_prior(prior, str(folder))
    weights = folder / WEIGHTS_FILE
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # one bit of the last tensor's data
    weights.write_bytes(bytes(blob))
    with pytest.raises(PriorMismatchError, match=rf"{re.escape(WEIGHTS_FILE)} does not match "
                       rf"{re.escape(META_FILE)}.*expected {meta['digest']}"):
        load_prior(str(folder))


def test_other_format_and_missing_files_are_refused(tmp_path, prior):
    folder = tmp_path / "prior"
    save_prior(prior, str(folder))
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(PriorMismatchError, match="format 99"):
        load_prior(str(folder))
    with pytest.raises(FileNotFoundError, match="fit-regions"):
        load_prior(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize(("setting", "value"), [
    ("features", "dino"),
    ("feature_model", "vit_small_patch16_224.dino"),
    ("feature_size", 224),
    ("feature_kwargs", {"img_size": 224}),
])
def test_check_refuses_other_feature_settings(tmp_path, prior, config, setting, value):
    save_prior(prior, str(tmp_path / "prior"))
    loaded = load_prior(str(tmp_path / "prior"))
    other = config.replace(**{setting: value})
    with pytest.raises(PriorMismatchError, match=rf"other feature settings: {setting}="):
        loaded.check(other)
    loaded.check(config)


def test_predict_refuses_descriptions_of_another_width(prior, calibration):
    description = calibration[0][0]
    with pytest.raises(PriorMismatchError, match="description columns"):
        prior.predict(description[..., :-1])


def test_regions_key_follows_the_prior_content(tmp_path, prior, config, monkeypatch):
    """The regions stage's key names the prior's content: the same location holding other
    weights plans other keys."""
    from types import SimpleNamespace

    from lregions_core import stages
    from lregions_core.manifest import read_manifest

    save_prior(prior, str(tmp_path / "prior"))
    with_prior = config.replace(region_prior=str(tmp_path / "prior"))
    row = read_manifest(ORACLE_V2)[0]
    keys = stages.plan(row, "0" * 20, with_prior)
    assert keys == stages.plan(row, "0" * 20, with_prior)
    assert keys["features_key"] == stages.plan(row, "0" * 20, config)["features_key"]
    assert keys["regions_key"] != stages.plan(row, "0" * 20, config)["regions_key"]
    monkeypatch.setattr(stages, "load_prior", lambda location: SimpleNamespace(digest="0" * 16))
    other = stages.plan(row, "0" * 20, with_prior)
    assert other["features_key"] == keys["features_key"]
    assert other["regions_key"] != keys["regions_key"] and other["item_key"] != keys["item_key"]


# -- fitting and describing -----------------------------------------------------------------------
def test_fit_needs_five_photos(calibration, config):
    with pytest.raises(ValueError, match="at least 5 calibrated photos, got 4"):
        fit(calibration[:4], config)
    fit(calibration[:5], config, epochs=2)  # five are enough


def test_describe_gives_finite_columns_for_every_box(config, models):
    from lregions_core.pipeline import propose, to_working

    item = oracle.make_item_v2(7000)
    work = to_working(item.image, config.work_size, config.work_multiple)
    features = models.features(work)
    boxes = propose(config, features, work.size, 7000).boxes
    n, k, _ = boxes.shape
    description = describe(features, boxes, work.size)
    channels = features.patches.shape[0]
    assert description.shape == (n, k, len(BASE_COLUMNS) + 2 * channels)
    assert description.dtype == np.float32 and np.isfinite(description).all()
    area = description[..., BASE_COLUMNS.index("area_share")]
    assert ((area > 0) & (area <= 1)).all()
    below = description[..., BASE_COLUMNS.index("contrast_below_anchor_best")]
    assert np.allclose(below.max(axis=1), 0.0) and (below <= 0).all()

    # boxes that are degenerate or reach past the image still describe as finite numbers
    w, h = work.size
    odd = np.array([[[5, 5, 5, 5], [-40, -40, w + 40, h + 40], [w - 1, h - 1, w + 9, h + 9]]],
                   dtype=np.float32)
    assert np.isfinite(describe(features, odd, work.size)).all()


def test_prior_ranks_held_out_boxes_better_than_chance(calibration, config):
    # Each fit holds out a fifth of the photos (its own split per seed) and records how well it
    # ranks their boxes; eight held-out photos make one split noisy, so five splits are averaged.
    real = [fit(calibration, config, seed=s).meta["heldout_correlation"] for s in range(5)]
    shuffled = _shuffled(calibration)
    chance = [fit(shuffled, config, seed=s).meta["heldout_correlation"] for s in range(5)]
    assert np.mean(real) > 0.2, real
    assert np.mean(real) > np.mean(chance) + 0.15, (real, chance)
    assert abs(np.mean(chance)) < 0.15, chance

    # Fitted on 30 photos, the box it ranks first in each relevant anchor of the 10 others beats
    # fewer of that anchor's boxes than a box picked at random (or by a prior of shuffled losses).
    def beaten(prior) -> float:
        shares = []
        for description, losses in calibration[30:]:
            predicted = prior.predict(description)
            for a in np.flatnonzero(relevant_anchors(losses)):
                shares.append(float((losses[a] < losses[a][np.argmin(predicted[a])]).mean()))
        return float(np.mean(shares))

    fitted, blind = beaten(fit(calibration[:30], config)), beaten(fit(shuffled[:30], config))
    assert fitted < 0.4 and fitted < blind - 0.05, (fitted, blind)


# -- lregions fit-regions -------------------------------------------------------------------------
def test_fit_regions_command_writes_a_prior(tmp_path, config, calibration):
    out = tmp_path / "prior"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "fit-regions", str(ORACLE_V2), "--out", str(out),
         "--preset", "oracle", "--limit", "12"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    meta = json.loads((out / META_FILE).read_text())
    blob = (out / WEIGHTS_FILE).read_bytes()
    assert meta["digest"] == hashlib.sha256(blob).hexdigest()[:16]
    assert f"(digest {meta['digest']})" in done.stdout
    assert f"--set region_prior={out}" in done.stdout
    assert "calibrated 12 of 12 rows" in done.stdout
    n, k = calibration[0][1].shape  # anchors, proposals per anchor
    assert meta["photos"] == 12 and meta["boxes"] == 12 * n * k
    assert meta["settings"] == {key: getattr(config, key) for key in PRIOR_SETTINGS}
    loaded = load_prior(str(out))
    loaded.check(config)
    assert loaded.digest == meta["digest"]


def test_fit_regions_command_refuses_too_few_rows(tmp_path, capsys):
    from lregions_core.cli import main

    out = tmp_path / "prior"
    code = main(["fit-regions", str(ORACLE_V2), "--out", str(out), "--preset", "oracle",
                 "--limit", "3"])
    assert code == 1
    assert "at least 5 calibrated photos, got 3" in capsys.readouterr().err
    assert not out.exists()


# -- across real Prefect workers -----------------------------------------------------------------
POOL = "lregions-test-prior"
BATCH_ROWS = slice(20, 28)  # eight oracle_v2 rows


def _batch_manifest(path: Path) -> Path:
    """Eight rows of manifests/oracle_v2.csv, their images named by absolute path."""
    with open(ORACLE_V2, newline="") as handle:
        rows = list(csv.DictReader(handle))[BATCH_ROWS]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "image": str(ORACLE_V2.parent / row["image"])})
    return path


def _chosen(out: Path) -> dict[str, tuple[str, int, str]]:
    """Per row id: the chosen box (index.parquet), the edits it took and the regions cache key
    (result.json)."""
    table = pd.read_parquet(out / "index.parquet")
    assert (table["status"] == "ok").all(), table["error"].tolist()
    found = {}
    for row_id, box in zip(table["id"], table["box"]):
        result = json.loads((out / "items" / row_id / "result.json").read_text())
        assert ",".join(str(v) for v in result["box"]) == box
        found[row_id] = (box, result["editor_requests"], result["regions_path"])
    return found


def _planned_regions_paths(manifest: Path, found: dict, config) -> dict[str, str]:
    """Each row's regions folder as :func:`lregions_core.stages.plan` names it for ``config``
    (the image hash read from the folder the run used)."""
    from lregions_core.manifest import read_manifest
    from lregions_core.stages import plan, regions_folder

    planned = {}
    for row in read_manifest(manifest):
        image_hash = Path(found[row.id][2]).name.split("-")[0]
        keys = plan(row, image_hash, config)
        planned[row.id] = regions_folder({"image_hash": image_hash, **keys})
    return planned


def test_prior_on_s3_reaches_workers_and_chooses_the_one_process_boxes(tmp_path, s3_server,
                                                                        calibration, config):
    import s3fs
    from servers import (
        client_env,
        lregions,
        moto_recorder,
        prefect_server,
        start_worker,
        stop,
    )

    prior = fit(calibration[:20], config, seed=0)
    local = str(tmp_path / "prior")
    digest = save_prior(prior, local)["digest"]
    s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True).mkdir("lregions-prior")
    url = "s3://lregions-prior/oracle"
    assert save_prior(prior, url)["digest"] == digest

    manifest = _batch_manifest(tmp_path / "m8.csv")
    outs = {name: tmp_path / name for name in ("workers", "one-process", "no-prior")}
    with prefect_server(tmp_path / "server") as api:
        env = client_env(api, tmp_path / "client")
        deployed = lregions(env, "deploy", "--pool", POOL, timeout=300)
        assert deployed.returncode == 0, deployed.stderr[-3000:]

        logs = [tmp_path / f"worker{i}.log" for i in (1, 2)]
        workers = [start_worker(env, POOL, f"w{i}", log) for i, log in zip((1, 2), logs)]
        moto_recorder(s3_server, "reset")
        moto_recorder(s3_server, "start")
        try:
            sharded = lregions(env, "edit", str(manifest), "--out", str(outs["workers"]),
                               "--pool", POOL, "--shard-size", "2", "--wait-for-workers", "180",
                               "--preset", "oracle", "--set", f"region_prior={url}",
                               timeout=900)
        finally:
            moto_recorder(s3_server, "stop")
            for worker in workers:
                stop(worker)
        said = [log.read_text(errors="replace") for log in logs]
        assert sharded.returncode == 0, (sharded.stdout[-2000:] + sharded.stderr[-2000:]
                                         + "".join(s[-2000:] for s in said))
        requests = moto_recorder(s3_server, "download")

        one = lregions(env, "edit", str(manifest), "--out", str(outs["one-process"]), "--preset",
                       "oracle", "--set", f"region_prior={local}", timeout=600)
        assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
        bare = lregions(env, "edit", str(manifest), "--out", str(outs["no-prior"]), "--preset",
                        "oracle", timeout=600)
        assert bare.returncode == 0, bare.stdout[-2000:] + bare.stderr[-2000:]

    # both workers ran shards, and their flow runs read the prior's weights from the bucket
    for text in said:
        assert re.search(r"[Ss]ubmitting flow run", text), text[-3000:]
    reads = [r for r in requests if r["method"] == "GET"
             and r["url"].split("?")[0].endswith(f"/lregions-prior/oracle/{WEIGHTS_FILE}")]
    assert len(reads) >= 2, [r["url"] for r in requests]

    sharded_rows, one_rows, bare_rows = (_chosen(outs[k]) for k in outs)
    assert len(sharded_rows) == 8 and sharded_rows.keys() == one_rows.keys() == bare_rows.keys()
    # the same prior, fetched by the workers from S3 and by one process from a folder: the same
    # box after the same edits, row for row
    assert {k: v[:2] for k, v in sharded_rows.items()} == {k: v[:2] for k, v in one_rows.items()}
    # without it the search goes otherwise (the edits it takes, and some of the boxes)
    assert all(sharded_rows[k][1] != bare_rows[k][1] for k in sharded_rows) or any(
        sharded_rows[k][0] != bare_rows[k][0] for k in sharded_rows), (sharded_rows, bare_rows)

    # Each run's regions keys are the ones planned for its settings, the prior's digest included:
    # the same settings without the prior plan other keys for every row.
    with_url, with_folder = config.replace(region_prior=url), config.replace(region_prior=local)
    for found, settings in ((sharded_rows, with_url), (one_rows, with_folder), (bare_rows, config)):
        assert {k: v[2] for k, v in found.items()} == _planned_regions_paths(manifest, found,
                                                                             settings)
    bare_keys = _planned_regions_paths(manifest, bare_rows, config)
    assert all(sharded_rows[k][2] != bare_keys[k] != one_rows[k][2] for k in bare_keys)
