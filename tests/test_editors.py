"""The diffusers editors ("sd-inpaint", "amused") with tiny random weights, offline, on the CPU;
the offline CLIP tokenizer; and the weight downloader (offline behaviour only)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lregions_core.config import make_config
from lregions_core.interfaces import Editor, EditRequest
from lregions_core.models import editors
from lregions_core.models.download import download_preset_weights
from lregions_core.models.weights import WeightsUnavailableError
from lregions_core.pipeline import register_components
from lregions_core.registry import EDITORS

# Only the editors this module registers (others, e.g. "oracle-painter", are tested elsewhere).
DIFFUSERS_EDITORS = [name for name in EDITORS.names() if name in ("sd-inpaint", "amused")]
MISSING_REPO = "lregions-test/no-such-editor"


def tiny_config(editor: str, **overrides):
    return make_config("tiny", overrides={"editor": editor, **overrides})


def request(width: int, height: int, seed: int, prompt: str = "a red apple", box=None):
    """A random picture with a rectangle to repaint (``box`` = x0, y0, x1, y1)."""
    rng = np.random.default_rng(width * 1000 + height)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box or (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    mask[y0:y1, x0:x1] = 255
    return EditRequest(Image.fromarray(pixels), Image.fromarray(mask), prompt, seed)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(params=DIFFUSERS_EDITORS)
def editor(request):
    return EDITORS.build(request.param, tiny_config(request.param))


# The contract every diffusers editor keeps (sizes, determinism, batching); the 1024 px editors'
# own behaviour is in test_editors_xl.py.
EVERY_EDITOR = (*DIFFUSERS_EDITORS, "sdxl-inpaint", "flux-fill")


@pytest.fixture(params=EVERY_EDITOR)
def any_editor(request):
    register_components()
    return EDITORS.build(request.param, tiny_config(request.param))


# --- tokenizer ------------------------------------------------------------------------------
def test_offline_tokenizer_matches_open_clip():
    import open_clip

    from lregions_core.models.tokenizer import clip_tokenizer_offline

    ours = clip_tokenizer_offline(77)
    reference = open_clip.get_tokenizer("ViT-B-16")  # open_clip's own SimpleTokenizer
    sentences = [
        "a high quality image of a cat wearing sunglasses.",
        "Hello,  WORLD!! it's 2024: naïve café, 東京 & émojis",
        "replace the dog with a tiger " * 20,  # longer than 77 tokens: truncated alike
    ]
    for text in sentences:
        ids = ours(text, truncation=True, max_length=77).input_ids
        expected = reference([text])[0].tolist()
        assert ids == expected[: len(ids)]
        assert all(i == 0 for i in expected[len(ids) :])  # open_clip pads with 0
    assert len(ours) == 49408 and ours.model_max_length == 77


# --- editors --------------------------------------------------------------------------------
def test_registered_and_protocol(editor):
    assert isinstance(editor, Editor)
    assert editor.name in DIFFUSERS_EDITORS
    assert editor.steps_per_call == editor.config.editor_steps == 2


def test_non_square_output(editor):
    outputs = editor.edit([request(96, 64, seed=0), request(96, 64, seed=1)])
    assert len(outputs) == 2
    for image in outputs:
        assert image.mode == "RGB" and image.size == (96, 64)


def test_mixed_sizes_keep_order(any_editor):
    sizes = [(96, 64), (64, 64), (64, 96), (96, 64), (48, 32)]
    outputs = any_editor.edit([request(w, h, seed=i) for i, (w, h) in enumerate(sizes)])
    assert [image.size for image in outputs] == sizes
    assert all(image.mode == "RGB" for image in outputs)
    assert any_editor.edit([]) == []


def test_deterministic_and_seed_dependent(any_editor):
    first = pixels(any_editor.edit([request(96, 64, seed=7)])[0])
    again = pixels(any_editor.edit([request(96, 64, seed=7)])[0])
    other = pixels(any_editor.edit([request(96, 64, seed=8)])[0])
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1.0


def test_result_independent_of_batch(any_editor):
    target = request(96, 64, seed=3, prompt="a blue car")
    alone = pixels(any_editor.edit([target])[0])
    batch = [
        request(96, 64, seed=11, box=(0, 0, 32, 32)),  # a different mask in the same batch
        request(64, 64, seed=12),  # another size: another group
        target,
        request(96, 64, seed=13, prompt="a yellow bird", box=(48, 16, 96, 64)),
    ]
    together = pixels(any_editor.edit(batch)[2])
    # Identical up to float rounding of batched kernels (a pixel level, rarely).
    assert np.abs(alone - together).max() <= 1
    assert np.abs(alone - together).mean() < 0.01


def test_batches_split_by_edit_batch():
    config = tiny_config("sd-inpaint", edit_batch=2)
    editor = EDITORS.build("sd-inpaint", config)
    requests = [request(64, 64, seed=i) for i in range(5)]
    split = [pixels(image) for image in editor.edit(requests)]
    whole = EDITORS.build("sd-inpaint", tiny_config("sd-inpaint")).edit(requests)
    whole = [pixels(image) for image in whole]
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(split, whole))


def test_long_prompt(editor):
    prompt = "a very detailed photograph of a small wooden cabin in a snowy forest " * 12
    assert len(prompt.split()) > 77
    (image,) = editor.edit([request(64, 64, seed=0, prompt=prompt)])
    assert image.size == (64, 64)


def test_size_must_fit_the_latent_grid(editor):
    with pytest.raises(ValueError, match="multiples of"):
        editor.edit([request(100, 64, seed=0)])


def test_pipeline_loaded_once(editor):
    again = EDITORS.build(editor.name, tiny_config(editor.name))
    assert again.pipeline is editor.pipeline
    assert editors.editor_pipeline(tiny_config(editor.name)) is editor.pipeline
    different = tiny_config(editor.name, editor_kwargs={"architecture": "tiny", "x": 1})
    assert editors._cache_key(different) != editors._cache_key(tiny_config(editor.name))


def test_amused_matches_diffusers_for_one_request():
    """Our per-request aMUSEd loop reproduces AmusedInpaintPipeline for a batch of one."""
    import torch

    config = tiny_config("amused", guidance_scale=3.0, editor_steps=3)
    editor = EDITORS.build("amused", config)
    job = request(64, 64, seed=5)
    ours = pixels(editor.edit([job])[0])
    theirs = editor.pipeline(
        config.prompt_template.format(prompt=job.prompt),
        job.image,
        job.mask,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5),
    ).images[0]
    assert np.array_equal(ours, pixels(theirs))


@pytest.fixture
def offline(monkeypatch):
    """No hub access: the environment variable and the flags the libraries read at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        import diffusers.utils.constants as diffusers_constants

        monkeypatch.setattr(diffusers_constants, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:  # pragma: no cover
        pass


@pytest.mark.parametrize("name", DIFFUSERS_EDITORS)
def test_missing_weights_error(name, offline, tmp_path):
    config = tiny_config(
        name, random_weights=False, editor_model=MISSING_REPO, weights_dir=str(tmp_path)
    )
    with pytest.raises(WeightsUnavailableError) as info:
        EDITORS.build(name, config)
    message = str(info.value)
    assert MISSING_REPO in message and "lregions download" in message


# --- downloads ------------------------------------------------------------------------------
@pytest.mark.parametrize("into_folder", [False, True])
def test_download_offline_names_the_repo(offline, tmp_path, into_folder):
    weights_dir = str(tmp_path) if into_folder else None
    config = make_config(overrides={"editor_model": MISSING_REPO, "weights_dir": weights_dir})
    with pytest.raises(WeightsUnavailableError) as info:
        download_preset_weights(config)
    assert MISSING_REPO in str(info.value)
    assert not (tmp_path / "lregions-test--no-such-editor").exists()  # no half-made folder


def test_download_nothing_for_random_or_oracle(monkeypatch):
    import huggingface_hub

    def forbidden(*args, **kwargs):
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", forbidden)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    assert download_preset_weights(make_config("tiny")) == []
    assert download_preset_weights(make_config("oracle")) == []


def test_download_into_weights_dir(monkeypatch, tmp_path):
    """Editor repo into <weights_dir>/<org--name>, safetensors only; oracle parts skipped."""
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    config = make_config(
        overrides={"weights_dir": str(tmp_path), "features": "oracle-saliency", "scorer": "oracle"}
    )
    lines = download_preset_weights(config)
    assert len(calls) == 1 and len(lines) == 1
    repo, kwargs = calls[0]
    assert repo == config.editor_model
    assert kwargs["local_dir"] == tmp_path / "stabilityai--stable-diffusion-2-inpainting"
    assert "*/*.safetensors" in kwargs["allow_patterns"]
    assert not any(p.endswith(".bin") for p in kwargs["allow_patterns"])
    assert repo in lines[0]


# --- real-size architectures (slow, LREGIONS_SLOW=1: ~1.3 B random parameters, ~30 s on CPU) -
@pytest.mark.slow
def test_full_architectures_parameter_counts():
    from lregions_core.models.editor_components import amused_components, sd_inpaint_components

    def count(module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6

    sd = sd_inpaint_components("full")
    assert 860 < count(sd["unet"]) < 870  # SD 2 inpainting UNet: 865.9 M
    assert 80 < count(sd["vae"]) < 90  # 83.7 M
    assert 330 < count(sd["text_encoder"]) < 360  # OpenCLIP ViT-H text, 23 layers
    del sd  # about 5 GB of float32 weights
    amused = amused_components("full")
    print({name: round(count(m)) for name, m in amused.items() if hasattr(m, "parameters")})
    assert count(amused["transformer"]) > 500
    assert count(amused["text_encoder"]) > 100
