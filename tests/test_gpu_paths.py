"""What can be checked of the GPU paths without a GPU, on tiny random-weight models on the CPU:
batching, prompt embeddings encoded once, the out-of-memory path (a simulated CUDA error),
schedulers, attention and VAE slicing, half precision within the stated tolerances, and the GPU
benchmark's instrumentation and reference procedure."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import noise_image
from test_editors import pixels, request

from lregions_core import profiling
from lregions_core.config import ConfigError, make_config
from lregions_core.models import checks, editors
from lregions_core.pipeline import Models, register_components
from lregions_core.registry import EDITORS, FEATURE_EXTRACTORS, SCORERS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
register_components()  # the CLIP and DINO adapters register themselves on import
STEPS = 2  # the tiny preset's; its PNDM takes 3 UNet passes for them (one warm-up step)


def tiny(**overrides):
    return make_config("tiny", overrides)


@pytest.fixture
def workloads(monkeypatch):
    """The benchmark's ``gpu_workloads`` module (benchmarks/ is not a package)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_workloads

    return gpu_workloads


@contextlib.contextmanager
def counting(module: torch.nn.Module) -> Iterator[list[int]]:
    """The batch size of each forward pass of ``module`` while in the block."""
    batches: list[int] = []
    handle = module.register_forward_pre_hook(
        lambda _m, args, kwargs: batches.append(
            int((args[0] if args else kwargs["input_ids"]).shape[0])
        ),
        with_kwargs=True,
    )
    try:
        yield batches
    finally:
        handle.remove()  # the pipeline is shared by every test


# --- prompt embeddings ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd-inpaint", "amused"])
def test_text_encoder_runs_once_per_prompt(name):
    editor = EDITORS.build(name, tiny(editor=name))
    jobs = [request(64, 64, seed=i) for i in range(3)]
    with counting(editor.pipeline.text_encoder) as batches:
        editor.edit(jobs)
        editor.edit(jobs[:2])
        assert len(batches) == 2  # the prompt and the empty prompt (guidance), once each
        editor.edit([request(64, 64, seed=0, prompt="a green pear")])
        assert len(batches) == 3
    lazy = EDITORS.build(name, tiny(editor=name))
    lazy.reuse_prompt_embeddings = False
    with counting(lazy.pipeline.text_encoder) as batches:
        lazy.edit(jobs)
        lazy.edit(jobs[:2])
        assert batches == [3, 3, 2, 2]  # every call: prompts, then empty prompts


@pytest.mark.parametrize("name", ["sd-inpaint", "amused"])
def test_reused_embeddings_give_the_same_edit(name):
    jobs = [request(64, 64, seed=i, prompt=p) for i, p in enumerate(["a cat", "a dog", "a cat"])]
    reused = EDITORS.build(name, tiny(editor=name)).edit(jobs)
    fresh = EDITORS.build(name, tiny(editor=name))
    fresh.reuse_prompt_embeddings = False
    for a, b in zip(reused, fresh.edit(jobs), strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= checks.BATCH_TOLERANCE_LEVELS


# --- batching -------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["default", "dpm-solver++"])
def test_edit_independent_of_its_batch(scheduler):
    editor = EDITORS.build("sd-inpaint", tiny(editor_scheduler=scheduler))
    target = request(96, 64, seed=3, prompt="a blue car")
    others = [request(96, 64, seed=10 + i, box=(8 * i, 0, 8 * i + 40, 48)) for i in range(5)]
    assert checks.batch_gap(editor, target, others) <= checks.BATCH_TOLERANCE_LEVELS


@pytest.mark.parametrize(("limit", "count", "chunks"), [(4, 10, [4, 3, 3]), (9, 10, [5, 5]),
                                                        (9, 9, [9]), (1, 2, [1, 1])])
def test_batches_are_equal_parts(limit, count, chunks):
    editor = EDITORS.build("sd-inpaint", tiny(edit_batch=limit))
    with counting(editor.pipeline.unet) as batches:
        editor.edit([request(64, 64, seed=i) for i in range(count)])
    passes = STEPS + 1
    assert batches == [2 * c for c in chunks for _ in range(passes)]  # x2: guidance


def test_attention_and_vae_slicing_do_not_change_the_edit():
    jobs = [request(64, 64, seed=i) for i in range(3)]
    reference = [pixels(im) for im in EDITORS.build("sd-inpaint", tiny()).edit(jobs)]
    eager = EDITORS.build("sd-inpaint", tiny())
    eager.attention = "eager"
    unsliced = EDITORS.build("sd-inpaint", tiny(vae_slicing=False))
    for editor in (eager, unsliced):
        for a, b in zip(reference, editor.edit(jobs), strict=True):
            assert np.abs(a - pixels(b)).max() <= checks.BATCH_TOLERANCE_LEVELS
    # The shared UNet goes back to SDPA for an editor that asks for it.
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = eager.pipeline.unet
    eager.edit(jobs[:1])
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    EDITORS.build("sd-inpaint", tiny()).edit(jobs[:1])
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


# --- out of GPU memory (simulated) ----------------------------------------------------------
def _fail_above(editor, size: int) -> list[int]:
    """Make ``editor`` raise CUDA's out-of-memory error for batches above ``size``."""
    tried: list[int] = []
    run = editor._run

    def run_or_fail(requests, width, height):
        tried.append(len(requests))
        if len(requests) > size:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run(requests, width, height)

    editor._run = run_or_fail
    return tried


def test_out_of_memory_halves_the_batch_and_keeps_every_row(caplog):
    jobs = [request(64, 64, seed=i) for i in range(7)]
    expected = [pixels(im) for im in EDITORS.build("sd-inpaint", tiny()).edit(jobs)]
    editor = EDITORS.build("sd-inpaint", tiny(edit_batch=8))
    tried = _fail_above(editor, 3)
    with caplog.at_level(logging.WARNING, logger=editors.__name__):
        images = editor.edit(jobs)
    assert tried == [7, 3, 2, 2]  # 7 fails; then equal parts of at most 3: 3 + 2 + 2
    assert editor.batch_limit == 3
    assert len(images) == len(jobs)
    for a, b in zip(expected, images, strict=True):
        assert np.abs(a - pixels(b)).max() <= checks.BATCH_TOLERANCE_LEVELS
    assert "edit_batch=3" in caplog.text and "out of GPU memory" in caplog.text
    # The limit found sticks: the next call starts there instead of failing again.
    tried.clear()
    editor.edit(jobs)
    assert tried == [3, 2, 2]


def test_out_of_memory_with_one_image_names_the_settings():
    editor = EDITORS.build("sd-inpaint", tiny())
    _fail_above(editor, 0)
    with pytest.raises(editors.EditorOutOfMemoryError) as info:
        editor.edit([request(64, 64, seed=0), request(64, 64, seed=1)])
    message = str(info.value)
    assert message.startswith("sd-inpaint: out of GPU memory editing one 64x64 image")
    assert "edit_batch" in message and "work_size" in message


# --- scheduler and compile views ------------------------------------------------------------
def test_scheduler_and_compile_share_the_weights():
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    base = editors.editor_pipeline(tiny())
    dpm = editors.editor_pipeline(tiny(editor_scheduler="dpm-solver++"))
    assert dpm is not base and dpm is editors.editor_pipeline(tiny(editor_scheduler="dpm-solver++"))
    assert dpm.unet is base.unet and dpm.vae is base.vae
    assert isinstance(dpm.scheduler, DPMSolverMultistepScheduler)
    assert dpm.scheduler.config.algorithm_type == "dpmsolver++"
    assert isinstance(base.scheduler, PNDMScheduler)  # the shared pipeline is untouched
    compiled = editors.editor_pipeline(tiny(compile_unet=True))  # compiles lazily: not run here
    assert compiled.unet._orig_mod is base.unet and compiled.scheduler is base.scheduler


def test_new_settings_are_validated():
    with pytest.raises(ConfigError, match="editor_scheduler"):
        tiny(editor_scheduler="euler")
    with pytest.raises(ConfigError, match="edit_batch"):
        tiny(edit_batch=0)
    with pytest.raises(ValueError, match="sd-inpaint and sdxl-inpaint only"):
        EDITORS.build("amused", tiny(editor="amused", editor_scheduler="dpm-solver++"))
    assert make_config("fast").editor_scheduler == "dpm-solver++"
    assert make_config("fast").editor_steps < make_config("default").editor_steps


# --- half precision -------------------------------------------------------------------------
def precision_gaps(config, dtype: str, size: tuple[int, int]) -> dict[str, dict[str, float]]:
    """CLIP score and DINO feature gaps of ``dtype`` vs float32 on a noise photo of ``size``
    and four candidates, each with another box repainted."""
    width, height = size
    source = noise_image(width, height, seed=1)
    candidates = [source.copy() for _ in range(4)]
    for i, candidate in enumerate(candidates):
        box = noise_image(width // 3, height // 3, seed=10 + i)
        candidate.paste(box, (width // 8 + i * width // 16, height // 8))
    half = config.replace(dtype=dtype)
    return {
        "clip": checks.score_gaps(SCORERS.build("clip", config), SCORERS.build("clip", half),
                                  source, candidates, "a cat wearing a red hat", "a cat"),
        "dino": checks.feature_gaps(FEATURE_EXTRACTORS.build("dino", config),
                                    FEATURE_EXTRACTORS.build("dino", half), source),
    }


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_within_tolerance(dtype):
    gaps = precision_gaps(tiny(), dtype, (96, 64))
    # Above 0: the half-precision models really ran in half precision.
    assert 0 < max(gaps["clip"].values()) <= checks.CLIP_TOLERANCE[dtype], gaps
    assert 0 < max(gaps["dino"].values()) <= checks.DINO_TOLERANCE[dtype], gaps


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_real_size_architectures(dtype):
    """CLIP ViT-B/16 and DINO ViT-B/8, random weights (half precision on a CPU: minutes)."""
    config = make_config("default", {"random_weights": True, "device": "cpu", "clip_views": 4})
    gaps = precision_gaps(config, dtype, (256, 192))
    print(dtype, gaps)
    assert max(gaps["clip"].values()) <= checks.CLIP_TOLERANCE[dtype], gaps
    assert max(gaps["dino"].values()) <= checks.DINO_TOLERANCE[dtype], gaps


# --- profiling ------------------------------------------------------------------------------
def test_phase_timer_counts_exclusive_time(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 4.0, 10.0, 10.5])
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: next(clock))
    timer = profiling.PhaseTimer(torch.device("cpu"))
    with timer.phase("outer"):  # 0
        with timer.phase("inner"):  # 1
            pass  # 3
        with timer.phase("inner"):  # 4
            pass  # 10
    # outer: 0..1 and 3..4 and 10..10.5; inner: 1..3 and 4..10
    assert timer.seconds == {"outer": 2.5, "inner": 8.0}


def test_denoiser_flops():
    flops = profiling.DenoiserFlops(editors.editor_pipeline(tiny()).unet)
    text = {"encoder_hidden_states": torch.zeros(1, 77, 32)}
    one = flops((torch.zeros(1, 9, 8, 6), torch.tensor(10)), text)
    two = flops((torch.zeros(2, 9, 8, 6), torch.tensor(10)),
                {"encoder_hidden_states": torch.zeros(2, 77, 32)})
    assert one > 0 and two == 2 * one
    from diffusers import UNet2DConditionModel

    from lregions_core.models.editor_components import SD2_UNET

    with torch.device("meta"):
        sd2 = profiling.DenoiserFlops(UNet2DConditionModel(**SD2_UNET))
    real = sd2((torch.empty(1, 9, 64, 64), torch.tensor(999)),
               {"encoder_hidden_states": torch.empty(1, 77, 1024)})
    assert 800e9 < real < 810e9  # SD 2 inpainting at 512x512: about 804 GFLOP per sample


def test_dense_peak_table(monkeypatch):
    assert profiling.dense_peak_tflops(torch.device("cpu")) is None
    names = {"NVIDIA H100 80GB HBM3": 989.5, "NVIDIA H100 PCIe": 756.5, "NVIDIA H200": 989.5,
             "NVIDIA H200 NVL": 835.5, "NVIDIA A100-SXM4-80GB": 312.0, "Some New GPU": None}
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device, n=name: n)
        assert profiling.dense_peak_tflops(torch.device("cuda")) == peak


def _photo(tmp_path: Path) -> tuple[Path, str, str]:
    path = tmp_path / "photo.png"
    noise_image(96, 64, seed=2).save(path)
    return path, "a red apple", "noise"


def test_instrumented_photo(workloads, tmp_path):
    config = tiny(num_anchors=3, num_proposals=3, iterations=2)
    models = Models.load(config)
    timer = profiling.PhaseTimer(torch.device("cpu"))
    with profiling.instrument(models, timer) as timed:
        run = workloads.time_photo(workloads.ours, config, timed, timer, _photo(tmp_path),
                                   tmp_path)
    assert set(run.seconds) == set(profiling.PHASES)
    assert sum(run.seconds.values()) <= run.wall + 1e-6
    requests, calls = run.counts["requests"], run.counts["editor_calls"]
    assert 3 <= requests <= 9 and calls >= 1
    # Every request: 3 UNet passes (PNDM, 2 steps) of 2 samples (guidance); chunks of <= 8.
    assert run.counts["unet_samples"] == 2 * (STEPS + 1) * requests
    assert run.counts["unet_flops"] > 0 and "unet_flops_missing" not in run.counts
    assert (tmp_path / "final.png").is_file() and (tmp_path / "cand_02.png").is_file()
    # Hooks and patches are gone afterwards.
    pipe = models.editor.pipeline
    assert not pipe.unet._forward_pre_hooks and not pipe.text_encoder._forward_hooks
    assert "encode" not in vars(pipe.vae) and "encode_text" not in vars(models.scorer.bundle.model)


def test_reference_procedure_call_count(workloads, tmp_path):
    options = type("Options", (), {"small": True, "device": "cpu", "dtype": "auto"})
    config = workloads.reference_config(options).replace(
        num_anchors=4, num_proposals=3, iterations=3, edit_batch=4)
    models = workloads.reference_models(config)
    assert config.editor_steps == 2 and config.editor_scheduler == "default"  # 50 x 0.04
    timer = profiling.PhaseTimer(torch.device("cpu"))
    with profiling.instrument(models, timer) as timed, counting(
        models.editor.pipeline.text_encoder
    ) as text_batches:
        run = workloads.time_photo(workloads.reference_procedure, config, timed, timer,
                                   _photo(tmp_path), tmp_path)
    # (iterations + 1) calls, one box per anchor each, no memo: 16 edits of 12 possible boxes.
    assert run.counts["editor_calls"] == 4 and run.counts["requests"] == 16
    assert run.counts["unet_calls"] == 4 * (STEPS + 1)  # one batch of 4 per call
    assert len(text_batches) == 2 * 4  # the prompt encoded on every call, as diffusers does


@pytest.mark.slow
def test_real_size_editor_paths():
    """The SD 2 inpainting architecture (random weights) through the new paths: prompt reuse
    with 1024-wide embeddings, DPM-Solver++, equal batches, FLOPs of the real UNet."""
    config = make_config("fast", {"random_weights": True, "device": "cpu", "editor_steps": 1,
                                  "edit_batch": 2})
    editor = EDITORS.build("sd-inpaint", config)
    jobs = [request(64, 64, seed=i) for i in range(3)]
    with counting(editor.pipeline.unet) as unet, counting(editor.pipeline.text_encoder) as text:
        images = editor.edit(jobs)
    assert [im.size for im in images] == [(64, 64)] * 3
    assert unet == [4, 2] and len(text) == 2  # 2 + 1 requests, guided; prompt and "" once each
    flops = profiling.DenoiserFlops(editor.pipeline.unet)
    per_sample = flops((torch.empty(1, 9, 8, 8), torch.tensor(999)),
                       {"encoder_hidden_states": torch.empty(1, 77, 1024)})
    assert 10e9 < per_sample < 20e9  # 804 GFLOP at 64x64 latents; 8x8 is 1/64 of the pixels
