"""Configs: presets start from one another (`base`), overrides on the command line."""

import pytest

from haltdet import ConfigError
from haltdet.config import ModelConfig, load_config


def test_presets_inherit_and_change_only_what_they_name():
    baseline, halting = load_config("baseline"), load_config("halting")
    assert halting.name == "halting" and halting.model.halting_layers == [2, 4]
    assert halting.train.max_steps == 1100 and baseline.train.max_steps == 4000
    # everything the preset does not name comes from its base
    for key in ("d_model", "num_layers", "window_size", "point_cloud_range", "bev_channels"):
        assert getattr(halting.model, key) == getattr(baseline.model, key)
    assert halting.data == baseline.data
    # two levels: halting_refine <- baseline_refine <- baseline
    refine = load_config("halting_refine")
    assert refine.train.refine_only and refine.train.batch_size == 4 and refine.model.refine
    assert refine.model.halting_layers == [2, 4] and refine.model.d_model == baseline.model.d_model


def test_base_beside_the_file_and_overrides(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: baseline\nname: parent\nmodel: {d_model: 32, pfn_channels: [16, 32]}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain: {max_steps: 7}\n")
    child = load_config(tmp_path / "child.yaml", ["train.lr=0.01"])
    assert child.name == "child"  # a base's name is not inherited
    assert child.model.d_model == 32 and child.train.max_steps == 7 and child.train.lr == 0.01
    assert child.model.num_layers == load_config("baseline").model.num_layers


@pytest.mark.parametrize("text, message", [
    ("base: loop.yaml\n", "loops back"),
    ("base: no_such_config\n", "no config file"),
    ("base: [1]\n", "must name a config"),
])
def test_bad_base_is_a_config_error(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "loop.yaml")


def test_peer_presets_load():
    random_drop = load_config("peer_random")
    assert random_drop.model.halting_scorer == "random" and random_drop.model.halting_keep_ratio == [0.1, 0.6]
    assert random_drop.train.sparsity_weight == 0.0 and random_drop.train.max_steps == 4000


def test_peer_presets_build_models():
    from haltdet.model.detector import Detector

    for name, check in (("peer_topk", lambda m: m.halting_keep_ratio == [0.1, 0.6] and m.halting_scorer == "mlp"),
                        ("peer_coarse", lambda m: m.grid_size() == (256, 256)),
                        ("peer_random", lambda m: m.halting_scorer == "random"),
                        ("peer_act", lambda m: m.halting_rule == "act" and m.halting_threshold == [0.99])):
        config = load_config(name)
        assert check(config.model), name
        Detector(config.model)
    assert load_config("peer_coarse", ["model.pillar_size=0.64"]).model.grid_size() == (192, 192)


@pytest.mark.parametrize("knob", [{"halting_keep_ratio": [0.5, 0.5]}, {"halting_max_tokens": 100},
                                  {"halting_scorer": "random"}, {"halting_rule": "sometimes"}])
def test_act_rule_refuses_what_it_cannot_use(knob):
    with pytest.raises(ConfigError, match="model.halting_rule"):
        ModelConfig(halting_layers=[2, 4], **{"halting_rule": "act", **knob}).validate()


@pytest.mark.parametrize("settings", [{"halting_dilation": -1}, {"halting_dilation": 9},
                                      {"halting_dilation": 1, "halting_rule": "act"}])
def test_dilation_refuses_what_it_cannot_do(settings):
    with pytest.raises(ConfigError, match="model.halting_dilation"):
        ModelConfig(halting_layers=[2, 4], **settings).validate()


def test_malformed_yaml_is_one_line_saying_where(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  d_model: [3\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.yaml")
    assert "not valid YAML" in str(err.value) and "line 3" in str(err.value) and "\n" not in str(err.value)


def test_removed_options_load_when_off_and_are_refused_when_on():
    """Configs of checkpoints written before options were removed still load (the keys at
    their off values are dropped); turning one on is an error naming it."""
    from haltdet.config import config_from_dict

    old = {"model": {"iou_head": False, "iou_rectify": [0.7, 0.7, 0.7], "regression_radius": 0},
           "train": {"iou_weight": 2.0, "sparsity_start": 0.0, "sparsity_ramp": 0.0}}
    config = config_from_dict(old)
    assert not hasattr(config.model, "iou_head") and not hasattr(config.train, "sparsity_start")
    for section, key, value in (("model", "iou_head", True), ("model", "regression_radius", 1),
                                ("train", "sparsity_start", 0.3)):
        with pytest.raises(ConfigError, match=f"'{section}.{key}': removed"):
            config_from_dict({section: {key: value}})


def test_sizes_that_cannot_fit_in_memory_are_refused_before_building():
    from haltdet.model.detector import Detector

    config = load_config("baseline")
    counted = sum(p.numel() for p in Detector(config.model).parameters())
    assert abs(config.model.weight_count() - counted) < 0.05 * counted  # the estimate is close
    with pytest.raises(ConfigError, match=r"'model.d_model': the sizes .* 768 GB in float32"):
        load_config("baseline", ["model.d_model=65536", "model.ffn_dim=131072", "model.pfn_channels=[64,65536]"])
