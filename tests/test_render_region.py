"""The final render at the input's resolution (``final_render`` "region"): its geometry, and the
edit end to end through the library (:func:`pipeline.edit_image`) and the batch stages, for the
oracle painter and the diffusers editors (tiny random-weight builds), on inputs of 256 to 6000
pixels on the longer side.

Every final image must keep the input bit for bit outside the matte's region, its edit layer
over the input must give the final image within one grey level, and ``edit_scale`` must be what
the geometry says and never above the upsampled edit's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lregions_core import images, index, pipeline, stages
from lregions_core.batch import new_state, run_all
from lregions_core.config import Config, make_config
from lregions_core.images import (
    RenderGeometry,
    box_matte,
    canvas_mask,
    crop_canvas,
    paste_region,
    render,
    render_geometry,
    render_region,
    upsample_scale,
    working_size,
)
from lregions_core.manifest import ManifestRow
from lregions_core.pipeline import Models, edit_image
from lregions_core.registry import EDITORS
from lregions_core.report import write_report
from lregions_core.store import Store

BLUE, GREEN = (30, 60, 220), (30, 170, 40)  # the oracle world's "blue" and "green"
PROMPT, SOURCE = "a red ball", "a blue ball"


def synthetic(width: int, height: int) -> Image.Image:
    """A photo-sized oracle-world image: a textured grey gradient (so any shifted pixel shows),
    a blue ball (the target) and a green box."""
    ys = np.arange(height, dtype=np.int32)[:, None]
    xs = np.arange(width, dtype=np.int32)[None, :]
    grey = (100 + 40 * xs // width + 20 * ys // height + (xs * 7 + ys * 13) % 11).astype(np.uint8)
    pixels = np.repeat(grey[..., None], 3, axis=2)
    pixels[..., 2] += 6  # a faint tint
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    cx, cy, r = 0.35 * width, 0.45 * height, 0.16 * short
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=BLUE)
    gx, gy, g = 0.75 * width, 0.7 * height, 0.1 * short
    draw.rectangle((gx - g, gy - g, gx + g, gy + g), fill=GREEN)
    return image


def size_of(long_side: int, landscape: bool = True) -> tuple[int, int]:
    short = round(long_side * 2 / 3)
    return (long_side, short) if landscape else (short, long_side)


# -- geometry -----------------------------------------------------------------------------------
def test_a_small_box_is_edited_at_the_inputs_resolution_with_context_up_to_native():
    box = (1000, 1000, 1100, 1100)
    cover = (992, 992, 1108, 1108)
    g = render_geometry((4000, 3000), box, cover, native=512, multiple=64, context=0.25)
    x0, y0, x1, y1 = g.crop
    assert (x1 - x0, y1 - y0) == (512, 512)  # grown to the editor's own size: real context
    assert x0 <= cover[0] and y0 <= cover[1] and cover[2] <= x1 and cover[3] <= y1
    assert g.scaled == g.canvas == (512, 512)
    assert g.edit_scale == 1.0


def test_a_large_box_is_scaled_down_to_native_never_up():
    g = render_geometry((4000, 3000), (0, 0, 3000, 2000), (0, 0, 3008, 2008), native=512,
                        multiple=64, context=0.25)
    # context: ceil(0.25 * 3000) = 750 each side -> (0, 0, 3750, 2750), longest 3750
    assert g.crop == (0, 0, 3750, 3000)
    assert g.scaled == (512, 410) and g.canvas == (512, 448)  # rounded up: padding
    assert g.edit_scale == pytest.approx(max(3750 / 512, 3000 / 410))


def test_an_input_smaller_than_native_is_edited_whole_at_its_size_and_padded():
    g = render_geometry((300, 200), (50, 50, 100, 100), (42, 42, 108, 108), native=512,
                        multiple=64, context=0.25)
    assert g.crop == (0, 0, 300, 200) and g.scaled == (300, 200) and g.canvas == (320, 256)
    assert g.edit_scale == 1.0
    canvas = crop_canvas(synthetic(300, 200), g)
    assert canvas.size == (320, 256)
    pixels = np.asarray(canvas)
    assert np.array_equal(pixels[:200, :300], np.asarray(synthetic(300, 200)))  # not resampled
    assert np.array_equal(pixels[:200, 300:], np.repeat(pixels[:200, 299:300], 20, axis=1))


@pytest.mark.parametrize("native", [512, 1024])
def test_geometry_holds_over_sizes_and_boxes(native):
    rng = np.random.default_rng(native)
    for _ in range(400):
        size = (int(rng.integers(64, 6001)), int(rng.integers(64, 6001)))
        w, h = size
        bw, bh = int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        box = (x0, y0, x0 + bw, y0 + bh)
        feather = int(rng.integers(0, 20))
        cover = (max(x0 - feather, 0), max(y0 - feather, 0), min(x0 + bw + feather, w),
                 min(y0 + bh + feather, h))
        g = render_geometry(size, box, cover, native, 64, float(rng.uniform(0, 1)))
        cx0, cy0, cx1, cy1 = g.crop
        assert 0 <= cx0 and 0 <= cy0 and cx1 <= w and cy1 <= h  # inside the input
        assert cx0 <= cover[0] and cy0 <= cover[1] and cover[2] <= cx1 and cover[3] <= cy1
        assert g.canvas[0] % 64 == 0 and g.canvas[1] % 64 == 0
        assert g.scaled[0] <= g.canvas[0] <= max(native, 64) and g.scaled[1] <= g.canvas[1]
        assert max(g.scaled) <= native or g.scaled == g.crop_size  # scaled down, never up
        assert g.edit_scale >= 1.0 - 1e-9
        if g.scaled != g.crop_size:
            assert max(g.scaled) == native
        # never coarser than the upsampled working edit (working size = native), but for
        # the rounding of a crop that already spans the input (the pipeline then upsamples)
        up = upsample_scale(size, working_size(w, h, native, 64))
        assert g.edit_scale <= up * (1 + 2 / min(g.scaled)) or g.edit_scale == 1.0


def test_canvas_mask_covers_every_painted_pixel_when_scaled_down():
    size = (5000, 3000)
    box = (1234, 777, 3001, 2100)
    g = render_geometry(size, box, box, native=512, multiple=64, context=0.25)
    assert g.edit_scale > 1
    paint = np.zeros((box[3] - box[1], box[2] - box[0]), bool)
    paint[::97, ::89] = True  # isolated pixels: each must still mark its canvas pixel
    mask = np.asarray(canvas_mask(g, paint, box)) > 0
    sx, sy = g.scaled[0] / g.crop_size[0], g.scaled[1] / g.crop_size[1]
    ys, xs = np.nonzero(paint)
    cx = ((xs + box[0] - g.crop[0] + 0.5) * sx).astype(int)
    cy = ((ys + box[1] - g.crop[1] + 0.5) * sy).astype(int)
    assert mask[cy, cx].all()
    assert not mask[g.scaled[1]:].any() and not mask[:, g.scaled[0]:].any()  # padding kept


@pytest.mark.parametrize("size,native", [((3000, 2000), 512), ((900, 1400), 1024)])
def test_render_region_keeps_the_background_and_the_layer_matches(size, native):
    source = synthetic(*size)
    work = working_size(*size, 256, 16)
    box_work = (40.3, 50.7, 120.2, 150.1)
    matte = box_matte(size, box_work, work, feather=8)
    box = images.input_box(size, box_work, work)
    g = render_geometry(size, box, matte.region, native, 16, 0.25)
    canvas = crop_canvas(source, g)
    # an editor that keeps its input: the final image is the input, bit for bit
    same, _ = render_region(source, canvas, g, matte)
    if g.scaled == g.crop_size:
        assert np.array_equal(np.asarray(same), np.asarray(source))
    painted = np.asarray(canvas).copy()
    painted[np.asarray(canvas_mask(g, np.ones((box[3] - box[1], box[2] - box[0]), bool),
                                   box)) > 0] = (220, 30, 30)
    final, layer = render_region(source, Image.fromarray(painted), g, matte)
    assert_final(source, final, layer, matte.region)
    x0, y0, x1, y1 = box
    m = int(np.ceil(3 * g.edit_scale))  # bicubic rings within two canvas pixels of an edge
    inside = np.asarray(final)[y0 + m : y1 - m, x0 + m : x1 - m]
    assert (np.abs(inside.astype(int) - (220, 30, 30)) <= 2).all()


def assert_final(source: Image.Image, final: Image.Image, layer: Image.Image | None,
                 region: tuple[int, int, int, int]) -> None:
    """The input bit for bit outside ``region``; the layer over the input is the final image
    within one grey level."""
    src, out = np.asarray(source.convert("RGB")), np.asarray(final)
    assert out.shape == src.shape
    x0, y0, x1, y1 = region
    outside = np.ones(src.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(src[outside], out[outside]), "pixels outside the matte changed"
    if layer is not None:
        over = Image.alpha_composite(source.convert("RGBA"), layer).convert("RGB")
        assert np.abs(np.asarray(over, np.int16) - out.astype(np.int16)).max() <= 1


# -- end to end: the library ----------------------------------------------------------------------
def editor_config(editor: str, **changes) -> Config:
    """The tiny preset (final_render "region", from the default preset) with ``editor``; the
    oracle preset (which upsamples by default) with final_render "region" for the painter."""
    if editor == "oracle-painter":
        return make_config("oracle", {"num_anchors": 3, "iterations": 2,
                                      "final_render": "region", **changes})
    if editor not in EDITORS.names():
        pipeline.register_components()
    if editor not in EDITORS.names():
        pytest.skip(f"editor {editor!r} is not registered")
    return make_config("tiny", {"editor": editor, "editor_kwargs": {"architecture": "tiny"},
                                "num_anchors": 2, "num_proposals": 2, "iterations": 1,
                                **changes})


_MODELS: dict[str, Models] = {}


def models_of(config: Config) -> Models:
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _MODELS:
        _MODELS.clear()  # one editor's models at a time
        _MODELS[key] = Models.load(config)
    return _MODELS[key]


@pytest.fixture
def region_kept(monkeypatch):
    """The pair's selection keeps the region render (random-weight scores may not): the region
    pixels are checked whatever the tiny scorer thinks."""
    monkeypatch.setattr(pipeline, "selection_scores", lambda scores, **kw: np.array([1.0, 0.0]))


def check_result(result, source: Image.Image, config: Config, models: Models) -> None:
    chosen = result.candidates[result.chosen]
    work = result.work_size
    matte = pipeline.candidate_matte(config, source.size, chosen.box, work, chosen.mask)
    assert_final(source, result.image, result.layer, matte.region)
    up = upsample_scale(source.size, work)
    detail = result.render_detail
    assert detail["edit_scale_upsample"] == up
    assert result.edit_scale <= up  # never coarser than the upsampled edit
    native = pipeline.editor_native_size(models.editor, config)
    geometry = render_geometry(source.size, result.box, matte.region, native,
                               config.work_multiple, config.render_context)
    if result.render == "region":
        assert result.edit_scale == geometry.edit_scale < up
        assert detail["crop"] == list(geometry.crop) and detail["canvas"] == list(geometry.canvas)
        assert detail["editor_requests"] == 1
    else:
        assert result.edit_scale == up
        expected, _ = render(source, chosen.image, work, matte, layer=False)
        assert np.array_equal(np.asarray(result.image), np.asarray(expected))
    summary = json.loads(json.dumps(result.summary()))
    assert summary["edit_scale"] == result.edit_scale and summary["render"] == result.render


@pytest.mark.parametrize("editor,long_side,landscape", [
    ("oracle-painter", 256, True),
    ("oracle-painter", 1024, False),
    ("oracle-painter", 6000, True),
    ("sd-inpaint", 256, True),
    ("sd-inpaint", 1500, False),
    ("sd-inpaint", 6000, False),
    ("sdxl-inpaint", 256, True),
    ("sdxl-inpaint", 1500, True),
    ("flux-fill", 256, False),
    ("flux-fill", 1500, True),
])
def test_region_render_end_to_end(editor, long_side, landscape, region_kept):
    config = editor_config(editor)
    assert config.final_render == "region"
    models = models_of(config)
    source = synthetic(*size_of(long_side, landscape))
    result = edit_image(source, PROMPT, source_prompt=SOURCE, config=config, models=models,
                        seed=0)
    check_result(result, source, config, models)
    work = result.work_size
    if upsample_scale(source.size, work) <= 1.0:  # the working edit is already at full size
        assert result.render == "upsample" and "already as fine" in result.render_detail["why"]
    else:
        assert result.render == "region" and set(result.render_detail["scores"]) == {
            "region", "upsample"}


def test_region_render_of_an_object_mask(region_kept):
    config = editor_config("oracle-painter", region_shape="mask")
    models = models_of(config)
    source = synthetic(3000, 2000)
    result = edit_image(source, PROMPT, source_prompt=SOURCE, config=config, models=models,
                        seed=1)
    chosen = result.candidates[result.chosen]
    assert chosen.shape == "mask" and result.render == "region"
    check_result(result, source, config, models)
    # the painter repainted every pixel the matte takes fully, at the input's resolution
    matte = pipeline.candidate_matte(config, source.size, chosen.box, result.work_size,
                                     chosen.mask)
    x0, y0, x1, y1 = matte.region
    pixels = np.asarray(result.image, np.int16)[y0:y1, x0:x1]
    # the painter's noise is +-6; bicubic scaling back to the input overshoots it a little
    red = np.abs(pixels - (220, 30, 30)).max(axis=-1) <= 12
    assert red[matte.alpha == 255].all() and (matte.alpha == 255).sum() > 1000


def test_the_scores_decide_and_a_worse_region_render_is_not_kept(monkeypatch):
    config = editor_config("oracle-painter")
    models = models_of(config)
    source = synthetic(2000, 1400)
    kept = edit_image(source, PROMPT, source_prompt=SOURCE, config=config, models=models)
    scores = kept.render_detail["scores"]
    better = scores["region"]["selection"] >= scores["upsample"]["selection"]  # ties: region
    assert kept.render == ("region" if better else "upsample")
    check_result(kept, source, config, models)
    monkeypatch.setattr(pipeline, "selection_scores", lambda scores, **kw: np.array([0.0, 1.0]))
    lost = edit_image(source, PROMPT, source_prompt=SOURCE, config=config, models=models)
    assert lost.render == "upsample" and "scored below" in lost.render_detail["why"]
    assert lost.edit_scale == upsample_scale(source.size, lost.work_size)
    assert lost.render_detail["edit_scale_region"] == kept.render_detail["edit_scale_region"]
    check_result(lost, source, config, models)


def test_upsample_is_the_reference_render():
    config = editor_config("oracle-painter", final_render="upsample")
    assert Config().final_render == "upsample" and make_config("reference").final_render == \
        "upsample"
    models = models_of(config)
    source = synthetic(2000, 1400)
    result = edit_image(source, PROMPT, source_prompt=SOURCE, config=config, models=models)
    assert result.render == "upsample" and result.render_detail["editor_requests"] == 0
    assert result.edit_scale == upsample_scale(source.size, result.work_size)
    check_result(result, source, config, models)


# -- end to end: the batch stages -----------------------------------------------------------------
@pytest.mark.parametrize("editor,sizes", [
    ("oracle-painter", [(1024, 700), (900, 3000)]),
    ("sd-inpaint", [(1500, 1000)]),
])
def test_batch_outputs_render_the_region_and_record_edit_scale(tmp_path, editor, sizes,
                                                               region_kept):
    config = editor_config(editor)
    models_of(config)  # loaded once here; the stages get the process's shared models
    rows = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"photo{i}.png"
        synthetic(*size).save(path)
        rows.append(ManifestRow(row=i + 1, id=f"p{i}", image=str(path), prompt=PROMPT,
                                source=SOURCE, seed=i))
    out = Store(str(tmp_path / "out"))
    states = run_all([new_state(r) for r in rows], config, out, evaluate=False)
    assert [s["status"] for s in states] == ["ok"] * len(rows), [s.get("error") for s in states]
    run_id, _ = index.begin_run(out, "", "render-test")
    index.write_part(out, "", run_id, "p0", states, config)
    index.merge(out, "", run_id)
    table = index.read_index(out)
    loaded = pipeline.shared_models(config)
    for row, state in zip(rows, states):
        result = out.read_json(f"items/{row.id}/result.json")
        source = Image.open(row.image).convert("RGB")
        final = out.read_png(f"items/{row.id}/final.png")
        layer = Image.open(out.path(f"items/{row.id}/layer.png"))
        best = result["candidates"][result["chosen"]]
        work = tuple(out.read_json(f"{result['regions_path']}/candidates.json")["work_size"])
        region = paste_region(source.size, best["box"], work, config.feather)
        assert_final(source, final, layer, region)
        up = upsample_scale(source.size, work)
        assert result["render"] == "region" and result["edit_scale"] < up
        native = pipeline.editor_native_size(loaded.editor, config)
        geometry = render_geometry(source.size, result["box"], region, native,
                                   config.work_multiple, config.render_context)
        assert result["edit_scale"] == geometry.edit_scale
        assert result["render_detail"]["edit_scale_upsample"] == up
        found = table[table["id"] == row.id].iloc[0]
        assert found["edit_scale"] == result["edit_scale"] and found["render"] == "region"
    page = (tmp_path / "out" / "report.html")
    write_report(str(tmp_path / "out"))
    html = page.read_text()
    assert "edit_scale" in html and "region render, edit scale" in html


def test_final_render_keys_the_outputs_not_the_regions():
    assert "final_render" not in stages.STAGE_SETTINGS["regions"]
    assert {"final_render", "render_context"} <= set(stages.OUTPUT_SETTINGS)
    row = ManifestRow(row=1, id="a", image="a.png", prompt=PROMPT, source=SOURCE)
    region = stages.plan(row, "hash", make_config("oracle", {"final_render": "region"}))
    upsample = stages.plan(row, "hash", make_config("oracle", {"final_render": "upsample"}))
    assert region["regions_key"] == upsample["regions_key"]
    assert region["features_key"] == upsample["features_key"]
    assert region["item_key"] != upsample["item_key"]


def test_render_settings_are_validated():
    from lregions_core.config import ConfigError

    with pytest.raises(ConfigError, match="final_render"):
        make_config("oracle", {"final_render": "sharpen"})
    with pytest.raises(ConfigError, match="render_context"):
        make_config("oracle", {"render_context": -0.1})


def test_geometry_record_is_frozen():
    g = RenderGeometry((0, 0, 10, 10), (10, 10), (16, 16))
    with pytest.raises(AttributeError):
        g.crop = (0, 0, 1, 1)  # type: ignore[misc]
