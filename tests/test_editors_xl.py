"""The 1024-pixel diffusers editors ("sdxl-inpaint", "flux-fill") with tiny random weights,
offline, on the CPU: edits, batching, prompt embeddings, the out-of-memory path, the memory
settings, their presets and downloads, the real-size architectures (counted on the meta device),
the diffusers version error, and a demo batch through the command line for each."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_editors import pixels, request
from test_gpu_paths import _fail_above, counting

from lregions_core.config import ConfigError, make_config
from lregions_core.interfaces import Editor
from lregions_core.models import checks, editors, editors_xl
from lregions_core.models.download import download_preset_weights
from lregions_core.models.weights import WeightsUnavailableError
from lregions_core.pipeline import register_components
from lregions_core.registry import EDITORS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "manifests" / "demo.csv"
XL_EDITORS = ["sdxl-inpaint", "flux-fill"]
FLUX_REPO = "black-forest-labs/FLUX.1-Fill-dev"
SDXL_REPO = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"


def tiny(editor: str, **overrides):
    return make_config("tiny", {"editor": editor, **overrides})


@pytest.fixture(params=XL_EDITORS)
def editor(request):
    return EDITORS.build(request.param, tiny(request.param))


def text_encoders(pipe) -> list[torch.nn.Module]:
    return [pipe.text_encoder, pipe.text_encoder_2]


# --- edits ----------------------------------------------------------------------------------
def test_registered_with_their_native_size(editor):
    register_components()
    assert set(XL_EDITORS) <= set(EDITORS.names())
    assert isinstance(editor, Editor) and editor.name in XL_EDITORS
    assert editor.native_size == 1024
    assert editor.steps_per_call == editor.config.editor_steps == 2
    # SDXL: the VAE's /8; FLUX packs 2x2 latents after it: /16
    assert editor.multiple == {"sdxl-inpaint": 8, "flux-fill": 16}[editor.name]
    for name in ("sd-inpaint", "amused"):
        assert EDITORS.build(name, tiny(name)).native_size == 512


def test_matches_the_diffusers_pipeline_for_one_request(editor):
    """One request: the editor's cached embeddings and per-request generator give what the
    diffusers pipeline gives from the prompt text and one generator."""
    job = request(64, 64, seed=5)
    ours = pixels(editor.edit([job])[0])
    config = editor.config
    options = {"strength": 1.0, "num_inference_steps": config.editor_steps}
    if editor.name == "sdxl-inpaint":
        options = {"strength": editor.strength, "num_inference_steps":
                   editors_xl.schedule_steps(config.editor_steps, editor.strength)}
    theirs = editor.pipeline(
        prompt=config.prompt_template.format(prompt=job.prompt),
        image=job.image,
        mask_image=job.mask,
        height=64,
        width=64,
        guidance_scale=config.guidance_scale,
        generator=torch.Generator().manual_seed(5),
        **options,
    ).images[0]
    assert np.abs(ours - pixels(theirs)).max() <= 1


def test_runs_exactly_editor_steps(editor):
    denoiser = editor.pipeline.unet if editor.name == "sdxl-inpaint" else (
        editor.pipeline.transformer)
    batches: list[int] = []
    handle = denoiser.register_forward_pre_hook(  # FLUX's transformer takes keywords only
        lambda _m, args, kwargs: batches.append(int(
            (args[0] if args else next(iter(kwargs.values()))).shape[0])), with_kwargs=True)
    try:
        editor.edit([request(64, 64, seed=0), request(64, 64, seed=1)])
    finally:
        handle.remove()
    # SDXL: guidance doubles the batch; FLUX's guidance is an input of its transformer
    per_pass = 4 if editor.name == "sdxl-inpaint" else 2
    assert batches == [per_pass] * editor.config.editor_steps


def test_schedule_steps_runs_the_steps_asked_for():
    for steps in range(1, 201):
        total = editors_xl.schedule_steps(steps, 0.99)
        assert min(int(total * 0.99), total) == steps
        assert total == steps or min(int((total - 1) * 0.99), total - 1) < steps


# --- prompt embeddings ----------------------------------------------------------------------
@pytest.mark.parametrize("name", XL_EDITORS)
def test_each_prompt_encoded_once(name):
    editor = EDITORS.build(name, tiny(name))
    jobs = [request(64, 64, seed=i) for i in range(3)]
    first, second = text_encoders(editor.pipeline)
    with counting(first) as one, counting(second) as two:
        editor.edit(jobs)
        editor.edit(jobs[:2])
        # The prompt, once per encoder. The unguided half of SDXL's guidance is zeros
        # (force_zeros_for_empty_prompt): no empty prompt to encode; FLUX has none.
        assert one == [1] and two == [1]
        editor.edit([request(64, 64, seed=0, prompt="a green pear")])
        assert one == [1, 1] and two == [1, 1]
    lazy = EDITORS.build(name, tiny(name))
    lazy.reuse_prompt_embeddings = False
    with counting(first) as one:
        lazy.edit(jobs)
        lazy.edit(jobs[:2])
        assert one == [3, 2]  # every call: its prompts, in one batch


@pytest.mark.parametrize("name", XL_EDITORS)
def test_reused_embeddings_give_the_same_edit(name):
    jobs = [request(64, 64, seed=i, prompt=p) for i, p in enumerate(["a cat", "a dog", "a cat"])]
    reused = EDITORS.build(name, tiny(name)).edit(jobs)
    fresh = EDITORS.build(name, tiny(name))
    fresh.reuse_prompt_embeddings = False
    for a, b in zip(reused, fresh.edit(jobs), strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= checks.BATCH_TOLERANCE_LEVELS


def test_sdxl_guidance_against_the_empty_prompt_when_the_weights_say_so():
    editor = EDITORS.build("sdxl-inpaint", tiny("sdxl-inpaint"))
    pipe = editor.pipeline
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        job = request(64, 64, seed=2)
        with counting(pipe.text_encoder) as batches:
            ours = pixels(editor.edit([job])[0])
        assert batches == [1, 1]  # the prompt and the empty prompt
        lazy = EDITORS.build("sdxl-inpaint", tiny("sdxl-inpaint"))
        lazy.reuse_prompt_embeddings = False
        assert np.abs(ours - pixels(lazy.edit([job])[0])).max() <= 1
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)


# --- out of GPU memory (simulated) ----------------------------------------------------------
@pytest.mark.parametrize("name", XL_EDITORS)
def test_out_of_memory_halves_the_batch(name, caplog):
    jobs = [request(64, 64, seed=i) for i in range(5)]
    expected = [pixels(im) for im in EDITORS.build(name, tiny(name)).edit(jobs)]
    editor = EDITORS.build(name, tiny(name, edit_batch=8))
    tried = _fail_above(editor, 2)
    with caplog.at_level("WARNING", logger=editors.__name__):
        images = editor.edit(jobs)
    assert tried == [5, 2, 2, 1]  # 5 fails; then equal parts of at most 2
    assert editor.batch_limit == 2
    for a, b in zip(expected, images, strict=True):
        assert np.abs(a - pixels(b)).max() <= checks.BATCH_TOLERANCE_LEVELS
    assert "edit_batch=2" in caplog.text


@pytest.mark.parametrize("name", XL_EDITORS)
def test_out_of_memory_with_one_image_names_the_editor(name):
    editor = EDITORS.build(name, tiny(name))
    _fail_above(editor, 0)
    with pytest.raises(editors.EditorOutOfMemoryError, match=f"^{name}: out of GPU memory"):
        editor.edit([request(64, 64, seed=0)])


# --- scheduler, compile and attention options -------------------------------------------------
def test_scheduler_and_compile_options():
    from diffusers import DPMSolverMultistepScheduler

    base = editors.editor_pipeline(tiny("sdxl-inpaint"))
    dpm = EDITORS.build("sdxl-inpaint", tiny("sdxl-inpaint", editor_scheduler="dpm-solver++"))
    assert dpm.pipeline.unet is base.unet
    assert isinstance(dpm.pipeline.scheduler, DPMSolverMultistepScheduler)
    # the view keeps the loaded pipeline's own settings
    assert dpm.pipeline.config.force_zeros_for_empty_prompt == base.config.force_zeros_for_empty_prompt
    assert dpm.edit([request(64, 64, seed=0)])[0].size == (64, 64)
    with pytest.raises(ValueError, match="sd-inpaint and sdxl-inpaint only"):
        EDITORS.build("flux-fill", tiny("flux-fill", editor_scheduler="dpm-solver++"))
    flux = editors.editor_pipeline(tiny("flux-fill"))
    compiled = editors.editor_pipeline(tiny("flux-fill", compile_unet=True))  # not run here
    assert compiled.transformer._orig_mod is flux.transformer


def test_attention_lever():
    jobs = [request(64, 64, seed=0)]
    reference = pixels(EDITORS.build("sdxl-inpaint", tiny("sdxl-inpaint")).edit(jobs)[0])
    eager = EDITORS.build("sdxl-inpaint", tiny("sdxl-inpaint"))
    eager.attention = "eager"
    assert np.abs(reference - pixels(eager.edit(jobs)[0])).max() <= checks.BATCH_TOLERANCE_LEVELS
    EDITORS.build("sdxl-inpaint", tiny("sdxl-inpaint")).edit(jobs)  # back to SDPA
    flux = EDITORS.build("flux-fill", tiny("flux-fill"))
    flux.attention = "eager"
    with pytest.raises(ValueError, match="flux-fill: attention 'eager' is not available"):
        flux.edit(jobs)


# --- memory settings ------------------------------------------------------------------------
def test_memory_settings_validate():
    assert make_config("tiny").editor_offload == "none" and not make_config("tiny").vae_tiling
    with pytest.raises(ConfigError, match="editor_offload must be one of"):
        tiny("flux-fill", editor_offload="cpu")
    with pytest.raises(ConfigError, match="needs device 'cuda' or 'auto'"):
        tiny("flux-fill", editor_offload="model")  # the tiny preset runs on device "cpu"
    with pytest.raises(ConfigError, match="vae_tiling"):
        tiny("sdxl-inpaint", vae_tiling="yes")
    assert tiny("sd-inpaint", device="cuda", editor_offload="sequential").editor_offload == (
        "sequential")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
@pytest.mark.parametrize("name", ["sd-inpaint", *XL_EDITORS])
def test_offload_refused_without_a_gpu(name):
    config = tiny(name, device="auto", editor_offload="model")
    with pytest.raises(ValueError, match="CUDA GPU.*set editor_offload=none"):
        EDITORS.build(name, config)


def test_offload_is_part_of_the_loaded_weights_key():
    plain = tiny("flux-fill", device="auto")
    assert editors._cache_key(plain) != editors._cache_key(plain.replace(editor_offload="model"))


@pytest.mark.parametrize("name", ["sd-inpaint", *XL_EDITORS])
def test_vae_tiling_is_set_per_call(name):
    tiled = EDITORS.build(name, tiny(name, vae_tiling=True))
    plain = EDITORS.build(name, tiny(name))
    assert tiled.pipeline is plain.pipeline  # same weights: the setting is per call
    job = [request(64, 64, seed=0)]
    expected = pixels(plain.edit(job)[0])
    assert not plain.pipeline.vae.use_tiling
    # 64 px is the tiny VAE's tile: nothing to tile, the same edit
    assert np.array_equal(expected, pixels(tiled.edit(job)[0]))
    assert tiled.pipeline.vae.use_tiling
    plain.edit(job)
    assert not plain.pipeline.vae.use_tiling


def test_vae_tiling_refused_for_amused():
    with pytest.raises(ValueError, match="aMUSEd's VQ-GAN has no tiled mode"):
        EDITORS.build("amused", tiny("amused", vae_tiling=True))


def test_flux_runs_in_bfloat16_on_cuda_by_default():
    cuda = {"device": "cuda", "random_weights": True}
    assert editors.editor_dtype(make_config("flux", cuda)) == torch.bfloat16
    assert editors.editor_dtype(make_config("sdxl", cuda)) == torch.float16
    assert editors.editor_dtype(make_config("flux", {**cuda, "dtype": "float16"})) == (
        torch.float16)
    assert editors.editor_dtype(make_config("flux", {"device": "cpu"})) == torch.float32


# --- the diffusers version ------------------------------------------------------------------
def test_missing_pipeline_class_names_editor_class_and_versions(monkeypatch):
    fake = types.ModuleType("diffusers")
    fake.__version__ = "0.99.0"
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    # a settings key of its own: nothing loaded before answers for it
    config = tiny("amused", editor_kwargs={"architecture": "tiny", "probe": "version"})
    with pytest.raises(editors.EditorUnavailableError) as info:
        EDITORS.build("amused", config)
    assert str(info.value) == (
        "amused needs diffusers >=0.40,<0.43 (AmusedInpaintPipeline, a deprecated pipeline); "
        "installed: 0.99.0")
    with pytest.raises(editors.EditorUnavailableError, match=r"^flux-fill needs diffusers .*"
                       r"\(FluxFillPipeline\); installed: 0\.99\.0$"):
        EDITORS.build("flux-fill", tiny("flux-fill", editor_kwargs={"architecture": "tiny",
                                                                    "probe": "version"}))


def test_diffusers_requirement_is_the_pyproject_pin():
    text = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"diffusers([^"]*)"', text).group(1)
    assert sorted(pin.split(",")) == sorted(editors.DIFFUSERS_REQUIREMENT.split(","))


# --- tokenizers and real-size architectures ---------------------------------------------------
def test_offline_t5_tokenizer():
    from lregions_core.models.tokenizer import T5_OFFLINE_VOCAB_SIZE, t5_tokenizer_offline

    tokenizer = t5_tokenizer_offline(512)
    assert len(tokenizer) == T5_OFFLINE_VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("A cat, wearing a hat! \u00fc", padding="max_length", max_length=512).input_ids
    assert len(ids) == 512 and max(ids) < T5_OFFLINE_VOCAB_SIZE
    assert 2 in ids and ids[ids.index(1) + 1:] == [0] * (511 - ids.index(1))
    assert tokenizer.decode(tokenizer("a red hat").input_ids, skip_special_tokens=True) == (
        "a red hat")


def test_full_architectures_on_the_meta_device():
    """The published sizes, counted without memory (FLUX is 16.9 B parameters)."""
    from lregions_core.models.editor_components import (
        flux_fill_components,
        sdxl_inpaint_components,
    )

    def millions(module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6

    with torch.device("meta"):
        sdxl = sdxl_inpaint_components("full")
        flux = flux_fill_components("full")
    assert 2560 < millions(sdxl["unet"]) < 2575  # SDXL UNet 2567 M (9 input channels)
    assert 83 < millions(sdxl["vae"]) < 84
    assert 120 < millions(sdxl["text_encoder"]) < 125  # CLIP ViT-L/14 text: 123 M
    assert 690 < millions(sdxl["text_encoder_2"]) < 700  # OpenCLIP bigG text: 695 M
    assert 11890 < millions(flux["transformer"]) < 11910  # FLUX.1: 11.9 B
    assert 4755 < millions(flux["text_encoder_2"]) < 4770  # T5 v1.1 XXL encoder: 4.76 B
    assert flux["transformer"].config.in_channels == 384 and flux["vae"].config.latent_channels == 16


# --- presets and downloads ------------------------------------------------------------------
def test_presets_listed_and_fit_their_editors(capsys):
    from flows.cli import main

    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"^sdxl: ", listed, re.MULTILINE) and re.search(r"^flux: ", listed, re.MULTILINE)
    assert "Non-Commercial" in listed.split("\nflux: ")[1].split("\n")[0]
    for preset, editor, multiple, repo in (("sdxl", "sdxl-inpaint", 8, SDXL_REPO),
                                           ("flux", "flux-fill", 16, FLUX_REPO)):
        config = make_config(preset)
        assert (config.editor, config.editor_model, config.work_size) == (editor, repo, 1024)
        assert config.work_multiple % multiple == 0


@pytest.fixture
def fake_snapshot(monkeypatch):
    import huggingface_hub

    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(kwargs.get("local_dir"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


@pytest.mark.parametrize(("preset", "repo"), [("sdxl", SDXL_REPO), ("flux", FLUX_REPO)])
def test_download_fetches_the_component_folders(fake_snapshot, tmp_path, preset, repo):
    config = make_config(preset, {"weights_dir": str(tmp_path), "features": "oracle-saliency",
                                  "scorer": "oracle"})
    lines = download_preset_weights(config)
    assert [call[0] for call in fake_snapshot] == [repo] and repo in lines[0]
    kwargs = fake_snapshot[0][1]
    assert kwargs["local_dir"] == tmp_path / repo.replace("/", "--")
    # T5's tokenizer model (FLUX), sharded weights and their index; no top-level checkpoint
    assert {"*/*.model", "*/*.safetensors", "*/*.json"} <= set(kwargs["allow_patterns"])
    assert not any(p.endswith(".bin") for p in kwargs["allow_patterns"])


def _refusal(kind: type, status: int):
    """A hub error as huggingface_hub raises it, without a live HTTP response."""
    error = kind.__new__(kind)
    Exception.__init__(error, f"{status} Client Error: Cannot access gated repo")
    error.response = types.SimpleNamespace(status_code=status)
    return error


@pytest.mark.parametrize("kind", ["gated", "unauthorised"])
def test_download_says_how_to_get_a_gated_repo(monkeypatch, tmp_path, kind):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    error = (_refusal(GatedRepoError, 403) if kind == "gated"
             else _refusal(RepositoryNotFoundError, 401))

    def refuse(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    config = make_config("flux", {"weights_dir": str(tmp_path), "features": "oracle-saliency",
                                  "scorer": "oracle"})
    with pytest.raises(WeightsUnavailableError) as info:
        download_preset_weights(config)
    message = str(info.value)
    for words in (FLUX_REPO, "gated repository", "FLUX.1 [dev] Non-Commercial License",
                  f"https://huggingface.co/{FLUX_REPO}", "hf auth login", "HF_TOKEN"):
        assert words in message
    assert not (tmp_path / FLUX_REPO.replace("/", "--")).exists()


@pytest.mark.parametrize("name", XL_EDITORS)
def test_edit_image_counts_the_steps(name):
    from conftest import noise_image

    from lregions_core.pipeline import edit_image

    config = tiny(name, num_anchors=2, num_proposals=2, iterations=1)
    image = noise_image(128, 96, seed=4)
    result = edit_image(image, "a red hat", config=config)
    assert result.image.size == image.size
    assert result.denoise_steps == result.editor_requests * config.editor_steps


# --- the command line, end to end (one temporary Prefect server for the session) ------------
@pytest.mark.parametrize("name", XL_EDITORS)
def test_demo_manifest_through_the_command_line(prefect_server, tmp_path, name):
    from flows.cli import main

    out = tmp_path / "demo"
    assert main(["edit", str(DEMO), "--out", str(out), "--preset", "tiny",
                 "--set", f"editor={name}"]) == 0
    table = pd.read_parquet(out / "index.parquet")
    assert list(table["status"]) == ["ok"] * 4
    assert all((out / "items" / row_id / "final.png").is_file() for row_id in table["id"])
