"""The method end to end on tiny random-weight models (offline, CPU): every mode, every editor,
determinism, odd input modes, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lregions_core.cli import main
from lregions_core.config import make_config
from lregions_core.pipeline import Models, edit_image
from lregions_core.registry import EDITORS, FEATURE_EXTRACTORS, SCORERS


def photo(size=(150, 100), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[30:70, 40:90] = (200, 40, 40)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _assert_valid(result, image: Image.Image, config) -> None:
    assert result.image.size == image.size and result.image.mode == "RGB"
    assert len(result.candidates) == config.num_anchors
    assert result.proposals.shape == (config.num_anchors, config.proposals_per_anchor, 4)
    x0, y0, x1, y1 = result.box
    assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    assert np.isfinite(result.selection[result.chosen])
    source = np.asarray(image.convert("RGB")).copy()
    final = np.asarray(result.image).copy()
    cx0, cy0, cx1, cy1 = result.changed_region
    source[cy0:cy1, cx0:cx1] = 0
    final[cy0:cy1, cx0:cx1] = 0
    assert np.array_equal(source, final), "pixels outside the edited region changed"
    json.dumps(result.summary())  # JSON-ready


@pytest.mark.parametrize("mode", ["rgn", "exhaustive", "random", "dino-random"])
def test_every_mode_on_tiny_models(mode):
    config = make_config("tiny", {"mode": mode, "num_anchors": 3, "num_proposals": 3,
                                  "iterations": 2})
    image = photo()
    result = edit_image(image, "a red hat", source_prompt="a hat", config=config)
    _assert_valid(result, image, config)
    if mode == "rgn":  # the preset's Bayesian search: rounds of edits within its cap
        assert result.outcome.trace and result.editor_requests <= config.rgn_budget
    if mode == "exhaustive":
        assert result.editor_requests <= config.num_anchors * config.proposals_per_anchor
    if mode in ("random", "dino-random"):
        assert result.editor_requests <= 3


@pytest.mark.parametrize("editor", ["sd-inpaint", "amused"])
def test_every_real_editor_end_to_end(editor):
    config = make_config("tiny", {"editor": editor, "editor_kwargs": {"architecture": "tiny"},
                                  "num_anchors": 2, "num_proposals": 2, "iterations": 1})
    image = photo((96, 128))
    result = edit_image(image, "a red hat", config=config)
    _assert_valid(result, image, config)
    assert result.denoise_steps == result.editor_requests * config.editor_steps


def test_registry_lists_every_component():
    Models.load(make_config("oracle"))
    assert {"dino", "oracle-saliency"} <= set(FEATURE_EXTRACTORS.names())
    assert {"clip", "oracle"} <= set(SCORERS.names())
    assert {"sd-inpaint", "amused", "oracle-painter"} <= set(EDITORS.names())
    with pytest.raises(KeyError, match="registered"):
        EDITORS.build("no-such-editor", make_config("tiny"))


def test_same_inputs_give_identical_outputs_on_cpu():
    config = make_config("tiny", {"num_anchors": 3, "num_proposals": 3, "iterations": 3})
    image = photo()
    a = edit_image(image, "a red hat", config=config, seed=7)
    b = edit_image(image, "a red hat", config=config, seed=7)
    assert a.box == b.box
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.outcome.probs, b.outcome.probs)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_any_input_mode_gives_rgb_at_input_size(mode):
    config = make_config("tiny", {"num_anchors": 2, "num_proposals": 2, "iterations": 1})
    image = photo((101, 77), mode)
    result = edit_image(image, "a red hat", config=config)
    assert result.image.mode == "RGB" and result.image.size == (101, 77)


def test_prompt_longer_than_clip_context():
    config = make_config("tiny", {"num_anchors": 2, "num_proposals": 2, "iterations": 1})
    prompt = " ".join(["a very big tree with many flowers"] * 40)
    result = edit_image(photo(), prompt, config=config)
    assert result.image.size == (150, 100)


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="empty"):
        edit_image(photo(), "  ", config=make_config("tiny"))


def test_cli_edit_image_writes_outputs(tmp_path):
    src = tmp_path / "in.png"
    photo().save(src)
    code = main(["edit-image", str(src), "a red hat", "--out", str(tmp_path / "out"),
                 "--preset", "tiny", "--set", "num_anchors=2", "--set", "iterations=1"])
    assert code == 0
    record = json.loads((tmp_path / "out" / "result.json").read_text())
    assert record["config"]["num_anchors"] == 2 and len(record["anchors"]) == 2
    final = Image.open(tmp_path / "out" / "final.png")
    assert final.size == (150, 100)
    layer = Image.open(tmp_path / "out" / "layer.png")
    assert layer.mode == "RGBA" and layer.size == (150, 100) and record["shape"] == "box"
    assert len(list((tmp_path / "out" / "candidates").glob("*.png"))) == 2
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    assert main(["edit-image", str(bad), "x", "--out", str(tmp_path / "o"), "--preset",
                 "tiny"]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert main(["edit-image", str(bad), "x", "--out", str(tmp_path / "o"), "--preset",
                 "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["edit-image", str(bad), "x", "--out", str(tmp_path / "o"), "--set",
                 "no_such=1"]) == 2
    assert main(["presets"]) == 0
    assert "oracle" in capsys.readouterr().out
