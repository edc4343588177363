"""Tests for lregions_core.config: presets, overrides, ``key=value`` parsing, validation, digests."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lregions_core import config as config_module
from lregions_core.config import (
    ANCHOR_RULES,
    ESTIMATORS,
    MODES,
    REGION_CHOICE_KEYS,
    Config,
    ConfigError,
    load_preset,
    make_config,
    parse_override,
    preset_names,
    preset_settings,
)


# ------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------
def test_known_presets_exist():
    names = preset_names()
    assert names == sorted(names)
    for name in ("default", "fast", "oracle", "amused"):
        assert name in names


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_validates(name):
    doc = load_preset(name)
    assert isinstance(doc.get("description"), str) and doc["description"].strip()
    assert isinstance(doc.get("set", {}), dict)
    settings = preset_settings(name)
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(settings) <= fields, f"preset {name} sets unknown keys {set(settings) - fields}"
    cfg = make_config(name)
    assert isinstance(cfg, Config)
    for key, value in settings.items():
        assert getattr(cfg, key) == value
    assert cfg.mode in MODES and cfg.anchor_rule in ANCHOR_RULES and cfg.estimator in ESTIMATORS
    # every float field really holds a float (no int sneaking in from JSON)
    defaults = Config()
    for f in dataclasses.fields(Config):
        if isinstance(getattr(defaults, f.name), float):
            assert isinstance(getattr(cfg, f.name), float), f.name


def test_reference_preset_is_the_dataclass_defaults():
    assert make_config("reference") == Config()
    assert make_config("reference").digest() == Config().digest()


def test_default_preset_changes_only_the_region_choice():
    # The models, steps and budgets stay the reference's; what differs is how boxes are proposed
    # and learned (chosen by the oracle-world ablation), and that the final image is rendered at
    # the input's resolution (final_render "region"; the reference upsamples the working edit).
    default, reference = make_config().to_dict(), Config().to_dict()
    changed = {k for k in default if default[k] != reference[k]}
    assert changed and changed <= set(REGION_CHOICE_KEYS) | {"final_render"}
    assert default["final_render"] == "region" and reference["final_render"] == "upsample"
    assert make_config().proposals_per_anchor > Config().proposals_per_anchor


def test_presets_start_from_their_base():
    default, fast, oracle_cfg = make_config("default"), make_config("fast"), make_config("oracle")
    assert load_preset("fast")["base"] == "default"
    assert fast.proposal_aspects == default.proposal_aspects  # from the base
    assert fast.iterations < default.iterations  # its own
    assert default.rgn_focus is not None and oracle_cfg.rgn_focus is None  # a base value undone
    for name in preset_names():
        settings = preset_settings(name)
        assert load_preset(name).get("set", {}).items() <= settings.items()


def test_preset_bases_that_loop_are_refused(monkeypatch):
    docs = {"a": {"base": "b", "set": {"lr": 0.1}}, "b": {"base": "a", "set": {}}}
    monkeypatch.setattr(config_module, "load_preset", docs.__getitem__)
    with pytest.raises(ConfigError, match="loop: a -> b -> a"):
        config_module.preset_settings("a")


def test_oracle_preset_values():
    cfg = make_config("oracle")
    assert cfg.features == "oracle-saliency"
    assert cfg.editor == "oracle-painter"
    assert cfg.scorer == "oracle"
    assert cfg.clip_pretrained is None
    assert cfg.num_anchors == 6
    assert cfg.work_size == 256 and cfg.work_multiple == 16
    # untouched settings keep their defaults
    assert cfg.num_proposals == Config().num_proposals
    assert cfg.oracle_noise == Config().oracle_noise == 0.0  # an exact judge unless asked


def test_unknown_preset():
    with pytest.raises(ConfigError, match="no-such-preset"):
        make_config("no-such-preset")
    with pytest.raises(ConfigError, match="available"):
        load_preset("no-such-preset")


# ------------------------------------------------------------------------------------------------
# parse_override
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("lr=0.1", "lr", 0.1),
        ("iterations=3", "iterations", 3),
        ("mode=exhaustive", "mode", "exhaustive"),
        ('feature_kwargs={"depth": 2}', "feature_kwargs", {"depth": 2}),
        ("clip_pretrained=null", "clip_pretrained", None),
        ("random_weights=true", "random_weights", True),
        ("prompt_template=a photo of {prompt}", "prompt_template", "a photo of {prompt}"),
        ("prompt_template={prompt}", "prompt_template", "{prompt}"),
        ("editor_model=org/name=v2", "editor_model", "org/name=v2"),  # split on the first '='
        (" seed =7", "seed", 7),
        ("weights_dir=", "weights_dir", ""),
    ],
)
def test_parse_override(text, key, value):
    got_key, got_value = parse_override(text)
    assert got_key == key
    assert got_value == value
    assert type(got_value) is type(value)


@pytest.mark.parametrize("text", ["lr", "=0.1", " =1", ""])
def test_parse_override_rejects_malformed(text):
    with pytest.raises(ConfigError):
        parse_override(text)


# ------------------------------------------------------------------------------------------------
# make_config
# ------------------------------------------------------------------------------------------------
def test_make_config_sets_strings():
    cfg = make_config(
        "oracle",
        sets=[
            "lr=0.1",
            "mode=exhaustive",
            'feature_kwargs={"depth": 2}',
            "clip_pretrained=null",
        ],
    )
    assert cfg.lr == 0.1 and isinstance(cfg.lr, float)
    assert cfg.mode == "exhaustive"
    assert cfg.feature_kwargs == {"depth": 2}
    assert cfg.clip_pretrained is None
    assert cfg.features == "oracle-saliency"  # preset still applied


def test_make_config_order_preset_then_overrides_then_sets():
    cfg = make_config("fast", overrides={"iterations": 7, "tau": 0.5}, sets=["iterations=2"])
    assert cfg.iterations == 2  # sets win over overrides
    assert cfg.tau == 0.5  # overrides win over the preset / defaults
    assert cfg.editor_steps == load_preset("fast")["set"]["editor_steps"]  # from the preset
    assert make_config("fast", overrides={"editor_steps": 3}).editor_steps == 3


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match="bogus_key"):
        make_config(overrides={"bogus_key": 1})
    with pytest.raises(ConfigError, match="another_one"):
        make_config(sets=["another_one=2"])
    with pytest.raises(ConfigError, match="bogus_key"):
        Config().replace(bogus_key=1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "learned"}, "mode"),
        ({"anchor_rule": "grid"}, "anchor_rule"),
        ({"estimator": "ppo"}, "estimator"),
        ({"num_anchors": 0}, "num_anchors"),
        ({"num_proposals": 0}, "num_proposals"),
        ({"proposal_min": 0.5, "proposal_max": 0.25}, "proposal_min"),
        ({"proposal_min": 0.0}, "proposal_min"),
        ({"iterations": -1}, "iterations"),
        ({"tau": 0.0}, "tau"),
        ({"select_top_k": 0}, "select_top_k"),
        ({"clip_views": 0}, "clip_views"),
        ({"feather": -1}, "feather"),
        ({"work_size": 32, "work_multiple": 64}, "work_size"),
        ({"prompt_template": "an image of"}, "prompt_template"),
    ],
)
def test_invalid_values_raise_config_error(change, message):
    with pytest.raises(ConfigError, match=message):
        make_config(overrides=change)
    with pytest.raises(ConfigError, match=message):
        Config(**change)


def test_invalid_mode_from_set_string():
    with pytest.raises(ConfigError, match="mode must be one of"):
        make_config(sets=["mode=bogus"])


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_accepted(mode):
    assert make_config(sets=[f"mode={mode}"]).mode == mode


def test_ints_for_float_fields_become_floats():
    a = make_config(sets=["lr=1"])
    b = make_config(sets=["lr=1.0"])
    c = make_config(overrides={"lr": 1, "tau": 2, "guidance_scale": 8})
    assert isinstance(a.lr, float) and a.lr == 1.0
    assert isinstance(c.tau, float) and isinstance(c.guidance_scale, float)
    assert a.digest() == b.digest()
    assert make_config(overrides={"lr": 1}).digest() == make_config(overrides={"lr": 1.0}).digest()
    # int fields stay ints
    assert isinstance(make_config(sets=["iterations=3"]).iterations, int)


def test_replace_coerces_ints_for_float_fields():
    a, b = Config().replace(lr=1), Config().replace(lr=1.0)
    assert a == b
    assert a.digest() == b.digest()


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.5  # type: ignore[misc]
    new = cfg.replace(lr=0.5)
    assert new.lr == 0.5 and cfg.lr == 0.05


# ------------------------------------------------------------------------------------------------
# digest
# ------------------------------------------------------------------------------------------------
def test_digest_stable_and_sensitive():
    a = make_config("oracle")
    d = a.digest()
    assert isinstance(d, str) and len(d) == 16
    int(d, 16)  # hexadecimal
    assert a.digest() == d
    assert make_config("oracle").digest() == d  # a fresh, equal config
    assert a.replace(lr=0.051).digest() != d
    assert a.replace(mode="exhaustive").digest() != d
    assert a.replace(feature_kwargs={"depth": 2}).digest() != d
    assert a.replace(clip_pretrained="openai").digest() != d
    assert make_config("default").digest() != d


def test_digest_independent_of_dict_key_order():
    a = Config().replace(feature_kwargs={"depth": 2, "embed_dim": 32})
    b = Config().replace(feature_kwargs={"embed_dim": 32, "depth": 2})
    assert a.digest() == b.digest()


def test_digest_of_keys_depends_only_on_those_keys():
    keys = ["features", "feature_model", "feature_size", "feature_kwargs"]
    a = make_config("oracle")
    d = a.digest(keys)
    assert len(d) == 16
    # changing anything else leaves it alone ...
    assert a.replace(lr=0.3, mode="random", editor_steps=9, seed=5).digest(keys) == d
    assert a.digest(tuple(keys)) == d
    assert a.digest(list(reversed(keys))) == d
    # ... while the whole digest does change
    assert a.replace(lr=0.3).digest() != a.digest()
    # changing one of the keys changes it
    assert a.replace(feature_size=64).digest(keys) != d
    assert a.replace(feature_kwargs={"x": 1}).digest(keys) != d
    # different key sets give different digests
    assert a.digest(["features"]) != d


def test_digest_matches_to_dict():
    cfg = make_config("tiny") if "tiny" in preset_names() else make_config("fast")
    data = cfg.to_dict()
    assert json.loads(json.dumps(data, sort_keys=True)) == data  # JSON-ready
    assert set(data) == {f.name for f in dataclasses.fields(Config)}


def test_string_settings_keep_their_text_and_values_are_stripped():
    config = make_config("default", sets=["weights_dir=2024", "mode= exhaustive"])
    assert config.weights_dir == "2024" and config.mode == "exhaustive"
