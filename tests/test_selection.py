"""Tests for lregions_core.selection: the reference's quality score over the top-k candidates.

Similarities are chosen as logarithms so the softmaxes come out as simple fractions:
softmax(log a, log b, log c) = (a, b, c) / (a + b + c).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lregions_core.interfaces import CandidateScores
from lregions_core.selection import select_best, selection_scores


def _cand(text: float, image: float) -> CandidateScores:
    return CandidateScores(
        loss_clip=0.0, loss_dir=0.0, loss_str=0.0, text_sim=text, image_sim=image
    )


def _four() -> list[CandidateScores]:
    # text:  log 4, -5 (worst: dropped by top-3), log 2, log 2
    # image: log 1, log 9 (irrelevant, dropped), log 2, log 1
    return [
        _cand(math.log(4), math.log(1)),
        _cand(-5.0, math.log(9)),
        _cand(math.log(2), math.log(2)),
        _cand(math.log(2), math.log(1)),
    ]


def test_hand_computed_scores_top3():
    # kept: 0, 2, 3. softmax(text) over them = (4, 2, 2)/8 = (0.5, 0.25, 0.25);
    # softmax(image) = (1, 2, 1)/4 = (0.25, 0.5, 0.25).
    # S = 2 * text + 1 * image = (1.25, 1.0, 0.75); candidate 1 gets -inf.
    s = selection_scores(_four())
    assert s.shape == (4,)
    assert s[1] == -np.inf
    np.testing.assert_allclose(s[[0, 2, 3]], [1.25, 1.0, 0.75])
    best, s2 = select_best(_four())
    assert best == 0
    np.testing.assert_array_equal(s, s2)


def test_weights_are_configurable():
    # text_weight 1, image_weight 3: (0.5 + 0.75, 0.25 + 1.5, 0.25 + 0.75) = (1.25, 1.75, 1.0)
    s = selection_scores(_four(), text_weight=1.0, image_weight=3.0)
    np.testing.assert_allclose(s[[0, 2, 3]], [1.25, 1.75, 1.0])
    assert s[1] == -np.inf
    best, _ = select_best(_four(), text_weight=1.0, image_weight=3.0)
    assert best == 2
    # image only: (0.25, 0.5, 0.25) -> candidate 2
    assert select_best(_four(), text_weight=0.0, image_weight=1.0)[0] == 2
    # text only: (0.5, 0.25, 0.25) -> candidate 0
    assert select_best(_four(), text_weight=1.0, image_weight=0.0)[0] == 0


def test_top_k_covering_all_candidates():
    # all four kept: text softmax (4, e^-5, 2, 2) / (8 + e^-5), image softmax (1, 9, 2, 1) / 13
    s = selection_scores(_four(), top_k=4)
    z = 8 + math.exp(-5)
    expected = [
        2 * 4 / z + 1 / 13,
        2 * math.exp(-5) / z + 9 / 13,
        2 * 2 / z + 2 / 13,
        2 * 2 / z + 1 / 13,
    ]
    np.testing.assert_allclose(s, expected)
    assert np.isfinite(s).all()
    # more than there are candidates behaves the same
    np.testing.assert_allclose(selection_scores(_four(), top_k=10), expected)


def test_top_k_one_keeps_only_best_text():
    s = selection_scores(_four(), top_k=1)
    # one candidate: both softmaxes are 1, S = 2 + 1
    np.testing.assert_allclose(s, [3.0, -np.inf, -np.inf, -np.inf])
    assert select_best(_four(), top_k=1)[0] == 0


def test_ties_in_text_keep_earlier_candidates():
    # all text similarities equal: the first three by position are kept, the last is dropped;
    # with equal image similarities every kept score is 2/3 + 1/3 = 1 and argmax is the first.
    cands = [_cand(0.3, 0.7) for _ in range(4)]
    s = selection_scores(cands)
    np.testing.assert_allclose(s[:3], [1.0, 1.0, 1.0])
    assert s[3] == -np.inf
    assert select_best(cands)[0] == 0


def test_tie_at_the_cut_keeps_the_earlier():
    # texts (0.9, 0.5, 0.5, 0.5) with top_k=2: 0 and the earlier of the tied ones (1) are kept
    cands = [_cand(0.9, 0.0), _cand(0.5, 0.0), _cand(0.5, 5.0), _cand(0.5, 5.0)]
    s = selection_scores(cands, top_k=2)
    assert np.isfinite(s[[0, 1]]).all()
    assert (s[[2, 3]] == -np.inf).all()


def test_tie_in_score_picks_first_index():
    # candidates 1 and 2 are identical and better than 0: argmax returns 1
    cands = [_cand(0.1, 0.1), _cand(0.5, 0.5), _cand(0.5, 0.5)]
    best, s = select_best(cands)
    assert s[1] == s[2] > s[0]
    assert best == 1


def test_single_candidate_and_return_types():
    best, s = select_best([_cand(0.2, 0.8)])
    assert best == 0 and isinstance(best, int)
    np.testing.assert_allclose(s, [3.0])


def test_large_similarities_do_not_overflow():
    cands = [_cand(1000.0, 2000.0), _cand(999.0, 2000.0)]
    s = selection_scores(cands)
    assert np.isfinite(s).all()
    # text softmax (e, 1)/(e + 1), image softmax (0.5, 0.5)
    e = math.e
    np.testing.assert_allclose(s, [2 * e / (e + 1) + 0.5, 2 / (e + 1) + 0.5])


def test_empty_input_raises():
    with pytest.raises(ValueError, match="no candidates"):
        selection_scores([])
    with pytest.raises(ValueError):
        select_best([])
