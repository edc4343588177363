"""Fetch every pretrained weight a config needs, ahead of time (``lregions download``).

Without ``weights_dir`` everything goes to the Hugging Face cache (``HF_HOME``), where the
loaders find it; copy that folder to an offline machine. With ``weights_dir`` each model goes to
``<weights_dir>/<safe_dirname(name)>``, the folder the loaders look in first (see
:mod:`lregions_core.models.weights`): the editor repo under its repo name, DINO under the timm
model name, CLIP under ``<clip_model>/<clip_pretrained>``, the segmenter under its repo name.

The segmenter (CLIPSeg) is fetched only when ``region_shape`` is not "box": a box run never
loads it. Components that need no weights (oracle components, ``random_weights``) are skipped.

Gated repositories (:data:`GATED_EDITORS`: FLUX.1 Fill [dev]) download only for a logged-in
Hugging Face account that has accepted the model's licence; when the hub refuses, the error says
so and how to fix it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lregions_core.config import Config
from lregions_core.models.weights import WeightsUnavailableError, safe_dirname

EDITORS_WITH_WEIGHTS = ("sd-inpaint", "sdxl-inpaint", "flux-fill", "amused")
# Diffusers repos: configs, tokenizers (CLIP's vocab/merges; T5's spiece.model beside its
# tokenizer.json) and safetensors weights in the component folders, sharded ones with their
# index. Top-level single-file checkpoints (SD ships a 5 GB *.ckpt/*.safetensors next to the
# folders, FLUX a 23 GB one) and pickled .bin duplicates are skipped.
EDITOR_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
# Gated editor repositories -> their licence: the hub serves them only to a logged-in account
# that accepted it.
GATED_EDITORS = {
    "black-forest-labs/FLUX.1-Fill-dev": "the FLUX.1 [dev] Non-Commercial License",
}
WEIGHT_VARIANTS = ("fp16", "bf16", "fp32", "non_ema", "ema")
SEGMENTERS_WITH_WEIGHTS = ("clipseg",)
# Transformers repos: config, tokenizer and processor files, and the safetensors weights (the
# pickled pytorch_model.bin next to them is skipped).
SEGMENTER_PATTERNS = ["*.json", "*.txt", "*.safetensors"]


def _target(config: Config, name: str) -> Path | None:
    """``<weights_dir>/<org--name>`` when a weights folder is configured, else None (hub cache)."""
    if not config.weights_dir:
        return None
    return Path(config.weights_dir).expanduser() / safe_dirname(name)


def _fetch(config: Config, component: str, name: str, action: Callable[[], str]) -> str:
    """Run one download; any failure becomes a :class:`WeightsUnavailableError` naming it."""
    target = _target(config, name)
    existed = target is not None and target.exists()
    try:
        return action()
    except Exception as exc:  # hub, HTTP, offline, file-system and library errors alike
        if target is not None and not existed:
            # A failed first download leaves a folder the loaders would take for the weights.
            shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, WeightsUnavailableError):
            raise
        raise WeightsUnavailableError(component, name, exc) from exc


def _download_editor(config: Config) -> str:
    from huggingface_hub import snapshot_download

    name = config.editor_model
    if Path(name).expanduser().is_dir():
        return f"editor {name}: a local folder, nothing to fetch"
    variant = config.editor_kwargs.get("variant")
    allow = list(EDITOR_PATTERNS)
    if variant:  # diffusers loads <file>.<variant>.safetensors when a variant is asked for
        allow[-1] = f"*/*.{variant}.safetensors"
        ignore = None
    else:
        ignore = [f"*.{v}.*" for v in WEIGHT_VARIANTS]
    target = _target(config, name)
    try:
        path = snapshot_download(
            name,
            revision=config.editor_kwargs.get("revision"),
            local_dir=target,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except OSError as exc:  # the hub's HTTP errors are OSErrors
        if _refused(exc, name):
            raise PermissionError(_gated_message(name)) from exc
        raise
    return f"editor {name}: {path}"


def _refused(exc: BaseException, name: str) -> bool:
    """Whether the hub refused a gated repository (no token, or the licence not accepted)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    if isinstance(exc, GatedRepoError):
        return True
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return name in GATED_EDITORS and isinstance(exc, HfHubHTTPError) and status in (401, 403)


def _gated_message(name: str) -> str:
    licence = GATED_EDITORS.get(name, "its licence")
    return (
        f"the Hugging Face hub refused {name}: it is a gated repository. Accept {licence} on "
        f"https://huggingface.co/{name} with your Hugging Face account, then log in on this "
        f"machine (`hf auth login`, or set HF_TOKEN to a read token of that account) and run "
        f"lregions download again"
    )


def _download_segmenter(config: Config) -> str:
    from huggingface_hub import snapshot_download

    name = config.segmenter_model
    if Path(name).expanduser().is_dir():
        return f"segmenter {name}: a local folder, nothing to fetch"
    path = snapshot_download(
        name,
        revision=config.segmenter_kwargs.get("revision"),
        local_dir=_target(config, name),
        allow_patterns=SEGMENTER_PATTERNS,
    )
    return f"segmenter {name}: {path}"


def _download_dino(config: Config) -> str:
    import timm

    name = config.feature_model
    target = _target(config, name)
    if target is None:
        # Building with pretrained=True fills the hub cache exactly as the loader will read it.
        timm.create_model(name, pretrained=True, num_classes=0)
        return f"features {name}: Hugging Face cache"
    from huggingface_hub import snapshot_download

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id if timm.is_model(name) else None
    if not repo:
        raise ValueError(f"timm model {name!r} has no Hugging Face hub weights")
    path = snapshot_download(repo, local_dir=target, allow_patterns=["model.safetensors", "*.json"])
    return f"features {name}: {path}"


def _download_clip(config: Config) -> str:
    import open_clip

    model, tag = config.clip_model, config.clip_pretrained
    name = f"{model}/{tag}"
    target = _target(config, name)
    if target is None:
        open_clip.create_model(model, pretrained=tag)
        return f"CLIP {name}: Hugging Face cache"
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    hub = (open_clip.get_pretrained_cfg(model, tag) or {}).get("hf_hub", "")
    if not hub:
        raise ValueError(f"open_clip {name} has no Hugging Face hub weights")
    # open_clip's convention: "org/repo/" means the default file, "org/repo/file.bin" names it.
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    safe = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else None
    if safe is None and filename.endswith((".bin", ".pth")):
        safe = filename[:-4] + ".safetensors"
    if safe:  # prefer the safetensors copy, as open_clip does
        try:
            return f"CLIP {name}: {hf_hub_download(repo, safe, local_dir=target)}"
        except EntryNotFoundError:
            pass
    return f"CLIP {name}: {hf_hub_download(repo, filename, local_dir=target)}"


def download_preset_weights(config: Config) -> list[str]:
    """Fetch the editor, DINO and CLIP weights ``config`` needs, and the segmenter's when
    ``region_shape`` is not "box"; one line per model fetched.

    Returns an empty list when nothing needs weights (``random_weights``, oracle components).
    Raises :class:`WeightsUnavailableError` naming the first model that cannot be fetched.
    """
    if config.random_weights:
        return []
    lines: list[str] = []
    if config.editor in EDITORS_WITH_WEIGHTS:
        lines.append(
            _fetch(config, "editor", config.editor_model, lambda: _download_editor(config))
        )
    if config.features == "dino":
        lines.append(
            _fetch(
                config, "feature extractor", config.feature_model, lambda: _download_dino(config)
            )
        )
    if config.scorer == "clip" and config.clip_pretrained:
        name = f"{config.clip_model}/{config.clip_pretrained}"
        lines.append(_fetch(config, "CLIP scorer", name, lambda: _download_clip(config)))
    if config.region_shape != "box" and config.segmenter in SEGMENTERS_WITH_WEIGHTS:
        lines.append(
            _fetch(
                config, "segmenter", config.segmenter_model, lambda: _download_segmenter(config)
            )
        )
    return lines
