"""Image input/output and the geometry between the input image and the editor's working size.

* :func:`load_image` turns any readable file, fsspec URL or byte string into a fully loaded RGB
  image, and every way of failing into one typed :class:`ImageLoadError`.
* :func:`working_size` / :func:`to_working` give the size the editor works at.
* :func:`scale_box`, :func:`box_mask` map boxes between sizes and rasterise them as masks.
* :func:`paste_back` / :func:`paste_region` put the edited region back into the original input,
  leaving every pixel outside ``paste_region`` bit-identical to the input.
* :class:`Matte` (from :func:`box_matte` or an object mask's :func:`mask_matte`) says how much
  of the edit each input pixel takes; :func:`compose` makes the final image with it and
  :func:`edit_layer` the RGBA layer that gives the same final image over the input.
* :func:`render_geometry` places a second edit of the chosen region on a crop of the input at up
  to the editor's own resolution (``final_render`` "region"): :func:`crop_canvas` and
  :func:`canvas_mask` make the editor's image and mask, :func:`render_region` pastes its edit
  back by the same matte. :func:`upsample_scale` and :attr:`RenderGeometry.edit_scale` say how
  many input pixels each editor pixel covers on either path.

Boxes are ``(x0, y0, x1, y1)`` in pixel-edge coordinates: pixel ``i`` spans ``[i, i + 1]``, so a
box over a whole ``W x H`` image is ``(0, 0, W, H)``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lregions_core import remote
from lregions_core.loading import heavy_import

__all__ = [
    "CHANGE_THRESHOLD",
    "MAX_PIXELS",
    "ImageLoadError",
    "Matte",
    "RenderGeometry",
    "TransientImageError",
    "box_mask",
    "box_matte",
    "canvas_mask",
    "changed_pixels",
    "compose",
    "context_box",
    "crop_canvas",
    "edit_layer",
    "load_image",
    "mask_matte",
    "paste_back",
    "paste_region",
    "render",
    "render_geometry",
    "render_region",
    "scale_box",
    "to_working",
    "upsample_scale",
    "working_size",
]

_log = logging.getLogger(__name__)

MAX_PIXELS = 80_000_000
"""Default limit on width * height, checked from the header before any pixel is decoded."""

Box = Sequence[float]


class ImageLoadError(ValueError):
    """An input that cannot be read as an image; says which file and what is wrong with it."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"cannot read image {path}: {problem}")

    def __reduce__(self):  # keep the two-argument constructor picklable (worker processes)
        return (type(self), (self.path, self.problem))


class TransientImageError(ImageLoadError):
    """An image URL that could not be read for a reason that may pass (timeouts, broken
    connections, 408, 429, 5xx) after every try: the row fails, and the next run tries again."""

    transient = True


def _read_bytes(source: str | os.PathLike[str]) -> bytes:
    """All bytes of a local path or fsspec URL; the handle is closed before returning."""
    path = os.fspath(source)
    try:
        with fsspec.open(str(path), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory, not a file") from None
    except PermissionError as e:
        raise ImageLoadError(path, f"permission denied ({e.strerror or e})") from None
    except (OSError, ValueError, ImportError) as e:
        # fsspec raises ValueError for unknown protocols, ImportError for missing backends.
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from None


SKIMAGE_PREFIX = "skimage:"
# Callables in skimage.data that are not sample images.
_NOT_SAMPLES = frozenset({"download_all", "file_hash", "lbp_frontal_face_cascade_filename"})


def skimage_sample(name: str):
    """The loader of scikit-image's bundled sample photo ``name`` (``skimage.data.<name>``),
    or None when there is no such sample."""
    data = heavy_import("skimage.data")  # lazy: only callers that use samples pay for it

    if not name.isidentifier() or name.startswith("_") or name in _NOT_SAMPLES:
        return None
    loader = getattr(data, name, None)
    return loader if callable(loader) else None


def read_source(location: str | os.PathLike[str]) -> bytes | np.ndarray:
    """The raw content behind an image location: the file's bytes (local path, fsspec URL, or
    http(s) URL read by :func:`lregions_core.remote.fetch` with timeouts and retries), or the
    pixel array of ``skimage:NAME``. Failures raise :class:`ImageLoadError`; an http(s) read
    that failed for a passing reason raises its subclass :class:`TransientImageError`."""
    path = os.fspath(location)
    if remote.is_http(path):
        try:
            return remote.fetch(path)
        except remote.FetchError as exc:
            error = TransientImageError if exc.transient else ImageLoadError
            raise error(path, exc.detail) from None
    if path.startswith(SKIMAGE_PREFIX):
        loader = skimage_sample(path[len(SKIMAGE_PREFIX) :])
        if loader is None:
            raise ImageLoadError(path, "no such scikit-image sample")
        return loader()
    return _read_bytes(path)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB with sensible values (see :func:`load_image`)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        # 16-bit data: 65535 -> 255; clipping instead would saturate almost every pixel.
        a = np.asarray(img).astype(np.float64) / 257.0
        return _gray_to_rgb(a)
    if mode == "I":
        # 32-bit ints usually hold 16-bit samples (e.g. TIFF/PNG via older decoders): treat
        # 0..65535 as 16-bit, anything outside that range is stretched like float data.
        a = np.asarray(img).astype(np.float64)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return _gray_to_rgb(a / 257.0)
        return _gray_to_rgb(_stretch(a))
    if mode == "F":
        return _gray_to_rgb(_stretch(np.asarray(img).astype(np.float64)))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "P":
        return img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have arbitrary colour underneath; composite over white instead.
        rgba = img.convert("RGBA") if img.mode != "La" else img.convert("LA").convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV and whatever else PIL converts


def _stretch(a: np.ndarray) -> np.ndarray:
    """Scale min..max to 0..255 (NaN/inf ignored); a constant image keeps its clipped value."""
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros_like(a)
    lo, hi = float(finite.min()), float(finite.max())
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        return np.clip(a, 0.0, 255.0)
    return (a - lo) * (255.0 / (hi - lo))


def _gray_to_rgb(a: np.ndarray) -> Image.Image:
    g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.stack([g, g, g], axis=-1)), "RGB")


def load_image(
    source: str | os.PathLike[str] | bytes, *, max_pixels: int | None = None
) -> Image.Image:
    """Read ``source`` (local path, fsspec URL, ``skimage:NAME`` or raw bytes) as a fully loaded
    RGB image.

    EXIF orientation is applied. Images over ``max_pixels`` (default :data:`MAX_PIXELS`) are
    refused from their header, before decoding. PIL's own decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) still applies as a hard error at twice its value; its warning
    level is treated as an error unless the caller raised ``max_pixels`` above it.
    Every failure raises :class:`ImageLoadError`.
    """
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        path, data = "<bytes>", bytes(source)
    else:
        path = os.fspath(source)
        raw = read_source(path)
        if isinstance(raw, np.ndarray):  # a bundled sample: already pixels
            return _to_rgb(Image.fromarray(raw))
        data = raw
    if not data:
        raise ImageLoadError(path, "empty file (0 bytes)")

    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # Local only: other code keeps PIL's default warning behaviour.
        if pil_limit is not None and limit <= pil_limit:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        else:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                img = opened
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ImageLoadError(path, f"zero-size image ({w} x {h})")
                if w * h > limit:
                    raise ImageLoadError(
                        path,
                        f"image too large: {w} x {h} = {w * h} pixels exceeds the limit of "
                        f"{limit} (decompression bomb?)",
                    )
                try:
                    img.load()  # decode now: lazy decoding would hide truncation until later
                except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
                    raise ImageLoadError(path, f"truncated or corrupt image data: {e}") from None
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception as e:  # noqa: BLE001 - broken EXIF must not lose a good image
                    _log.debug("ignoring unusable EXIF orientation in %s: %s", path, e)
                try:
                    out = _to_rgb(img)
                except (ValueError, OSError) as e:
                    raise ImageLoadError(path, f"unsupported mode {img.mode!r}: {e}") from None
                if out is opened:  # leaving the with-block closes it, which drops its pixels
                    out = out.copy()
                out.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageLoadError(path, f"image too large: {e} (decompression bomb?)") from None
        except UnidentifiedImageError:
            raise ImageLoadError(path, "not an image file (unrecognised format)") from None
        except ImageLoadError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
            # Plugins report malformed headers with any of these.
            raise ImageLoadError(path, f"corrupt image header: {e}") from None
    return out


CHANGE_THRESHOLD = 24
"""A pixel counts as changed when any channel moved by more than this (of 255)."""


def changed_pixels(image: np.ndarray, source: np.ndarray) -> np.ndarray:
    """(H, W) bool: where any channel of ``image`` differs from ``source`` by more than
    :data:`CHANGE_THRESHOLD` (both (H, W, 3) arrays of 0..255 values)."""
    # Channel by channel: numpy reduces a length-3 last axis many times slower.
    d = np.abs(np.asarray(image, np.int16) - np.asarray(source, np.int16))
    return (d[..., 0] > CHANGE_THRESHOLD) | (d[..., 1] > CHANGE_THRESHOLD) | (
        d[..., 2] > CHANGE_THRESHOLD)


def _round_multiple(x: float, multiple: int) -> int:
    # floor(x + 0.5) rather than round(): banker's rounding sends 1.5 up but 2.5 down.
    return max(multiple, math.floor(x / multiple + 0.5) * multiple)


def working_size(width: int, height: int, size: int, multiple: int) -> tuple[int, int]:
    """(w, h) the editor works at: longer side scaled to ``size``, aspect ratio kept, each side
    rounded to the nearest multiple of ``multiple`` (at least ``multiple``)."""
    if width <= 0 or height <= 0 or size <= 0 or multiple <= 0:
        raise ValueError(f"working_size needs positive values, got {width, height, size, multiple}")
    scale = size / max(width, height)
    return _round_multiple(width * scale, multiple), _round_multiple(height * scale, multiple)


def to_working(image: Image.Image, size: int, multiple: int) -> Image.Image:
    """``image`` as RGB, resized (Lanczos) to :func:`working_size`."""
    rgb = _to_rgb(image)
    target = working_size(rgb.width, rgb.height, size, multiple)
    if rgb.size == target:
        return rgb.copy()
    return rgb.resize(target, Image.Resampling.LANCZOS)


def scale_box(
    box: Box, from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Map a pixel-edge box on a ``from_size`` image to a ``to_size`` image (x, y scaled apart)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy


def pixel_box(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer pixel-edge box covering every pixel ``box`` touches, clipped to ``size``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box must have x0 <= x1 and y0 <= y1, got {tuple(box)}")
    w, h = size
    return (
        min(max(math.floor(x0), 0), w),
        min(max(math.floor(y0), 0), h),
        min(max(math.ceil(x1), 0), w),
        min(max(math.ceil(y1), 0), h),
    )


def box_mask(size: tuple[int, int], box: Box) -> Image.Image:
    """Mode "L" mask of ``size``: 255 on every pixel ``box`` touches, 0 elsewhere."""
    w, h = size
    x0, y0, x1, y1 = pixel_box(box, size)
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m, "L")


def input_box(
    source_size: tuple[int, int], box_work: Box, work_size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """The working box in input pixels, rounded outward and clipped; None if it covers nothing."""
    x0, y0, x1, y1 = pixel_box(scale_box(box_work, work_size, source_size), source_size)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def paste_region(
    source_size: tuple[int, int], box_work: Box, work_size: tuple[int, int], feather: int
) -> tuple[int, int, int, int]:
    """Integer rectangle (x0, y0, x1, y1) of the input outside which :func:`paste_back` returns
    the input unchanged: the box rounded outward, grown by ``feather``, clipped.
    ``(0, 0, 0, 0)`` when the box covers no input pixel."""
    if feather < 0:
        raise ValueError(f"feather must be >= 0, got {feather}")
    ib = input_box(source_size, box_work, work_size)
    if ib is None:
        return 0, 0, 0, 0
    w, h = source_size
    x0, y0, x1, y1 = ib
    return max(x0 - feather, 0), max(y0 - feather, 0), min(x1 + feather, w), min(y1 + feather, h)


@dataclass(frozen=True)
class Matte:
    """How much of the edit each input pixel takes: ``alpha`` (uint8, 0 = the input's pixel,
    255 = the edit's) over the integer rectangle ``region`` (x0, y0, x1, y1) of the input; every
    pixel outside ``region`` has alpha 0. Quantised to 8 bits here, once, so the final image and
    the edit layer (:func:`edit_layer`) agree: the input composited with the layer is the final
    image up to the compositor's rounding."""

    region: tuple[int, int, int, int]
    alpha: np.ndarray  # (y1 - y0, x1 - x0) uint8


def box_matte(
    source_size: tuple[int, int], box_work: Box, work_size: tuple[int, int], feather: int
) -> Matte:
    """The box's matte: 255 on the box (rounded outward to input pixels) and
    ``round(255 * max(0, 1 - d / (feather + 1)))`` outside it, ``d`` the Chebyshev distance in
    pixels from the box (a rectangular ramp, exactly :func:`paste_region`)."""
    region = paste_region(source_size, box_work, work_size, feather)
    ib = input_box(source_size, box_work, work_size)
    if ib is None:
        return Matte((0, 0, 0, 0), np.zeros((0, 0), np.uint8))
    rx0, ry0, rx1, ry1 = region
    bx0, by0, bx1, by1 = ib
    xs = np.arange(rx0, rx1)
    ys = np.arange(ry0, ry1)
    dx = np.maximum(np.maximum(bx0 - xs, xs - (bx1 - 1)), 0)
    dy = np.maximum(np.maximum(by0 - ys, ys - (by1 - 1)), 0)
    d = np.maximum(dx[None, :], dy[:, None]).astype(np.float64)
    weight = np.clip(1.0 - d / (feather + 1), 0.0, 1.0)
    return Matte(region, np.rint(255.0 * weight).astype(np.uint8))


def soft_mask(mask: np.ndarray, ramp: int) -> np.ndarray:
    """(H, W) float64 in [0, 1] from a boolean mask: 1 deep inside, falling to
    ``1 / (ramp + 1)`` on its edge pixels (by Euclidean distance to the nearest pixel outside),
    0 outside. ``ramp=0`` keeps the hard mask."""
    mask = np.asarray(mask, dtype=bool)
    if ramp <= 0 or not mask.any():
        return mask.astype(np.float64)
    distance = heavy_import("scipy.ndimage").distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return np.clip(distance / (ramp + 1), 0.0, 1.0)


def mask_matte(
    source_size: tuple[int, int],
    mask_work: Image.Image,
    box_work: Box,
    work_size: tuple[int, int],
    ramp: int,
) -> Matte:
    """The matte of an object mask (mode "L" at ``work_size``, 255 = edited): softened inside
    its edge over ``ramp`` working pixels (:func:`soft_mask`), resized bilinearly to the input
    and cut to the box (rounded outward), so nothing outside the box ever changes."""
    if tuple(mask_work.size) != tuple(work_size):
        raise ValueError(f"mask is {mask_work.size}, expected the working size {work_size}")
    ib = input_box(source_size, box_work, work_size)
    if ib is None:
        return Matte((0, 0, 0, 0), np.zeros((0, 0), np.uint8))
    soft = soft_mask(np.asarray(mask_work.convert("L")) > 127, ramp)
    full = Image.fromarray(soft.astype(np.float32), "F").resize(source_size, Image.Resampling.BILINEAR)
    x0, y0, x1, y1 = ib
    alpha = np.rint(255.0 * np.clip(np.asarray(full)[y0:y1, x0:x1], 0.0, 1.0)).astype(np.uint8)
    return Matte(ib, alpha)


def _upsampled(edited: Image.Image, work_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    if tuple(edited.size) != tuple(work_size):
        raise ValueError(f"edited image is {edited.size}, expected the working size {work_size}")
    return np.asarray(_to_rgb(edited).resize(size, Image.Resampling.BICUBIC))


def render(
    source: Image.Image, edited: Image.Image, work_size: tuple[int, int], matte: Matte,
    *, layer: bool = True,
) -> tuple[Image.Image, Image.Image | None]:
    """The final image (:func:`compose`) and, with ``layer``, the edit layer
    (:func:`edit_layer`), from one bicubic upsampling of ``edited``."""
    src = _to_rgb(source)
    up = _upsampled(edited, work_size, src.size)
    return _blend(src, up, matte), _layer(src.size, up, matte) if layer else None


def compose(
    source: Image.Image, edited: Image.Image, work_size: tuple[int, int], matte: Matte
) -> Image.Image:
    """The final image: ``edited`` (at ``work_size``, upsampled bicubically to the source size)
    blended over ``source`` by ``matte``: ``rint(s * (255 - a) / 255 + e * a / 255)``. Where the
    alpha is 0 the output is the source bit for bit; where it is 255, the upsampled edit."""
    return render(source, edited, work_size, matte, layer=False)[0]


def edit_layer(
    source_size: tuple[int, int], edited: Image.Image, work_size: tuple[int, int], matte: Matte
) -> Image.Image:
    """The edit as an RGBA layer at the input's size: colour = the upsampled edit, alpha = the
    matte (0 and black wherever the edit does not reach), so ``input`` composited with it
    ("over", e.g. ``Image.alpha_composite``) gives :func:`compose`'s final image within one
    grey level per channel."""
    return _layer(source_size, _upsampled(edited, work_size, source_size), matte)


def _blend(
    src: Image.Image, up: np.ndarray, matte: Matte, origin: tuple[int, int] = (0, 0)
) -> Image.Image:
    """``src`` with ``up`` (the edit over the input rectangle starting at ``origin``, covering
    the matte's region) blended in by the matte."""
    out = np.array(src, dtype=np.uint8)  # a copy: everything outside the region stays as is
    x0, y0, x1, y1 = matte.region
    if x1 <= x0 or y1 <= y0:
        return Image.fromarray(out, "RGB")
    ox, oy = origin
    a = matte.alpha[..., None].astype(np.float64) / 255.0
    s = out[y0:y1, x0:x1].astype(np.float64)
    e = up[y0 - oy : y1 - oy, x0 - ox : x1 - ox].astype(np.float64)
    out[y0:y1, x0:x1] = np.clip(np.rint(s * (1.0 - a) + e * a), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def _layer(
    size: tuple[int, int], up: np.ndarray, matte: Matte, origin: tuple[int, int] = (0, 0)
) -> Image.Image:
    width, height = size
    layer = np.zeros((height, width, 4), np.uint8)
    x0, y0, x1, y1 = matte.region
    if x1 > x0 and y1 > y0:
        ox, oy = origin
        alpha = matte.alpha
        edit = up[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        layer[y0:y1, x0:x1, :3] = np.where(alpha[..., None] > 0, edit, 0)
        layer[y0:y1, x0:x1, 3] = alpha
    return Image.fromarray(layer, "RGBA")


# -- the final render at the input's resolution ("region") ----------------------------------------
def upsample_scale(source_size: tuple[int, int], work_size: tuple[int, int]) -> float:
    """Input pixels per editor pixel when the working edit is upsampled to the input
    (``final_render`` "upsample"): the larger of the two axes' ratios. Below 1 when the input
    is smaller than the working image (the editor then had more pixels than the photo)."""
    return max(source_size[0] / work_size[0], source_size[1] / work_size[1])


def _contains(outer: tuple[int, int, int, int], inner: tuple[int, int, int, int]) -> bool:
    """True when the rectangle ``inner`` lies inside ``outer`` (edges included)."""
    return (outer[0] <= inner[0] and outer[1] <= inner[1]
            and inner[2] <= outer[2] and inner[3] <= outer[3])


def _ceil_multiple(x: int, multiple: int) -> int:
    return max(multiple, -(-int(x) // multiple) * multiple)


def context_box(
    box: Box, size: tuple[int, int], context: float
) -> tuple[int, int, int, int]:
    """``box`` rounded outward to pixels and grown on every side by ``ceil(context x`` its longer
    side ``)`` pixels, clipped to ``size``."""
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    x0, y0, x1, y1 = pixel_box(box, size)
    grow = math.ceil(context * max(x1 - x0, y1 - y0))
    w, h = size
    return max(x0 - grow, 0), max(y0 - grow, 0), min(x1 + grow, w), min(y1 + grow, h)


@dataclass(frozen=True)
class RenderGeometry:
    """Where a region render reads the input and at what size the editor sees it.

    ``crop`` (x0, y0, x1, y1): the rectangle of the input the editor gets, always inside the
    input. ``scaled`` (w, h): the crop's size in editor pixels (the crop itself when it is no
    larger than the editor's own size, else scaled down: never up). ``canvas`` (w, h): the
    editor's image, ``scaled`` rounded up to the editor's multiple; the rounding is padding on
    the right and bottom (the crop's edge pixels repeated, never repainted)."""

    crop: tuple[int, int, int, int]
    scaled: tuple[int, int]
    canvas: tuple[int, int]

    @property
    def crop_size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.crop
        return x1 - x0, y1 - y0

    @property
    def edit_scale(self) -> float:
        """Input pixels per editor pixel over the crop (the larger axis'): 1.0 when the editor
        works at the input's own resolution, never below it."""
        (cw, ch), (sw, sh) = self.crop_size, self.scaled
        return max(cw / sw, ch / sh)


def render_geometry(
    source_size: tuple[int, int],
    box: Box,
    cover: tuple[int, int, int, int],
    native: int,
    multiple: int,
    context: float,
) -> RenderGeometry:
    """The crop and editor size of a region render of ``box`` (input pixels) on an input of
    ``source_size``, for an editor whose own resolution is ``native`` (longer side) and whose
    sides must be multiples of ``multiple``.

    1. The *context box*: the box grown by ``context`` (fraction of its longer side, each side,
       :func:`context_box`), joined with ``cover`` (the rectangle the final image may take from
       the edit: the matte's region, which holds the feather), clipped to the input.
    2. The scale: 1 when the context box's longer side is at most ``native``, else
       ``native / longer side``: the input is scaled down to the editor's size, never up.
    3. The crop: a square of ``native / scale`` input pixels (at least the context box, at most
       what the editor sees at its own size) centred on the context box, moved inside the
       input, cut to the input where the input is smaller. A small box thus gets up to
       ``native`` pixels of real context each way rather than an editor image below its own
       size.
    4. ``scaled``: the crop times the scale, each side rounded to a whole pixel; ``canvas``:
       ``scaled`` rounded up to ``multiple`` (padding), so the canvas is at most ``native``
       rounded up to ``multiple`` on either side.
    """
    if native < 1 or multiple < 1:
        raise ValueError(f"native and multiple must be >= 1, got {native}, {multiple}")
    width, height = source_size
    bx0, by0, bx1, by1 = context_box(box, source_size, context)
    if bx1 <= bx0 or by1 <= by0:
        raise ValueError(f"the box {tuple(box)} covers no pixel of a {width}x{height} input")
    cx0, cy0, cx1, cy1 = cover
    if cx1 > cx0 and cy1 > cy0:
        bx0, by0 = max(min(bx0, cx0), 0), max(min(by0, cy0), 0)
        bx1, by1 = min(max(bx1, cx1), width), min(max(by1, cy1), height)
    longest = max(bx1 - bx0, by1 - by0)
    side = max(native, longest)  # the crop's side in input pixels before cutting to the input
    scale = native / side

    def place(lo: int, hi: int, full: int) -> tuple[int, int]:
        extent = min(side, full)
        start = min(max((lo + hi - extent) // 2, 0), full - extent)
        return start, start + extent

    x0, x1 = place(bx0, bx1, width)
    y0, y1 = place(by0, by1, height)
    if not _contains((x0, y0, x1, y1), (bx0, by0, bx1, by1)):  # pragma: no cover - by design
        raise AssertionError("the crop must hold the context box")
    cw, ch = x1 - x0, y1 - y0
    if scale >= 1.0:
        scaled = (cw, ch)
    else:
        scaled = (max(1, math.floor(cw * scale + 0.5)), max(1, math.floor(ch * scale + 0.5)))
    canvas = (_ceil_multiple(scaled[0], multiple), _ceil_multiple(scaled[1], multiple))
    return RenderGeometry(crop=(x0, y0, x1, y1), scaled=scaled, canvas=canvas)


def crop_canvas(source: Image.Image, geometry: RenderGeometry) -> Image.Image:
    """The editor's image of a region render: the input's crop, scaled down (Lanczos) to
    ``geometry.scaled`` when it is larger, padded to ``geometry.canvas`` by repeating its last
    column and row."""
    crop = _to_rgb(source).crop(geometry.crop)
    if crop.size != geometry.scaled:
        crop = crop.resize(geometry.scaled, Image.Resampling.LANCZOS)
    if geometry.canvas == geometry.scaled:
        return crop
    (sw, sh), (cw, ch) = geometry.scaled, geometry.canvas
    padded = np.pad(np.asarray(crop), ((0, ch - sh), (0, cw - sw), (0, 0)), mode="edge")
    return Image.fromarray(padded, "RGB")


def canvas_mask(
    geometry: RenderGeometry, paint: np.ndarray, region: tuple[int, int, int, int]
) -> Image.Image:
    """The editor's mask of a region render (mode "L" at ``geometry.canvas``, 255 = repaint):
    ``paint`` (bool, the input pixels of the rectangle ``region`` to repaint) carried onto the
    canvas, a canvas pixel repainted when any input pixel it covers is (so scaling never
    shrinks the painted area). The padding is never repainted."""
    x0, y0, x1, y1 = geometry.crop
    full = np.zeros((y1 - y0, x1 - x0), np.uint8)
    rx0, ry0, rx1, ry1 = region
    if not _contains(geometry.crop, region):
        raise ValueError(f"the painted region {region} is not inside the crop {geometry.crop}")
    full[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = np.where(paint, 255, 0)
    scaled = Image.fromarray(full, "L")
    if scaled.size != geometry.scaled:
        # BOX averages every input pixel a canvas pixel covers: above 0 where any is painted.
        scaled = scaled.resize(geometry.scaled, Image.Resampling.BOX)
        scaled = Image.fromarray(np.where(np.asarray(scaled) > 0, 255, 0).astype(np.uint8), "L")
    out = Image.new("L", geometry.canvas, 0)
    out.paste(scaled, (0, 0))
    return out


def _region_patch(edited: Image.Image, geometry: RenderGeometry) -> np.ndarray:
    """The editor's output of a region render back on the crop's input pixels: padding cut
    off, scaled up (bicubic) to the crop when the crop was scaled down."""
    if tuple(edited.size) != tuple(geometry.canvas):
        raise ValueError(f"edited image is {edited.size}, expected the canvas {geometry.canvas}")
    sw, sh = geometry.scaled
    patch = _to_rgb(edited).crop((0, 0, sw, sh))
    if patch.size != geometry.crop_size:
        patch = patch.resize(geometry.crop_size, Image.Resampling.BICUBIC)
    return np.asarray(patch)


def render_region(
    source: Image.Image, edited: Image.Image, geometry: RenderGeometry, matte: Matte,
    *, layer: bool = True,
) -> tuple[Image.Image, Image.Image | None]:
    """The final image and (with ``layer``) the edit layer of a region render: ``edited`` (the
    editor's output on ``geometry.canvas``) put back on the crop and blended over ``source`` by
    ``matte`` exactly as :func:`render` blends an upsampled working edit: the input bit for bit
    where the alpha is 0, and the layer over the input gives the final image within one grey
    level. The matte's region must lie inside the crop."""
    x0, y0 = geometry.crop[:2]
    rx0, ry0, rx1, ry1 = matte.region
    if rx1 > rx0 and ry1 > ry0 and not _contains(geometry.crop, matte.region):
        raise ValueError(f"the matte's region {matte.region} is not inside the crop {geometry.crop}")
    src = _to_rgb(source)
    patch = _region_patch(edited, geometry)
    final = _blend(src, patch, matte, (x0, y0))
    return final, _layer(src.size, patch, matte, (x0, y0)) if layer else None


def changed_region(matte: Matte) -> tuple[int, int, int, int]:
    """The smallest rectangle outside which the matte is 0 (outside it, output == input);
    ``(0, 0, 0, 0)`` when nothing changes."""
    ys, xs = np.nonzero(matte.alpha)
    if xs.size == 0:
        return 0, 0, 0, 0
    x0, y0 = matte.region[:2]
    return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


def paste_back(
    source: Image.Image,
    edited: Image.Image,
    box_work: Box,
    work_size: tuple[int, int],
    feather: int,
) -> Image.Image:
    """Blend the edited box back into the full-size ``source`` (:func:`compose` with the box's
    :func:`box_matte`): weight 1 on the box, a ramp over ``feather`` pixels outside it, the
    source bit for bit beyond (:func:`paste_region`), the upsampled edit exactly on the box."""
    matte = box_matte(source.size, box_work, work_size, feather)
    return compose(source, edited, work_size, matte)  # compose checks the edit's size
