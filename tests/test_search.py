"""The Bayesian box search (``estimator="bayes"``) on oracle-world items: its loss model, its
rounds and caps, its levers, and that it is a function of the photo and seed alone."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from lregions_core import images, oracle
from lregions_core.config import ConfigError, make_config
from lregions_core.learner import CandidateBank, choose_regions
from lregions_core.pipeline import propose
from lregions_core.region_prior import describe, objectness
from lregions_core.search import LossModel, _pairwise_iou


def _world(seed: int, **changes):
    item = oracle.make_item_v2(seed)
    cfg = make_config("oracle", changes)
    work = images.to_working(item.image, cfg.work_size, cfg.work_multiple)
    feats = oracle.SaliencyFeatures()(work)
    scorer = oracle.OracleScorer(cfg.oracle_noise)
    props = propose(cfg, feats, work.size, seed)
    bank = CandidateBank(editor=oracle.Painter(1), scorer=scorer,
                         context=scorer.prepare(work, item.prompt, item.source_prompt),
                         image=work, prompt=item.prompt, seed=seed, loss_weights=(1.0, 1.0, 1.0))
    return SimpleNamespace(cfg=cfg, work=work, feats=feats, props=props, bank=bank, item=item)


def _search(seed: int, **changes):
    w = _world(seed, **changes)
    outcome = choose_regions(w.cfg, w.feats, w.props.boxes, w.work.size, w.bank, seed)
    return w, outcome


def test_the_loss_model_interpolates_an_exact_judge_and_smooths_a_noisy_one():
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 12, 12], [50, 50, 60, 60]]], dtype=float)
    ranking = np.zeros((1, 3))
    tried, losses = np.array([0, 2]), np.array([0.2, 0.9])
    exact = LossModel(boxes, ranking, 0.0, 0.0).posterior(tried, losses)[0]
    noisy = LossModel(boxes, ranking, 0.0, 1.0).posterior(tried, losses)[0]
    standardised = (losses - losses.mean()) / losses.std()
    np.testing.assert_allclose(exact[tried], standardised, atol=1e-3)  # exact: the losses
    assert abs(noisy[0] - noisy[2]) < abs(exact[0] - exact[2])  # noisy: pulled together
    # an untried box that overlaps a tried one is predicted like it, more than a far one
    assert abs(exact[1] - exact[0]) < abs(exact[1] - exact[2])


def test_box_overlap_covariance_is_positive_semidefinite():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (60, 2))
    wh = rng.uniform(1, 50, (60, 2))
    iou = _pairwise_iou(np.concatenate([xy, xy + wh], axis=1))
    assert np.linalg.eigvalsh(iou ** 2).min() > -1e-9
    np.testing.assert_allclose(np.diag(iou), 1.0)


def test_objectness_ranks_boxes_that_fit_the_object_first():
    # over items, the best-ranked box of the anchor nearest the target overlaps it more than
    # the anchor's average box
    best, mean = [], []
    for seed in range(2000, 2030):
        w = _world(seed)
        target = images.scale_box(w.item.target_box, w.item.image.size, w.work.size)
        ranking = objectness(describe(w.feats, w.props.boxes, w.work.size))
        iou = _pairwise_iou(np.concatenate([w.props.boxes.reshape(-1, 4), [target]]))[-1, :-1]
        iou = iou.reshape(ranking.shape)
        a = iou.max(axis=1).argmax()
        best.append(iou[a, ranking[a].argmin()])
        mean.append(iou[a].mean())
    assert np.mean(best) > np.mean(mean) + 0.05, (np.mean(best), np.mean(mean))


def test_rounds_halve_the_anchors_and_respect_the_edit_cap():
    w, outcome = _search(2001)
    n = w.props.boxes.shape[0]
    trace = outcome.trace
    assert trace[0]["edited"] == n  # round 0: one box per anchor
    for before, after in itertools.pairwise(trace):
        assert after["edited"] <= max(1, int(np.ceil(0.7 * before["edited"])))
    _, capped = _search(2001, rgn_budget=n + 2)
    assert capped.trace[-1]["boxes_tried"] <= n + 2
    w_cap, _ = _search(2001, rgn_budget=n + 2)
    assert w_cap.bank.editor_requests <= n + 2


def test_each_anchor_keeps_a_tried_box():
    w, outcome = _search(2002)
    table = w.bank.loss_table(w.props.boxes)
    for a, j in enumerate(outcome.chosen):
        assert not np.isnan(table[a, j])  # no edit after the search
    assert len(outcome.candidates) == w.props.boxes.shape[0]


def test_with_an_exact_judge_each_anchor_keeps_its_lowest_loss():
    w, outcome = _search(2003, rgn_noise=0.0)
    table = w.bank.loss_table(w.props.boxes)
    for a, j in enumerate(outcome.chosen):
        assert table[a, j] == pytest.approx(np.nanmin(table[a]))


@pytest.mark.parametrize("changes", [{}, {"rgn_acquisition": "thompson"}, {"oracle_noise": 0.1}])
def test_the_search_is_a_function_of_the_photo_and_seed(changes):
    _, a = _search(2004, **changes)
    _, b = _search(2004, **changes)
    np.testing.assert_array_equal(a.chosen, b.chosen)
    assert a.trace == b.trace


def test_a_stricter_confidence_and_no_halving_spend_more_edits():
    spent = {}
    for label, changes in {"preset": {}, "wider": {"rgn_halving": 1.0, "rgn_confidence": 0.999}}.items():
        spent[label] = sum(_search(seed, **changes)[0].bank.editor_requests
                           for seed in range(2010, 2016))
    assert spent["wider"] > spent["preset"], spent


@pytest.mark.parametrize(("key", "value"), [
    ("rgn_halving", 0.0), ("rgn_halving", 1.5), ("rgn_confidence", 1.0), ("rgn_noise", -0.1),
    ("rgn_acquisition", "ucb"), ("rgn_init", "saliency"), ("rgn_budget", -1),
])
def test_bad_search_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        make_config("oracle", {key: value})


def test_a_prior_with_the_prompts_embedding_runs_with_clip(tmp_path):
    # CLIP's scorer gives a prompt embedding: the prior's descriptions end with it, the prior
    # records its width, and a search with that prior runs end to end (tiny models)
    from skimage import data

    from lregions_core.images import to_working
    from lregions_core.pipeline import Models, calibration_photo, edit_image
    from lregions_core.region_prior import fit, load_prior, prompt_embedding, save_prior

    config = make_config("tiny", {"num_anchors": 3})
    models = Models.load(config)
    photo = images.Image.fromarray(data.chelsea()).convert("RGB")
    work = to_working(photo, config.work_size, config.work_multiple)
    text = prompt_embedding(models.scorer.prepare(work, "a red hat", "a cat"))
    assert text is not None and text.ndim == 1
    item = oracle.make_item(1)
    assert prompt_embedding(oracle.OracleScorer().prepare(
        item.image, item.prompt, item.source_prompt)) is None
    photos = [calibration_photo(config, models, photo.rotate(90 * i, expand=True), prompt, "a cat", i)
              for i, prompt in enumerate(["a red hat", "a dog", "a hat", "a car", "a tree"])]
    description, losses = photos[0]
    np.testing.assert_allclose(description[..., -text.size:], np.broadcast_to(
        text, description.shape[:2] + text.shape), rtol=1e-6)
    assert losses.shape == description.shape[:2]
    save_prior(fit(photos, config, text_dims=text.size, epochs=2), str(tmp_path / "prior"))
    prior = load_prior(str(tmp_path / "prior"))
    assert prior.meta["prompt_dims"] == text.size
    result = edit_image(photo, "a red hat", source_prompt="a cat", models=models, seed=0,
                        config=config.replace(region_prior=str(tmp_path / "prior")))
    assert 3 <= result.editor_requests <= config.rgn_budget
