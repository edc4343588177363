"""Metrics against values worked out by hand, and the Evaluator's presence/absence rules."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import noise_image
from PIL import Image

from lregions_core import metrics
from lregions_core.config import make_config
from lregions_core.images import to_working
from lregions_core.metrics import (
    METRICS,
    Evaluator,
    background_mask,
    masked_mse,
    masked_psnr,
    masked_ssim,
    pixel_box,
    self_similarity,
    structure_distance,
)


# --- MSE / PSNR --------------------------------------------------------------------------------
def two_by_two() -> tuple[np.ndarray, np.ndarray]:
    """a = black 2x2; b = a with pixel (row 0, col 0) at 127.5 = 0.5 in all 3 channels."""
    a = np.zeros((2, 2, 3))
    b = a.copy()
    b[0, 0] = 127.5
    return a, b


def test_masked_mse_by_hand():
    a, b = two_by_two()
    everything = np.ones((2, 2), bool)
    # 3 channels of (0.5)^2 over 4 pixels x 3 channels: 0.75 / 12 = 0.0625
    assert masked_mse(a, b, everything) == pytest.approx(0.0625, abs=1e-15)
    # Drop the identical pixel (1, 1): 0.75 / (3 pixels x 3 channels) = 0.25 / 3
    three = np.array([[True, True], [True, False]])
    assert masked_mse(a, b, three) == pytest.approx(0.25 / 3, abs=1e-15)
    # Drop the changed pixel instead: nothing differs among the counted ones.
    assert masked_mse(a, b, ~np.array([[True, False], [False, False]])) == 0.0
    # A zero-filled computation (zero outside the mask, mean over the whole image) gives
    # 0.75 / 12 = 0.0625 for the 3-pixel mask, not 1/12: masking must not be zero-filling.
    zero_filled = (((a - b) / 255.0 * three[..., None]) ** 2).mean()
    assert zero_filled == pytest.approx(0.0625)
    assert masked_mse(a, b, three) != pytest.approx(zero_filled)


def test_masked_mse_uint8_does_not_wrap_and_empty_mask_raises():
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[1, 0] = 255  # a difference of 1.0 on [0, 1]; uint8 0 - 255 would wrap to 1/255
    # 3 channels of 1.0^2 over 12 values: 0.25
    assert masked_mse(a, b, np.ones((2, 2), bool)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no counted pixel"):
        masked_mse(a, b, np.zeros((2, 2), bool))
    with pytest.raises(ValueError):
        masked_mse(a, b, np.ones((3, 2), bool))


def test_masked_psnr_by_hand():
    a, b = two_by_two()
    three = np.array([[True, True], [True, False]])
    # MSE = 1/12 -> 10 log10(12) = 10.7918 dB; MSE = 1/16 -> 10 log10(16) = 12.0412 dB
    assert masked_psnr(a, b, three) == pytest.approx(10 * math.log10(12))
    assert masked_psnr(a, b, three) == pytest.approx(10.791812, abs=1e-6)
    assert masked_psnr(a, b, np.ones((2, 2), bool)) == pytest.approx(12.041200, abs=1e-6)
    assert masked_psnr(a, a, np.ones((2, 2), bool)) == float("inf")


# --- SSIM --------------------------------------------------------------------------------------
def test_ssim_constant_images_by_hand():
    # Constant images: every window has sigma = cov = 0, so SSIM = (2 mu_a mu_b + C1) /
    # (mu_a^2 + mu_b^2 + C1) with C1 = (0.01 * 1)^2 = 1e-4; mu_a = 0.5, mu_b = 0.25:
    # (0.25 + 1e-4) / (0.3125 + 1e-4) = 0.2501 / 0.3126 = 0.800064
    a, b = np.full((5, 6, 3), 127.5), np.full((5, 6, 3), 63.75)
    mask = np.zeros((5, 6), bool)
    mask[1:3, 2:5] = True
    assert masked_ssim(a, b, mask) == pytest.approx(0.2501 / 0.3126, abs=1e-9)


def test_ssim_identical_masked_out_change_and_decreasing():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 255, (12, 12, 3))
    assert masked_ssim(a, a, np.ones((12, 12), bool)) == pytest.approx(1.0, abs=1e-12)
    b = a.copy()
    b[:, :2] = 255 - b[:, :2]  # change columns 0-1 only
    # Counted columns >= 5: each 7x7 window (radius 3) stays at columns >= 2, so SSIM is 1.
    far = np.zeros((12, 12), bool)
    far[:, 5:] = True
    assert masked_ssim(a, b, far) == pytest.approx(1.0, abs=1e-12)
    near = np.zeros((12, 12), bool)
    near[:, 4:] = True  # column 4's window reaches column 1: the window leaks the change
    assert masked_ssim(a, b, near) < 1.0 - 1e-3
    # 12x12: skimage's default 7x7 window, whole map (no border crop), masked mean.
    _, full = structural_similarity(a / 255, b / 255, channel_axis=-1, data_range=1.0, full=True)
    assert masked_ssim(a, b, near) == pytest.approx(full.mean(-1)[near].mean(), abs=1e-12)
    # Growing changes in the counted background: SSIM goes down step by step.
    noise = rng.normal(0, 1, a.shape)
    values = [masked_ssim(a, np.clip(a + s * noise, 0, 255), far) for s in (0, 5, 20, 60)]
    assert values[0] == pytest.approx(1.0)
    assert all(x > y for x, y in itertools.pairwise(values))


def test_ssim_is_a_masked_mean_and_small_windows():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 255, (2, 4, 5, 3))
    mask = np.zeros((4, 5), bool)
    mask[1:, 3:] = True
    # 4x5 image: window 3 (largest odd <= 4); the value is the map's mean on the mask.
    _, full = structural_similarity(
        a / 255, b / 255, channel_axis=-1, data_range=1.0, full=True, win_size=3
    )
    assert masked_ssim(a, b, mask) == pytest.approx(full.mean(-1)[mask].mean())
    zero_filled = structural_similarity(
        a / 255 * mask[..., None],
        b / 255 * mask[..., None],
        channel_axis=-1,
        data_range=1.0,
        win_size=3,
    )
    assert masked_ssim(a, b, mask) != pytest.approx(zero_filled, abs=1e-3)
    with pytest.raises(ValueError, match="3x3"):
        masked_ssim(a[:2], b[:2], mask[:2])


# --- masks and boxes ---------------------------------------------------------------------------
def test_background_mask_and_pixel_box():
    # width 4, height 3; the rectangle x in [1, 3), y in [0, 2) is not background
    expected = np.array(
        [[True, False, False, True], [True, False, False, True], [True, True, True, True]]
    )
    np.testing.assert_array_equal(background_mask((4, 3), (1, 0, 3, 2)), expected)
    assert background_mask((4, 3), (-5, -5, 10, 10)).sum() == 0  # clipped, covers everything
    # float box -> every pixel it touches, clipped to (4, 3)
    assert pixel_box((1.5, 0.2, 3.1, 2.0), (4, 3)) == (1, 0, 4, 2)
    assert pixel_box((-2, -1, 9, 9), (4, 3)) == (0, 0, 4, 3)


# --- self-similarity and structure distance ----------------------------------------------------
def tokens(*vectors: tuple[float, ...]) -> np.ndarray:
    """(C, 1, n) grid of the given C-dimensional tokens."""
    return np.array(vectors, dtype=np.float64).T[:, None, :]


def test_self_similarity_by_hand():
    np.testing.assert_allclose(self_similarity(tokens((1, 0), (0, 1))), np.eye(2))
    np.testing.assert_allclose(self_similarity(tokens((1, 0), (2, 0))), np.ones((2, 2)))
    np.testing.assert_allclose(self_similarity(tokens((1, 0), (-3, 0))), [[1, -1], [-1, 1]])
    # cos 45 degrees = 1/sqrt(2); a zero token has cosine 0 with everything, itself included
    half = 1 / math.sqrt(2)
    np.testing.assert_allclose(self_similarity(tokens((1, 0), (1, 1))), [[1, half], [half, 1]])
    np.testing.assert_allclose(self_similarity(tokens((1, 0), (0, 0))), [[1, 0], [0, 0]])
    # row-major patch order: grid (C=2, h=2, w=2), token (row 0, col 1) is flat index 1
    grid = np.zeros((2, 2, 2))
    grid[:, 0, 0], grid[:, 0, 1], grid[:, 1, 0], grid[:, 1, 1] = (1, 0), (0, 1), (1, 0), (0, 1)
    np.testing.assert_allclose(self_similarity(grid)[0], [1, 0, 1, 0])


def test_structure_distance_by_hand():
    ortho, parallel = tokens((1, 0), (0, 1)), tokens((1, 0), (2, 0))
    assert structure_distance(ortho, ortho) == 0.0
    # I vs all-ones: two off-diagonal differences of 1 over 4 entries -> 2/4 = 0.5
    assert structure_distance(ortho, parallel) == pytest.approx(0.5)
    # I vs 45 degrees: two off-diagonal differences of 1/sqrt(2) -> (0.5 + 0.5)/4 = 0.25
    assert structure_distance(ortho, tokens((1, 0), (1, 1))) == pytest.approx(0.25)
    # all-ones vs antiparallel: off-diagonal 1 - (-1) = 2 -> (4 + 4)/4 = 2
    assert structure_distance(parallel, tokens((1, 0), (-1, 0))) == pytest.approx(2.0)
    # only the grid must match, not the channel count
    assert structure_distance(tokens((1, 0, 0), (0, 5, 0)), ortho) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="grids differ"):
        structure_distance(ortho, np.zeros((2, 2, 1)))


# --- the Evaluator -----------------------------------------------------------------------------
SOURCE = noise_image(64, 48, seed=3)
BOX = (16, 8, 48, 40)
TARGET = (32, 8, 64, 40)  # IoU with BOX: 16*32 / (1024 + 1024 - 512) = 512 / 1536 = 1/3
OBJECT = np.zeros((48, 64), bool)  # the edited object: the left half of BOX
OBJECT[8:40, 16:32] = True


def edited(source: Image.Image) -> Image.Image:
    """A fake result: new pixels in the box, a faint change everywhere (the 'feather')."""
    a = np.asarray(source).astype(np.int16)
    a = a + np.random.default_rng(5).integers(-6, 7, a.shape)
    a[BOX[1] : BOX[3], BOX[0] : BOX[2]] = np.asarray(noise_image(32, 32, seed=9))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_change_against_object_counts_pixels() -> None:
    source = np.zeros((4, 5, 3), np.uint8)
    final = source.copy()
    final[0, 0:3] = 200  # three changed pixels...
    final[3, 4, 1] = 20  # ...and one moved by less than the threshold
    obj = np.zeros((4, 5), bool)
    obj[0:2, 0:2] = True  # two of the changed pixels, plus two unchanged
    found = metrics.change_against_object(source, final, obj)
    assert found == {"changed_outside": pytest.approx(1 / 3), "changed_iou": pytest.approx(2 / 5)}
    assert metrics.change_against_object(source, source, obj) == {
        "changed_outside": 0.0, "changed_iou": 0.0}
    with pytest.raises(ValueError, match="differ in size"):
        metrics.change_against_object(source, final, obj[:3])


def test_object_metrics_missing_without_a_mask(tiny) -> None:
    out = tiny.evaluate(SOURCE, edited(SOURCE), prompt="a red ball", source_prompt=None, box=BOX)
    assert out["object_mask"] is None
    for name in metrics.OBJECT_METRICS:
        assert out["metrics"][name] is None and "no object mask" in out["missing"][name]


@pytest.fixture(scope="module")
def tiny():
    return Evaluator(make_config("tiny"))


def test_tiny_all_metrics_present(tiny):
    final = edited(SOURCE)
    out = tiny.evaluate(
        SOURCE, final, prompt="a red ball", source_prompt=None, box=BOX, target_box=TARGET,
        object_mask=OBJECT, object_from="test",
    )
    assert out["weights"] == "random" and out["object_mask"] == "test"
    assert out["ground_truth"] == "target_box"
    assert set(out["metrics"]) == set(METRICS)
    for name, value in out["metrics"].items():
        if name in metrics.PIE_METRICS:  # PIE-Bench's metrics need a target_mask
            assert value is None and "no target_mask" in out["missing"][name]
            continue
        if name == "bg_lpips" and value is None:
            assert isinstance(out["missing"][name], str) and out["missing"][name]
            continue
        assert value is not None and math.isfinite(value), (name, value)
        assert name not in out["missing"]
    m = out["metrics"]
    assert m["box_iou"] == pytest.approx(1 / 3)
    # Background = outside target_box (given), via the pure functions.
    src, fin = np.asarray(SOURCE), np.asarray(final)
    mask = background_mask(SOURCE.size, TARGET)
    assert m["bg_mse"] == pytest.approx(masked_mse(src, fin, mask))
    assert m["bg_psnr"] == pytest.approx(masked_psnr(src, fin, mask))
    assert m["bg_ssim"] == pytest.approx(masked_ssim(src, fin, mask))
    # Inside the box, outside the object: the box's right half, where the edit changed a lot.
    inside = np.zeros((48, 64), bool)
    inside[8:40, 32:48] = True
    assert m["box_bg_mse"] == pytest.approx(masked_mse(src, fin, inside)) and m["box_bg_mse"] > 0.01
    changed = (np.abs(fin.astype(int) - src.astype(int)) > 24).any(-1)
    assert m["changed_outside"] == pytest.approx((changed & ~OBJECT).sum() / changed.sum())
    assert m["changed_iou"] == pytest.approx((changed & OBJECT).sum() / (changed | OBJECT).sum())
    assert 0.3 < m["changed_outside"] < 0.7  # half the noisy box is outside the object
    # CLIP numbers from the scorer's own embeddings: cosines of the right pairs.
    scorer, _ = metrics._model("clip", tiny._keys["clip"])
    e_fin, e_src, e_reg = scorer.embed([final, SOURCE, final.crop(BOX)])
    t, t_src = scorer.encode_text(["a red ball", "a photo"])
    assert m["clip_text_image"] == pytest.approx(float(e_fin @ t), abs=1e-5)
    assert m["clip_text_image_region"] == pytest.approx(float(e_reg @ t), abs=1e-5)
    assert m["clip_image_image"] == pytest.approx(float(e_fin @ e_src), abs=1e-5)
    cos = torch.nn.functional.cosine_similarity(e_fin - e_src, t - t_src, dim=0)
    assert m["clip_directional"] == pytest.approx(float(cos), abs=1e-4)
    # Structure distance from the DINO tokens of the two working images.
    dino, _ = metrics._model("dino", tiny._keys["dino"])
    config = tiny.config
    feats = [dino(to_working(im, config.work_size, config.work_multiple)) for im in (SOURCE, final)]
    assert m["structure_distance"] == pytest.approx(structure_distance(*(f.patches for f in feats)))
    assert m["structure_distance"] > 0


def test_tiny_identical_images(tiny):
    out = tiny.evaluate(SOURCE, SOURCE.copy(), prompt="a red ball", source_prompt="noise", box=BOX)
    m = out["metrics"]
    assert m["clip_image_image"] == pytest.approx(1.0, abs=1e-5)
    assert m["clip_directional"] == 0.0  # no change, no direction (as the scorer's L_dir)
    assert m["bg_mse"] == 0.0 and m["bg_psnr"] == float("inf")
    assert m["bg_ssim"] == pytest.approx(1.0)
    assert m["structure_distance"] == pytest.approx(0.0, abs=1e-9)
    if m["bg_lpips"] is not None:
        assert m["bg_lpips"] == pytest.approx(0.0, abs=1e-6)
    assert m["box_iou"] is None
    assert out["missing"].pop("box_iou") == "no target_box in the manifest"
    # no object mask, no target_mask given
    assert set(out["missing"]) == {*metrics.OBJECT_METRICS, *metrics.PIE_METRICS}


def test_tiny_lpips_masked_mean(tiny):
    """LPIPS random backbone (tiny): the background value is the spatial map's masked mean."""
    final = edited(SOURCE)
    out = tiny.evaluate(SOURCE, final, prompt="x", source_prompt=None, box=BOX)
    model, reason = metrics._lpips(tiny._keys["lpips"])
    if model is None:
        pytest.skip(f"LPIPS unavailable: {reason}")

    def t(im):
        return torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)[None]

    with torch.inference_mode():
        spatial = model(t(SOURCE), t(final), normalize=True)[0, 0].numpy()
    mask = background_mask(SOURCE.size, BOX)
    assert out["metrics"]["bg_lpips"] == pytest.approx(float(spatial[mask].mean()), rel=1e-5)
    assert out["metrics"]["bg_lpips"] != pytest.approx(float(spatial.mean()), rel=1e-3)


def test_structure_distance_on_the_working_image(tiny):
    """Tokens come from the working images (as in the pipeline): 100x70 -> working 64x48 ->
    DINO grid 4x3. DINO on the raw input gives the same grid but other pixels (one resampling
    instead of two), so another number."""
    source = noise_image(100, 70, seed=4)
    final = Image.fromarray(255 - np.asarray(source))
    out = tiny.evaluate(source, final, prompt="x", source_prompt=None, box=(0, 0, 50, 30))
    dino, _ = metrics._model("dino", tiny._keys["dino"])
    work = [to_working(im, 64, 16) for im in (source, final)]
    assert work[0].size == (64, 48)
    feats = [dino(im).patches for im in work]
    assert feats[0].shape[1:] == (3, 4)
    got = out["metrics"]["structure_distance"]
    assert got == pytest.approx(structure_distance(*feats), rel=1e-6)
    raw = structure_distance(*(dino(im).patches for im in (source, final)))
    assert got != pytest.approx(raw, rel=1e-4)


@pytest.fixture
def clear_caches():
    metrics._model.cache_clear()
    metrics._lpips.cache_clear()
    yield
    metrics._model.cache_clear()
    metrics._lpips.cache_clear()


def test_oracle_preset(offline_hub, monkeypatch, clear_caches):
    monkeypatch.setenv("TORCH_HOME", str(offline_hub / "torch"))  # no AlexNet cached
    out = Evaluator(make_config("oracle")).evaluate(
        SOURCE,
        edited(SOURCE),
        prompt="a red ball",
        source_prompt=None,
        box=BOX,
        target_box=TARGET,
    )
    m, missing = out["metrics"], out["missing"]
    for name in metrics.CLIP_METRICS:
        assert m[name] is None and missing[name] == "the oracle preset has no CLIP model"
    assert m["structure_distance"] is None
    assert missing["structure_distance"] == "no DINO model in this preset"
    assert m["bg_lpips"] is None and "weights" in missing["bg_lpips"]
    for name in ("bg_mse", "bg_psnr", "bg_ssim"):
        assert math.isfinite(m[name])
    assert m["box_iou"] == pytest.approx(1 / 3)
    assert out["weights"] == "pretrained"


def test_default_preset_offline_gives_reasons_not_numbers(offline_hub, monkeypatch, clear_caches):
    monkeypatch.setenv("TORCH_HOME", str(offline_hub / "torch"))
    evaluator = Evaluator(make_config("default", {"device": "cpu"}))
    for _ in range(2):  # the second image must not retry the failed builds
        out = evaluator.evaluate(
            SOURCE, edited(SOURCE), prompt="a red ball", source_prompt=None, box=BOX
        )
    assert metrics._model.cache_info().misses == 2  # clip, dino: built (failed) once each
    assert metrics._lpips.cache_info().misses == 1
    for name in (*metrics.CLIP_METRICS, "structure_distance", "bg_lpips"):
        assert out["metrics"][name] is None
        assert "weights" in out["missing"][name] and "not available" in out["missing"][name]
    assert "ViT-B-16/openai" in out["missing"]["clip_text_image"]
    assert "vit_base_patch8_224.dino" in out["missing"]["structure_distance"]
    assert out["weights"] == "pretrained"
    assert math.isfinite(out["metrics"]["bg_mse"])


def test_random_clip_weights_refused_unless_asked(clear_caches):
    config = make_config("default", {"clip_pretrained": None, "features": "oracle-saliency"})
    out = Evaluator(config).evaluate(SOURCE, SOURCE, prompt="x", source_prompt=None, box=BOX)
    for name in metrics.CLIP_METRICS:
        assert out["metrics"][name] is None and "random_weights" in out["missing"][name]
