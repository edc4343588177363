"""Evaluation metrics: CLIP similarities, background preservation, structure distance, box IoU.

The conventions are the field's (PIE-Bench style): CLIP text-image similarity over the whole
image and inside the edited region, CLIP image-image and directional similarity, background
preservation (MSE, PSNR, SSIM, LPIPS) outside the edited region, structure distance as the MSE
between DINO ViT self-similarity matrices of source and result, and the chosen box's IoU with a
ground-truth box. Where the object's mask is known (the oracle world's target, or the refined
mask of a masked edit), the background *inside* the chosen box but outside the object
(``box_bg_*``: what a box edit repaints needlessly), the share of changed pixels that lie outside
the object and the IoU of the changed pixels with it.

Ground truth: a ``target_mask`` (the edit region, from the manifest) is preferred to a
``target_box``; :meth:`Evaluator.evaluate` reports which one the ``bg_*`` metrics used
(``ground_truth``: "target_mask", "target_box" or None for the chosen box). With a target_mask,
the ``pie_*`` metrics follow PIE-Bench's evaluation code instead of true masked means: both
images are multiplied by (1 - mask), i.e. the edit region is zeroed, and PSNR, MSE, SSIM
(torchmetrics, data_range 1) and LPIPS are taken over the whole zeroed images; ``pie_clip_whole``
and ``pie_clip_edited`` are CLIP scores (100 max(cos, 0), torchmetrics' CLIPScore) of the prompt
with the whole edit and with the edit multiplied by the mask. They are comparable with published
PIE-Bench tables only as far as the models are: PIE-Bench's CLIP is ViT-L/14 and its LPIPS
SqueezeNet, while these use the config's CLIP model and the project's LPIPS (AlexNet).

The pure functions take numpy images (H, W, 3), uint8 or float in [0, 255], and compute on [0, 1] floats;
a ``mask`` is (H, W) bool, True on the pixels that COUNT (the unedited background). Every masked
statistic is a true masked mean over the counted pixels, never a statistic of a zero-filled image
(zero-filling drags the value towards "identical" by the share of masked-out pixels).

:class:`Evaluator` builds the models a config names (lazily, once per process) and reports a
metric as ``None`` with a reason when its model cannot be had, rather than a number from random
weights (those are used only when ``config.random_weights`` says so, and reported as such).

Thread safety: :meth:`Evaluator.evaluate` is safe to call concurrently. The evaluator keeps no
state between calls; its models are shared, each safe to call concurrently (the CLIP scorer and
DINO extractor say why in their modules; LPIPS is a plain forward pass with no hooks).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from lregions_core.anchors import box_iou
from lregions_core.config import Config
from lregions_core.images import (
    ImageLoadError,
    changed_pixels,
    pixel_box,
    read_source,
    to_working,
)
from lregions_core.loading import heavy_import, load_once
from lregions_core.models.runtime import seeded
from lregions_core.models.weights import WeightsUnavailableError

METRICS = (  # in report order
    "clip_text_image", "clip_text_image_region", "clip_image_image", "clip_directional",
    "bg_mse", "bg_psnr", "bg_ssim", "bg_lpips", "structure_distance", "box_iou",
    "box_bg_mse", "box_bg_psnr", "changed_outside", "changed_iou",
    "pie_mse", "pie_psnr", "pie_ssim", "pie_lpips", "pie_clip_whole", "pie_clip_edited",
)
OBJECT_METRICS = METRICS[10:14]  # need an object mask (see Evaluator.evaluate)
CLIP_METRICS = METRICS[:4]
PIE_METRICS = METRICS[14:]  # PIE-Bench's conventions; need a target_mask (see pie_background)
LPIPS_MIN_SIDE = 31  # AlexNet's pooling leaves no feature map below 31 px per side
NEUTRAL_SOURCE_PROMPT = "a photo"  # same T_src as the CLIP scorer when no caption is given

Box = Sequence[float]


# --- pure functions ---------------------------------------------------------------------------
def _unit(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from uint8 or float in [0, 255]."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    return array / 255.0


def _check(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    a, b, mask = _unit(a), _unit(b), np.asarray(mask, dtype=bool)
    if a.shape != b.shape or mask.shape != a.shape[:2]:
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}, mask {mask.shape}")
    if not mask.any():
        raise ValueError("the mask has no counted pixel (no background to measure)")
    return a, b, mask


def masked_mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared difference (values in [0, 1]) over the counted pixels and the 3 channels."""
    a, b, mask = _check(a, b, mask)
    return float(((a - b) ** 2)[mask].mean())  # (n_counted, 3) -> one mean


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """10 log10(1 / MSE) in dB for a peak of 1; ``inf`` when the counted pixels are equal."""
    mse = masked_mse(a, b, mask)
    return float("inf") if mse == 0 else float(10.0 * math.log10(1.0 / mse))


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean of skimage's SSIM map (averaged over channels) over the counted pixels.

    The window is 7x7 (skimage's default) or, for smaller images, the largest odd size that
    fits, at least 3; images under 3 px per side raise ValueError. The whole map is used (no
    border crop), since a masked mean has no reason to drop the counted pixels near the border.
    The window makes SSIM leak: pixels within its radius of an edit see it.
    """
    structural_similarity = heavy_import("skimage.metrics").structural_similarity

    a, b, mask = _check(a, b, mask)
    side = min(a.shape[:2])
    if side < 3:
        raise ValueError(f"SSIM needs at least 3x3 pixels, got {a.shape[:2]}")
    win = min(7, side if side % 2 else side - 1)
    _, full = structural_similarity(a, b, channel_axis=-1, data_range=1.0, full=True, win_size=win)
    return float(full.mean(axis=-1)[mask].mean())


def background_mask(size: tuple[int, int], region: Sequence[int]) -> np.ndarray:
    """(H, W) bool for ``size`` = (width, height): True outside the integer pixel-edge
    rectangle ``region`` = (x0, y0, x1, y1) (x1, y1 exclusive; clipped to the image)."""
    w, h = size
    x0, y0, x1, y1 = (int(v) for v in region)
    mask = np.ones((h, w), dtype=bool)
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = False
    return mask


def load_target_mask(location: str, size: tuple[int, int], raw: bytes | None = None
                     ) -> np.ndarray:
    """The manifest's ``target_mask`` (local path or fsspec URL; ``raw``: its bytes, when the
    caller read them already) as (H, W) bool for ``size`` = (width, height): True where the mask
    is over 127 (255 = the edit region). Any mode is read as grey (an alpha channel is ignored);
    a mask of another size is resized to ``size`` (nearest neighbour). Raises
    :class:`~lregions_core.images.ImageLoadError` naming the file."""
    raw = read_source(location) if raw is None else raw
    if isinstance(raw, np.ndarray) or not raw:
        raise ImageLoadError(location, "not a mask image file")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            grey = image.convert("L")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(location, f"not a readable mask image ({type(exc).__name__}: "
                                       f"{exc})") from None
    if grey.size != tuple(size):
        grey = grey.resize(tuple(size), Image.Resampling.NEAREST)
    return np.asarray(grey) > 127


def pie_zeroed(image: np.ndarray, edit: np.ndarray) -> np.ndarray:
    """PIE-Bench's unedited part: ``image`` in [0, 1] (H, W, 3) float64 times (1 - ``edit``),
    ``edit`` being the (H, W) bool edit region (zeroed)."""
    edit = np.asarray(edit, dtype=bool)
    array = _unit(image)
    if edit.shape != array.shape[:2]:
        raise ValueError(f"target mask {edit.shape} and image {array.shape[:2]} differ in size")
    return array * (~edit)[..., None]


def _pie_tensors(a: np.ndarray, b: np.ndarray, edit: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Both images zeroed on the edit region, as (1, 3, H, W) float64 tensors."""
    pa, pb = (torch.from_numpy(pie_zeroed(x, edit)).permute(2, 0, 1)[None].contiguous()
              for x in (a, b))
    if pa.shape != pb.shape:
        raise ValueError(f"shapes differ: {tuple(pa.shape)}, {tuple(pb.shape)}")
    return pa, pb


def pie_background(a: np.ndarray, b: np.ndarray, edit: np.ndarray) -> dict[str, float]:
    """``pie_mse`` and ``pie_psnr`` as PIE-Bench computes them: both images zeroed on the edit
    region (:func:`pie_zeroed`), then torchmetrics' MSE and PSNR (data_range 1) over the whole
    images, in float64; PSNR is ``inf`` when the zeroed images are equal."""
    regression = heavy_import("torchmetrics.functional.regression")
    image = heavy_import("torchmetrics.functional.image")
    pa, pb = _pie_tensors(a, b, edit)
    mse = float(regression.mean_squared_error(pa, pb))
    psnr = float("inf") if mse == 0 else float(
        image.peak_signal_noise_ratio(pa, pb, data_range=1.0))
    return {"pie_mse": mse, "pie_psnr": psnr}


def pie_ssim(a: np.ndarray, b: np.ndarray, edit: np.ndarray) -> float:
    """PIE-Bench's SSIM of the unedited part: torchmetrics' SSIM (Gaussian 11x11 window, sigma
    1.5, data_range 1) of the two images zeroed on the edit region. Raises ValueError for images
    under 6 px per side (the reflect-padded window does not fit)."""
    image = heavy_import("torchmetrics.functional.image")
    pa, pb = _pie_tensors(a, b, edit)
    if min(pa.shape[2:]) < 6:
        raise ValueError(f"SSIM needs at least 6x6 pixels, got {tuple(pa.shape[2:])}")
    return float(image.structural_similarity_index_measure(pa, pb, data_range=1.0))


def change_against_object(a: np.ndarray, b: np.ndarray, obj: np.ndarray) -> dict[str, float]:
    """How an edit ``b`` of ``a`` sits on the object ``obj`` ((H, W) bool): the share of the
    changed pixels (:func:`~lregions_core.images.changed_pixels`) outside the object
    (``changed_outside``, 0 when nothing changed) and their IoU with it (``changed_iou``)."""
    obj = np.asarray(obj, dtype=bool)
    changed = changed_pixels(np.asarray(a), np.asarray(b))
    if changed.shape != obj.shape:
        raise ValueError(f"object mask {obj.shape} and images {changed.shape} differ in size")
    count = int(changed.sum())
    union = int((changed | obj).sum())
    return {
        "changed_outside": float((changed & ~obj).sum() / count) if count else 0.0,
        "changed_iou": float((changed & obj).sum() / union) if union else 0.0,
    }


def self_similarity(tokens: np.ndarray) -> np.ndarray:
    """(h*w, h*w) cosine similarities of the (C, h, w) tokens, in row-major patch order.
    A zero token has cosine 0 with everything (its norm is clamped, not divided by)."""
    t = np.asarray(tokens, dtype=np.float64)
    if t.ndim != 3:
        raise ValueError(f"expected (C, h, w) tokens, got shape {t.shape}")
    flat = t.reshape(t.shape[0], -1).T  # (h*w, C)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    return flat @ flat.T


def structure_distance(tokens_a: np.ndarray, tokens_b: np.ndarray) -> float:
    """MSE between the self-similarity matrices of two token grids (same h, w required)."""
    a, b = np.asarray(tokens_a), np.asarray(tokens_b)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"token grids differ: {a.shape} vs {b.shape}")
    return float(((self_similarity(a) - self_similarity(b)) ** 2).mean())


# --- components, built once per process (failures too) ----------------------------------------
def _short(exc: BaseException) -> str:
    """A one-line reason: the first sentence of a weights error, else type and first line."""
    if isinstance(exc, WeightsUnavailableError):  # its first sentence, without the long cause
        return f"weights for the {exc.component} {exc.name!r} are not available"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text.split('. ')[0]}"


def _key(config: Config, fields: Sequence[str]) -> str:
    return json.dumps({f: getattr(config, f) for f in fields}, sort_keys=True)


CLIP_FIELDS = ("scorer", "clip_model", "clip_pretrained", "clip_kwargs", "clip_structure_layer",
               "weights_dir", "random_weights", "device", "dtype")
DINO_FIELDS = ("features", "feature_model", "feature_size", "feature_kwargs", "weights_dir",
               "random_weights", "device", "dtype")
BuildResult = tuple[Any, str | None]  # (component, None) or (None, reason)


@load_once(maxsize=8)
def _model(kind: str, key: str) -> BuildResult:
    """The CLIP scorer (``kind`` "clip") or DINO extractor ("dino") for the settings in ``key``,
    or why there is none. Cached either way, so a failure is not retried for every image."""
    config = Config().replace(**json.loads(key))
    if kind == "clip" and (config.scorer != "clip" or config.clip_model == "none"):
        return None, "the oracle preset has no CLIP model"
    if kind == "clip" and not config.clip_pretrained and not config.random_weights:
        # open_clip would silently build random weights: never report numbers from those.
        return None, "clip_pretrained is null: no CLIP weights (random_weights is false)"
    if kind == "dino" and config.features != "dino":
        return None, "no DINO model in this preset"
    # Importing the model modules registers "clip" and "dino".
    heavy_import("lregions_core.models.clip")
    heavy_import("lregions_core.models.dino")
    from lregions_core.registry import FEATURE_EXTRACTORS, SCORERS

    try:
        return (SCORERS if kind == "clip" else FEATURE_EXTRACTORS).build(kind, config), None
    except (WeightsUnavailableError, OSError, RuntimeError, ValueError, ImportError) as exc:
        return None, _short(exc)


def _offline() -> bool:
    """The project's offline switch, HF_HUB_OFFLINE (the hub reads it at import time)."""
    import huggingface_hub.constants as hf_constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(hf_constants.HF_HUB_OFFLINE) or env


@load_once()
def _lpips(key: str) -> BuildResult:
    """LPIPS (AlexNet, spatial map) or why there is none. Pretrained: torchvision's ImageNet
    AlexNet (downloaded into the torch hub cache) plus the package's linear layers. Random
    weights: a seeded random AlexNet with the package's own linear layers (no download)."""
    settings = json.loads(key)
    random_backbone = bool(settings["random_weights"])  # pretrained=True: the linear layers
    try:
        lpips = heavy_import("lpips")
        AlexNet_Weights = heavy_import("torchvision.models").AlexNet_Weights
    except ImportError as exc:
        return None, f"lpips is not installed ({exc})"
    url = AlexNet_Weights.IMAGENET1K_V1.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not random_backbone and not os.path.isfile(cached) and _offline():
        # A download with no network can hang (urllib has no timeout): do not try.
        return None, f"weights for LPIPS' AlexNet are not available (offline; not in {cached})"
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    try:
        with warnings.catch_warnings(), quiet[0], quiet[1], seeded():
            warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation notes
            kwargs = {"pnet_rand": random_backbone, "spatial": True, "verbose": False}
            model = lpips.LPIPS(net="alex", pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        return None, f"weights for LPIPS' AlexNet are not available ({_short(exc)})"
    model = model.eval().requires_grad_(False).to(settings["device"])
    return model, None


# --- the evaluator ----------------------------------------------------------------------------
def shared_evaluator(config: Config) -> Evaluator:
    """One :class:`Evaluator` per process and settings (its models load once, thread-safely)."""
    return _shared_evaluator(json.dumps(config.to_dict(), sort_keys=True))


@load_once(maxsize=8)
def _shared_evaluator(config_json: str) -> Evaluator:
    return Evaluator(Config(**json.loads(config_json)))


class Evaluator:
    """All metrics of one edit, from the models ``config`` names (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        lpips_key = {"random_weights": config.random_weights, "device": config.device_resolved}
        self._keys = {"clip": _key(config, CLIP_FIELDS), "dino": _key(config, DINO_FIELDS),
                      "lpips": json.dumps(lpips_key, sort_keys=True)}

    def evaluate(
        self,
        source: Image.Image,
        final: Image.Image,
        *,
        prompt: str,
        source_prompt: str | None,
        box: Box,
        target_box: Box | None = None,
        object_mask: np.ndarray | None = None,
        object_from: str | None = None,
        target_mask: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """``{"metrics": {name: float | None}, "missing": {name: reason}, "weights": ...,
        "object_mask": ..., "ground_truth": ...}``.

        ``box`` (the chosen region) and ``target_box`` (a ground-truth region) are in input
        pixels; ``final`` must have the source's size. ``target_mask`` ((H, W) bool at the
        input's size, True on the edit region) is the ground-truth region where known. The
        background is everything outside ``target_mask`` when given, else outside
        ``target_box``, else outside ``box``: outside the chosen box the pixels are the input's
        by construction (paste-back), so without ground truth the bg_* metrics measure only the
        feather (and the box choice is not judged by them). ``ground_truth`` says which was
        used ("target_mask", "target_box" or None). The :data:`PIE_METRICS` need a target_mask.

        ``object_mask`` ((H, W) bool at the input's size) is the edited object where it is known
        (``object_from`` says whence, reported as ``object_mask``); without it the
        :data:`OBJECT_METRICS` are missing.
        """
        source, final = source.convert("RGB"), final.convert("RGB")
        if source.size != final.size:
            raise ValueError(f"final {final.size} and source {source.size} sizes differ")
        metrics: dict[str, float | None] = dict.fromkeys(METRICS)
        missing: dict[str, str] = {}

        def record(names: Sequence[str], fn: Any) -> None:
            try:
                metrics.update(fn())
            except _Missing as why:
                missing.update(dict.fromkeys(names, str(why)))

        if target_mask is not None:
            target_mask = np.asarray(target_mask, dtype=bool)
            if target_mask.shape != (source.height, source.width):
                raise ValueError(f"target mask {target_mask.shape} and image "
                                 f"{(source.height, source.width)} differ in size")
            ground_truth, background = "target_mask", ~target_mask
        else:
            region = box if target_box is None else target_box
            ground_truth = None if target_box is None else "target_box"
            background = background_mask(source.size, pixel_box(region, source.size))
        record(CLIP_METRICS, lambda: self._clip_metrics(source, final, prompt, source_prompt, box))
        record(("bg_mse", "bg_psnr", "bg_ssim", "bg_lpips"),
               lambda: self._background(source, final, background, missing))
        record(("structure_distance",), lambda: self._structure(source, final))
        record(("box_iou",), lambda: self._iou(box, target_box))
        record(OBJECT_METRICS, lambda: self._object(source, final, box, object_mask, missing))
        record(PIE_METRICS, lambda: self._pie(source, final, prompt, target_mask, missing))
        missing = {name: missing[name] for name in METRICS if name in missing}  # stable order
        weights = "random" if self.config.random_weights else "pretrained"
        return {"metrics": metrics, "missing": missing, "weights": weights,
                "object_mask": object_from if object_mask is not None else None,
                "ground_truth": ground_truth}

    def _pie(self, source: Image.Image, final: Image.Image, prompt: str,
             edit: np.ndarray | None, missing: dict[str, str]) -> dict[str, float | None]:
        """The :data:`PIE_METRICS` (see the module docstring and :func:`pie_background`)."""
        if edit is None:
            raise _Missing("no target_mask in the manifest (PIE-Bench metrics need one)")
        if edit.all() or not edit.any():  # PIE-Bench's own code gives NaN here, not a score
            raise _Missing(f"the target_mask marks {'every' if edit.all() else 'no'} pixel as "
                           "the edit region: no unedited part or no edited part to measure")
        a, b = np.asarray(source), np.asarray(final)
        out: dict[str, float | None] = dict(pie_background(a, b, edit))
        try:
            out["pie_ssim"] = pie_ssim(a, b, edit)
        except ValueError as exc:
            missing["pie_ssim"] = str(exc)
        zeroed = [(pie_zeroed(x, edit) * 255.0) for x in (a, b)]
        try:
            out["pie_lpips"] = float(self._lpips_map(*zeroed).mean())
        except _Missing as why:
            missing["pie_lpips"] = str(why)
        scorer, reason = _model("clip", self._keys["clip"])
        if scorer is None:
            missing.update(dict.fromkeys(("pie_clip_whole", "pie_clip_edited"), reason))
            return out
        edited_part = Image.fromarray((b * edit[..., None]).astype(np.uint8))
        with torch.inference_mode():
            e_whole, e_edited = scorer.embed([final, edited_part])
            (t_prompt,) = scorer.encode_text([prompt])
        # torchmetrics' CLIPScore: 100 max(cos, 0); the embeddings are L2-normalised
        out["pie_clip_whole"] = 100.0 * max(float(e_whole @ t_prompt), 0.0)
        out["pie_clip_edited"] = 100.0 * max(float(e_edited @ t_prompt), 0.0)
        return out

    @staticmethod
    def _object(source: Image.Image, final: Image.Image, box: Box, obj: np.ndarray | None,
                missing: dict[str, str]) -> dict[str, float | None]:
        if obj is None:
            raise _Missing("no object mask (a box edit outside the oracle world)")
        a, b = np.asarray(source), np.asarray(final)
        out: dict[str, float | None] = dict(change_against_object(a, b, obj))
        inside = ~background_mask(source.size, pixel_box(box, source.size)) & ~np.asarray(obj)
        if inside.any():
            out["box_bg_mse"] = masked_mse(a, b, inside)
            out["box_bg_psnr"] = masked_psnr(a, b, inside)
        else:
            missing.update(dict.fromkeys(("box_bg_mse", "box_bg_psnr"),
                                         "the object covers the whole box"))
        return out

    # --- groups of metrics; each raises _Missing when none of its metrics can be had --------
    def _clip_metrics(
        self, source: Image.Image, final: Image.Image, prompt: str, source_prompt: str | None,
        box: Box,
    ) -> dict[str, float | None]:
        scorer, reason = _model("clip", self._keys["clip"])
        if scorer is None:
            raise _Missing(reason)
        x0, y0, x1, y1 = pixel_box(box, final.size)
        if x1 <= x0 or y1 <= y0:
            raise _Missing(f"the box {tuple(box)} covers no pixel of the image")
        src_text = (source_prompt or "").strip() or NEUTRAL_SOURCE_PROMPT
        e_final, e_source, e_region = scorer.embed([final, source, final.crop((x0, y0, x1, y1))])
        t_prompt, t_source = scorer.encode_text([prompt, src_text])
        delta, direction = e_final - e_source, t_prompt - t_source
        # An unchanged image has no edit direction: cosine 0, as in the scorer's L_dir.
        if float(delta.norm()) <= scorer.zero_delta:
            directional = 0.0
        else:
            norms = (delta.norm() * direction.norm()).clamp_min(1e-12)
            directional = float(delta @ direction / norms)
        return {  # embeddings are L2-normalised: the dot product is the cosine
            "clip_text_image": float(e_final @ t_prompt),
            "clip_text_image_region": float(e_region @ t_prompt),
            "clip_image_image": float(e_final @ e_source),
            "clip_directional": directional,
        }

    def _background(
        self, source: Image.Image, final: Image.Image, mask: np.ndarray, missing: dict[str, str]
    ) -> dict[str, float | None]:
        """The bg_* metrics over the counted pixels of ``mask`` (True on the background)."""
        a, b = np.asarray(source), np.asarray(final)
        if not mask.any():
            raise _Missing("the region covers the whole image: no background to measure")
        out: dict[str, float | None] = {
            "bg_mse": masked_mse(a, b, mask),
            "bg_psnr": masked_psnr(a, b, mask),
        }
        try:
            out["bg_ssim"] = masked_ssim(a, b, mask)
        except ValueError as exc:
            missing["bg_ssim"] = str(exc)
        try:
            out["bg_lpips"] = float(self._lpips_map(a, b)[mask].mean())
        except _Missing as why:
            missing["bg_lpips"] = str(why)
        return out

    def _lpips_map(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """LPIPS' spatial (H, W) distance map of two images (uint8 or float in [0, 255])."""
        model, reason = _lpips(self._keys["lpips"])
        if model is None:
            raise _Missing(reason)
        if min(a.shape[:2]) < LPIPS_MIN_SIDE:
            raise _Missing(f"image under {LPIPS_MIN_SIDE} px per side: too small for LPIPS")
        device = next(model.parameters()).device

        def tensor(x: np.ndarray) -> torch.Tensor:  # (1, 3, H, W) in [0, 1]
            return torch.from_numpy(_unit(x).astype(np.float32)).permute(2, 0, 1)[None]

        with torch.inference_mode():
            # normalize=True maps [0, 1] to LPIPS' [-1, 1]; spatial=True gives a (1, 1, H, W) map
            dist = model(tensor(a).to(device), tensor(b).to(device), normalize=True)
        return dist[0, 0].cpu().numpy()

    def _structure(self, source: Image.Image, final: Image.Image) -> dict[str, float]:
        extractor, reason = _model("dino", self._keys["dino"])
        if extractor is None:
            raise _Missing(reason)
        # The working images the pipeline's DINO sees; equal input sizes give equal grids.
        size, multiple = self.config.work_size, self.config.work_multiple
        tokens = [extractor(to_working(im, size, multiple)).patches for im in (source, final)]
        return {"structure_distance": structure_distance(*tokens)}

    @staticmethod
    def _iou(box: Box, target_box: Box | None) -> dict[str, float]:
        if target_box is None:
            raise _Missing("no target_box in the manifest")
        return {"box_iou": float(box_iou(np.asarray(box), np.asarray(target_box)))}


class _Missing(Exception):
    """A metric group that cannot be computed; the message is the reason reported."""
