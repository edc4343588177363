"""Tests for lregions_core.learner: the memoised candidate bank, the four region-choice modes and
the region network's learning, in the oracle world (CPU, exact scores, no weights)."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lregions_core import images, oracle
from lregions_core.config import make_config
from lregions_core.images import box_mask
from lregions_core.interfaces import EditRequest
from lregions_core.learner import CandidateBank, choose_regions
from lregions_core.pipeline import propose


class CountingEditor:
    """Wraps an editor and records every request it is asked to edit."""

    name = "counting"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.steps_per_call = inner.steps_per_call
        self.requests: list[EditRequest] = []
        self.calls = 0

    def edit(self, requests: Sequence[EditRequest]):
        self.calls += 1
        self.requests.extend(requests)
        return self.inner.edit(requests)

    def mask_keys(self) -> list[bytes]:
        return [np.asarray(r.mask).tobytes() for r in self.requests]


@pytest.fixture(scope="module")
def world():
    item = oracle.make_item(3)
    cfg = make_config("oracle", {"estimator": "regression"})  # the region network's learners
    work = images.to_working(item.image, cfg.work_size, cfg.work_multiple)
    feats = oracle.SaliencyFeatures()(work)
    scorer = oracle.OracleScorer()
    context = scorer.prepare(work, item.prompt, item.source_prompt)
    return SimpleNamespace(
        item=item, cfg=cfg, work=work, feats=feats, scorer=scorer, context=context
    )


def _bank(world, *, steps: int = 1, seed: int = 0, weights=(1.0, 1.0, 1.0)):
    editor = CountingEditor(oracle.Painter(steps))
    bank = CandidateBank(
        editor=editor,
        scorer=world.scorer,
        context=world.context,
        image=world.work,
        prompt=world.item.prompt,
        seed=seed,
        loss_weights=weights,
    )
    return bank, editor


def _run(world, seed: int = 0, steps: int = 1, **changes):
    cfg = world.cfg.replace(**changes)
    props = propose(cfg, world.feats, world.work.size, seed)
    bank, editor = _bank(world, steps=steps, seed=seed)
    outcome = choose_regions(cfg, world.feats, props.boxes, world.work.size, bank, seed)
    return SimpleNamespace(cfg=cfg, props=props, bank=bank, editor=editor, outcome=outcome)


def _unique_boxes(boxes: np.ndarray, size: tuple[int, int]) -> int:
    """Distinct masks among ``boxes`` (two boxes clipped to the same pixels are one edit)."""
    return len({images.pixel_box(np.round(b, 3), size) for b in boxes.reshape(-1, 4)})


def _check_candidates(run) -> None:
    """One candidate per anchor, for the chosen proposal's box."""
    boxes = run.props.boxes
    chosen = run.outcome.chosen
    assert chosen.shape == (boxes.shape[0],)
    assert len(run.outcome.candidates) == boxes.shape[0]
    for a, cand in enumerate(run.outcome.candidates):
        assert cand.anchor == a
        assert cand.proposal == int(chosen[a])
        np.testing.assert_allclose(cand.box, boxes[a, chosen[a]])
        assert cand.image.size == run.bank.image.size


def _assert_no_box_edited_twice(editor: CountingEditor) -> None:
    keys = editor.mask_keys()
    assert len(keys) == len(set(keys))


# ------------------------------------------------------------------------------------------------
# CandidateBank
# ------------------------------------------------------------------------------------------------
def test_bank_memoises_repeated_fetches(world):
    bank, editor = _bank(world)
    box_a = (10.0, 12.0, 50.0, 60.0)
    box_b = (30.0, 30.0, 90.0, 100.0)
    first = bank.fetch([(0, 0, box_a), (0, 1, box_b)])
    assert editor.calls == 1 and len(editor.requests) == 2
    assert bank.editor_requests == 2 and bank.editor_batches == 1
    again = bank.fetch([(0, 1, box_b), (0, 0, box_a)])
    assert editor.calls == 1 and len(editor.requests) == 2  # nothing re-edited
    assert bank.editor_requests == 2 and bank.editor_batches == 1
    assert again[1].image is first[0].image
    assert again[0].loss == first[1].loss
    # a new box among known ones: only the new one is edited
    bank.fetch([(1, 0, box_a), (1, 1, (0.0, 0.0, 20.0, 20.0)), (1, 2, box_b)])
    assert editor.calls == 2 and len(editor.requests) == 3
    assert bank.editor_requests == 3 and bank.editor_batches == 2
    _assert_no_box_edited_twice(editor)


def test_bank_identical_box_of_two_anchors_edited_once(world):
    bank, editor = _bank(world)
    shared = np.array([20.0, 10.0, 70.0, 80.0])
    out = bank.fetch([(0, 2, shared), (1, 4, shared.copy()), (2, 0, tuple(shared))])
    assert len(editor.requests) == 1
    assert [(c.anchor, c.proposal) for c in out] == [(0, 2), (1, 4), (2, 0)]
    assert out[0].image is out[1].image is out[2].image
    assert out[0].loss == out[1].loss == out[2].loss
    # boxes equal to 3 decimals share the memo too
    bank.fetch([(3, 0, shared + 1e-5)])
    assert len(editor.requests) == 1
    assert bank.known(shared) and bank.known(shared + 1e-5)
    assert not bank.known(shared + 0.01)


def test_bank_requests_and_losses(world):
    bank, editor = _bank(world, seed=5, weights=(1.0, 2.0, 3.0))
    box = (16.0, 8.0, 64.0, 72.0)
    assert bank.loss_of(box) is None
    (cand,) = bank.fetch([(0, 0, box)])
    (req,) = editor.requests
    assert req.prompt == world.item.prompt
    assert req.seed == 5
    assert req.image is world.work
    assert np.array_equal(np.asarray(req.mask), np.asarray(box_mask(world.work.size, box)))
    s = cand.scores
    assert cand.loss == pytest.approx(s.loss_clip + 2 * s.loss_dir + 3 * s.loss_str)
    assert bank.loss_of(box) == pytest.approx(cand.loss)
    # the scores are the oracle scorer's for that edit
    expected = world.scorer.score(world.context, oracle.Painter(1).edit([req]), [5])[0]
    assert s == expected


def test_bank_denoise_steps(world):
    bank, _ = _bank(world, steps=7)
    assert bank.denoise_steps == 0
    bank.fetch([(0, 0, (0, 0, 10, 10)), (0, 1, (0, 0, 20, 20))])
    bank.fetch([(0, 1, (0, 0, 20, 20)), (0, 2, (0, 0, 30, 30))])
    assert bank.editor_requests == 3
    assert bank.denoise_steps == 3 * 7


# ------------------------------------------------------------------------------------------------
# exhaustive / random / dino-random
# ------------------------------------------------------------------------------------------------
def test_exhaustive_edits_every_box_once_and_takes_argmin(world):
    run = _run(world, mode="exhaustive", steps=3)
    boxes = run.props.boxes
    n, k, _ = boxes.shape
    assert (n, k) == (world.cfg.num_anchors, world.cfg.proposals_per_anchor)
    unique = _unique_boxes(boxes, world.work.size)
    assert run.bank.editor_requests == unique
    assert len(run.editor.requests) == unique
    assert run.editor.calls == 1  # all boxes in one batch; the final fetch is all memo hits
    assert run.bank.denoise_steps == unique * 3
    _assert_no_box_edited_twice(run.editor)
    # recompute every loss independently and check each anchor's choice is its argmin
    painter = oracle.Painter(1)
    table = np.empty((n, k))
    for a in range(n):
        for j in range(k):
            req = EditRequest(
                world.work, box_mask(world.work.size, boxes[a, j]), world.item.prompt, 0
            )
            table[a, j] = world.scorer.score(world.context, painter.edit([req]), [0])[0].total(
                1, 1, 1
            )
    np.testing.assert_allclose(run.bank.loss_table(boxes), table)
    np.testing.assert_array_equal(run.outcome.chosen, table.argmin(axis=1))
    _check_candidates(run)
    for a, cand in enumerate(run.outcome.candidates):
        assert cand.loss == pytest.approx(table[a].min())
    assert run.outcome.probs is None and run.outcome.param_change == 0.0


def test_exhaustive_with_duplicate_boxes_across_anchors(world):
    # anchor 1 has exactly anchor 0's boxes: only K edits, and both pick the same proposal
    base = np.array([[[0, 0, 20, 20], [0, 0, 60, 60], [0, 0, 100, 100]]], dtype=np.float64)
    boxes = np.concatenate([base, base.copy()])
    bank, editor = _bank(world)
    cfg = world.cfg.replace(mode="exhaustive", num_anchors=2, num_proposals=3)
    out = choose_regions(cfg, world.feats, boxes, world.work.size, bank, 0)
    assert bank.editor_requests == 3
    assert len(editor.requests) == 3
    assert out.chosen[0] == out.chosen[1]


@pytest.mark.parametrize("mode", ["random", "dino-random"])
def test_random_modes_edit_one_box_per_anchor(world, mode):
    run = _run(world, mode=mode)
    n, k, _ = run.props.boxes.shape
    assert run.bank.editor_requests == n
    assert run.editor.calls == 1
    _assert_no_box_edited_twice(run.editor)
    _check_candidates(run)
    assert ((run.outcome.chosen >= 0) & (run.outcome.chosen < k)).all()
    assert run.outcome.probs is None
    # same seed: same sizes; another seed: other sizes
    again = _run(world, mode=mode)
    np.testing.assert_array_equal(run.outcome.chosen, again.outcome.chosen)
    other = _run(world, mode=mode, seed=1)
    assert not np.array_equal(run.outcome.chosen, other.outcome.chosen)


def test_random_mode_anchors_are_random_and_dino_random_anchors_are_attention(world):
    dino0 = _run(world, mode="dino-random", seed=0).props.cells
    dino1 = _run(world, mode="dino-random", seed=1).props.cells
    rgn = propose(world.cfg, world.feats, world.work.size, 0).cells
    np.testing.assert_array_equal(dino0, dino1)
    np.testing.assert_array_equal(dino0, rgn)
    rand0 = _run(world, mode="random", seed=0).props.cells
    rand1 = _run(world, mode="random", seed=1).props.cells
    assert not np.array_equal(rand0, rand1)
    assert len({tuple(c) for c in rand0}) == len(rand0)


# ------------------------------------------------------------------------------------------------
# rgn: learning the box
# ------------------------------------------------------------------------------------------------
def test_rgn_learns(world):
    # the policy's own most probable box per anchor (rgn_final="policy"): learning, not the memo,
    # decides the box
    run = _run(world, mode="rgn", rgn_final="policy")
    out = run.outcome
    cfg = run.cfg
    boxes = run.props.boxes
    n, k, _ = boxes.shape
    _check_candidates(run)
    _assert_no_box_edited_twice(run.editor)
    assert run.bank.editor_requests <= (cfg.iterations + 1) * n
    assert run.editor.calls <= cfg.iterations + 1
    assert run.bank.denoise_steps == run.bank.editor_requests * 1

    # the policy starts uniform (zero-initialised last layer) ...
    assert out.initial_probs.shape == (n, k)
    assert (out.initial_probs == out.initial_probs[0, 0]).all()
    np.testing.assert_allclose(out.initial_probs, 1.0 / k, rtol=1e-6)
    # ... the network's parameters move and the distribution leaves uniform
    assert out.param_change > 0
    assert out.probs.shape == (n, k)
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert np.abs(out.probs - out.initial_probs).max() > 0.1
    np.testing.assert_array_equal(out.chosen, out.probs.argmax(axis=1))

    # the expected loss over the tried boxes is lower under the final policy than uniformly
    table = run.bank.loss_table(boxes)
    known = ~np.isnan(table)
    filled = np.where(known, table, 0.0)

    def expected(p):
        return float(((p * filled).sum(1) / (p * known).sum(1)).mean())

    before = expected(out.initial_probs)
    after = expected(out.probs)
    assert after < before

    # the policy's expected loss over the boxes tried so far falls during learning
    assert out.trace[-1]["expected_loss"] < out.trace[0]["expected_loss"]

    # the trace records every iteration
    assert [t["iteration"] for t in out.trace] == list(range(cfg.iterations))
    tried = [t["boxes_tried"] for t in out.trace]
    assert tried == sorted(tried)
    assert all(t <= (i + 1) * n for i, t in enumerate(tried))


def test_rgn_boxes_beat_random_sizes_and_never_beat_exhaustive(world):
    # same anchors in all three modes; exhaustive is each anchor's best box (a lower bound)
    def mean_loss(mode):
        return np.mean([c.loss for c in _run(world, mode=mode).outcome.candidates])

    rgn, best, rand = mean_loss("rgn"), mean_loss("exhaustive"), mean_loss("dino-random")
    assert best <= rgn < rand


def test_rgn_zero_iterations_edits_n_boxes(world):
    run = _run(world, mode="rgn", iterations=0)
    n, k, _ = run.props.boxes.shape
    out = run.outcome
    assert run.bank.editor_requests == n
    assert out.param_change == 0.0
    assert out.trace == []
    np.testing.assert_array_equal(out.probs, out.initial_probs)
    np.testing.assert_allclose(out.probs, 1.0 / k, rtol=1e-6)
    # ties: argmax of a uniform row is the first proposal
    np.testing.assert_array_equal(out.chosen, np.zeros(n, dtype=int))
    _check_candidates(run)


@pytest.mark.parametrize("estimator", ["memo-expectation", "reinforce"])
def test_rgn_estimators_run_and_move_parameters(world, estimator):
    run = _run(world, mode="rgn", estimator=estimator, iterations=4)
    out = run.outcome
    assert out.param_change > 0
    assert len(out.trace) == 4
    assert np.isfinite(out.probs).all()
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert np.abs(out.probs - out.initial_probs).max() > 0
    _check_candidates(run)
    _assert_no_box_edited_twice(run.editor)


def test_rgn_estimators_differ(world):
    memo = _run(world, mode="rgn", estimator="memo-expectation", iterations=4).outcome
    rf = _run(world, mode="rgn", estimator="reinforce", iterations=4).outcome
    assert not np.allclose(memo.probs, rf.probs)


def test_rgn_deterministic_and_leaves_global_rng_alone(world):
    state = torch.get_rng_state()
    a = _run(world, mode="rgn", seed=2).outcome
    assert torch.equal(torch.get_rng_state(), state)
    b = _run(world, mode="rgn", seed=2).outcome
    np.testing.assert_array_equal(a.chosen, b.chosen)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert a.param_change == b.param_change
    assert a.trace == b.trace
    # another global torch seed does not change anything either
    torch.manual_seed(12345)
    c = _run(world, mode="rgn", seed=2).outcome
    np.testing.assert_array_equal(a.probs, c.probs)


def test_unknown_mode_guard(world):
    cfg = make_config("oracle")
    object.__setattr__(cfg, "mode", "bogus")  # bypass the frozen dataclass's validation
    props = propose(world.cfg, world.feats, world.work.size, 0)
    bank, _ = _bank(world)
    with pytest.raises(ValueError, match="unknown mode"):
        choose_regions(cfg, world.feats, props.boxes, world.work.size, bank, 0)
