"""Oracle world v2: the generator's range, the noisy judge, and the new proposals and anchors.

The region-choice thresholds are in ``tests/test_regions_v2.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from lregions_core import images, oracle
from lregions_core.anchors import box_iou, find_anchors, make_proposals, refine_cells
from lregions_core.config import ConfigError, make_config
from lregions_core.interfaces import EditRequest
from lregions_core.pipeline import propose

SEEDS = range(1000, 1060)


@pytest.fixture(scope="module")
def items():
    return {seed: oracle.make_item_v2(seed) for seed in SEEDS}


def _colours_present(item) -> set[str]:
    pixels = np.asarray(item.image)
    return {name for name in oracle.COLOURS if oracle._near(pixels, name).sum() >= 4}


# -- the generator ------------------------------------------------------------------------------
def test_items_are_reproducible_and_differ_by_seed():
    a, b, c = oracle.make_item_v2(7), oracle.make_item_v2(7), oracle.make_item_v2(8)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.prompt, a.source_prompt, a.target_box) == (b.prompt, b.source_prompt, b.target_box)
    assert a.image.size != c.image.size or not np.array_equal(np.asarray(a.image),
                                                              np.asarray(c.image))


def test_sizes_and_aspect_ratios_span_the_range(items):
    sides = np.array([max(i.image.size) for i in items.values()])
    ratios = np.array([max(i.image.size) / min(i.image.size) for i in items.values()])
    assert sides.min() >= 150 and sides.max() <= 1024
    assert sides.min() < 250 and sides.max() > 700  # small and large images both occur
    assert ratios.max() <= 3.1 and ratios.max() > 2.5 and (ratios < 1.3).any()
    portrait = sum(i.image.height > i.image.width for i in items.values())
    assert 0 < portrait < len(items)  # both orientations


def test_targets_range_from_thin_bars_to_large_blobs(items):
    boxes = np.array([i.target_box for i in items.values()], dtype=float)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    elongation = np.maximum(w, h) / np.minimum(w, h)
    short = np.array([min(i.image.size) for i in items.values()])
    assert (elongation >= 3).sum() >= 5  # thin bars, horizontal and vertical
    assert (w > h * 3).any() and (h > w * 3).any()
    assert (np.sqrt(w * h) / short > 0.45).any()  # large blobs
    assert (np.sqrt(w * h) / short < 0.15).any()  # small targets
    touching = [
        b[0] == 0 or b[1] == 0 or b[2] == i.image.width or b[3] == i.image.height
        for b, i in zip(boxes, items.values())
    ]
    assert 5 <= sum(touching) < len(items)


def test_captions_follow_the_palette_contract_and_distractors_are_other_colours(items):
    counts = []
    for item in items.values():
        target, prompt = oracle.colour_in(item.source_prompt), oracle.colour_in(item.prompt)
        assert target != prompt
        assert item.source_prompt.split()[-1] == item.prompt.split()[-1] in oracle.SHAPES_V2
        present = _colours_present(item)
        assert target in present and prompt not in present
        counts.append(len(present - {target}))
    assert min(counts) >= 1 and max(counts) <= 5  # distractors, and an occluder's colour


def test_the_wide_generator_adds_shades_second_targets_and_occluders_over_the_same_layout():
    shaded = grown = covered = 0
    for seed in range(1000, 1060):
        wide, narrow = oracle.make_item_v2(seed), oracle.make_item_v2(seed, wide=False)
        assert (wide.image.size, wide.prompt, wide.source_prompt) == (
            narrow.image.size, narrow.prompt, narrow.source_prompt)
        a, b = np.asarray(wide.image).astype(int), np.asarray(narrow.image).astype(int)
        target = oracle.colour_in(wide.source_prompt)
        assert oracle._near(a, target).any() and not oracle._near(a, oracle.colour_in(wide.prompt)).any()
        changed = np.abs(a - b).sum(-1) > 0
        new_pixels = a[changed]
        # shades of the target's colour: near it but outside the judge's tolerance
        distance = np.linalg.norm(new_pixels - np.array(oracle.COLOURS[target]), axis=-1)
        shaded += bool(((distance > oracle.COLOUR_TOLERANCE) & (distance < 120)).sum() > 20)
        wx0, wy0, wx1, wy1 = wide.target_box
        nx0, ny0, nx1, ny1 = narrow.target_box
        grown += (wx1 - wx0) * (wy1 - wy0) > 1.2 * (nx1 - nx0) * (ny1 - ny0)  # a second target
        hidden = oracle._near(b, target) & ~oracle._near(a, target)
        covered += bool(hidden.sum() > 0.05 * oracle._near(b, target).sum())
    assert 15 <= shaded <= 45 and 3 <= grown <= 20 and 5 <= covered <= 25, (shaded, grown, covered)


def test_target_box_is_the_drawn_target(items):
    for item in list(items.values())[:10]:
        mask = oracle._near(np.asarray(item.image), oracle.colour_in(item.source_prompt))
        ys, xs = np.nonzero(mask)
        assert item.target_box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_background_is_never_a_palette_colour_and_barely_salient():
    # the narrower generator's items: the wide one adds shades of palette colours on purpose
    for item in [oracle.make_item_v2(seed, wide=False) for seed in range(1000, 1010)]:
        pixels = np.asarray(item.image).astype(int)
        objects = np.zeros(pixels.shape[:2], bool)
        for name in oracle.COLOURS:
            objects |= oracle._near(pixels, name)
        # everything not an object (allowing for anti-aliased edges) is low-saturation grey
        grown = objects.copy()
        for axis in (0, 1):
            for shift in (-1, 1):
                grown |= np.roll(objects, shift, axis=axis)
        background = pixels[~grown]
        assert (background.max(axis=1) - background.min(axis=1)).max() <= 14


# -- the noisy judge ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judged():
    item = oracle.make_item_v2(1001)
    work = images.to_working(item.image, 256, 16)
    boxes = [(x, y, x + w, y + h) for x in (0, 40, 80) for y in (0, 30) for w in (30, 60)
             for h in (20, 50)]
    requests = [EditRequest(work, images.box_mask(work.size, b), item.prompt, 3) for b in boxes]
    edits = oracle.Painter(1).edit(requests)
    exact = oracle.OracleScorer(0.0)
    context = exact.prepare(work, item.prompt, item.source_prompt)
    return item, work, boxes, edits, exact, context


def _values(scores) -> np.ndarray:
    return np.array([[s.loss_clip, s.loss_dir, s.loss_str, s.text_sim, s.image_sim]
                     for s in scores])


def test_noise_is_deterministic_per_image_box_and_seed(judged):
    item, work, _boxes, edits, exact, context = judged
    noisy = oracle.OracleScorer(0.1)
    ctx = noisy.prepare(work, item.prompt, item.source_prompt)
    first = _values(noisy.score(ctx, edits, [3] * len(edits)))
    again = _values(noisy.score(ctx, edits[::-1], [3] * len(edits)))[::-1]
    np.testing.assert_array_equal(first, again)  # same edit, same judgment, in any batch order
    # another seed: other noise for the same pixels
    other_seed = _values(noisy.score(ctx, edits, [4] * len(edits)))
    assert (np.abs(first - other_seed) > 1e-6).all()
    # another image (same pixels, other captions): other noise
    ctx2 = noisy.prepare(work, item.prompt.replace("a ", "the ", 1), item.source_prompt)
    assert not np.allclose(_values(noisy.score(ctx2, edits, [3] * len(edits))), first)
    # every box has its own noise
    truth = _values(exact.score(context, edits, [3] * len(edits)))
    deltas = first - truth
    assert len({tuple(np.round(d, 9)) for d in deltas}) == len(edits)


def test_noise_scales_with_the_setting_and_zero_is_exact(judged):
    item, work, _boxes, edits, exact, context = judged
    truth = _values(exact.score(context, edits, [3] * len(edits)))
    zero = oracle.OracleScorer(0.0)
    np.testing.assert_array_equal(
        _values(zero.score(zero.prepare(work, item.prompt, item.source_prompt), edits,
                           [3] * len(edits))), truth)
    deltas = {}
    for level in (0.05, 0.1):
        scorer = oracle.OracleScorer(level)
        ctx = scorer.prepare(work, item.prompt, item.source_prompt)
        deltas[level] = _values(scorer.score(ctx, edits, [3] * len(edits))) - truth
    # the same standard-normal draws, scaled: two levels differ by their ratio exactly
    np.testing.assert_allclose(deltas[0.1], 2 * deltas[0.05], atol=1e-12)
    # each of the five values is perturbed, with a standard deviation near the setting
    assert (np.abs(deltas[0.1]) > 0).all()
    assert 0.06 < deltas[0.1].std() < 0.14


def test_noise_statistics_over_many_edits():
    item = oracle.make_item_v2(1002)
    work = images.to_working(item.image, 128, 16)
    scorer = oracle.OracleScorer(0.1)
    ctx = scorer.prepare(work, item.prompt, item.source_prompt)
    exact = oracle.OracleScorer(0.0)
    ectx = exact.prepare(work, item.prompt, item.source_prompt)
    rng = np.random.default_rng(0)
    boxes = [tuple(float(v) for v in np.sort(rng.uniform(0, 1, 2)) * work.width) +
             tuple(float(v) for v in np.sort(rng.uniform(0, 1, 2)) * work.height)
             for _ in range(150)]
    boxes = [(b[0], b[2], b[1], b[3]) for b in boxes]
    edits = oracle.Painter(1).edit(
        [EditRequest(work, images.box_mask(work.size, b), item.prompt, 0) for b in boxes])
    deltas = _values(scorer.score(ctx, edits, [0] * 150)) - _values(exact.score(ectx, edits,
                                                                              [0] * 150))
    assert np.abs(deltas.mean(axis=0)).max() < 0.035  # unbiased
    assert np.all(np.abs(deltas.std(axis=0) - 0.1) < 0.025)
    correlation = np.corrcoef(deltas.T)[np.triu_indices(5, 1)]
    assert np.abs(correlation).max() < 0.3  # independent terms


def test_oracle_noise_setting_is_validated_and_reaches_the_scorer():
    from lregions_core.pipeline import Models

    config = make_config("oracle", {"oracle_noise": 0.1})
    assert Models.load(config).scorer.noise == 0.1
    assert make_config("oracle").digest() != config.digest()
    with pytest.raises(ConfigError, match="oracle_noise"):
        make_config("oracle", {"oracle_noise": -0.1})
    with pytest.raises(ConfigError, match="oracle scorer"):
        make_config("default", {"oracle_noise": 0.1})


# -- proposals and anchors ----------------------------------------------------------------------
def test_aspect_proposals_keep_the_area_and_order_size_major():
    boxes = make_proposals(np.array([[200.0, 100.0]]), (400, 200), 2, 0.1, 0.2,
                           aspects=[0.25, 1.0, 4.0], spacing="geometric")
    assert boxes.shape == (1, 6, 4)
    w = boxes[0, :, 2] - boxes[0, :, 0]
    h = boxes[0, :, 3] - boxes[0, :, 1]
    # half-size s = 20, 40 px; ratio a: half-width s*sqrt(a), half-height s/sqrt(a)
    np.testing.assert_allclose(w, [20, 40, 80, 40, 80, 160])
    np.testing.assert_allclose(h, [80, 40, 20, 160, 80, 40])
    np.testing.assert_allclose(w * h, np.repeat([1600, 6400], 3))


def test_geometric_spacing_has_a_constant_ratio_and_linear_is_the_reference():
    geo = make_proposals(np.array([[500.0, 500.0]]), (1000, 1000), 4, 0.05, 0.4,
                         spacing="geometric")
    sizes = geo[0, :, 2] - geo[0, :, 0]
    np.testing.assert_allclose(sizes[1:] / sizes[:-1], 2.0)
    lin = make_proposals(np.array([[500.0, 500.0]]), (1000, 1000), 4, 0.1, 0.4)
    np.testing.assert_allclose(lin[0, :, 2] - lin[0, :, 0], [200, 400, 600, 800])
    with pytest.raises(ValueError, match="spacing"):
        make_proposals(np.zeros((1, 2)), (10, 10), 2, 0.1, 0.2, spacing="cubic")


def test_proposal_settings_are_validated():
    assert make_config("default", {"proposal_aspects": [1, 2]}).proposal_aspects == [1.0, 2.0]
    assert (make_config("default", {"proposal_aspects": [1, 2]}).digest()
            == make_config("default", {"proposal_aspects": [1.0, 2.0]}).digest())
    for bad in ([], [0.0], [1, -2], "wide", [True]):
        with pytest.raises(ConfigError, match="proposal_aspects"):
            make_config("default", {"proposal_aspects": bad})
    with pytest.raises(ConfigError, match="proposal_spacing"):
        make_config("default", {"proposal_spacing": "cubic"})


def test_propose_uses_every_aspect_for_every_size():
    config = make_config("oracle", {"num_proposals": 4, "proposal_aspects": [0.5, 1, 2],
                                    "mode": "exhaustive"})
    item = oracle.make_item_v2(1003)
    work = images.to_working(item.image, config.work_size, config.work_multiple)
    props = propose(config, oracle.SaliencyFeatures()(work), work.size, 0)
    assert props.boxes.shape == (config.num_anchors, 12, 4)


def _blob_field() -> np.ndarray:
    """A large bright blob (peak 1.0) and a small dim one (peak 0.3) on a 16x24 grid."""
    rows, cols = np.mgrid[0:16, 0:24].astype(float)
    big = np.exp(-((rows - 8) ** 2 + (cols - 7) ** 2) / (2 * 3.0**2))
    small = 0.3 * np.exp(-((rows - 4) ** 2 + (cols - 19) ** 2) / (2 * 1.0**2))
    return big + small


def test_peaks_rule_gives_the_small_object_an_anchor_where_nms_does_not():
    field = _blob_field()
    peaks = [tuple(c) for c in find_anchors(field, 3, rule="peaks", spread=0.1)]
    nms = [tuple(c) for c in find_anchors(field, 3, rule="nms", spread=0.1)]
    assert peaks[:2] == [(8, 7), (4, 19)]  # each hill's top, highest first
    assert (4, 19) not in nms  # nms spends all three anchors on the big blob's slopes
    # when every hill has an anchor, the rest follow nms among the unused cells
    more = [tuple(c) for c in find_anchors(field, 5, rule="peaks", spread=0.1)]
    assert more[:2] == peaks[:2] and len(set(more)) == 5


def test_peaks_rule_on_a_plateau_takes_one_anchor_per_object():
    field = np.zeros((10, 20))
    field[2:8, 2:9] = 1.0  # a flat plateau: every cell ties
    field[4:6, 14:16] = 0.5
    cells = [tuple(c) for c in find_anchors(field, 2, rule="peaks", spread=0.1)]
    assert cells[0] == (2, 2) and cells[1] == (4, 14)  # ties broken in raster order


def test_refined_anchor_moves_towards_the_attention_centre():
    field = np.zeros((5, 5))
    field[2, 1:4] = [0.5, 1.0, 0.75]  # peak cell 2, heavier on the right
    field[1:4, 2] = [0.6, 1.0, 0.6]  # symmetric vertically
    (pos,) = refine_cells(field, np.array([[2, 2]]))
    # parabola through 0.5, 1, 0.75: vertex at (0.5 - 0.75) / (2 * (0.5 - 2 + 0.75)) = 1/6
    np.testing.assert_allclose(pos, [2.0, 2 + 1 / 6])
    edge = refine_cells(field, np.array([[0, 2]]))  # no neighbour above: row kept
    assert edge[0, 0] == 0.0


def test_new_anchors_and_proposals_fit_v2_targets_better(items):
    """Where the best proposal of any anchor fits the target (oracle-world box IoU)."""
    def ceiling(settings):
        config = make_config("oracle", {"mode": "exhaustive", **settings})
        out = []
        for item in list(items.values())[:30]:
            work = images.to_working(item.image, config.work_size, config.work_multiple)
            props = propose(config, oracle.SaliencyFeatures()(work), work.size, 0)
            scale = np.array([work.width / item.image.width, work.height / item.image.height] * 2)
            out.append(box_iou(props.boxes, np.array(item.target_box) * scale).max())
        return float(np.mean(out))

    square = {"anchor_rule": "nms", "anchor_refine": False, "proposal_aspects": [1.0],
              "proposal_spacing": "linear", "proposal_min": 0.125, "proposal_max": 0.4375,
              "num_proposals": 6}
    reference = ceiling(square)
    fitted = ceiling({})  # the preset's proposal family and anchors
    assert fitted > reference + 0.15, (reference, fitted)
    assert ceiling({**square, "anchor_rule": "peaks"}) > reference + 0.05
