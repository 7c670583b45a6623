"""Config loading: precedence, types, unknown keys, and errors that name the field."""

import pytest

from sd_train.config import ConfigError, TrainConfig, load_config, parse_overrides


def test_precedence_defaults_yaml_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: 50\noptim:\n  lr: 0.5\n")
    cfg = load_config(str(y), ["optim.lr=2e-4", "ema.step_start_ema=null", "eval.prompts=[a, b]"])
    assert cfg.max_steps == 50 and cfg.optim.lr == 2e-4 and cfg.ema.step_start_ema is None
    assert cfg.eval.prompts == ["a", "b"]
    assert cfg.micro_batch_size == TrainConfig().micro_batch_size


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key optim.lrr. Did you mean optim.lr\?"):
        load_config(None, ["optim.lrr=1"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("max_steps=abc", "max_steps must be an integer"),
        ("ema.decay=[1]", "ema.decay must be a number"),
        ("dist.strategy=zero", r"dist.strategy='zero' is not one of"),
        ("data=3", "data is a section"),
        ("noequals", "not of the form"),
    ],
)
def test_type_errors_name_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=0.5", "c=true", "d="]) == {"a": {"b": 0.5}, "c": True, "d": ""}
    # YAML 1.1 reads 1e-3 as a string; a float field still takes it.
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3
