"""Every registered model: output shape, finite outputs, gradients reach every parameter, size knobs that grow
it; and a new model with a size knob of its own, declared where it is registered, working end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import build_model, list_models, model_defaults, model_kwargs, register, size_ranges, unregister
from models.layers import WIDTH, channels
from models.vgg import vgg
from training.config import ConfigError, TrainConfig, make_config


def test_registry_has_the_variants():
    assert {"small_cnn", "vgg", "resnet", "mobile_cnn"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("width", [0.5, 1.0])
def test_model_forward_backward(name, width):
    torch.manual_seed(0)
    model = build_model(name, num_classes=47, width=width)
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    assert out.shape == (4, 47)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.arange(4)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient at {pname}"


@pytest.mark.parametrize("name", list_models())
def test_model_channels_last_and_eval(name):
    model = build_model(name, num_classes=10).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, 10)


def test_width_changes_parameter_count():
    small = sum(p.numel() for p in build_model("vgg", 47, width=0.5).parameters())
    big = sum(p.numel() for p in build_model("vgg", 47, width=2.0).parameters())
    assert big > 4 * small


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'.*small_cnn"):
        build_model("nope", 10)
    with pytest.raises(ValueError, match="does not take depth"):
        build_model("small_cnn", 10, depth=3)
    assert "width" in model_kwargs("resnet") and "blocks" in model_kwargs("resnet")


def _params(name: str, **kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name, 47, **kwargs).parameters())


@pytest.mark.parametrize("name", list_models())
def test_size_knobs_are_declared_and_grow_the_model(name):
    """Every model declares its size knobs where it is registered (at least width), each default inside its
    range, and the parameter count grows with each knob (what makes it one: search.space puts it at the top of
    its range for the largest model a space can sample)."""
    defaults, ranges = model_defaults(name), size_ranges(name)
    assert "width" in ranges and set(ranges) <= set(model_kwargs(name))
    for key, bounds in ranges.items():
        small = defaults[key]
        big = min(bounds.high, small * 2 if isinstance(small, float) else small + 2)
        assert bounds.problem(key, small) is None and bounds.problem(key, big) is None
        assert _params(name, **{key: big}) > _params(name, **{key: small}), (name, key)


# --- a new model with a new size knob: nothing but its own file (here: this test) declares it --------------------

def kernel_cnn(num_classes: int, width: float = 1.0, dropout: float = 0.1, kernel: int = 3) -> nn.Module:
    """A throwaway model whose second conv's kernel size is a size knob none of the shipped models has."""
    c = channels(64, width)
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
        nn.Conv2d(c, c, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes),
    )


@pytest.fixture
def restored_registry():
    """The model registry as it was before the test, whatever the test registers."""
    before = set(list_models())
    yield
    for name in set(list_models()) - before:
        unregister(name)
    assert set(list_models()) == before


@pytest.fixture
def kernel_model(restored_registry) -> str:
    register(size={"width": WIDTH, "kernel": (1, 27)})(kernel_cnn)
    return "kernel_cnn"


def test_registration_refuses_what_a_config_could_not_carry(restored_registry):
    def toy(num_classes: int, width: float = 1.0, kernel: int = 3) -> nn.Module:
        return nn.Linear(28 * 28, num_classes)

    with pytest.raises(ValueError, match="size knob 'heads' is not one of its numeric keywords"):
        register(size={"heads": (1, 8)})(toy)
    with pytest.raises(ValueError, match="default is outside its declared range: kernel must be >= 5, got 3"):
        register(size={"kernel": (5, 9)})(toy)
    with pytest.raises(ValueError, match="keyword 'act' needs a default"):
        register(lambda num_classes, act=None: nn.Identity())
    with pytest.raises(ValueError, match="registered twice"):
        register(size={"width": WIDTH})(vgg)
    assert "toy" not in list_models() and "<lambda>" not in list_models()


def test_a_new_size_knob_is_a_config_key(kernel_model):
    from search.space import SIZE_KEYS
    from training.config import parse_set, size_keys

    assert "kernel" in size_keys() and "kernel" in SIZE_KEYS and "kernel" not in TrainConfig().to_dict()
    c = make_config(parse_set(["model=kernel_cnn", "kernel=5"]))  # as `--set` gives it
    assert c.model_kwargs() == {"width": 1.0, "dropout": 0.25, "kernel": 5}
    assert c.to_dict()["kernel"] == 5 and "model_args" not in c.to_dict()  # one flat config, as a checkpoint stores it
    assert make_config(base=c.to_dict()) == c
    assert make_config({"model": "kernel_cnn"}).to_dict()["kernel"] == 3  # the model's default, stored with it
    assert "kernel" not in make_config({}).to_dict()  # (another model's config does not grow its keys)
    for value, message in ((28, "kernel must be <= 27, got 28"), (0, "kernel must be >= 1, got 0"),
                           (2.5, "kernel must be an integer"), ("big", "kernel must be a number")):
        with pytest.raises(ConfigError, match=message):
            make_config({"model": "kernel_cnn", "kernel": value})
    with pytest.raises(ConfigError, match="kernel must be <= 27"):  # (a value no model could use, whatever the model)
        make_config({"kernel": 99})
    with pytest.raises(ConfigError, match="'kernal' \\(did you mean 'kernel'\\?\\)"):
        make_config({"kernal": 5})
    with pytest.raises(ConfigError, match="model too large: kernel_cnn with width=8, kernel=27"):
        make_config({"model": "kernel_cnn", "kernel": 27, "width": 8.0})


SPACE = """
fixed: {{split: digits}}
start:
  - {{model: kernel_cnn}}
space:
  model:
    choice:
      small_cnn: {{}}
      kernel_cnn: {{kernel: {{int: [1, {top}]}}}}
  width: {{uniform: [0.5, 8.0]}}
  lr: {{loguniform: [1.0e-4, 1.0e-2]}}
"""


def test_a_new_size_knob_in_a_search_space(kernel_model, tmp_path):
    """The space validates, samples and bounds the new knob, as it does depth and blocks."""
    import optuna

    from search.space import DefineByRun, _largest_models, cheapest_point, default_point, load_search_spec, start_points

    (tmp_path / "s.yaml").write_text(SPACE.format(top=9))
    spec = load_search_spec(tmp_path / "s.yaml")
    assert {"model": "kernel_cnn", "kernel": 9, "width": 8.0} in _largest_models(spec.space)
    assert default_point(spec) == cheapest_point(spec) | {"width": 1.0} and "kernel" not in default_point(spec)
    assert start_points(spec)[0] == {**default_point(spec), "model": "kernel_cnn", "kernel": 3}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define, kernels = DefineByRun(spec), set()
    for _ in range(20):
        trial = study.ask()
        fixed = define(trial)
        assert ("kernel" in trial.params) == (trial.params["model"] == "kernel_cnn")
        kernels.add(make_config({**fixed, **trial.params}).model_kwargs().get("kernel"))
        study.tell(trial, 0.0)
    assert None in kernels and kernels - {None} and kernels - {None} <= set(range(1, 10))
    # bounded: a kernel out of the model's range, and the largest model (every size knob at its top) too large
    for top, message in ((28, "kernel=28.0 is not a valid value: kernel must be <= 27, got 28"),
                         (27, "the largest model it can sample \\(model=kernel_cnn, kernel=27, width=8.0\\) is "
                              "refused: model too large")):
        (tmp_path / "s.yaml").write_text(SPACE.format(top=top))
        with pytest.raises(ConfigError, match=message):
            load_search_spec(tmp_path / "s.yaml")


def test_a_new_size_knob_trains_and_comes_back_from_its_checkpoint(kernel_model, digits_data, tiny_config, tmp_path):
    from training.checkpoint import build_from_checkpoint, load_checkpoint
    from training.inference import evaluate
    from training.trainer import train

    result = train({**tiny_config, "model": "kernel_cnn", "kernel": 5, "width": 0.25, "epochs": 2}, digits_data,
                   out_dir=tmp_path)
    assert result.epochs_run == 2 and not result.diverged
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["config"]["model"] == "kernel_cnn" and best["config"]["kernel"] == 5
    model = build_from_checkpoint(best)
    assert model[4].kernel_size == (5, 5)
    _, acc, _ = evaluate(model, digits_data.val_x, digits_data.val_y)
    assert acc == pytest.approx(result.best_val_acc, abs=1e-6)
