"""The DINO feature extractor, on the tiny preset's random-weight ViT (offline, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_image
from PIL import Image

from lregions_core.config import make_config
from lregions_core.interfaces import FeatureExtractor, Features
from lregions_core.models import dino
from lregions_core.models.weights import WeightsUnavailableError
from lregions_core.registry import FEATURE_EXTRACTORS


@pytest.fixture(scope="module")
def config():
    return make_config("tiny")


@pytest.fixture(scope="module")
def extractor(config) -> dino.DinoFeatures:
    return FEATURE_EXTRACTORS.build("dino", config)


def test_registered_and_protocol(extractor):
    assert "dino" in FEATURE_EXTRACTORS
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.name == "dino:vit_small_patch16_224.dino"
    assert extractor.patch_size == 16


def test_model_loaded_once_per_settings(config, extractor):
    again = FEATURE_EXTRACTORS.build("dino", config)
    assert again.model is extractor.model
    other = FEATURE_EXTRACTORS.build(
        "dino", config.replace(feature_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    )
    assert other.model is not extractor.model
    assert len(other.model.blocks) == 1


def test_random_weights_reproducible_and_global_rng_untouched(config):
    key = dino._settings_key(config)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fresh = dino.load_dino.__wrapped__(key)  # a new build, bypassing the cache
    assert torch.equal(torch.rand(3), expected)
    cached = dino.load_dino(key)
    for (name, a), (_, b) in zip(
        fresh.state_dict().items(), cached.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("size", "feature_size", "grid"),
    [
        ((64, 64), 64, (4, 4)),
        ((200, 120), 64, (2, 4)),  # 64 x 38.4 -> 64 x 32
        ((200, 120), 128, (5, 8)),  # 128 x 76.8 -> 128 x 80
        ((120, 200), 128, (8, 5)),
        ((1000, 10), 64, (1, 4)),  # at least one patch
    ],
)
def test_shapes(config, size, feature_size, grid):
    extractor = FEATURE_EXTRACTORS.build("dino", config.replace(feature_size=feature_size))
    features = extractor(noise_image(*size))
    assert isinstance(features, Features)
    assert features.grid == grid
    assert features.attention.shape == grid and features.attention.dtype == np.float32
    assert features.patches.shape == (32, *grid) and features.patches.dtype == np.float32
    assert np.isfinite(features.patches).all()


def test_accepts_any_mode(extractor):
    image = noise_image(80, 48).convert("L")
    assert extractor(image).grid == extractor(image.convert("RGB")).grid


def test_attention_matches_unfused_reference(config, monkeypatch):
    extractor = FEATURE_EXTRACTORS.build("dino", config.replace(feature_size=128))
    image = noise_image(200, 120, seed=3)
    features = extractor(image)
    attention = features.attention
    assert (attention >= 0).all() and attention.sum() <= 1 + 1e-5
    assert attention.sum() > 0.5  # CLS keeps some mass on itself, most goes to 40 patches

    # Reference: timm's own non-fused path, weights captured at the attention dropout.
    block = extractor.model.blocks[-1]
    monkeypatch.setattr(block.attn, "fused_attn", False)
    captured = {}
    handle = block.attn.attn_drop.register_forward_hook(
        lambda _m, args, _out: captured.__setitem__("attn", args[0])
    )
    try:
        with torch.inference_mode():
            extractor.model.forward_features(extractor.preprocess(image))
    finally:
        handle.remove()
    prefix = extractor.model.num_prefix_tokens
    reference = captured["attn"][0, :, 0, prefix:].mean(0).reshape(features.grid).numpy()
    np.testing.assert_allclose(attention, reference, rtol=1e-5, atol=1e-6)


def test_attention_peaks_at_the_attended_patch(config):
    """Crafted weights: the last block's CLS query matches only the key of one patch's content."""
    extractor = FEATURE_EXTRACTORS.build("dino", config.replace(feature_size=128))
    image = np.zeros((80, 128, 3), dtype=np.uint8)
    image[32:48, 80:96] = 255  # patch (row 2, col 5) of a 5 x 8 grid
    tokens = {}
    handle = extractor.model.blocks[-1].register_forward_pre_hook(
        lambda _m, args: tokens.__setitem__("x", args[0])
    )
    with torch.inference_mode():
        extractor.model.forward_features(extractor.preprocess(Image.fromarray(image)))
    handle.remove()
    block = extractor.model.blocks[-1]
    x = block.norm1(tokens["x"])[0]  # (1 + 40, C) normed inputs of the last block
    prefix = extractor.model.num_prefix_tokens
    bright, dark = x[prefix + 2 * 8 + 5], x[prefix]  # the bright patch's token, a dark one
    direction = (bright - dark) / (bright - dark).norm()
    attn = block.attn
    dim = attn.head_dim * attn.num_heads
    weight = torch.zeros(3 * dim, x.shape[-1])
    bias = torch.zeros(3 * dim)
    weight[dim : 2 * dim] = direction * 50.0  # every head's keys: projection onto `direction`
    bias[:dim] = 1.0  # every query is constant, so the logit is the key alone
    original = (attn.qkv.weight.clone(), attn.qkv.bias.clone())
    try:
        with torch.no_grad():
            attn.qkv.weight.copy_(weight)
            attn.qkv.bias.copy_(bias)
        features = extractor(Image.fromarray(image))
    finally:
        with torch.no_grad():
            attn.qkv.weight.copy_(original[0])
            attn.qkv.bias.copy_(original[1])
    assert np.unravel_index(features.attention.argmax(), features.grid) == (2, 5)
    assert features.attention[2, 5] > 0.9


def test_patches_row_major(config):
    extractor = FEATURE_EXTRACTORS.build("dino", config.replace(feature_size=128))
    image = noise_image(200, 120, seed=5)
    features = extractor(image)
    with torch.inference_mode():
        # timm's own NCHW reshape of the last block, with the final norm applied.
        maps = extractor.model.forward_intermediates(
            extractor.preprocess(image), indices=[-1], norm=True, intermediates_only=True
        )
    np.testing.assert_allclose(features.patches, maps[0][0].numpy(), rtol=1e-5, atol=1e-5)


def test_deterministic(extractor):
    image = noise_image(96, 64, seed=7)
    a, b = extractor(image), extractor(image)
    assert np.array_equal(a.attention, b.attention) and np.array_equal(a.patches, b.patches)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_local_weights_dir(config, tmp_path, filename):
    source = dino.load_dino(dino._settings_key(config))
    state = {k: v + 1.0 for k, v in source.state_dict().items()}  # unlike the random init
    folder = tmp_path / "vit_small_patch16_224.dino"
    folder.mkdir()
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(folder / filename))
    else:
        torch.save(state, folder / filename)
    extractor = FEATURE_EXTRACTORS.build(
        "dino", config.replace(random_weights=False, weights_dir=str(tmp_path))
    )
    for name, value in extractor.model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_weights_unavailable_offline(config, offline_hub):
    with pytest.raises(WeightsUnavailableError) as info:
        FEATURE_EXTRACTORS.build("dino", config.replace(random_weights=False))
    message = str(info.value)
    assert "feature extractor 'vit_small_patch16_224.dino'" in message
    assert "weights_dir" in message and "--preset tiny" in message


@pytest.mark.slow
def test_real_size_architecture_random_weights():
    config = make_config("default", {"random_weights": True, "device": "cpu"})
    extractor = FEATURE_EXTRACTORS.build("dino", config)
    features = extractor(noise_image(320, 240))
    assert extractor.patch_size == 8
    assert features.grid == (24, 32)
    assert features.patches.shape == (768, 24, 32)
