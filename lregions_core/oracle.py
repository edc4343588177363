"""The oracle world: a CPU-only toy world in which the quality of every edit is known exactly.

Each generated item is a low-saturation background with a *target* object in a named colour
("a blue ball") and one or two salient *distractors* in other colours. The prompt asks for the
target in another colour ("a red ball"). Three registered components stand in for the models,
so the method runs through exactly the same code path (registry, modes, selection):

* ``oracle-saliency`` (feature extractor): per-patch saturation, blurred so that a uniform object
  peaks at its centre; attends to distractors as much as to the target, as DINO would.
* ``oracle-painter`` (editor): paints the masked region in the colour the prompt names.
* ``oracle`` (scorer): finds the target from the *source* caption's colour and scores coverage of
  the target (``L_clip``), colour correctness (``L_dir``) and change outside it (``L_str``).
  ``text_sim`` is the IoU of the changed pixels with the target, ``image_sim`` the unchanged share.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lregions_core.config import Config
from lregions_core.interfaces import CandidateScores, EditRequest, Features
from lregions_core.loading import heavy_import
from lregions_core.registry import EDITORS, FEATURE_EXTRACTORS, SCORERS

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "magenta": (220, 40, 200),
    "cyan": (30, 210, 220),
    "orange": (245, 140, 20),
    "purple": (120, 40, 190),
}
PATCH = 8  # pixels per saliency patch
COLOUR_TOLERANCE = 50.0  # RGB distance within which a pixel "is" a named colour
CHANGE_THRESHOLD = 24  # any channel moved by more than this counts as changed


def colour_in(text: str | None) -> str:
    """The first colour name in ``text``; a clear error when there is none."""
    for word in re.findall(r"[a-z]+", (text or "").lower()):
        if word in COLOURS:
            return word
    raise ValueError(
        f"the oracle world needs a colour name in {text!r} (one of {', '.join(COLOURS)})"
    )


def _near(pixels: np.ndarray, colour: str) -> np.ndarray:
    ref = np.array(COLOURS[colour], dtype=np.float32)
    return np.linalg.norm(pixels.astype(np.float32) - ref, axis=-1) < COLOUR_TOLERANCE


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OracleItem:
    image: Image.Image
    prompt: str
    source_prompt: str
    target_box: tuple[int, int, int, int]  # input pixels, (x0, y0, x1, y1)


def make_item(seed: int) -> OracleItem:
    """One generated item; the same seed gives the same item."""
    rng = np.random.default_rng([seed, 7])
    width, height = int(rng.integers(120, 200)), int(rng.integers(96, 160))
    yy, xx = np.mgrid[0:height, 0:width]
    base = 115 + 30 * rng.random() * (xx / width) + 20 * rng.random() * (yy / height)
    grey = base[..., None] + rng.normal(0, 5, (height, width, 1)) + rng.normal(0, 2, (1, 1, 3))
    canvas = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)

    names = list(COLOURS)
    order = rng.permutation(len(names))
    target_colour, prompt_colour = names[order[0]], names[order[1]]
    distractor_colours = [names[i] for i in order[2:]]
    short = min(width, height)
    placed: list[tuple[int, int, int, int]] = []

    def place(scale: tuple[float, float]) -> tuple[int, int, int, int] | None:
        for _ in range(100):
            rx = rng.uniform(*scale) * short
            ry = rx * rng.uniform(0.8, 1.25)
            cx = rng.uniform(rx + 1, width - rx - 1)
            cy = rng.uniform(ry + 1, height - ry - 1)
            box = (int(cx - rx), int(cy - ry), int(np.ceil(cx + rx)), int(np.ceil(cy + ry)))
            if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
                continue
            if all(b[2] + 4 < box[0] or box[2] + 4 < b[0] or b[3] + 4 < box[1] or box[3] + 4 < b[1]
                   for b in placed):
                placed.append(box)
                return box
        return None

    shape = "ball" if rng.random() < 0.5 else "box"
    target = place((0.13, 0.3))
    assert target is not None  # the first object always fits
    for i in range(int(rng.integers(1, 3))):
        box = place((0.1, 0.26))
        if box is not None:
            _draw(draw, box, "ball" if rng.random() < 0.5 else "box", distractor_colours[i])
    _draw(draw, target, shape, target_colour)
    # Bounding box of what was actually drawn (rasterisation may trim a pixel).
    ys, xs = np.nonzero(_near(np.asarray(canvas), target_colour))
    target_box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    def a(colour: str) -> str:
        return f"an {colour}" if colour[0] in "aeiou" else f"a {colour}"

    return OracleItem(
        image=canvas,
        prompt=f"{a(prompt_colour)} {shape}",
        source_prompt=f"{a(target_colour)} {shape}",
        target_box=target_box,
    )


def _draw(draw: ImageDraw.ImageDraw, box, shape: str, colour: str) -> None:
    xy = (box[0], box[1], box[2] - 1, box[3] - 1)
    if shape == "ball":
        draw.ellipse(xy, fill=COLOURS[colour])
    else:
        draw.rectangle(xy, fill=COLOURS[colour])


# ------------------------------------------------------------------------------------------------
class SaliencyFeatures:
    """Stands in for DINO: attention = blurred per-patch saturation; six feature channels."""

    name = "oracle-saliency"
    patch_size = PATCH

    def __call__(self, image: Image.Image) -> Features:
        gaussian = heavy_import("skimage.filters").gaussian

        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        gh, gw = max(1, rgb.shape[0] // PATCH), max(1, rgb.shape[1] // PATCH)
        rgb = np.asarray(image.convert("RGB").resize((gw * PATCH, gh * PATCH)), np.float32) / 255
        cells = rgb.reshape(gh, PATCH, gw, PATCH, 3).transpose(0, 2, 1, 3, 4)
        saturation = cells.max(axis=-1) - cells.min(axis=-1)  # (gh, gw, P, P)
        sat = saturation.mean(axis=(2, 3))
        blurred = gaussian(sat, sigma=1.5, mode="constant")
        attention = (blurred / max(blurred.sum(), 1e-12)).astype(np.float32)
        mean_rgb = cells.mean(axis=(2, 3))  # (gh, gw, 3)
        luma_std = cells.mean(axis=-1).std(axis=(2, 3))
        patches = np.concatenate(
            [mean_rgb, sat[..., None], luma_std[..., None], blurred[..., None]], axis=-1
        )
        return Features(attention=attention, patches=patches.transpose(2, 0, 1).astype(np.float32))


class Painter:
    """Stands in for the inpainting model: fills the mask with the prompt's colour (plus a little
    seeded noise, so different seeds give different pixels, as a real editor's would)."""

    name = "oracle-painter"

    def __init__(self, steps: int) -> None:
        self.steps_per_call = steps

    def edit(self, requests: Sequence[EditRequest]) -> list[Image.Image]:
        out = []
        for req in requests:
            pixels = np.array(req.image.convert("RGB"), dtype=np.int16)
            mask = np.asarray(req.mask.convert("L")) > 127
            noise = np.random.default_rng(req.seed).integers(-6, 7, pixels.shape)
            paint = np.clip(np.array(COLOURS[colour_in(req.prompt)]) + noise, 0, 255)
            pixels[mask] = paint[mask]
            out.append(Image.fromarray(pixels.astype(np.uint8), "RGB"))
        return out


@dataclass(frozen=True)
class _OracleContext:
    source: np.ndarray  # (H, W, 3) uint8
    target: np.ndarray  # (H, W) bool: pixels of the target object
    prompt_colour: str


class OracleScorer:
    """Exact edit quality in the oracle world (replaces the CLIP losses)."""

    name = "oracle"

    def prepare(self, source: Image.Image, prompt: str, source_prompt: str | None):
        pixels = np.asarray(source.convert("RGB"))
        target = _near(pixels, colour_in(source_prompt))
        if not target.any():
            raise ValueError(f"the source image has no {colour_in(source_prompt)} object")
        return _OracleContext(pixels, target, colour_in(prompt))

    def score(self, context, candidates, seeds) -> list[CandidateScores]:
        ctx: _OracleContext = context
        area = float(ctx.target.sum())
        out = []
        for candidate in candidates:
            pixels = np.asarray(candidate.convert("RGB"))
            changed = (np.abs(pixels.astype(np.int16) - ctx.source).max(axis=-1)) > CHANGE_THRESHOLD
            coverage = float((changed & ctx.target).sum()) / area
            spill = float((changed & ~ctx.target).sum()) / area
            right = _near(pixels[changed], ctx.prompt_colour).mean() if changed.any() else 0.0
            out.append(
                CandidateScores(
                    loss_clip=1.0 - coverage,
                    loss_dir=1.0 - float(right),
                    loss_str=spill / (1.0 + spill),
                    text_sim=coverage / (1.0 + spill),  # = IoU(changed, target)
                    image_sim=1.0 - float(changed.mean()),
                )
            )
        return out


@FEATURE_EXTRACTORS.register("oracle-saliency")
def build_saliency(config: Config) -> SaliencyFeatures:
    return SaliencyFeatures()


@EDITORS.register("oracle-painter")
def build_painter(config: Config) -> Painter:
    return Painter(config.editor_steps)


@SCORERS.register("oracle")
def build_oracle_scorer(config: Config) -> OracleScorer:
    return OracleScorer()
