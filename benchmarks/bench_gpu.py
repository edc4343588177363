"""lregions at real size on a GPU, timed side by side with the reference procedure.

Real-size architectures with random weights (speed and memory do not depend on the weights'
values): DINO ViT-B/8 (ViT-S/16 for ``fast``), CLIP ViT-B/16, Stable Diffusion 2 inpainting at
512 px with each preset's scheduler and steps; and the ``sdxl`` and ``flux`` presets' editors
(SDXL inpainting 0.1, FLUX.1 Fill [dev]) at 1024 px, rgn mode (``--editor-presets``). ``--small``
runs the same code with the ``tiny`` preset's models (each preset's editor in its tiny build) at
64 px and the steps scaled by 0.04, keeping each preset's method settings, so it runs on a CPU.
Sections: the real-size models' size and denoiser work (meta device: counted, not run, so the
12 B FLUX transformer needs no memory); each mode's cost per photo next to the reference
procedure (``gpu_workloads.py``); where the time goes; levers measured off and on in the same
run; numerical checks; a profile.

    python benchmarks/bench_gpu.py                          # on a CUDA machine (80 GB for FLUX)
    python benchmarks/bench_gpu.py --small --photos 2       # CPU / CI
    options: --compile on|off|auto  --profile DIR  --peak-tflops X  --dtype  --no-levers
             --editor-presets sdxl flux (the default; none: SD 2 only)
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gpu_workloads import (
    MODES,
    PHOTOS,
    PhotoRun,
    anchor_requests,
    bench_config,
    ours,
    reference_config,
    reference_models,
    reference_procedure,
    time_calls,
    time_photo,
    warm_up,
)
from PIL import Image

from lregions_core import profiling
from lregions_core.models import checks
from lregions_core.models.runtime import resolve_dtype
from lregions_core.pipeline import Models
from lregions_core.profiling import PhaseTimer, instrument
from lregions_core.registry import EDITORS, FEATURE_EXTRACTORS, SCORERS


def _autoencoder_flops(vae: Any, size: int) -> float:
    """FLOPs of encoding and decoding one ``size`` x ``size`` image."""
    count = profiling.count_flops
    latents = torch.empty(1, vae.config.latent_channels, size // 8, size // 8)
    return (count(vae.encode, torch.empty(1, 3, size, size)) or 0) + (count(vae.decode, latents)
                                                                        or 0)


def _ids(length: int) -> torch.Tensor:
    return torch.zeros(1, length, dtype=torch.long)


def real_size_facts() -> None:
    """Size and work of the real-size models, built on the meta device (counted, not run)."""
    import open_clip
    import timm

    from lregions_core.models.editor_components import (
        FLUX_T5_MAX_LENGTH,
        flux_fill_components,
        sd_inpaint_components,
        sdxl_inpaint_components,
    )

    count = profiling.count_flops
    with torch.device("meta"):
        sd = sd_inpaint_components("full")
        sdxl = sdxl_inpaint_components("full")
        flux = flux_fill_components("full")
        dino = timm.create_model("vit_base_patch8_224.dino", num_classes=0, dynamic_img_size=True)
        clip = open_clip.create_model("ViT-B-16", device="meta")
    unet, vae, text = sd["unet"], sd["vae"], sd["text_encoder"]
    # SDXL at 1024 px: 128x128 latents; both text encoders' states (768 + 1280), the pooled
    # embedding and the 6 size/crop ids.
    sdxl_cond = {"encoder_hidden_states": torch.empty(1, 77, 2048), "added_cond_kwargs": {
        "text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)}}
    # FLUX at 1024 px: 64x64 packed latent tokens (16 latent + 16 masked-image channels x 2x2,
    # and the 8x8-pixel mask x 2x2), 512 T5 tokens.
    tokens, text_tokens = (1024 // 16) ** 2, FLUX_T5_MAX_LENGTH
    flux_inputs = {"hidden_states": torch.empty(1, tokens, 384),
                   "encoder_hidden_states": torch.empty(1, text_tokens, 4096),
                   "pooled_projections": torch.empty(1, 768), "timestep": torch.empty(1),
                   "img_ids": torch.empty(tokens, 3), "txt_ids": torch.empty(text_tokens, 3),
                   "guidance": torch.empty(1)}
    # (preset group, name, module, what the FLOPs are for, FLOPs)
    rows = [
        ("default", "SD 2 inpainting UNet", unet, "one sample, one step, 512x512", count(
            unet, torch.empty(1, 9, 64, 64), torch.tensor(999),
            encoder_hidden_states=torch.empty(1, 77, 1024))),
        ("default", "SD 2 VAE", vae, "encode + decode, 512x512", _autoencoder_flops(vae, 512)),
        ("default", "SD 2 text encoder", text, "one prompt", count(text, _ids(77))),
        ("sdxl", "SDXL inpainting UNet", sdxl["unet"], "one sample, one step, 1024x1024", count(
            sdxl["unet"], torch.empty(1, 9, 128, 128), torch.tensor(999), **sdxl_cond)),
        ("sdxl", "SDXL VAE", sdxl["vae"], "encode + decode, 1024x1024",
         _autoencoder_flops(sdxl["vae"], 1024)),
        ("sdxl", "SDXL text encoder 1 (CLIP ViT-L/14)", sdxl["text_encoder"], "one prompt",
         count(sdxl["text_encoder"], _ids(77))),
        ("sdxl", "SDXL text encoder 2 (OpenCLIP ViT-bigG/14)", sdxl["text_encoder_2"],
         "one prompt", count(sdxl["text_encoder_2"], _ids(77))),
        ("flux", "FLUX.1 Fill transformer", flux["transformer"],
         "one sample, one step, 1024x1024", count(flux["transformer"], **flux_inputs)),
        ("flux", "FLUX VAE", flux["vae"], "encode + decode, 1024x1024",
         _autoencoder_flops(flux["vae"], 1024)),
        ("flux", "FLUX text encoder 1 (CLIP ViT-L/14, pooled)", flux["text_encoder"],
         "one prompt", count(flux["text_encoder"], _ids(77))),
        ("flux", "FLUX text encoder 2 (T5 v1.1 XXL)", flux["text_encoder_2"],
         f"one prompt, {text_tokens} tokens", count(flux["text_encoder_2"], _ids(text_tokens))),
        ("shared", "DINO ViT-B/8", dino, "one 256x256 image",
         count(dino, torch.empty(1, 3, 256, 256))),
        ("shared", "CLIP ViT-B/16", clip, "one 224x224 view", count(clip.encode_image,
                                                                      torch.empty(1, 3, 224, 224))),
    ]
    print("\nReal-size models (built on the meta device: counted by FlopCounterMode, not run)\n")
    print("| model | parameters (M) | GiB at 2 bytes | GFLOP | for |\n|---|---|---|---|---|")
    totals: dict[str, int] = {}
    for group, name, module, use, flops in rows:
        params = sum(p.numel() for p in module.parameters())
        totals[group] = totals.get(group, 0) + params
        print(f"| {name} | {params / 1e6:.1f} | {params * 2 / 2**30:.2f} "
              f"| {f'{flops / 1e9:.1f}' if flops else 'n/a'} | {use} |")
    for group in ("default", "sdxl", "flux"):
        total = totals[group] + totals["shared"]
        print(f"| all, {group} preset (its editor, DINO, CLIP) | {total / 1e6:.1f} "
              f"| {total * 2 / 2**30:.2f} | | |")


def mode_rows(args: argparse.Namespace, photos: list, out: Path) -> list[tuple]:
    """Every mode and the reference on every photo, interleaved (each photo through every
    configuration in turn, so a change in the machine's load is shared), best of ``rounds``."""
    runs = [(preset, mode, bench_config(args, preset, mode=mode), Models.load, ours)
            for preset in ("default", "fast") for mode in MODES]
    runs += [(preset, "rgn", bench_config(args, preset, mode="rgn"), Models.load, ours)
             for preset in args.editor_presets]
    runs.append(("reference", "reference", reference_config(args), reference_models,
                 reference_procedure))
    loaded = []
    for preset, mode, config, load, procedure in runs:
        models = load(config)
        warm_up(models, config, photos[0])
        loaded.append((preset, mode, config, models, procedure))
    best: dict[tuple[int, int], PhotoRun] = {}
    for _ in range(args.rounds):
        for p, photo in enumerate(photos):
            for r, (_, _, config, models, procedure) in enumerate(loaded):
                # Hooks per photo: configurations share modules (one UNet for all of them).
                timer = PhaseTimer(torch.device(config.device_resolved))
                with instrument(models, timer) as timed:
                    run = time_photo(procedure, config, timed, timer, photo, out)
                if (r, p) not in best or run.wall < best[r, p].wall:
                    best[r, p] = run
    return [(preset, mode, config, [best[r, p] for p in range(len(photos))])
            for r, (preset, mode, config, _, _) in enumerate(loaded)]


def solver(config: Any) -> str:
    """The editor's sampler, by name."""
    if config.editor_scheduler == "dpm-solver++":
        return "DPM-Solver++"
    return {"sd-inpaint": "PNDM", "sdxl-inpaint": "Euler", "flux-fill": "flow-matching Euler",
            "amused": "aMUSEd"}.get(config.editor, config.editor_scheduler)


def _mean(runs: list[PhotoRun], key: str, field: str = "counts") -> float:
    return float(np.mean([getattr(r, field).get(key, 0.0) for r in runs]))


def print_modes(rows: list[tuple], peak: float | None) -> dict[str, float]:
    """The cost table and the time-split table; returns mean seconds per photo by row."""
    means = {f"{p} {m}": float(np.mean([r.wall for r in runs])) for p, m, _, runs in rows}
    ref = means["reference reference"]
    print("\nPer photo (means over the photos; 'each' is every photo's seconds)\n")
    print("| preset | mode | steps | s/photo | each | vs reference | requests | editor calls"
          " | UNet passes | UNet samples | UNet TFLOP/s | share of peak | UNet floor s"
          " | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, mode, config, runs in rows:
        unet_s, flops = _mean(runs, "unet", "seconds"), _mean(runs, "unet_flops")
        counted = unet_s > 0 and not _mean(runs, "unet_flops_missing")
        rate = flops / unet_s / 1e12 if counted else None
        seconds = means[f"{preset} {mode}"]
        print(f"| {preset} | {mode} | {config.editor_steps} {solver(config)} "
              f"| {seconds:.2f} | {'/'.join(f'{r.wall:.2f}' for r in runs)} "
              f"| {ref / seconds:.2f}x | {_mean(runs, 'requests'):.1f} "
              f"| {_mean(runs, 'editor_calls'):.1f} | {_mean(runs, 'unet_calls'):.0f} "
              f"| {_mean(runs, 'unet_samples'):.0f} | {f'{rate:.3g}' if rate else 'n/a'} "
              f"| {f'{rate / peak:.0%}' if rate and peak else 'n/a'} "
              f"| {f'{flops / (peak * 1e12):.2f}' if peak and counted else 'n/a'} "
              f"| {max(r.peak_gib for r in runs):.2f} |")
    print("\nWhere the time goes (mean seconds per photo, exclusive phases)\n")
    print("| preset | mode | " + " | ".join(profiling.PHASES) + " |")
    print("|---|---|" + "---|" * len(profiling.PHASES))
    for preset, mode, _, runs in rows:
        split = [_mean(runs, phase, "seconds") for phase in profiling.PHASES]
        print(f"| {preset} | {mode} | " + " | ".join(f"{s:.3f}" for s in split) + " |")
    return means


def levers_section(args: argparse.Namespace, photo: tuple, rgn_requests: float) -> None:
    """Each lever off and on, on the same editor calls (one box per anchor per call)."""
    config = bench_config(args, "default")
    device = torch.device(config.device_resolved)
    models = Models.load(config)
    calls = anchor_requests(config, models, photo, 3)
    anchors = len(calls[0])

    def editor(**changes: Any) -> Any:
        built = EDITORS.build(config.editor, config.replace(**changes))
        built.edit(calls[0][:1])  # warm-up (and, for a compiled UNet, the first compilation)
        return built

    def best_of(editors: list[Any]) -> list[tuple[float, float]]:
        """(s/request, peak GiB) of each editor: best of ``rounds``, interleaved."""
        runs = [[time_calls(e, calls, device) for e in editors] for _ in range(args.rounds)]
        return [min(run[i] for run in runs) for i in range(len(editors))]

    print(f"\nLevers: 3 editor calls of {anchors} requests (one box per anchor), "
          f"{config.editor_steps} steps; seconds per request, best of {args.rounds} "
          f"interleaved\n")
    print("| edit_batch | UNet batch | s/request | vs edit_batch=1 | peak GiB |\n|---|---|---|---|---|")
    sizes = sorted({1, 2, 4, anchors})
    timed = best_of([editor(edit_batch=size) for size in sizes])
    for size, (seconds, peak) in zip(sizes, timed, strict=True):
        print(f"| {size} | {2 * size} | {seconds:.4f} | {timed[0][0] / seconds:.2f}x "
              f"| {peak:.2f} |")

    rows = []

    def compare(name: str, off: tuple[str, Any], on: tuple[str, Any]) -> None:
        (off_s, off_gib), (on_s, on_gib) = best_of([off[1], on[1]])
        rows.append((name, off[0], on[0], off_s, on_s, off_gib, on_gib))

    def attr(name: str, value: Any, **changes: Any) -> Any:
        built = editor(**changes)
        setattr(built, name, value)
        return built

    compare("prompt embeddings", ("every call", attr("reuse_prompt_embeddings", False)),
            ("once per prompt", editor()))
    compare("attention", ("eager", attr("attention", "eager")), ("SDPA", editor()))
    compare("VAE slicing", ("off", editor(vae_slicing=False)), ("on", editor()))
    fast = bench_config(args, "fast")
    compare("scheduler", (f"{solver(config)} {config.editor_steps} steps", editor()),
            (f"{solver(fast)} {fast.editor_steps} steps",
             editor(editor_scheduler=fast.editor_scheduler, editor_steps=fast.editor_steps)))
    if device.type == "cuda":
        compare("precision", ("float32", editor(dtype="float32")), (str(resolve_dtype(config)),
                                                                   editor()))
    print("| lever | off | on | s/request off | on | off / on | peak GiB off | on |")
    print("|---|---|---|---|---|---|---|---|")
    for name, off, on, off_s, on_s, off_gib, on_gib in rows:
        print(f"| {name} | {off} | {on} | {off_s:.4f} | {on_s:.4f} | {off_s / on_s:.2f}x "
              f"| {off_gib:.2f} | {on_gib:.2f} |")
    if device.type == "cuda":
        clip_on_device(config, calls[0], device)
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        compile_lever(config, calls, device, rgn_requests, args.rounds)
    else:
        print("\ntorch.compile: not measured (--compile on to measure it)")


def clip_on_device(config: Any, requests: list, device: torch.device) -> None:
    """CLIP's 16 views per candidate made on the CPU vs on the GPU (scored the same way)."""
    work = requests[0].image
    candidates = [r.image for r in requests]
    seconds = []
    for on_device in (False, True):
        scorer = SCORERS.build("clip", config)
        scorer.augment_on_device = on_device
        context = scorer.prepare(work, "a photo", None)
        scorer.score(context, candidates[:1], [0])  # warm-up
        profiling.synchronize(device)
        start = time.perf_counter()
        scorer.score(context, candidates, list(range(len(candidates))))
        profiling.synchronize(device)
        seconds.append((time.perf_counter() - start) / len(candidates))
    print(f"\nCLIP views made on the CPU: {seconds[0]:.4f} s per candidate; on the GPU: "
          f"{seconds[1]:.4f} ({seconds[0] / seconds[1]:.2f}x)")


def compile_lever(config: Any, calls: list, device: torch.device, rgn_requests: float,
                  rounds: int) -> None:
    """torch.compile of the UNet: compile time, steady speed, and photos until it pays off.
    Learning makes batches of varying size; two sizes are compiled first (after the second,
    dynamo makes the batch dimension dynamic), as in a real run."""
    first_calls = [calls[0], calls[1][: max(1, len(calls[1]) // 2)]]
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # A cold compile, as on a fresh machine: inductor's on-disk cache would hold earlier runs'.
    with tempfile.TemporaryDirectory(prefix="lregions-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        editors = [EDITORS.build(config.editor, config.replace(compile_unet=c))
                   for c in (False, True)]
        first = [time_calls(e, first_calls, device)[0] * sum(map(len, first_calls))
                 for e in editors]
        runs = [[time_calls(e, calls, device)[0] for e in editors] for _ in range(rounds)]
    if before is None:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
    steady = [min(run[i] for run in runs) for i in (0, 1)]
    compile_s = first[1] - first[0]
    saved = (steady[0] - steady[1]) * rgn_requests
    pays = f"after {math.ceil(compile_s / saved)} photos" if saved > 0 else "never (no saving)"
    print(f"\ntorch.compile of the UNet (cold cache): first two batch sizes {first[1]:.1f} s vs "
          f"{first[0]:.1f} s without (compiling ~{compile_s:.0f} s); then, best of {rounds}, "
          f"{steady[0]:.4f} -> {steady[1]:.4f} s/request ({steady[0] / steady[1]:.2f}x); at "
          f"{rgn_requests:.0f} requests per photo (rgn, default) it pays off {pays}.")


def checks_section(args: argparse.Namespace, photo: tuple) -> None:
    """Half precision vs float32 (CLIP scores, DINO features) and batching of the editor."""
    config = bench_config(args, "default")
    device = torch.device(config.device_resolved)
    # On a CPU the run is float32: check float16 there too, as the GPU will use it.
    half = str(resolve_dtype(config)).removeprefix("torch.")
    half = "float16" if half == "float32" else half
    full = config.replace(dtype="float32")
    models = Models.load(config)
    (requests,) = anchor_requests(config, models, photo, 1)
    work, prompt, source = requests[0].image, photo[1], photo[2]
    edited = models.editor.edit(requests)
    rows = []
    gaps = checks.score_gaps(SCORERS.build("clip", full), SCORERS.build("clip", full.replace(
        dtype=half)), work, edited, prompt, source)
    rows += [(f"CLIP {k} ({half} vs float32)", v, checks.CLIP_TOLERANCE[half])
             for k, v in gaps.items()]
    gaps = checks.feature_gaps(FEATURE_EXTRACTORS.build("dino", full),
                               FEATURE_EXTRACTORS.build("dino", full.replace(dtype=half)), work)
    rows += [(f"DINO {k} ({half} vs float32, relative)", v, checks.DINO_TOLERANCE[half])
             for k, v in gaps.items()]
    gap = checks.batch_gap(models.editor, requests[0], requests[1:])
    rows.append((f"edit alone vs in a batch of {len(requests)} (pixel levels)", gap,
                 checks.BATCH_TOLERANCE_LEVELS))
    print(f"\nChecks on {profiling.device_name(device)}\n")
    print("| check | measured | tolerance | ok |\n|---|---|---|---|")
    for name, value, tolerance in rows:
        print(f"| {name} | {value:.2g} | {tolerance:g} | {'yes' if value <= tolerance else 'NO'} |")


def profile_section(args: argparse.Namespace, photo: tuple, folder: Path, out: Path) -> None:
    """torch.profiler over one photo (rgn, default preset): a Chrome trace and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    config = bench_config(args, "default")
    device = torch.device(config.device_resolved)
    models = Models.load(config)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        time_photo(ours, config, models, PhaseTimer(device), photo, out)
    folder.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(folder / "trace.json"))
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nProfile of one photo (rgn, default): {folder / 'trace.json'}; top ops by {key}\n")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny models, 64 px, few steps")
    parser.add_argument("--photos", type=int, default=2, choices=range(1, len(PHOTOS) + 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: float16 on CUDA, float32 on CPU")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="measure torch.compile of the UNet (auto: on CUDA only)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time everything this many times, keep the best (a busy machine)")
    parser.add_argument("--no-levers", action="store_true")
    parser.add_argument("--editor-presets", nargs="*", default=["sdxl", "flux"],
                        choices=["sdxl", "flux", "amused"], metavar="PRESET",
                        help="presets whose editor also gets a per-photo row (rgn mode), "
                        "default sdxl flux; give none for SD 2 only")
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace here")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense fp16/bf16 peak")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared CPU: "
                        "spinning threads of busy cores made tiny models 10-20x slower)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = bench_config(args, "default")
    device = torch.device(config.device_resolved)
    peak = args.peak_tflops or profiling.dense_peak_tflops(device)
    size = "small (tiny preset models, 64 px)" if args.small else "real-size models, 512 px"
    if args.editor_presets and not args.small:
        size += f" ({', '.join(args.editor_presets)}: 1024 px)"
    print(f"torch {torch.__version__}; {profiling.device_name(device)}; "
          f"{str(resolve_dtype(config)).removeprefix('torch.')}; {size}"
          f"; dense 16-bit peak: {f'{peak:g} TFLOP/s' if peak else 'unknown (n/a on a CPU)'}"
          f"; peak GiB: {'CUDA max allocated' if device.type == 'cuda' else 'process max RSS'}")
    real_size_facts()
    from skimage import data

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        photos = []
        for name, prompt, source in PHOTOS[: args.photos]:
            Image.fromarray(getattr(data, name)()).convert("RGB").save(out / f"{name}.png")
            photos.append((out / f"{name}.png", prompt, source))
        rows = mode_rows(args, photos, out)
        means = print_modes(rows, peak)
        ratio = means["reference reference"] / means["default rgn"]
        print(f"\nrgn (default preset): {means['default rgn']:.2f} s per photo; reference "
              f"procedure: {means['reference reference']:.2f} s; rgn is {ratio:.2f}x faster")
        rgn_requests = next(_mean(runs, "requests") for p, m, _, runs in rows
                            if (p, m) == ("default", "rgn"))
        if not args.no_levers:
            levers_section(args, photos[0], rgn_requests)
        checks_section(args, photos[0])
        if args.profile:
            profile_section(args, photos[0], Path(args.profile), out)


if __name__ == "__main__":
    main()
