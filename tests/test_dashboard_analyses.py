"""The explorer's analyses are right, on a synthetic ASHA search where the answer is known: only the
parameters a trial sampled enter importance, the parallel coordinates, "parameter vs accuracy" and
the table (a conditional parameter is blank where its branch was not taken); trials are compared at
one epoch every compared trial reached (an ASHA rung), not by best val acc after 2, 6 or 12 epochs;
the parallel coordinates show the 8 most important parameters by default."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from dashboard import figures
from search.space import DefineByRun, load_search_spec, replay, sampled_params
from training.config import make_config

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
pytestmark = pytest.mark.usefixtures("loopback_server")

SPACE = """\
max_epochs: 12
asha: {grace_period: 2, reduction_factor: 3}
fixed: {split: digits}
space:
  lr: {loguniform: [1.0e-4, 1.0e-1]}
  width: {uniform: [0.5, 2.0]}
  dropout: {uniform: [0.0, 0.5]}
  weight_decay: {loguniform: [1.0e-6, 1.0e-2]}
  label_smoothing: {uniform: [0.0, 0.2]}
  aug_strength: {uniform: [0.0, 1.0]}
  aug_rotate: {uniform: [0.0, 15.0]}
  batch_size: {choice: [64, 128, 256]}
  optimizer:
    choice:
      adamw: {}
      sgd: {momentum: {uniform: [0.8, 0.99]}}
  scheduler:
    choice:
      none: {}
      step: {gamma: {uniform: [0.2, 0.6]}}
"""
N_TRIALS = 30


def _acc(config: dict, epoch: int, rng) -> float:
    """Validation accuracy after `epoch` epochs: decided by lr (best at 3e-3), the rest is noise."""
    peak = 0.92 - 0.2 * abs(math.log10(config["lr"]) - math.log10(3e-3))
    return float(np.clip(peak * (1 - 0.3 / epoch) + rng.normal(0, 0.003), 0.05, 0.99))


def _sample(space: DefineByRun, rng) -> dict:
    """One trial's full config (what params.json holds): the sampled values over every default."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=int(rng.integers(1 << 30))))
    trial = study.ask()
    fixed = space(trial)
    return {**fixed, **trial.params}


def write_experiment(root: Path, name: str = "synthetic", seed: int = 0) -> Path:
    """An experiment folder as a Ray Tune + ASHA search leaves it: search.json naming the space file,
    trial_<id>/params.json (full config) and result.json (one line per epoch). 30 trials run 2
    epochs; ASHA keeps the best third of those by val acc at epoch 2 up to epoch 6, and the best
    third of those at epoch 6 up to 12."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rng = np.random.default_rng(seed)
    exp = root / name
    exp.mkdir(parents=True)
    space_file = root.parent / f"{name}-space.yaml"
    space_file.write_text(SPACE)
    (exp / "search.json").write_text(json.dumps({"config": str(space_file), "max_epochs": 12}))
    space = DefineByRun(load_search_spec(space_file))
    configs = [_sample(space, rng) for _ in range(N_TRIALS)]
    curves = [[_acc(c, e, rng) for e in range(1, 13)] for c in configs]
    alive = list(range(N_TRIALS))
    stop_at = {}
    for rung, keep in ((2, N_TRIALS // 3), (6, N_TRIALS // 9)):
        ranked = sorted(alive, key=lambda i: curves[i][rung - 1], reverse=True)
        stop_at.update({i: rung for i in ranked[keep:]})
        alive = ranked[:keep]
    stop_at.update({i: 12 for i in alive})
    for i, (config, curve) in enumerate(zip(configs, curves, strict=True)):
        d = exp / f"trial_{i:05d}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(config))
        last = stop_at[i]
        (d / "result.json").write_text("".join(
            json.dumps({"epoch": e, "training_iteration": e, "val_acc": curve[e - 1], "val_loss": 1 - curve[e - 1],
                        "done": e == last, "time_total_s": float(e)}) + "\n" for e in range(1, last + 1)))
    return exp


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyses") / "results"
    write_experiment(root)
    return root


@pytest.fixture(scope="module")
def loaded(synthetic):
    from search.results import load_experiment

    return load_experiment(synthetic / "synthetic")


@pytest.fixture(scope="module")
def space(synthetic):
    return DefineByRun(load_search_spec(synthetic.parent / "synthetic-space.yaml"))


# ---------------------------------------------------------------- which parameters a trial sampled


def test_sampled_params_follow_the_branches(space):
    base = make_config({}).to_dict()  # every key, as a trial's params.json has them
    sgd_step = {**base, "optimizer": "sgd", "scheduler": "step"}
    common = {"lr", "width", "dropout", "weight_decay", "label_smoothing", "aug_strength", "aug_rotate",
              "batch_size", "optimizer", "scheduler"}
    assert set(sampled_params(space, sgd_step)) == common | {"momentum", "gamma"}
    assert set(sampled_params(space, {**base, "optimizer": "adamw", "scheduler": "none"})) == common
    assert sampled_params(space, {"lr": 0.01}) is None  # not a config of this space


def test_only_sampled_blanks_the_branches_not_taken(loaded, space):
    trials = loaded.trials
    assert trials["config/momentum"].notna().all() and trials["config/gamma"].notna().all()  # the full config
    masked, params, dists, note = figures.only_sampled(trials, lambda c: sampled_params(space, c))
    assert note is None
    assert {figures.param_name(c) for c in params} == {
        "lr", "width", "dropout", "weight_decay", "label_smoothing", "aug_strength", "aug_rotate", "batch_size",
        "optimizer", "scheduler", "momentum", "gamma"}  # not split, epochs, seed, ... (fixed)
    sgd = trials["config/optimizer"] == "sgd"
    assert masked.loc[sgd, "config/momentum"].notna().all() and masked.loc[~sgd, "config/momentum"].isna().all()
    step = trials["config/scheduler"] == "step"
    assert masked.loc[step, "config/gamma"].notna().all() and masked.loc[~step, "config/gamma"].isna().all()
    assert masked["config/batch_size"].dropna().map(float).isin([64, 128, 256]).all()
    # ... and the ranges the space sampled them from (for importance), not the ranges the trials happen to span
    assert dists["lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert dists["batch_size"] == CategoricalDistribution([64, 128, 256])
    assert dists["gamma"] == FloatDistribution(0.2, 0.6) and set(dists) == {figures.param_name(c) for c in params}

    # without the space: what varies between the trials, and the note says why
    same, varying, _, note = figures.only_sampled(trials, None)
    assert same is trials and set(varying) == set(figures.varying_params(trials)) and "unknown" in note
    _, _, _, note = figures.only_sampled(trials, lambda c: None)
    assert "does not fit the config of trial(s) 00000, 00001, 00002 and 27 more" in note


def test_importance_of_a_conditional_parameter_uses_only_the_trials_that_sampled_it(space):
    """The issue's case: the full config shows momentum's default (0.9) in every adamw trial, and the
    adamw trials are the better ones, so momentum looked important. Once masked, momentum's values in
    the trials that did not sample it cannot change its importance at all."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(40):
        sgd = i % 2 == 0
        lr = 10 ** rng.uniform(-4, -1)
        rows.append({"trial_id": f"t{i}", "status": "finished", "best_val_acc": 0.9 - 0.1 * sgd + rng.normal(0, 0.02),
                     "config/optimizer": "sgd" if sgd else "adamw", "config/lr": lr,
                     "config/momentum": rng.uniform(0.8, 0.99) if sgd else 0.9, "config/scheduler": "none"})
    full = pd.DataFrame(rows)
    names = lambda c: sampled_params(space, {**make_config({}).to_dict(), **c})  # noqa: E731
    masked, params, dists, _ = figures.only_sampled(full, names)
    assert set(params) == {"config/optimizer", "config/lr", "config/momentum", "config/scheduler"}  # (constant)
    values = figures.importance_values(masked, params=params)

    other = full.copy()
    other.loc[other["config/optimizer"] == "adamw", "config/momentum"] = rng.uniform(0.8, 0.99, 20)
    assert figures.importance_values(figures.only_sampled(other, names)[0], params=params) == values
    unmasked = figures.importance_values(full, params=params)
    assert values["momentum"] < unmasked["momentum"]  # the 0.9 default no longer counts
    assert max(values, key=values.get) == "optimizer"


def test_replay_gives_the_searcher_and_the_dashboard_the_same_trial(space):
    """search.space.replay is the one way a known config becomes an Optuna trial: the searcher adds what it
    gives to its study, the summary and the dashboard read which parameters it sampled and from where."""
    import optuna

    config = {**make_config({}).to_dict(), "optimizer": "sgd", "momentum": 0.95, "scheduler": "none", "lr": 3e-3}
    replayed = replay(space, config)
    assert replayed.params["momentum"] == 0.95 and "gamma" not in replayed.params
    assert replayed.distributions == sampled_params(space, config)
    study = optuna.create_study(direction="maximize")
    for value, failed, state in ((0.8, False, "COMPLETE"), (None, False, "PRUNED"), (None, True, "FAIL")):
        study.add_trial(replayed.finished(value, failed))  # valid for a study: every value in its distribution
        assert study.trials[-1].state.name == state and study.trials[-1].params == replayed.params
    with pytest.raises(KeyError, match="no 'momentum'"):
        replay(space, {k: v for k, v in config.items() if k != "momentum"})


def test_importance_uses_the_space_range_where_every_value_fits():
    lr = FloatDistribution(1e-4, 1e-1, log=True)
    narrow = pd.Series([1e-3, 2e-3, 1.5e-3])  # spans less than the space: the space's range counts
    assert figures._distribution(narrow, lr) is lr
    own = figures._distribution(pd.Series([1e-3, 0.5]), lr)  # 0.5 is outside the space (another space)
    assert own == FloatDistribution(1e-3, 0.5, log=True)
    sizes = CategoricalDistribution([64, 128, 256])
    assert figures._distribution(pd.Series([64.0, 128.0]), sizes) is sizes  # as the table holds them
    assert figures._distribution(pd.Series(["adamw"]), sizes) == CategoricalDistribution(["adamw"])


# ---------------------------------------------------------------- the budget trials are compared at


def test_budget_counts_and_default():
    assert figures.asha_rungs(12, 2, 3) == [2, 6, 12]
    assert figures.asha_rungs(10, 1, 2) == [1, 2, 4, 8, 10]
    assert figures.default_budget({2: 30, 6: 10, 12: 3}, 30) == 2  # 10 < half of 30
    assert figures.default_budget({2: 12, 6: 6, 12: 2}, 12) == 6  # half, and at least 5
    assert figures.default_budget({1: 4, 2: 4}, 4) == 2  # fewer than 5 trials: all of them
    assert figures.default_budget({2: 3, 6: 1}, 9) == 2  # none has enough: the most trials
    assert figures.default_budget({}, 0) is None


def test_a_parameter_that_drives_accuracy_at_the_rung_ranks_first(loaded, space):
    masked, params, dists, _ = figures.only_sampled(loaded.trials, lambda c: sampled_params(space, c))
    counts = figures.budget_counts(masked, loaded.histories, figures.asha_rungs(12, 2, 3))
    assert counts == {2: 30, 6: 10, 12: 3}
    assert figures.budget_counts(masked, loaded.histories) == {2: 30, 6: 10, 12: 3}  # from epochs_run
    assert figures.default_budget(counts, 30) == 2
    at2 = figures.metric_at_epoch(masked, loaded.histories, 2)
    hist = loaded.histories["00000"]
    assert at2.iloc[0] == pytest.approx(float(hist.loc[hist["epoch"] == 2, "val_acc"].iloc[0]))
    data = masked.assign(at2=at2)
    values = figures.importance_values(data, "at2", params, dists)
    assert max(values, key=values.get) == "lr" and values["lr"] > 0.3
    fig = figures.param_importance(data, "at2", "val acc at epoch 2", params)
    assert "for val acc at epoch 2<br><sup>(30 trials" in fig.layout.title.text
    assert fig.data[0].y[-1] == "lr"  # on top

    axes = [n for n in values][:figures.PARCOORDS_DEFAULT_AXES]
    pc = figures.parallel_coordinates(data, axes, "at2", "val acc at epoch 2")
    labels = [d.label for d in pc.data[0].dimensions]
    assert len(labels) == 9 and labels[-1] == "val acc at epoch 2" and "(30 trials)" in pc.layout.title.text
    assert list(pc.data[0].line.color) == pytest.approx(at2.tolist())


# ---------------------------------------------------------------- the page


def _page(monkeypatch, root: Path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("EMNIST_TUNE_RESULTS", str(root))
    return AppTest.from_file(APP, default_timeout=60).run()


def _chart(at, key: str) -> dict:
    """The figure of the plotly chart with this key (its element id ends with the key)."""
    (chart,) = [c for c in at.get("plotly_chart") if c.proto.id.endswith(key)]
    return json.loads(chart.proto.spec)


def test_page_analyses_on_the_synthetic_search(monkeypatch, synthetic, loaded):
    at = _page(monkeypatch, synthetic)
    assert not at.exception and not at.error, [e.value for e in at.exception]
    assert not [i.value for i in at.info if "not known" in str(i.value)]

    budget = at.selectbox(key="explorer_budget")
    assert budget.value == 2 and budget.options == ["val acc at epoch 2 (30 trials)", "val acc at epoch 6 (10 trials)"]
    importance = _chart(at, "explorer_importance")
    assert "val acc at epoch 2<br><sup>(30 trials" in importance["layout"]["title"]["text"]
    assert importance["data"][0]["y"][-1] == "lr"

    axes = at.multiselect(key="explorer_parcoords_axes")
    assert len(axes.value) == 8 and axes.value[0] == "lr" and len(axes.options) == 12
    parcoords = _chart(at, "explorer_parcoords")
    assert [d["label"] for d in parcoords["data"][0]["dimensions"]][-1] == "val acc at epoch 2"
    assert len(parcoords["data"][0]["dimensions"]) == 9
    extra = next(o for o in axes.options if o not in axes.value)
    at.multiselect(key="explorer_parcoords_axes").select(extra).run()
    assert len(_chart(at, "explorer_parcoords")["data"][0]["dimensions"]) == 10

    params = at.selectbox(key="explorer_param")
    assert "momentum" in params.options and "split" not in params.options and "epochs" not in params.options

    table = next(d.value for d in at.dataframe if "trial_id" in d.value.columns)
    assert {"momentum", "gamma", "lr"} <= set(table.columns) and "seed" not in table.columns
    adamw = table[table["optimizer"] == "adamw"]
    assert len(adamw) and adamw["momentum"].isna().all()  # not sampled: blank, not 0.9

    at.selectbox(key="explorer_budget").select(6).run()
    assert not at.exception and not at.error
    assert "val acc at epoch 6<br><sup>(10 trials" in _chart(at, "explorer_importance")["layout"]["title"]["text"]


def test_page_without_the_saved_space_says_so(monkeypatch, tmp_path):
    root = tmp_path / "results"
    exp = write_experiment(root, seed=2)
    (exp / "search.json").unlink()
    at = _page(monkeypatch, root)
    assert not at.exception and not at.error
    assert any("not known" in str(i.value) and "no readable" in str(i.value) for i in at.info)
    assert at.selectbox(key="explorer_budget").value == 2  # budgets from the epochs the trials ran
    table = next(d.value for d in at.dataframe if "trial_id" in d.value.columns)
    assert (table.loc[table["optimizer"] == "adamw", "momentum"] == 0.9).all()  # the table as it is
