"""Search-space YAML: validation before Ray starts, and the define-by-run sampling with Optuna."""

from __future__ import annotations

import optuna
import pytest

from search.space import DefineByRun, default_point, load_search_spec
from training.config import ConfigError, make_config

GOOD = """
base: {base}
max_epochs: 4
asha: {{grace_period: 1, reduction_factor: 2}}
fixed: {{split: digits}}
space:
  lr: {{loguniform: [1.0e-4, 1.0e-1]}}
  width: {{uniform: [0.5, 2.0]}}
  batch_size: {{choice: [32, 64]}}
  optimizer:
    choice:
      adamw: {{}}
      sgd: {{momentum: {{uniform: [0.8, 0.99]}}}}
  scheduler:
    choice:
      none: {{}}
      step: {{step_size: {{int: [1, 3]}}, gamma: {{loguniform: [0.1, 0.5]}}}}
"""


def _write(tmp_path, text, name="s.yaml"):
    (tmp_path / "train.yaml").write_text("lr: 2.0e-3\noptimizer: adamw\nscheduler: none\n")
    path = tmp_path / name
    path.write_text(text.format(base="train.yaml") if "{base}" in text else text)
    return path


def test_define_by_run_is_conditional(tmp_path):
    spec = load_search_spec(_write(tmp_path, GOOD))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    define = DefineByRun(spec)
    for _ in range(40):
        trial = study.ask()
        fixed = define(trial)
        params = trial.params
        assert ("momentum" in params) == (params["optimizer"] == "sgd")
        assert ("step_size" in params) == ("gamma" in params) == (params["scheduler"] == "step")
        assert 1e-4 <= params["lr"] <= 1e-1 and params["batch_size"] in (32, 64)
        assert fixed["split"] == "digits" and fixed["epochs"] == 4 and not set(fixed) & set(params)
        assert fixed["model"] == "small_cnn" and fixed["dropout"] == 0.25  # the rest: defaults/base
        make_config({**params, **fixed})  # every sample is a complete, valid training config
        study.tell(trial, params["lr"])
    assert {t.params["optimizer"] for t in study.trials} == {"adamw", "sgd"}


def test_default_point_follows_active_branches(tmp_path):
    spec = load_search_spec(_write(tmp_path, GOOD))
    # scheduler "none" has no parameters, so step_size/gamma are not part of the point; the default
    # batch size (128) is not one of the choices (32, 64), so the sampler picks that one.
    assert default_point(spec) == {"lr": 2e-3, "width": 1.0, "optimizer": "adamw", "scheduler": "none"}
    assert spec.trial_base()["epochs"] == 4 and spec.trial_base()["split"] == "digits"


def test_start_points_are_points_of_the_space_completed_from_the_default(tmp_path):
    """`start:` (a portfolio tried after the default config): each point gives some parameters, the default
    config the rest, only the branches it chooses; the tuner evaluates them in that order, after the default."""
    from search.space import start_points

    text = GOOD.format(base="train.yaml") + "start:\n  - {optimizer: sgd, width: 1.5}\n  - {scheduler: step}\n"
    spec = load_search_spec(_write(tmp_path, text))
    first, second = start_points(spec)
    assert first == {"lr": 2e-3, "width": 1.5, "optimizer": "sgd", "momentum": 0.9, "scheduler": "none"}
    assert second == {"lr": 2e-3, "width": 1.0, "optimizer": "adamw", "scheduler": "step", "step_size": 3,
                      "gamma": 0.1}
    for p in (first, second):
        make_config(p, base=spec.trial_base())
    # the shipped default space's portfolio is valid, and differs from the default point
    from search.run import DEFAULT_SEARCH

    shipped = load_search_spec(DEFAULT_SEARCH)
    assert start_points(shipped) and all(p != default_point(shipped) for p in start_points(shipped))


@pytest.mark.parametrize("start, message", [
    ("start: {lr: 0.01}\n", "start must be a list"),
    ("start:\n  - {lrr: 0.01}\n", r"\['lrr'\] are not parameters of the space"),
    ("start:\n  - {lr: 5.0}\n", "lr=5.0 is outside its distribution"),
    ("start:\n  - {optimizer: lion}\n", "is not a point of the space"),
    ("start:\n  - {momentum: 0.9}\n", "not on the branch it chooses"),
    ("start:\n  - {width: 1.0, optimizer: sgd, momentum: 2.0}\n", "momentum=2.0 is outside"),
    ("start:\n  - 3\n", "start must be a list"),
])
def test_bad_start_points_are_one_line_errors(tmp_path, start, message):
    with pytest.raises(ConfigError, match=message):
        load_search_spec(_write(tmp_path, GOOD.format(base="train.yaml") + start))


@pytest.mark.parametrize(
    "bad, message",
    [
        ("space:\n  lrr: {uniform: [0, 1]}\n", "unknown parameter 'lrr' \\(did you mean 'lr'\\?\\)"),
        ("space:\n  lr: {uniform: [0.1, 0.1]}\n", "empty range"),
        ("space:\n  lr: {loguniform: [0, 0.1]}\n", "loguniform needs low > 0"),
        ("space:\n  model: {choice: [small_cnn, transformer]}\n", "model='transformer' is not a valid value"),
        ("space:\n  model: {choice: []}\n", "non-empty"),
        ("space:\n  lr: {normal: [0, 1]}\n", "expected one of uniform"),
        ("space:\n  depth: {int: [1.5, 3]}\n", "int bounds must be integers"),
        ("space:\n  epochs: {int: [1, 3]}\n", "epochs is the ASHA budget"),
        ("fixed: {lr: 0.1}\nspace:\n  lr: {uniform: [0.01, 0.1]}\n", "both fixed and searched"),
        ("space:\n  optimizer:\n    choice:\n      sgd: {lr: {uniform: [0.1, 1]}}\n  lr: {uniform: [0.01, 0.1]}\n",
         "appears more than once"),
        ("spaces: {}\n", "unknown top-level key"),
        ("space: {}\n", "non-empty `space:`"),
        ("max_epochs: 2\nasha: {grace_period: 3}\nspace:\n  lr: {uniform: [0.01, 0.1]}\n", "exceeds max_epochs"),
        ("fixed: {optimizer: lion}\nspace:\n  lr: {uniform: [0.01, 0.1]}\n", "optimizer must be one of"),
        ("space:\n  lr: [1, 2\n", "invalid YAML"),
    ],
)
def test_bad_yaml_is_a_clear_error(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        load_search_spec(_write(tmp_path, bad))


def test_shipped_search_spaces_are_valid():
    from search.run import DEFAULT_SEARCH

    for path in (DEFAULT_SEARCH, DEFAULT_SEARCH.parent / "smoke.yaml"):
        spec = load_search_spec(path)
        make_config(default_point(spec), base=spec.trial_base())


def test_default_space_largest_models_stay_fast():
    """The widest/deepest corner of the shipped space stays a model a trial trains quickly: a few
    million parameters and about a GFLOP per 28x28 image at most (today's largest, resnet at width
    2.5 with 2 blocks, is ~1.0 GFLOP, 4.4M parameters)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_model
    from search.run import DEFAULT_SEARCH
    from training.config import count_parameters

    spec = load_search_spec(DEFAULT_SEARCH)
    widest = spec.space["width"]["uniform"][1]
    for model, sub in spec.space["model"]["choice"].items():
        extra = {k: v["int"][1] for k, v in (sub or {}).items()}  # depth / blocks at their maximum
        c = make_config({**spec.trial_base(), "model": model, "width": widest, **extra})
        assert count_parameters(c) <= 5e6, (model, extra)
        net = build_model(model, 47, **c.model_kwargs()).eval()
        with FlopCounterMode(display=False) as flops, torch.no_grad():
            net(torch.zeros(1, 1, 28, 28))
        assert flops.get_total_flops() <= 1.1e9, (model, extra, flops.get_total_flops())


def test_saved_space_is_the_one_the_search_started_with(tmp_path):
    """search.settings.saved_space, the one reader of an experiment's space for the summary and the
    dashboard: an older experiment (no copy of its space in search.json) uses the file while it is what
    the search started with, and is refused with a reason otherwise."""
    import hashlib
    import json
    import os

    from search.settings import saved_space
    from search.summary import _sampled_names

    (tmp_path / "base.yaml").write_text("split: digits\n")
    space = tmp_path / "space.yaml"
    space.write_text(GOOD.format(base="base.yaml"))
    exp = tmp_path / "exp"
    exp.mkdir()

    def settings(**extra):
        (exp / "search.json").write_text(json.dumps({"config": str(space), **extra}))

    settings(config_sha256=hashlib.sha256(space.read_bytes()).hexdigest(), max_epochs=3)
    spec, max_epochs, why = saved_space(exp)
    assert why is None and max_epochs == 3 and "momentum" in spec.params
    names = _sampled_names(exp)
    trial = {"lr": 0.01, "width": 1.0, "batch_size": 32, "scheduler": "none", "momentum": 0.9}
    assert names({**trial, "optimizer": "sgd"}) == {"lr", "width", "batch_size", "scheduler", "optimizer", "momentum"}
    assert "momentum" not in names({**trial, "optimizer": "adamw"})  # not its branch
    settings()  # no checksum saved (an older search), no budget: the space file's own
    assert saved_space(exp)[1] == 4

    settings(config_sha256="0" * 64)  # the file was edited after the search started: it is there, edited
    assert saved_space(exp)[::2] == (None, f"the search space file {space} has been edited since the search started")
    assert _sampled_names(exp)({**trial, "optimizer": "sgd"}) is None  # the summary shows what varied instead
    settings()
    (tmp_path / "base.yaml").unlink()
    assert saved_space(exp)[2] == f"the base config of the search space file {space} is not there any more"
    space.unlink()
    os.mkfifo(space)  # a FIFO would block the reader
    assert saved_space(exp)[2] == f"the search space file {space} that search.json names is not on this machine"
    (exp / "search.json").write_text("[1, 2]")
    assert saved_space(exp)[2] == "the experiment has no readable search.json"
    (exp / "search.json").write_text(json.dumps({"config": 7}))
    assert saved_space(exp)[2] == "search.json names no search space file"


def test_saved_space_from_another_machine_is_found_in_the_repository(tmp_path):
    """An older experiment copied from another machine names a path that is not here: the file of the same
    name in configs/search/ is used when it has the saved checksum, and said to be edited when it has not
    (the issue's page said "not there any more" of a file that was there, edited)."""
    import hashlib
    import json

    from search.run import DEFAULT_SEARCH
    from search.settings import saved_space

    exp = tmp_path / "exp"
    exp.mkdir()
    elsewhere = "/elsewhere/emnist-tune/configs/search/default.yaml"
    good = hashlib.sha256(DEFAULT_SEARCH.read_bytes()).hexdigest()
    (exp / "search.json").write_text(json.dumps({"config": elsewhere, "config_sha256": good}))
    spec, _, why = saved_space(exp)
    assert why is None and spec.path == DEFAULT_SEARCH
    (exp / "search.json").write_text(json.dumps({"config": elsewhere, "config_sha256": "0" * 64}))
    assert saved_space(exp)[::2] == (None, (f"the search space file {elsewhere} that search.json names is not on "
                                            "this machine, and configs/search/default.yaml in this repository has "
                                            "been edited since the search started (its checksum differs)"))


def _experiment_with_copy(tmp_path, space_text: str, base_text: str | None = "split: digits\n", **extra):
    """An experiment whose search.json holds its space's text as search.run.settings_of writes it; the file it
    names is then edited (widened, a parameter moved into a branch) and its base removed."""
    import hashlib
    import json

    from search.run import space_copy

    cfg = tmp_path / "cfg"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "base.yaml").write_text(base_text or "")
    space = cfg / "space.yaml"
    space.write_text(space_text)
    settings = {"config": str(space), "config_sha256": hashlib.sha256(space.read_bytes()).hexdigest(),
                **space_copy(space), "max_epochs": 3, **extra}
    space.write_text(space_text.replace("[0.5, 2.0]", "[0.25, 4.0]").replace("  width:", "  depth: {int: [1, 3]}\n"
                                                                              "  width:"))
    (cfg / "base.yaml").unlink()
    exp = tmp_path / "exp"
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "search.json").write_text(json.dumps(settings))
    return exp, space


def test_saved_space_is_the_experiments_own_copy(tmp_path):
    from search.settings import saved_space

    exp, space = _experiment_with_copy(tmp_path, GOOD.format(base="base.yaml"))
    spec, max_epochs, why = saved_space(exp)
    assert why is None and max_epochs == 3 and spec.path == space
    assert spec.space["width"] == {"uniform": [0.5, 2.0]} and "depth" not in spec.params  # not the edited file
    assert spec.base["split"] == "digits" and spec.fixed == {"split": "digits"}  # the base from its copy too
    # a space without a base config
    exp2, _ = _experiment_with_copy(tmp_path / "b", GOOD.replace("base: {base}\n", "").format())
    assert saved_space(exp2)[2] is None


def _hostile(tmp_path, **fields):
    import json

    exp = tmp_path / "hostile"
    exp.mkdir(exist_ok=True)
    (exp / "search.json").write_text(json.dumps({"config": str(tmp_path / "gone.yaml"), **fields}))
    return exp


@pytest.mark.parametrize("fields, why", [
    ({"space_text": 7}, "is not text"),
    ({"space_text": "space: {lr: {uniform: [0.1, 1]}}", "base_text": ["x"]}, "is not text"),
    ({"space_text": "x" * (2**20 + 1)}, "larger than a search space"),
    ({"space_text": "space: {lr: {uniform: [0.1, 1]}}", "config_sha256": "0" * 64}, "does not match its checksum"),
    ({"space_text": "space: [1, 2\n"}, "cannot be used (ConfigError)"),
    ({"space_text": "- just a list\n"}, "cannot be used (ConfigError)"),
    ({"space_text": "base: b.yaml\nspace: {lr: {uniform: [0.1, 1]}}\n"}, "cannot be used (ConfigError)"),  # no base
    ({"space_text": "space: {lr: {uniform: [0.1, 1]}}\n", "base_text": "lr: 1\n"}, "cannot be used (ConfigError)"),
    ({"space_text": "base: b.yaml\nspace: {lr: {uniform: [0.1, 1]}}\n", "base_text": "nonsense_key: 1\n"},
     "cannot be used (ConfigError)"),
    ({"space_text": "space: {lrr: {uniform: [0.1, 1]}}\n"}, "cannot be used (ConfigError)"),
    ({"space_text": "{1: 2, space: {lr: {uniform: [0.1, 1]}}}\n"}, "cannot be used (ConfigError)"),
    ({"space_text": "space: {lr: {uniform: [0.1, 1]}}\nfixed: [1, 2]\n"}, "cannot be used (ConfigError)"),
    ({"space_text": "space: {lr: {uniform: [0.1, 1]}}\nasha: 3\n"}, "cannot be used (ConfigError)"),
    ({"space_text": "space: {lr: {uniform: [0.1, 1]}}\nmax_epochs: true\n"}, "cannot be used (ConfigError)"),
    ({"space_text": "[" * 100_000}, "cannot be used (ConfigError)"),  # nesting deeper than the parser's stack
    ({"space_text": "a: &a [*a]\nspace: {lr: {uniform: [0.1, 1]}}\n"}, "cannot be used (ConfigError)"),  # itself
    # billion laughs: a few lines that are 10^9 values
    ({"space_text": "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
      + "space: {model: {choice: *i}}\n"}, "cannot be used (ConfigError)"),
    ({"space_text": "space: {model: {choice: {small_cnn: [1]}}}\n"}, "cannot be used (ConfigError)"),
    ({"space_text": "space: {lr: {uniform: [0.1, 1]}}\x00\n"}, "cannot be used (ConfigError)"),
])
def test_a_damaged_copy_of_the_space_is_a_reason(tmp_path, fields, why):
    """Whatever the copy holds, saved_space answers (None, None, why) and never raises; with the file it
    names gone too, the reason says both."""
    from search.settings import saved_space

    spec, max_epochs, reason = saved_space(_hostile(tmp_path, **fields))
    assert spec is None and max_epochs is None
    assert reason.startswith("the copy of the search space in search.json ") and why in reason, reason
    assert reason.endswith("that search.json names is not on this machine")


def test_a_damaged_copy_falls_back_to_the_unedited_file(tmp_path):
    """A copy that does not match the saved checksum is not used; the file itself still has it, so it is."""
    import hashlib
    import json

    from search.settings import saved_space

    (tmp_path / "train.yaml").write_text("split: digits\n")
    space = tmp_path / "s.yaml"
    space.write_text(GOOD.format(base="train.yaml"))
    exp = _hostile(tmp_path, config=str(space), config_sha256=hashlib.sha256(space.read_bytes()).hexdigest(),
                   space_text=GOOD.format(base="train.yaml").replace("0.99", "0.999"), base_text="split: digits\n")
    spec, _, why = saved_space(exp)
    assert why is None and spec.space["optimizer"]["choice"]["sgd"]["momentum"] == {"uniform": [0.8, 0.99]}
    # a copy of a file written with CRLF line ends (read back as text with \n) still matches its checksum
    space.write_bytes(GOOD.format(base="train.yaml").replace("\n", "\r\n").encode())
    json.loads((exp / "search.json").read_text())
    exp = _hostile(tmp_path, config=str(tmp_path / "moved.yaml"),
                   config_sha256=hashlib.sha256(space.read_bytes()).hexdigest(), space_text=space.read_text(),
                   base_text="split: digits\n")
    assert saved_space(exp)[2] is None


def test_search_json_too_large_or_odd_is_a_reason(tmp_path):
    import json

    from search.settings import saved_space

    exp = _hostile(tmp_path)
    (exp / "search.json").write_text(json.dumps({"config": "x", "pad": "x" * (4 * 2**20)}))
    assert saved_space(exp) == (None, None, "the experiment has no readable search.json")
    (exp / "search.json").write_text(json.dumps({"config": "x" * 5000}))
    assert saved_space(exp)[2] == "search.json names no search space file"
    (exp / "search.json").write_text('{"config": "a", "space_text": "\\ud800"}')  # a lone surrogate
    assert "is not valid text" in saved_space(exp)[2]
    (exp / "search.json").write_text("[" * 100_000)
    assert saved_space(exp)[2] == "the experiment has no readable search.json"
    (exp / "search.json").write_text(json.dumps({"config": "a\x00b"}))
    assert "not on this machine" in saved_space(exp)[2]


def test_size_keys_come_from_the_models():
    """What a model's parameter count depends on: the model and the size knobs the models declare where they are
    registered (tests/test_models.py adds one with a new knob), in TrainConfig's order."""
    from search.space import SIZE_KEYS

    assert SIZE_KEYS == ("model", "width", "depth", "blocks")
