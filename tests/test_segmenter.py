"""The CLIPSeg segmenter ("clipseg") with tiny random weights, offline, on the CPU; its loading from
a weights folder and its missing-weights error; and ``lregions download`` for the segmenter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise_image

from lregions_core.config import make_config
from lregions_core.interfaces import Segmenter
from lregions_core.models import segmenter as segmenter_module
from lregions_core.models.download import download_preset_weights
from lregions_core.models.weights import WeightsUnavailableError, safe_dirname
from lregions_core.registry import SEGMENTERS

MISSING_REPO = "lregions-test/no-such-segmenter"
# Batched CPU kernels may round differently from single-image ones; a map's batch-mates must not
# change it by more than this (observed: ~1e-7).
BATCH_ATOL = 1e-5
SIZES = [(50, 30), (64, 64), (3, 7), (129, 17), (1, 1)]  # (width, height)


def tiny_config(**overrides):
    return make_config("tiny", overrides=overrides)


@pytest.fixture
def segmenter():
    return SEGMENTERS.build("clipseg", tiny_config())


def images_and_texts():
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    texts = ["a cat", "the red apple on the left", "a cat", "sky", "a dog"]
    return images, texts


def test_tiny_preset_builds_the_tiny_architecture(segmenter):
    assert isinstance(segmenter, Segmenter)
    assert segmenter.name == "clipseg"
    config = segmenter.bundle.model.config
    assert config.vision_config.hidden_size == 32 and config.vision_config.num_hidden_layers == 2
    assert config.text_config.hidden_size == 32 and config.text_config.num_hidden_layers == 2
    assert config.reduce_dim == 16 and list(config.extract_layers) == [0, 1]
    assert not segmenter.bundle.model.training
    assert next(segmenter.bundle.model.parameters()).dtype == torch.float32


def test_maps_have_each_images_size_and_range(segmenter):
    images, texts = images_and_texts()
    maps = segmenter.segment(images, texts)
    assert len(maps) == len(images)
    for image, probability in zip(images, maps):
        assert isinstance(probability, np.ndarray)
        assert probability.shape == (image.height, image.width)
        assert probability.dtype == np.float32
        assert np.isfinite(probability).all()
        assert probability.min() >= 0.0 and probability.max() <= 1.0
    # Random weights give graded maps, not saturated 0/1 ones (the decoder is re-initialised).
    assert 0.01 < float(maps[1].mean()) < 0.99
    assert float(maps[1].std()) > 0


def test_non_rgb_images_are_converted(segmenter):
    image = noise_image(40, 24, seed=3)
    rgb = segmenter.segment([image], ["a cat"])[0]
    rgba = segmenter.segment([image.convert("RGBA")], ["a cat"])[0]
    np.testing.assert_array_equal(rgb, rgba)
    grey = segmenter.segment([image.convert("L")], ["a cat"])[0]
    assert grey.shape == (24, 40)


def test_maps_depend_on_the_text_and_the_image(segmenter):
    image = noise_image(64, 64, seed=1)
    cat, sky = segmenter.segment([image, image], ["a cat", "the sky"])
    assert np.abs(cat - sky).max() > 1e-3
    other = segmenter.segment([noise_image(64, 64, seed=2)], ["a cat"])[0]
    assert np.abs(cat - other).max() > 1e-3


def test_deterministic_across_calls_and_builds(segmenter):
    images, texts = images_and_texts()
    first = segmenter.segment(images, texts)
    again = segmenter.segment(images, texts)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    old_model = segmenter.bundle.model
    segmenter_module.clear_segmenter_cache()
    rebuilt = SEGMENTERS.build("clipseg", tiny_config())
    assert rebuilt.bundle.model is not old_model  # really a second build
    old_state, new_state = old_model.state_dict(), rebuilt.bundle.model.state_dict()
    assert old_state.keys() == new_state.keys()
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state)
    for a, b in zip(first, rebuilt.segment(images, texts)):
        np.testing.assert_array_equal(a, b)


def test_loaded_once_per_settings(segmenter):
    assert SEGMENTERS.build("clipseg", tiny_config()).bundle is segmenter.bundle
    other = SEGMENTERS.build("clipseg", tiny_config(dtype="bfloat16"))
    assert other.bundle is not segmenter.bundle
    assert next(other.bundle.model.parameters()).dtype == torch.bfloat16
    probability = other.segment([noise_image(20, 10)], ["a cat"])[0]
    assert probability.dtype == np.float32 and probability.shape == (10, 20)


def test_a_map_does_not_depend_on_its_batch_mates(segmenter):
    images, texts = images_and_texts()
    batched = segmenter.segment(images, texts)
    segmenter.batch_size = 2  # several forward passes, the last one with a single image
    chunked = segmenter.segment(images, texts)
    for index, (image, text) in enumerate(zip(images, texts)):
        alone = segmenter.segment([image], [text])[0]  # a batch of one: logits lose a dim
        np.testing.assert_allclose(batched[index], alone, rtol=0, atol=BATCH_ATOL)
        np.testing.assert_allclose(chunked[index], alone, rtol=0, atol=BATCH_ATOL)
    # The same (image, text) pair with different batch-mates, in another position.
    mates = [noise_image(33, 80, seed=9), images[1], noise_image(8, 8, seed=8)]
    again = segmenter.segment(mates, ["a bird", texts[1], "water"])[1]
    np.testing.assert_allclose(again, batched[1], rtol=0, atol=BATCH_ATOL)


def test_batch_of_one_with_squeezed_logits(segmenter, monkeypatch):
    """Some transformers releases squeeze every unit dimension of CLIPSeg's logits, the batch's
    too when it holds one image; the map must come out the same either way."""
    image = noise_image(30, 20, seed=4)
    expected = segmenter.segment([image], ["a cat"])[0]
    model = segmenter.bundle.model

    class Squeezing:
        def __call__(self, **inputs):
            output = model(**inputs)
            output.logits = output.logits.squeeze()
            return output

        def __getattr__(self, name):
            return getattr(model, name)

    monkeypatch.setattr(segmenter.bundle, "model", Squeezing())
    squeezed = segmenter.segment([image], ["a cat"])[0]
    assert squeezed.shape == (20, 30)
    np.testing.assert_array_equal(squeezed, expected)


def test_empty_input_gives_empty_output(segmenter):
    assert segmenter.segment([], []) == []


@pytest.mark.parametrize(
    ("count", "texts", "message"),
    [
        (2, ["a cat"], "one text per image"),
        (1, ["a cat", "a dog"], "one text per image"),
        (2, ["a cat", ""], "text 1 is empty"),
        (1, ["   "], "text 0 is empty"),
    ],
)
def test_bad_inputs_are_clear_errors(segmenter, count, texts, message):
    images = [noise_image(16, 16, seed=i) for i in range(count)]
    with pytest.raises(ValueError, match=message):
        segmenter.segment(images, texts)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="architecture must be one of"):
        SEGMENTERS.build("clipseg", tiny_config(segmenter_kwargs={"architecture": "huge"}))


def test_preprocessing_is_the_published_one(segmenter):
    """Rescale to [0, 1], then ImageNet mean/std (CLIPSeg's preprocessor_config.json); a 64 px
    square input is not resized, so the normalised pixels can be checked exactly."""
    processor = segmenter.bundle.image_processor
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]
    assert list(processor.image_std) == [0.229, 0.224, 0.225]
    assert processor.size["height"] == processor.size["width"] == 64
    image = noise_image(64, 64, seed=5)
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"][0].numpy()
    expected = (np.asarray(image, dtype=np.float32) / 255 - [0.485, 0.456, 0.406]) / [
        0.229, 0.224, 0.225
    ]
    np.testing.assert_allclose(pixels, expected.transpose(2, 0, 1), atol=1e-5)
    resized = processor(images=[noise_image(200, 90)], return_tensors="pt")["pixel_values"]
    assert tuple(resized.shape) == (1, 3, 64, 64)


def test_full_architecture_is_rd64_refined():
    """The random "full" build has CIDAS/clipseg-rd64-refined's exact parameter count (150.75 M
    float32 weights; the hub lists 150,747,746 plus 274 int64 position ids). Built on the meta
    device: no memory, no time."""
    from transformers import CLIPSegForImageSegmentation

    with torch.device("meta"):
        model = CLIPSegForImageSegmentation(segmenter_module.clipseg_config("full"))
    assert sum(p.numel() for p in model.parameters()) == 150_747_746
    assert sum(b.numel() for b in model.buffers()) == 274


# --- real weights: from a folder, or a clear error ------------------------------------------------
def test_loads_from_weights_dir(offline_hub, tmp_path, segmenter):
    """The pretrained path (safetensors and processor files from <weights_dir>/<org--name>) gives
    the same maps as the model that was saved there."""
    from transformers import CLIPSegProcessor

    name = "lregions-test/tiny-clipseg"
    folder = tmp_path / "weights" / safe_dirname(name)
    bundle = segmenter.bundle
    bundle.model.save_pretrained(folder)
    CLIPSegProcessor(
        image_processor=bundle.image_processor, tokenizer=bundle.tokenizer
    ).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    loaded = SEGMENTERS.build(
        "clipseg",
        tiny_config(random_weights=False, segmenter_model=name, weights_dir=str(tmp_path / "weights")),
    )
    assert loaded.bundle is not bundle
    images, texts = images_and_texts()
    for a, b in zip(segmenter.segment(images, texts), loaded.segment(images, texts)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [MISSING_REPO, "CIDAS/clipseg-rd64-refined"])
def test_missing_weights_error(offline_hub, tmp_path, name):
    config = tiny_config(random_weights=False, segmenter_model=name, weights_dir=str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        SEGMENTERS.build("clipseg", config)
    message = str(info.value)
    assert name in message and "lregions download" in message and "segmenter" in message


# --- downloads ------------------------------------------------------------------------------------
NO_OTHER_WEIGHTS = {"features": "oracle-saliency", "scorer": "oracle", "editor": "oracle-painter"}


@pytest.fixture
def fake_snapshot(monkeypatch):
    import huggingface_hub

    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_download_segmenter_only_when_not_box(fake_snapshot, tmp_path):
    box = make_config(overrides={**NO_OTHER_WEIGHTS, "weights_dir": str(tmp_path)})
    assert download_preset_weights(box) == [] and fake_snapshot == []
    for shape in ("mask", "auto"):
        lines = download_preset_weights(box.replace(region_shape=shape))
        assert len(lines) == 1 and "CIDAS/clipseg-rd64-refined" in lines[0]
    assert len(fake_snapshot) == 2
    repo, kwargs = fake_snapshot[0]
    assert repo == "CIDAS/clipseg-rd64-refined"
    assert kwargs["local_dir"] == tmp_path / "CIDAS--clipseg-rd64-refined"
    assert "*.safetensors" in kwargs["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in kwargs["allow_patterns"])


def test_download_segmenter_with_the_other_models(fake_snapshot):
    """With an editor that has weights, the segmenter comes after it (hub cache: no folder)."""
    config = make_config(
        overrides={"features": "oracle-saliency", "scorer": "oracle", "region_shape": "mask"}
    )
    lines = download_preset_weights(config)
    assert [repo for repo, _ in fake_snapshot] == [config.editor_model, config.segmenter_model]
    assert fake_snapshot[1][1]["local_dir"] is None and len(lines) == 2


def test_download_no_segmenter_for_random_or_other_segmenters(fake_snapshot):
    assert download_preset_weights(tiny_config(region_shape="mask")) == []
    other = make_config(
        overrides={**NO_OTHER_WEIGHTS, "region_shape": "auto", "segmenter": "oracle-segmenter"}
    )
    assert download_preset_weights(other) == []
    assert fake_snapshot == []


@pytest.mark.parametrize("into_folder", [False, True])
def test_download_offline_names_the_segmenter(offline_hub, tmp_path, into_folder):
    weights_dir = tmp_path / "weights"
    config = make_config(
        overrides={
            **NO_OTHER_WEIGHTS,
            "region_shape": "mask",
            "segmenter_model": MISSING_REPO,
            "weights_dir": str(weights_dir) if into_folder else None,
        }
    )
    with pytest.raises(WeightsUnavailableError) as info:
        download_preset_weights(config)
    assert MISSING_REPO in str(info.value) and "segmenter" in str(info.value)
    assert not (weights_dir / safe_dirname(MISSING_REPO)).exists()  # no half-made folder
