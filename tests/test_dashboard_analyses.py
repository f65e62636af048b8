"""The explorer's analyses are right, on a synthetic ASHA search where the answer is known: only the
parameters a trial sampled enter importance, the parallel coordinates, "parameter vs accuracy" and
the table (a conditional parameter is blank where its branch was not taken); trials are compared at
one epoch every compared trial reached (an ASHA rung), not by best val acc after 2, 6 or 12 epochs;
the parallel coordinates show the 8 most important parameters by default. Issue 18: the importance is
Optuna's own evaluator on the trials as Optuna sampled them (also after the space file was edited: the
experiment's own copy is replayed); without a copy, the parameters whose values show they were conditional
are left out and named; a conditional bar says among how many trials it was measured; intervals over
resamples of the trials, and no ranking drawn where the trials cannot support one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from dashboard import analyses, explorer_figures, importance_study, trial_table
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


def _sample(space: DefineByRun, rng) -> tuple[dict, dict]:
    """One trial's full config (what params.json holds: the sampled values over every default), and what
    Optuna itself recorded of it ({"params", "distributions"} as JSON): the reference the page must match."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=int(rng.integers(1 << 30))))
    trial = study.ask()
    fixed = space(trial)
    dists = {k: optuna.distributions.distribution_to_json(d) for k, d in trial.distributions.items()}
    return {**fixed, **trial.params}, {"params": trial.params, "distributions": dists}


def write_experiment(root: Path, name: str = "synthetic", seed: int = 0, n_trials: int = N_TRIALS,
                     copy: bool = False, edit: bool = False) -> Path:
    """An experiment folder as a Ray Tune + ASHA search leaves it: search.json naming the space file,
    trial_<id>/params.json (full config) and result.json (one line per epoch). `n_trials` trials run 2
    epochs; ASHA keeps the best third of those by val acc at epoch 2 up to epoch 6, and the best
    third of those at epoch 6 up to 12. `copy`: search.json also holds the space's checksum and text, as a
    search of today writes it (search.run.settings_of); else it is an older experiment's, with the checksum
    only. `edit`: the space file is edited afterwards (its ranges widened, a parameter added to a branch), as
    in the issue. Next to the space: <name>-optuna.json, what Optuna recorded of each trial (see _sample)."""
    import hashlib

    import optuna

    from search.run import space_copy

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rng = np.random.default_rng(seed)
    exp = root / name
    exp.mkdir(parents=True)
    space_file = root.parent / f"{name}-space.yaml"
    space_file.write_text(SPACE)
    settings = {"config": str(space_file), "max_epochs": 12}
    if copy or edit:
        settings["config_sha256"] = hashlib.sha256(space_file.read_bytes()).hexdigest()
    if copy:
        settings.update(space_copy(space_file))
    (exp / "search.json").write_text(json.dumps(settings))
    space = DefineByRun(load_search_spec(space_file))
    configs, recorded = zip(*[_sample(space, rng) for _ in range(n_trials)], strict=True)
    (root.parent / f"{name}-optuna.json").write_text(json.dumps(recorded))
    curves = [[_acc(c, e, rng) for e in range(1, 13)] for c in configs]
    alive = list(range(n_trials))
    stop_at = {}
    for rung, keep in ((2, n_trials // 3), (6, n_trials // 9)):
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
    if edit:  # the default space widened after the search (the issue), and a parameter added to a branch
        space_file.write_text(SPACE.replace("[1.0e-4, 1.0e-1]", "[1.0e-5, 1.0]").replace(
            "sgd: {momentum: {uniform: [0.8, 0.99]}}", "sgd: {momentum: {uniform: [0.5, 0.999]}, nesterov: "
                                                      "{choice: [true, false]}}"))
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
    masked, params, dists, note, left_out = analyses.only_sampled(trials, lambda c: sampled_params(space, c))
    assert note is None and left_out == {}
    assert {trial_table.param_name(c) for c in params} == {
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
    assert dists["gamma"] == FloatDistribution(0.2, 0.6) and set(dists) == {trial_table.param_name(c) for c in params}

    # without the space: what varies between the trials, and the note says why
    same, varying, _, note, _ = analyses.only_sampled(trials, None)
    assert same is trials and set(varying) == set(trial_table.varying_params(trials)) and "unknown" in note
    _, _, _, note, _ = analyses.only_sampled(trials, lambda c: None)
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
    masked, params, dists, _, _ = analyses.only_sampled(full, names)
    assert set(params) == {"config/optimizer", "config/lr", "config/momentum", "config/scheduler"}  # (constant)
    values = importance_study.importance_values(masked, params=params)

    other = full.copy()
    other.loc[other["config/optimizer"] == "adamw", "config/momentum"] = rng.uniform(0.8, 0.99, 20)
    assert importance_study.importance_values(analyses.only_sampled(other, names)[0], params=params) == values
    unmasked = importance_study.importance_values(full, params=params)
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
    assert importance_study._distribution(narrow, lr) is lr
    own = importance_study._distribution(pd.Series([1e-3, 0.5]), lr)  # 0.5 is outside the space (another space)
    assert own == FloatDistribution(1e-3, 0.5, log=True)
    sizes = CategoricalDistribution([64, 128, 256])
    assert importance_study._distribution(pd.Series([64.0, 128.0]), sizes) is sizes  # as the table holds them
    assert importance_study._distribution(pd.Series(["adamw"]), sizes) == CategoricalDistribution(["adamw"])


# ---------------------------------------------------------------- the budget trials are compared at


def test_budget_counts_and_default():
    assert analyses.asha_rungs(12, 2, 3) == [2, 6, 12]
    assert analyses.asha_rungs(10, 1, 2) == [1, 2, 4, 8, 10]
    assert analyses.default_budget({2: 30, 6: 10, 12: 3}, 30) == 2  # 10 < half of 30
    assert analyses.default_budget({2: 12, 6: 6, 12: 2}, 12) == 6  # half, and at least 5
    assert analyses.default_budget({1: 4, 2: 4}, 4) == 2  # fewer than 5 trials: all of them
    assert analyses.default_budget({2: 3, 6: 1}, 9) == 2  # none has enough: the most trials
    assert analyses.default_budget({}, 0) is None


def test_a_parameter_that_drives_accuracy_at_the_rung_ranks_first(loaded, space):
    masked, params, dists, _, _ = analyses.only_sampled(loaded.trials, lambda c: sampled_params(space, c))
    counts = analyses.budget_counts(masked, loaded.histories, analyses.asha_rungs(12, 2, 3))
    assert counts == {2: 30, 6: 10, 12: 3}
    assert analyses.budget_counts(masked, loaded.histories) == {2: 30, 6: 10, 12: 3}  # from epochs_run
    assert analyses.default_budget(counts, 30) == 2
    at2 = analyses.metric_at_epoch(masked, loaded.histories, 2)
    hist = loaded.histories["00000"]
    assert at2.iloc[0] == pytest.approx(float(hist.loc[hist["epoch"] == 2, "val_acc"].iloc[0]))
    data = masked.assign(at2=at2)
    values = importance_study.importance_values(data, "at2", params, dists)
    assert max(values, key=values.get) == "lr" and values["lr"] > 0.3
    fig = explorer_figures.param_importance(data, "at2", "val acc at epoch 2", params)
    assert "for val acc at epoch 2<br><sup>(30 trials" in fig.layout.title.text
    assert fig.data[0].y[-1] == "lr"  # on top

    axes = [n for n in values][:explorer_figures.PARCOORDS_DEFAULT_AXES]
    pc = explorer_figures.parallel_coordinates(data, axes, "at2", "val acc at epoch 2")
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


# ---------------------------------------------------------------- issue 18: what importance can and cannot say


def _at_epoch(exp: Path, epoch: int) -> dict[str, float]:
    """Each trial's val acc at `epoch`, read straight from its result.json (not through the page's readers)."""
    out = {}
    for d in sorted(exp.glob("trial_*")):
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        out[d.name.removeprefix("trial_")] = next(r["val_acc"] for r in rows if r["epoch"] == epoch)
    return out


def _optuna_reference(root: Path, name: str, epoch: int = 2, quantile: float | None = None,
                      params: list[str] | None = None) -> dict[str, float]:
    """Optuna's own PedAnovaImportanceEvaluator on a study of the trials as Optuna sampled them (each one's
    params and distributions as the sampler recorded them: conditional ones only on their branch), valued
    by the val acc at `epoch` (the page's default ASHA rung): what the page's bars must equal."""
    import optuna
    from optuna.trial import create_trial

    values = _at_epoch(root / name, epoch)
    recorded = json.loads((root.parent / f"{name}-optuna.json").read_text())
    study = optuna.create_study(direction="maximize")
    for i, r in enumerate(recorded):
        dists = {k: optuna.distributions.json_to_distribution(v) for k, v in r["distributions"].items()}
        study.add_trial(create_trial(value=values[f"{i:05d}"], params=r["params"], distributions=dists))
    evaluator = (optuna.importance.PedAnovaImportanceEvaluator() if quantile is None
                 else optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile))
    return optuna.importance.get_param_importances(study, evaluator=evaluator, params=params)


def _page_bars(at) -> dict[str, tuple[float, str]]:
    """{parameter: (the importance bar's value, its label)} as the page drew them."""
    bar = _chart(at, "explorer_importance")["data"][0]
    return {label.split(" · ")[0]: (x, label) for x, label in zip(bar["x"], bar["y"], strict=True)}


def _same_values(page: dict[str, float], reference: dict[str, float]) -> None:
    for name in set(page) | set(reference):
        assert page.get(name, 0.0) == pytest.approx(reference.get(name, 0.0), abs=1e-9), name


UNCONDITIONAL = ["lr", "width", "dropout", "weight_decay", "label_smoothing", "aug_strength", "aug_rotate",
                 "batch_size", "optimizer", "scheduler"]


def _renormalised(values: dict[str, float], names: list[str]) -> dict[str, float]:
    total = sum(values.get(n, 0.0) for n in names)
    return {n: values.get(n, 0.0) / total for n in names}


def test_importance_is_optunas_on_the_same_trials(synthetic, loaded, space):
    """Conditional parameters (momentum, gamma) and ASHA-stopped trials (20 stopped at epoch 2, 7 at 6): the
    page's numbers are Optuna's PedAnovaImportanceEvaluator on the trials as Optuna sampled them, at the page's
    target quantile (its best 10 of 30 trials); and, on the parameters every trial sampled, Optuna's run on
    those parameters alone."""
    masked, params, dists, _, _ = analyses.only_sampled(loaded.trials, lambda c: sampled_params(space, c))
    assert (loaded.trials["status"] == "stopped").sum() == 27
    data = masked.assign(at2=analyses.metric_at_epoch(masked, loaded.histories, 2))
    page = importance_study.importance_values(data, "at2", params, dists)
    assert {"momentum", "gamma"} <= set(page)
    _same_values(page, _optuna_reference(synthetic, "synthetic", quantile=1 / 3))
    alone = _optuna_reference(synthetic, "synthetic", quantile=1 / 3, params=UNCONDITIONAL)
    _same_values(_renormalised(page, UNCONDITIONAL), alone)
    result = importance_study.importance(data, "at2", params, dists)
    assert result.values == page  # the resampling does not change the values drawn


def test_importance_is_optunas_with_its_defaults_from_100_trials(tmp_path):
    """From 100 trials on, the page's quantile is Optuna's default: the page equals
    PedAnovaImportanceEvaluator() as it comes, the issue's reference computation."""
    from search.results import load_experiment

    root = tmp_path / "results"
    exp = write_experiment(root, seed=3, n_trials=120)
    space = DefineByRun(load_search_spec(root.parent / "synthetic-space.yaml"))
    loaded = load_experiment(exp)
    masked, params, dists, _, _ = analyses.only_sampled(loaded.trials, lambda c: sampled_params(space, c))
    data = masked.assign(at2=analyses.metric_at_epoch(masked, loaded.histories, 2))
    assert importance_study.importance_quantile(120) == 0.1
    _same_values(importance_study.importance_values(data, "at2", params, dists), _optuna_reference(root, "synthetic"))


def test_page_importance_after_the_space_file_was_edited(monkeypatch, tmp_path):
    """The issue's case: the space file was edited (widened) after the search. The page replays the trials
    into the experiment's own copy of its space, says nothing is unknown, and its bars are Optuna's on the
    trials as they were sampled (the widened ranges would change them); a conditional parameter's bar says
    among how many trials it was measured."""
    root = tmp_path / "results"
    exp = write_experiment(root, copy=True, edit=True)
    at = _page(monkeypatch, root)
    assert not at.exception and not at.error, [e.value for e in at.exception]
    assert not [i.value for i in at.info if "not known" in str(i.value)]
    bars = _page_bars(at)
    _same_values({k: x for k, (x, _) in bars.items()}, _optuna_reference(root, "synthetic", quantile=1 / 3))
    configs = [json.loads((d / "params.json").read_text()) for d in sorted(exp.glob("trial_*"))]
    step = sum(c["scheduler"] == "step" for c in configs)
    sgd = sum(c["optimizer"] == "sgd" for c in configs)
    assert bars["gamma"][1] == f"gamma · {step} of 30 trials"
    assert bars["momentum"][1] == f"momentum · {sgd} of 30 trials"
    assert bars["lr"][1] == "lr" and "nesterov" not in bars  # (only the edited file has nesterov)
    hover = _chart(at, "explorer_importance")["data"][0]["customdata"]
    assert f"measured among the {step} of 30 trials that sampled it" in [h[1] for h in hover]
    assert any("is a conditional parameter" in str(c.value) and "gamma" in str(c.value) for c in at.caption)


def test_page_without_the_copy_leaves_out_what_was_conditional(monkeypatch, tmp_path):
    """An older experiment (no copy of its space) whose space file was edited: the page says the file was
    edited (not that it is gone), and importance leaves out the parameters whose values show they were
    conditional, naming them and why, instead of ranking momentum's 0.9 and gamma's 0.1 in the trials that
    never sampled them."""
    root = tmp_path / "results"
    write_experiment(root, edit=True)
    at = _page(monkeypatch, root)
    assert not at.exception and not at.error
    bars = _page_bars(at)
    assert "gamma" not in bars and "momentum" not in bars and {"lr", "scheduler", "optimizer"} <= set(bars)
    (note,) = [str(i.value).replace("\\", "") for i in at.info if "not known" in str(i.value)]  # (markdown escapes)
    assert "has been edited since the search started" in note and "not there" not in note
    assert "- gamma: always 0.1 (its default) where scheduler is none (" in note
    assert "- momentum: always 0.9 (its default) where optimizer is adamw (" in note
    table = next(d.value for d in at.dataframe if "trial_id" in d.value.columns)
    assert "gamma" in table.columns  # the table still shows every setting that differs


def test_conditional_in_values_rule(loaded):
    assert set(analyses.conditional_in_values(loaded.trials)) == {"config/gamma", "config/momentum"}
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        model = "mobile_cnn" if i < 3 else ["small_cnn", "vgg"][i % 2]
        rows.append({"trial_id": f"t{i}", "config/model": model, "config/lr": 10 ** rng.uniform(-4, -2),
                     # batch_size is 128 (its default) in the 3 mobile_cnn trials by chance: (1/3)^3 is no proof
                     "config/batch_size": 128 if model == "mobile_cnn" else int(rng.choice([64, 128, 256])),
                     "config/depth": int(rng.integers(1, 5)) if model == "vgg" else 2,  # vgg only (default 2)
                     "config/odd": [{"a": i % 2}] if i % 3 else None})  # values of no config type
    found = analyses.conditional_in_values(pd.DataFrame(rows))
    assert list(found) == ["config/depth"]
    assert found["config/depth"] == "always 2 (its default) where model is mobile_cnn or small_cnn (16 trials)"
    assert analyses.conditional_in_values(pd.DataFrame(rows[:2])) == {}  # too few to show anything
    assert analyses.conditional_in_values(pd.DataFrame()) == {}


def test_importance_says_how_sure_it_is(synthetic, loaded, space):
    """Intervals over 100 seeded resamples of the trials for every value and rank, drawn as lines beside the
    bars; with these 30 trials (lr decides, the rest is noise) most ranks move over many places."""
    masked, params, dists, _, _ = analyses.only_sampled(loaded.trials, lambda c: sampled_params(space, c))
    data = masked.assign(at2=analyses.metric_at_epoch(masked, loaded.histories, 2))
    result = importance_study.importance(data, "at2", params, dists)
    assert result == importance_study.importance(data, "at2", params, dists)  # seeded: the same on every page load
    assert result.resamples == importance_study.BOOTSTRAP_RESAMPLES and result.n_trials == 30
    for n in result.values:
        assert 0 <= result.low[n] <= result.high[n] <= 1 and 1 <= result.rank_low[n] <= result.rank_high[n] <= 12
    assert sum(result.rank_high[n] - result.rank_low[n] >= 5 for n in result.values) >= 6
    assert result.sampled_in["gamma"] == int(masked["config/gamma"].notna().sum()) < 30
    fig = explorer_figures.param_importance(data, "at2", "val acc at epoch 2", params, result=result)
    bar, lines = fig.data
    low = dict(zip(lines.y[0::3], lines.x[0::3], strict=True))
    assert low[bar.y[-1]] == result.low[list(result.values)[0]]
    assert any("rank" in h[0] for h in bar.customdata)


def _noise_trials(n: int, decides: bool, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        lr = 10 ** rng.uniform(-4, -1)
        acc = 0.9 - (0.2 * abs(math.log10(lr) - math.log10(3e-3)) if decides else 0) + rng.normal(0, 0.003)
        rows.append({"trial_id": f"t{i}", "status": "finished", "best_val_acc": acc, "config/lr": lr,
                     "config/width": rng.uniform(0.5, 2), "config/dropout": rng.uniform(0, 0.5),
                     "config/label_smoothing": rng.uniform(0, 0.2), "config/aug_strength": rng.uniform(0, 1),
                     "config/batch_size": int(rng.choice([64, 128, 256]))})
    return pd.DataFrame(rows)


def test_a_ranking_only_where_the_trials_support_one():
    few = importance_study.importance(_noise_trials(12, decides=True))
    assert few.caveat.startswith("12 trials are too few to rank the hyperparameters: it takes at least 20")
    fig = explorer_figures.param_importance(_noise_trials(12, decides=True), result=few)
    assert set(fig.data[0].marker.color) == {"#cdb9e0"} and "not a supported ranking" in fig.layout.title.text
    noise = importance_study.importance(_noise_trials(28, decides=False))  # the issue: 28 trials, nothing decides
    assert noise.caveat.startswith("in 100 resamples of these 28 trials, every parameter's rank moves")
    assert not noise.settled
    clear = importance_study.importance(_noise_trials(40, decides=True))
    assert clear.supported and clear.settled == ["lr"] and clear.rank_low["lr"] == 1
    fig = explorer_figures.param_importance(_noise_trials(40, decides=True), result=clear)
    colours = dict(zip(fig.data[0].y, fig.data[0].marker.color, strict=True))
    assert colours["lr"] == "#9467bd" and colours["width"] == "#cdb9e0"  # only the settled place in full colour


def test_page_says_when_the_trials_cannot_support_a_ranking(monkeypatch, tmp_path):
    root = tmp_path / "results"
    write_experiment(root, n_trials=12, copy=True)
    at = _page(monkeypatch, root)
    assert not at.exception and not at.error
    assert any(str(i.value).startswith("These bars are not a ranking: 12 trials are too few") for i in at.info)
    assert "not a supported ranking" in _chart(at, "explorer_importance")["layout"]["title"]["text"]


def test_page_on_damaged_trial_configs(monkeypatch, tmp_path):
    """params.json files with values of no config type (a string learning rate, an int beyond float range, a
    mapping as the scheduler, null, NaN): the page stays up, says which trial the saved space does not fit,
    and still leaves out what the other trials show was conditional."""
    root = tmp_path / "results"
    exp = write_experiment(root, copy=True)
    damage = [{"lr": "abc"}, {"momentum": 10**400}, {"scheduler": {"a": [1]}}, {"gamma": None},
              {"batch_size": True}, {"optimizer": [1, 2]}, {"width": -1e308}, {"dropout": float("nan")}]
    for i, bad in enumerate(damage):
        path = exp / f"trial_{i:05d}" / "params.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **bad}))
    at = _page(monkeypatch, root)
    assert not at.exception and not at.error, [e.value for e in at.exception]
    (note,) = [str(i.value).replace("\\", "") for i in at.info if "not known" in str(i.value)]
    assert "the saved search space does not fit the config of trial(s) 00002, 00005" in note
    assert "- gamma: always 0.1" in note and "- momentum: always 0.9" in note
    bars = _page_bars(at)
    assert "gamma" not in bars and "momentum" not in bars and "lr" in bars
