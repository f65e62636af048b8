from __future__ import annotations

import pytest

from training.config import ConfigError, TrainConfig, load_yaml, make_config, parse_set


def test_defaults_and_overrides():
    c = make_config({"lr": "1e-3", "epochs": 4.0, "nesterov": "false"})
    assert isinstance(c, TrainConfig)
    assert c.lr == 1e-3 and c.epochs == 4 and c.nesterov is False
    assert make_config(base=c.to_dict()) == c


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lrr": 1}, "unknown config key.*'lrr' \\(did you mean 'lr'\\?\\)"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"lr": 0}, "lr must be > 0"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"model": "transformer"}, "model must be one of"),
        ({"optimizer": "lion"}, "optimizer must be one of"),
        ({"scheduler": "warm"}, "scheduler must be one of"),
        ({"split": "kanji"}, "split must be one of"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"aug_scale": 1.0}, "aug_scale"),
        ({"aug_rotate": -1}, "aug_rotate must be >= 0"),
        ({"nesterov": "maybe"}, "nesterov must be true or false"),
        ({"model": 3}, "model must be a string"),
        ({"ema_decay": 1.0}, "ema_decay must be in \\[0, 1\\)"),
        ({"ema_decay": -0.1}, "ema_decay must be in"),
        ({"width": 0}, "width must be > 0, got 0.0"),  # (size ranges: as each model declares them)
        ({"depth": 0}, "depth must be >= 1, got 0"),
        ({"model": "resnet", "blocks": 101}, "blocks must be <= 100, got 101"),
        ({"blocks": 1.5}, "blocks must be an integer"),
    ],
)
def test_bad_values_are_clear(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(overrides)


def test_parse_set_and_yaml(tmp_path):
    assert parse_set(["lr=3e-3", "model=resnet", "nesterov=true", "width=1.5"]) == {
        "lr": "3e-3", "model": "resnet", "nesterov": True, "width": 1.5}
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["lr"])
    (tmp_path / "a.yaml").write_text("lr: 1.0e-3\nmodel: vgg\n")
    assert make_config(base=load_yaml(tmp_path / "a.yaml")).model == "vgg"
    (tmp_path / "b.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("lr: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_shipped_train_yaml_is_valid():
    from training.train import DEFAULT_CONFIG

    raw = load_yaml(DEFAULT_CONFIG)
    cfg = make_config(base=raw)  # (raises on an unknown key or a bad value)
    assert raw and cfg.to_dict() == {**TrainConfig().to_dict(), **raw}  # every value of the file, as written
    with pytest.raises(ConfigError):  # the validation the file passed is real
        make_config(base={**raw, "lr": -1.0})


def test_configs_stay_flat_with_the_models_own_keys():
    """A config is one flat mapping of keys (what checkpoints, trial configs and YAML hold): depth and blocks as
    before, whatever the model, and nothing else a model's registration adds for the shipped models."""
    from training.config import FIELDS, config_keys, size_keys

    for model in ("small_cnn", "vgg", "resnet", "mobile_cnn"):
        c = make_config({"model": model, "depth": 3, "blocks": 2})
        assert list(c.to_dict()) == list(FIELDS) == config_keys()
        assert make_config(base=c.to_dict()) == c and c.model_args == {}
    assert size_keys() == ["width", "depth", "blocks"]
    assert make_config({"model": "vgg", "depth": 3}).model_kwargs() == {"width": 1.0, "dropout": 0.25, "depth": 3}
    assert make_config({"model": "resnet", "blocks": 2}).model_kwargs() == {"width": 1.0, "dropout": 0.25, "blocks": 2}
