"""The CLIP scorer, on the tiny preset's random-weight open_clip ViT (offline, CPU)."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
import torch
from conftest import noise_image
from PIL import Image

from lregions_core.config import make_config
from lregions_core.interfaces import CandidateScores, Scorer
from lregions_core.models import clip
from lregions_core.models.weights import WeightsUnavailableError
from lregions_core.registry import SCORERS


def edited(image: Image.Image, seed: int = 1) -> Image.Image:
    """``image`` with a box repainted, as an editor would."""
    out = image.copy()
    out.paste(noise_image(40, 30, seed), (20, 10))
    return out


@pytest.fixture(scope="module")
def config():
    return make_config("tiny")


@pytest.fixture(scope="module")
def scorer(config) -> clip.ClipScorer:
    return SCORERS.build("clip", config)


@pytest.fixture(scope="module")
def source() -> Image.Image:
    return noise_image(96, 64)


def test_registered_and_protocol(scorer):
    assert "clip" in SCORERS
    assert isinstance(scorer, Scorer)
    assert scorer.name == "clip:ViT-B-16/None"
    assert scorer.image_size == 64
    assert scorer.bundle.depth == 2 and scorer.structure_layer == 1


def test_model_loaded_once_per_settings(config, scorer):
    assert SCORERS.build("clip", config).bundle is scorer.bundle
    assert SCORERS.build("clip", config.replace(clip_views=2)).bundle is scorer.bundle


@pytest.mark.parametrize(("layer", "expected"), [(0, 1), (2, 2), (11, 2)])
def test_structure_layer_clamped(config, layer, expected):
    assert SCORERS.build("clip", config.replace(clip_structure_layer=layer)).structure_layer == (
        expected
    )


def test_full_path_matches_encode_image(scorer, source):
    views = scorer.full_view(scorer.pixels(source))[None]
    full, selfsim = scorer.encode_full(views)
    np.testing.assert_allclose(full.numpy(), scorer.encode_views(views).numpy(), atol=1e-6)
    assert selfsim.shape == (1, 16, 16)  # 4 x 4 patch tokens, class token excluded
    np.testing.assert_allclose(torch.diagonal(selfsim[0]).numpy(), 1.0, atol=1e-5)


def test_value_range_one_path(scorer, source):
    white = scorer.pixels(Image.new("RGB", (10, 10), (255, 255, 255)))
    black = scorer.pixels(Image.new("RGB", (10, 10)))
    assert white.dtype == torch.float32 and white.max() == 1.0 and black.max() == 0.0
    context = scorer.prepare(source, "a cat", None)
    # The source given twice as candidates embeds exactly as the source did in prepare().
    twice = scorer.embed([source, source.copy()])
    np.testing.assert_allclose(
        twice.numpy(), context.source_embedding[None].expand(2, -1), atol=1e-6
    )
    # Other modes are converted to RGB, not misread.
    assert torch.equal(scorer.pixels(source.convert("RGBA")), scorer.pixels(source))


def test_scores_shape_and_ranges(scorer, source):
    context = scorer.prepare(source, "a red apple", "noise")
    candidates = [edited(source, 1), edited(source, 2), noise_image(64, 96, 9)]  # any size
    scores = scorer.score(context, candidates, [0, 1, 2])
    assert len(scores) == 3 and all(isinstance(s, CandidateScores) for s in scores)
    for s in scores:
        values = [s.loss_clip, s.loss_dir, s.loss_str, s.text_sim, s.image_sim]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values)
        assert 0.0 <= s.loss_clip <= 2.0 and 0.0 <= s.loss_dir <= 2.0 and s.loss_str >= 0.0
        assert -1.0 <= s.text_sim <= 1.0 and -1.0 <= s.image_sim <= 1.0
    assert scores[0].loss_dir != 1.0 and scores[0].loss_str > 0.0
    assert scorer.score(context, [], []) == []
    with pytest.raises(ValueError):
        scorer.score(context, candidates, [0])


def test_identical_candidate(scorer, source):
    context = scorer.prepare(source, "a red apple", None)
    (same,) = scorer.score(context, [source.copy()], [4])
    assert same.loss_str == pytest.approx(0.0, abs=1e-10)
    assert same.image_sim == pytest.approx(1.0, abs=1e-5)
    assert same.loss_dir == 1.0  # no change, no direction: defined, not NaN


def test_batching_does_not_change_scores(scorer, source):
    context = scorer.prepare(source, "a red apple", None)
    candidates = [edited(source, 1), edited(source, 2)]
    together = scorer.score(context, candidates, [3, 4])
    alone = [scorer.score(context, [c], [s])[0] for c, s in zip(candidates, [3, 4], strict=True)]
    for a, b in zip(together, alone, strict=True):
        for name in ("loss_clip", "loss_dir", "loss_str", "text_sim", "image_sim"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-5)


def test_deterministic_per_seed(scorer, source):
    context = scorer.prepare(source, "a red apple", None)
    candidate = edited(source)
    torch.manual_seed(99)
    expected_draw = torch.rand(4)
    torch.manual_seed(99)
    first = scorer.score(context, [candidate, candidate], [7, 8])
    assert torch.equal(torch.rand(4), expected_draw)  # the global RNG was not disturbed
    again = scorer.score(context, [candidate, candidate], [7, 8])
    assert first == again
    # Other seed, other augmented views; everything but L_clip comes from the full view alone.
    assert first[0].loss_str == pytest.approx(first[1].loss_str, abs=1e-7)
    assert first[0].text_sim == pytest.approx(first[1].text_sim, abs=1e-6)
    assert abs(first[0].loss_clip - first[1].loss_clip) > 1e-4


def test_single_view_ignores_seed(config, source):
    scorer = SCORERS.build("clip", config.replace(clip_views=1))
    context = scorer.prepare(source, "a red apple", None)
    a, b = scorer.score(context, [edited(source)] * 2, [1, 2])
    # Equal up to float noise between rows of one batch (no augmented views to differ).
    for name in ("loss_clip", "loss_dir", "loss_str", "text_sim", "image_sim"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-6)
    assert a.loss_clip == pytest.approx(1.0 - a.text_sim, abs=1e-6)


def test_augmented_views_depend_only_on_seed(scorer, source):
    pixels = scorer.pixels(source)
    a, b = scorer.augmented_views(pixels, 5, 3), scorer.augmented_views(pixels, 5, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = scorer.augmented_views(pixels, 6, 3)
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert all(v.shape == (3, 64, 64) and 0.0 <= v.min() and v.max() <= 1.0 for v in a)


def test_long_prompt_truncated(scorer, source):
    prompt = " ".join(f"word{i}" for i in range(200))
    context = scorer.prepare(source, prompt, prompt)
    (score,) = scorer.score(context, [edited(source)], [0])
    assert math.isfinite(score.loss_clip)
    assert score.loss_dir == pytest.approx(1.0)  # T == T_src: a zero text direction


def test_neutral_source_prompt(scorer, source):
    assert scorer.prepare(source, "a cat", None).source_prompt == clip.NEUTRAL_SOURCE_PROMPT
    assert scorer.prepare(source, "a cat", "  ").source_prompt == clip.NEUTRAL_SOURCE_PROMPT
    assert scorer.prepare(source, "a cat", "a dog").source_prompt == "a dog"


def test_text_embedded_once_per_process(config, scorer, source, monkeypatch):
    model = scorer.bundle.model
    calls: list[int] = []
    original = model.encode_text

    def counting(tokens, *args, **kwargs):
        calls.append(len(tokens))
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "encode_text", counting)
    prompt = f"a unique prompt {uuid.uuid4().hex}"
    first = scorer.prepare(source, prompt, None)
    assert len(calls) == 1 and calls[0] in (1, 2)  # one batched call for the uncached texts
    second = SCORERS.build("clip", config).prepare(noise_image(50, 50, 3), prompt, None)
    assert len(calls) == 1
    assert torch.equal(first.text_embedding, second.text_embedding)
    assert first.text_embedding.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_random_weights_reproducible_and_global_rng_untouched(config):
    key = clip._settings_key(config)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fresh = clip.load_clip.__wrapped__(key)  # a new build, bypassing the cache
    assert torch.equal(torch.rand(3), expected)
    cached = clip.load_clip(key).model.state_dict()
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, cached[name]), name


def test_local_weights_dir(config, tmp_path):
    state = {
        k: v + 1.0 for k, v in clip.load_clip(clip._settings_key(config)).model.state_dict().items()
    }
    folder = tmp_path / "ViT-B-16--mine"
    folder.mkdir()
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    scorer = SCORERS.build(
        "clip",
        config.replace(random_weights=False, clip_pretrained="mine", weights_dir=str(tmp_path)),
    )
    for name, value in scorer.bundle.model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_weights_unavailable_offline(config, offline_hub):
    with pytest.raises(WeightsUnavailableError) as info:
        SCORERS.build("clip", config.replace(random_weights=False, clip_pretrained="openai"))
    message = str(info.value)
    assert "CLIP scorer 'ViT-B-16/openai'" in message and "weights_dir" in message


def test_unknown_architecture_is_not_a_weights_problem(config):
    with pytest.raises(ValueError, match="unknown open_clip model"):
        SCORERS.build("clip", config.replace(clip_model="no-such-clip"))


@pytest.mark.slow
def test_real_size_architecture_random_weights(source):
    config = make_config("default", {"random_weights": True, "device": "cpu", "clip_views": 2})
    scorer = SCORERS.build("clip", config)
    assert scorer.image_size == 224 and scorer.structure_layer == 11
    context = scorer.prepare(source, "a red apple", None)
    assert context.source_selfsim.shape == (196, 196)
    (score,) = scorer.score(context, [edited(source)], [0])
    assert math.isfinite(score.loss_clip) and score.loss_str > 0.0
