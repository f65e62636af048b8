"""Trial explorer: the figure/table functions on a real tiny search and on edge cases, and the
page itself through Streamlit's AppTest (finished search, empty root, a search still being
written, a corrupt checkpoint, a checkpoint outside the results root, the Refresh button,
trial folders and files that lead outside the results root, malformed and bloated result.json)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from dashboard import class_figures, explorer_figures, importance_study, trial_table
from dashboard.common import open_experiment
from search.results import MAX_HISTORY_ROWS, load_experiment
from training.checkpoint import load_checkpoint

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")

# every test here: the page serves on loopback (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("loopback_server")


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tiny(tiny_experiment):
    return load_experiment(tiny_experiment / "tiny")


@pytest.fixture(scope="module")
def best_val(tiny):
    ckpt = load_checkpoint(tiny.best_checkpoint())
    return ckpt["metrics"]["val"], ckpt["classes"]


def make_trials(rows: list[dict]) -> pd.DataFrame:
    """A trials table shaped like search.results' (only the columns the figures use, plus config)."""
    base = {"status": "finished", "best_val_acc": 0.5, "last_val_acc": 0.5, "epochs_run": 2, "max_epochs": 2,
            "stopped_early": False, "diverged": False, "seconds": 1.0, "num_failures": 0, "has_checkpoint": True}
    out = [{"trial_id": f"t{i}", **base, **r} for i, r in enumerate(rows)]
    return pd.DataFrame(out)


def annotation_text(fig: go.Figure) -> str:
    return " ".join(a.text for a in fig.layout.annotations)


def dims(fig: go.Figure) -> dict:
    (trace,) = fig.data
    assert trace.type == "parcoords"
    return {d.label: d for d in trace.dimensions}


# ---------------------------------------------------------------- figures on the real experiment


def test_varying_params_are_the_searched_ones(tiny):
    assert set(trial_table.varying_params(tiny.trials)) == {"config/lr", "config/width", "config/aug_strength"}


def test_parallel_coordinates_real(tiny):
    fig = explorer_figures.parallel_coordinates(tiny.trials)
    d = dims(fig)
    assert list(d) == ["aug_strength", "lr", "width", "best_val_acc"]
    acc = tiny.trials["best_val_acc"].tolist()
    assert list(d["best_val_acc"].values) == pytest.approx(acc)
    assert list(fig.data[0].line.color) == pytest.approx(acc)
    assert list(d["lr"].values) == pytest.approx(tiny.trials["config/lr"].tolist())


def test_param_vs_metric_real(tiny):
    fig = explorer_figures.param_vs_metric(tiny.trials, "lr")
    assert all(t.type == "scatter" and t.mode == "markers" for t in fig.data)
    xs = [x for t in fig.data for x in t.x]
    ys = [y for t in fig.data for y in t.y]
    assert len(xs) == 4
    assert sorted(ys) == pytest.approx(sorted(tiny.trials["best_val_acc"]))
    assert sorted(xs) == pytest.approx(sorted(tiny.trials["config/lr"]))
    assert {t.name for t in fig.data} == set(tiny.trials["status"])
    # lr was sampled from [1e-4, 1e-2], but 4 samples need not span two decades: log only if they do
    lr = tiny.trials["config/lr"]
    assert (fig.layout.xaxis.type == "log") == bool(lr.max() / lr.min() >= 100)


def test_learning_curves_real(tiny):
    ids = tiny.trials["trial_id"].tolist()
    for metric in ("val_acc", "val_loss"):
        fig = explorer_figures.learning_curves(tiny.histories, ids, metric)
        assert [t.name for t in fig.data] == ids
        for t in fig.data:
            h = tiny.histories[t.name]
            assert list(t.x) == h["epoch"].tolist()
            assert list(t.y) == pytest.approx(h[metric].tolist())
        assert metric in fig.layout.yaxis.title.text


def test_asha_milestones_real(tiny):
    fig = explorer_figures.asha_milestones(tiny.trials, tiny.histories)
    (bar,) = fig.data
    assert bar.type == "bar"
    assert list(bar.x) == [1, 2]
    runs = tiny.trials["epochs_run"]
    assert list(bar.y) == [int((runs >= 1).sum()), int((runs >= 2).sum())]
    assert bar.y[0] == 4


def test_param_importance_real(tiny):
    fig = explorer_figures.param_importance(tiny.trials)
    assert fig is not None
    bar, spread = fig.data  # the bars, and where the resamples of the trials put each value
    assert bar.type == "bar" and bar.orientation == "h"
    assert set(bar.y) == {"lr", "width", "aug_strength"}
    assert sum(bar.x) == pytest.approx(1.0)
    assert list(bar.x) == sorted(bar.x)  # least important at the bottom, most important on top
    assert [y for y in spread.y if y is not None] == [y for y in bar.y for _ in range(2)]
    assert "not a supported ranking" in fig.layout.title.text  # 4 trials


def test_per_class_table_real(best_val):
    val, classes = best_val
    df = class_figures.per_class_table(val)
    assert list(df.columns) == ["class", "precision", "recall", "f1", "support"]
    assert df["class"].tolist() == [str(c) for c in classes]
    assert int(df["support"].sum()) == val["n"]
    assert df["recall"].tolist() == pytest.approx([r["recall"] for r in val["per_class"]])


def test_confusion_heatmap_real(best_val):
    val, classes = best_val
    fig = class_figures.confusion_heatmap(val["confusion"], classes)
    (hm,) = fig.data
    assert hm.type == "heatmap"
    z = np.array(hm.z)
    assert z.shape == (len(classes), len(classes))
    assert z.sum() == val["n"]
    assert np.trace(z) == pytest.approx(val["accuracy"] * val["n"])
    assert list(hm.x) == list(hm.y) == [str(c) for c in classes]
    assert fig.layout.xaxis.type == "category"  # '0'..'9' must stay labels, not numbers
    assert fig.layout.yaxis.autorange == "reversed"


def test_confused_pairs_table_real(best_val):
    val, _ = best_val
    df = class_figures.confused_pairs_table(val["most_confused"])
    assert list(df.columns) == ["pair", "mistakes", "detail"]
    assert len(df) == len(val["most_confused"])
    assert df["mistakes"].tolist() == [p["count"] for p in val["most_confused"]]
    first = val["most_confused"][0]
    assert df["pair"][0] == f"{first['a']} ↔ {first['b']}"
    assert f"{first['a_as_b']}× '{first['a']}' read as '{first['b']}'" in df["detail"][0]


# ---------------------------------------------------------------- figures on edge cases


EMPTY = pd.DataFrame(columns=["trial_id", "status", "best_val_acc", "last_val_acc", "epochs_run", "max_epochs",
                              "stopped_early", "diverged", "seconds", "num_failures", "has_checkpoint"])


def test_figures_on_empty_trials():
    assert trial_table.varying_params(EMPTY) == []
    assert "No trial has a validation result" in annotation_text(explorer_figures.parallel_coordinates(EMPTY))
    assert "No trial has a value for lr" in annotation_text(explorer_figures.param_vs_metric(EMPTY, "lr"))
    assert "No trials yet" in annotation_text(explorer_figures.asha_milestones(EMPTY, {}))
    assert "No trial chosen" in annotation_text(explorer_figures.learning_curves({}, [], "val_acc"))
    assert explorer_figures.param_importance(EMPTY) is None
    assert importance_study.importance_inputs(EMPTY)[2] == "there are no trials yet"
    for fig in (explorer_figures.parallel_coordinates(EMPTY), explorer_figures.asha_milestones(EMPTY, {})):
        assert not fig.data


def test_parallel_coordinates_categorical_and_log_axes():
    t = make_trials([
        {"best_val_acc": 0.7, "config/optimizer": "sgd", "config/lr": 1e-5, "config/nesterov": True,
         "config/width": 1.0},
        {"best_val_acc": 0.8, "config/optimizer": "adam", "config/lr": 1e-3, "config/nesterov": False,
         "config/width": 1.0},
        {"best_val_acc": 0.9, "config/optimizer": "sgd", "config/lr": 1e-2, "config/nesterov": True,
         "config/width": 1.0},
    ])
    d = dims(explorer_figures.parallel_coordinates(t))
    assert list(d) == ["optimizer", "lr (log)", "nesterov", "best_val_acc"]  # width does not vary
    assert list(d["optimizer"].ticktext) == ["adam", "sgd"]
    assert list(d["optimizer"].values) == [1, 0, 1]
    assert list(d["optimizer"].tickvals) == [0, 1]
    assert list(d["nesterov"].ticktext) == ["False", "True"]
    assert list(d["lr (log)"].values) == pytest.approx([-5, -3, -2])
    assert d["lr (log)"].ticktext[0] == "1e-05" and d["lr (log)"].ticktext[-1] == "0.01"


def test_parallel_coordinates_nan_single_trial_and_conditional_param():
    t = make_trials([
        {"best_val_acc": 0.6, "config/optimizer": "sgd", "config/momentum": 0.9, "config/lr": 0.01},
        {"best_val_acc": 0.7, "config/optimizer": "adam", "config/momentum": np.nan, "config/lr": 0.02},
        {"best_val_acc": np.nan, "status": "running", "config/optimizer": "adam", "config/momentum": np.nan,
         "config/lr": 0.03},
    ])
    d = dims(explorer_figures.parallel_coordinates(t))
    assert len(d["best_val_acc"].values) == 2  # the running trial has nothing to colour by
    assert list(d["lr"].values) == pytest.approx([0.01, 0.02])
    assert d["momentum"].values[0] == pytest.approx(0.9) and math.isnan(d["momentum"].values[1])

    one = explorer_figures.parallel_coordinates(t.iloc[[0]])
    (trace,) = one.data
    assert [dim.label for dim in trace.dimensions] == ["best_val_acc"]  # nothing varies in one trial
    assert trace.line.cmin < trace.line.cmax
    assert "no hyperparameter differs" in one.layout.title.text


def test_param_vs_metric_log_axis_status_colours_and_nan():
    t = make_trials([
        {"status": "finished", "best_val_acc": 0.9, "config/weight_decay": 1e-6},
        {"status": "stopped", "best_val_acc": 0.5, "config/weight_decay": 1e-4},
        {"status": "stopped", "best_val_acc": 0.4, "config/weight_decay": 1e-3},
        {"status": "diverged", "best_val_acc": np.nan, "config/weight_decay": 1e-2},
    ])
    fig = explorer_figures.param_vs_metric(t, "config/weight_decay")
    assert fig.layout.xaxis.type == "log"
    traces = {tr.name: tr for tr in fig.data}
    assert set(traces) == {"finished", "stopped"}  # the diverged trial has no accuracy to plot
    assert list(traces["stopped"].y) == [0.5, 0.4]
    assert list(traces["stopped"].hovertext) == ["t1", "t2"]  # the trial, named on hover
    assert traces["finished"].marker.color == explorer_figures.STATUS_COLORS["finished"]
    assert traces["stopped"].marker.color != traces["finished"].marker.color

    narrow = explorer_figures.param_vs_metric(make_trials([{"config/lr": 1e-3}, {"config/lr": 5e-3}]), "lr")
    assert narrow.layout.xaxis.type != "log"


def test_param_vs_metric_categorical_and_missing():
    t = make_trials([{"config/model": "resnet", "best_val_acc": 0.8}, {"config/model": "small_cnn"}])
    fig = explorer_figures.param_vs_metric(t, "model")
    assert fig.layout.xaxis.type == "category"
    assert list(fig.data[0].x) == ["resnet", "small_cnn"]
    assert "No trial has a value for dropout" in annotation_text(explorer_figures.param_vs_metric(t, "dropout"))
    no_acc = make_trials([{"config/model": "resnet", "best_val_acc": np.nan}])
    assert "validation result" in annotation_text(explorer_figures.param_vs_metric(no_acc, "model"))


def test_learning_curves_missing_history_nan_and_order():
    histories = {
        "a": pd.DataFrame({"epoch": [2, 1, 3], "val_acc": [0.5, 0.3, np.nan], "val_loss": [1.0, 2.0, np.inf]}),
        "b": pd.DataFrame(),  # started, no epoch yet
        "c": pd.DataFrame({"epoch": [1], "train_loss": [2.0]}),  # no val metrics
    }
    fig = explorer_figures.learning_curves(histories, ["a", "b", "c", "missing"], "val_loss")
    (tr,) = fig.data
    assert tr.name == "a"
    assert list(tr.x) == [1, 2, 3]  # sorted by epoch
    assert tr.y[0] == 2.0 and tr.y[1] == 1.0 and (tr.y[2] is None or math.isnan(tr.y[2]))  # inf is a gap
    assert "b, c, missing" in fig.layout.title.text
    assert "have no validation accuracy yet" in annotation_text(
        explorer_figures.learning_curves(histories, ["b"], "val_acc"))


def test_asha_milestones_successive_halving_and_history_fallback():
    t = make_trials([{"epochs_run": e, "max_epochs": 5} for e in (1, 1, 1, 1, 2, 2, 4)])
    (bar,) = explorer_figures.asha_milestones(t, {}).data
    assert list(bar.x) == [1, 2, 3, 4, 5]  # up to the epoch budget, even if nobody got there
    assert list(bar.y) == [7, 3, 1, 1, 0]

    t = make_trials([{"epochs_run": np.nan, "max_epochs": np.nan}, {"epochs_run": 1, "max_epochs": np.nan}])
    hist = {"t0": pd.DataFrame({"epoch": [1, 2, 3]})}
    (bar,) = explorer_figures.asha_milestones(t, hist).data
    assert list(bar.y) == [2, 1, 1]

    pending = make_trials([{"epochs_run": 0, "max_epochs": np.nan, "status": "pending"}])
    assert "No trial has finished an epoch" in annotation_text(
        explorer_figures.asha_milestones(pending, {"t0": pd.DataFrame()}))


def test_param_importance_needs_three_usable_trials_and_a_varying_param():
    rows = [{"config/lr": lr, "config/width": w, "best_val_acc": a}
            for lr, w, a in ((1e-4, 0.5, 0.3), (1e-3, 1.0, 0.6), (1e-2, 1.5, 0.5))]
    rows += [{"status": "running", "best_val_acc": 0.99, "config/lr": 5e-3, "config/width": 2.0},
             {"status": "error", "best_val_acc": np.nan, "config/lr": 5e-3, "config/width": 2.0}]
    t = make_trials(rows)
    usable, params, reason = importance_study.importance_inputs(t)
    assert reason is None and len(usable) == 3 and params == ["config/lr", "config/width"]
    fig = explorer_figures.param_importance(t)
    assert set(fig.data[0].y) == {"lr", "width"}
    assert "3 trials" in fig.layout.title.text

    two = t.iloc[[0, 1, 3]]  # one of these is running: 2 usable
    assert explorer_figures.param_importance(two) is None
    assert ("at least 3" in importance_study.importance_inputs(two)[2]
            and "are 2" in importance_study.importance_inputs(two)[2])
    same = make_trials([{"config/lr": 1e-3, "best_val_acc": a} for a in (0.1, 0.2, 0.3)])
    assert explorer_figures.param_importance(same) is None
    assert "no hyperparameter differs" in importance_study.importance_inputs(same)[2]


def test_param_importance_categorical_int_and_conditional_params():
    rows = []
    for i in range(8):
        sgd = i % 2 == 0
        rows.append({"config/optimizer": "sgd" if sgd else "adamw", "config/momentum": 0.9 if sgd else np.nan,
                     "config/batch_size": [64, 128][i % 4 // 2], "config/channels_last": i % 3 == 0,
                     "best_val_acc": 0.9 if sgd else 0.2 + 0.01 * i, "status": "stopped" if i > 5 else "finished"})
    values = importance_study.importance_values(make_trials(rows))
    assert set(values) == {"optimizer", "batch_size", "channels_last"}  # momentum is constant where it is set
    assert sum(values.values()) == pytest.approx(1.0)
    assert max(values, key=values.get) == "optimizer"  # it decides the accuracy here


def test_checkpoint_tables_on_missing_metrics():
    df = class_figures.per_class_table(None)
    assert list(df.columns) == ["class", "precision", "recall", "f1", "support"] and df.empty
    assert class_figures.per_class_table({"accuracy": 0.5}).empty
    pairs = class_figures.confused_pairs_table([])
    assert list(pairs.columns) == ["pair", "mistakes", "detail"] and pairs.empty
    partial = class_figures.confused_pairs_table([{"a": "O", "b": "0", "count": 3}])
    assert partial["mistakes"].tolist() == [3] and "?× 'O' read as '0'" in partial["detail"][0]
    for bad in (None, [], [[1, 2, 3]], [[1, 2], [3]]):
        fig = class_figures.confusion_heatmap(bad, ["a", "b"])
        assert not fig.data and "no confusion matrix" in annotation_text(fig)
    fig = class_figures.confusion_heatmap([[3, 1], [0, 4]], ["only-one-name"])
    assert list(fig.data[0].x) == ["0", "1"]  # class names that do not fit: indices instead
    assert np.array(fig.data[0].customdata)[0] == pytest.approx([0.75, 0.25])  # row shares for hover


# ---------------------------------------------------------------- the page (AppTest)


@pytest.fixture
def app(monkeypatch):
    """AppTest of dashboard/app.py over a given results root. The Predictor page is another module;
    if it is not there yet, a stand-in lets app.py import (this page is the default one)."""
    from streamlit.testing.v1 import AppTest

    if importlib.util.find_spec("dashboard.predictor") is None:
        import dashboard

        stub = types.ModuleType("dashboard.predictor")
        stub.render = lambda root, name: None
        monkeypatch.setitem(sys.modules, "dashboard.predictor", stub)
        monkeypatch.setattr(dashboard, "predictor", stub, raising=False)

    def make(root: Path) -> AppTest:
        monkeypatch.setenv("EMNIST_TUNE_RESULTS", str(root))
        return AppTest.from_file(APP, default_timeout=60)

    return make


def no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not [e.value for e in at.error], [e.value for e in at.error]


def table_with(at, column: str) -> pd.DataFrame:
    found = [d.value for d in at.dataframe if column in d.value.columns]
    assert found, f"no table with a {column!r} column; tables: {[list(d.value.columns) for d in at.dataframe]}"
    return found[0]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


@pytest.fixture
def copy_of_tiny(tiny_experiment, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(tiny_experiment / "tiny", root / "tiny")
    return root


def test_page_on_finished_search(app, tiny_experiment, tiny):
    at = app(tiny_experiment).run()
    no_exception(at)
    trials = table_with(at, "trial_id")
    assert len(trials) == 4
    assert set(trials["trial_id"]) == set(tiny.trials["trial_id"])
    assert trials["trial_id"][0] == tiny.best_trial  # best first
    assert {"lr", "width", "aug_strength", "best_val_acc", "stopped_early", "seconds"} <= set(trials.columns)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Trials"] == "4" and metrics["Best trial"] == tiny.best_trial
    assert int(metrics["Finished"]) == int((tiny.trials["status"] == "finished").sum())
    assert len(at.get("plotly_chart")) == 7  # parcoords, param vs acc, importance, 2 curves, ASHA, confusion

    assert at.selectbox(key="explorer_trial").value == tiny.best_trial
    per_class = table_with(at, "precision")
    assert len(per_class) == 10
    assert len(table_with(at, "pair")) > 0
    assert at.multiselect(key="explorer_curve_trials").value[0] == tiny.best_trial

    # another trial: its own checkpoint's numbers
    other = next(t for t in tiny.trials["trial_id"] if t != tiny.best_trial)
    at.selectbox(key="explorer_trial").select(other).run()
    no_exception(at)
    expected = load_checkpoint(tiny.best_checkpoint(other))["metrics"]["val"]
    assert table_with(at, "precision")["recall"].tolist() == pytest.approx([r["recall"] for r in expected["per_class"]])
    assert f"Best checkpoint of trial {other}" in texts(at.caption)

    # filters and the hyperparameter picker
    at.selectbox(key="explorer_param").select("width").run()
    no_exception(at)
    at.slider(key="explorer_min_acc").set_value(1.0).run()
    assert len(table_with(at, "trial_id")) == 0
    at.slider(key="explorer_min_acc").set_value(0.0).run()
    status = tiny.trials["status"].iloc[0]
    at.multiselect(key="explorer_status_filter").select(status).run()
    assert len(table_with(at, "trial_id")) == int((tiny.trials["status"] == status).sum())
    at.toggle(key="explorer_auto_refresh").set_value(True).run()
    no_exception(at)


def test_a_budgeted_search_shows_its_time_spent_and_left(app, copy_of_tiny):
    """The explorer's line for a time-budgeted search: spent and left, counting on while its driver's heartbeat is
    fresh (a search still running), and as recorded once it has ended."""
    import json
    import re
    import time

    from search.ledger import BUDGET_FILE

    path = copy_of_tiny / "tiny" / BUDGET_FILE
    now = time.time()
    path.write_text(json.dumps({"budget_s": 600, "sessions": [{"started": now - 100, "seconds": 98}]}))
    at = app(copy_of_tiny).run()
    no_exception(at)
    line = next(c for c in texts(at.caption).splitlines() if c.startswith("Time budget"))
    assert re.fullmatch(r"Time budget 10 min 00 s: 1 min \d\d s spent, 8 min \d\d s left \(running: refresh to "
                        r"follow it\)\.", line), line
    path.write_text(json.dumps({"budget_s": 600, "sessions": [{"started": now - 1000, "seconds": 620}]}))
    at = app(copy_of_tiny).run()
    line = next(c for c in texts(at.caption).splitlines() if c.startswith("Time budget"))
    assert line == "Time budget 10 min 00 s: 10 min 20 s spent, 20 s over.", line
    path.write_text("{damaged")
    at = app(copy_of_tiny).run()
    no_exception(at)
    assert "Time budget" not in texts(at.caption)


def test_refresh_button_rereads_the_experiment(app, copy_of_tiny, monkeypatch):
    from dashboard import explorer

    # Without the file fingerprint, only the Refresh button can invalidate the cached experiment.
    monkeypatch.setattr(explorer, "_fingerprint", lambda path: ())
    at = app(copy_of_tiny).run()
    assert len(table_with(at, "trial_id")) == 4
    (copy_of_tiny / "tiny" / "trial_new0001").mkdir()
    at.run()
    assert len(table_with(at, "trial_id")) == 4  # cached
    at.button(key="explorer_refresh_button").click().run()
    no_exception(at)
    table = table_with(at, "trial_id")
    assert len(table) == 5
    assert table.set_index("trial_id").loc["new0001", "status"] == "pending"


def test_new_results_are_picked_up_without_refresh(app, copy_of_tiny):
    at = app(copy_of_tiny).run()
    assert len(table_with(at, "trial_id")) == 4
    (copy_of_tiny / "tiny" / "trial_new0002").mkdir()
    at.run()
    assert len(table_with(at, "trial_id")) == 5


def test_empty_results_root(app, tmp_path):
    at = app(tmp_path).run()
    assert not at.exception
    assert "No experiments under the results root" in texts(at.info)


def test_experiment_without_trials(app, tmp_path):
    (tmp_path / "starting").mkdir()
    (tmp_path / "starting" / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    at = app(tmp_path).run()
    no_exception(at)
    assert "has no trials yet" in texts(at.info)


def test_experiment_being_written(app, copy_of_tiny, tiny):
    exp_dir = copy_of_tiny / "tiny"
    cut, no_ckpt = tiny.best_trial, next(t for t in tiny.trials["trial_id"] if t != tiny.best_trial)
    result = exp_dir / f"trial_{cut}" / "result.json"
    text = result.read_text()
    result.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 40])  # last line cut mid-way
    for d in (exp_dir / f"trial_{no_ckpt}").glob("checkpoint_*"):
        shutil.rmtree(d)
    (exp_dir / "trial_zzz").mkdir()
    expected = load_experiment(exp_dir).trials.set_index("trial_id")

    at = app(copy_of_tiny).run()
    no_exception(at)
    table = table_with(at, "trial_id").set_index("trial_id")
    assert len(table) == 5
    assert table.loc["zzz", "status"] == "pending"
    assert table.loc[cut, "epochs_run"] == 1  # the half-written epoch 2 is not there yet
    assert (table["status"] == expected.loc[table.index, "status"]).all()
    assert not table.loc[no_ckpt, "has_checkpoint"]

    at.selectbox(key="explorer_trial").select(no_ckpt).run()
    no_exception(at)
    assert f"Trial {no_ckpt} has no checkpoint on disk" in texts(at.info)
    assert not [d for d in at.dataframe if "precision" in d.value.columns]

    at.selectbox(key="explorer_trial").select("zzz").run()
    no_exception(at)
    assert "Trial zzz has not started yet" in texts(at.info)

    at.selectbox(key="explorer_trial").select(cut).run()  # still has its epoch-1 checkpoint
    no_exception(at)
    assert len(table_with(at, "precision")) == 10


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_corrupt_checkpoint(app, copy_of_tiny, tiny, damage):
    best = tiny.best_trial
    paths = [copy_of_tiny / "tiny" / Path(p).relative_to(tiny.path) for p in tiny.checkpoints[best]["path"]]
    newest_best = copy_of_tiny / "tiny" / tiny.best_checkpoint(best).relative_to(tiny.path)

    def spoil(path):
        data = path.read_bytes()
        half = len(data) // 2
        path.write_bytes(data[:half] if damage == "truncated" else b"\x00garbage" * 64 + data[half:])

    # The best checkpoint damaged: the page falls back to the trial's other readable checkpoint, if any.
    spoil(newest_best)
    at = app(copy_of_tiny).run()
    no_exception(at)
    assert at.selectbox(key="explorer_trial").value == best
    if len(paths) > 1:
        assert len(table_with(at, "precision")) == 10
    # Every checkpoint of the trial damaged: a clear message instead of per-class tables.
    for path in paths:
        if path != newest_best:
            spoil(path)
    at = app(copy_of_tiny).run()
    no_exception(at)
    shown = texts(at.info) + texts(at.warning)
    assert f"Trial {best}" in shown and "Traceback" not in shown
    assert not [d for d in at.dataframe if "precision" in d.value.columns]
    assert len(table_with(at, "trial_id")) == 4  # the rest of the page is there

    other = next(t for t in tiny.trials["trial_id"] if t != best)
    at.selectbox(key="explorer_trial").select(other).run()
    no_exception(at)
    assert len(table_with(at, "precision")) == 10


def test_checkpoint_outside_results_root_is_not_opened(app, copy_of_tiny, tiny, tmp_path):
    best = tiny.best_trial
    for i, listed in enumerate(tiny.checkpoints[best]["path"]):  # every checkpoint of the best trial
        path = copy_of_tiny / "tiny" / Path(listed).relative_to(tiny.path)
        outside = tmp_path / f"elsewhere{i}.pt"
        shutil.copy(path, outside)
        path.unlink()
        path.symlink_to(outside)
    at = app(copy_of_tiny).run()
    assert not at.exception
    assert f"The checkpoint of trial {best} is outside the results root" in texts(at.error)
    assert "leads outside the results root" in texts(at.warning)
    assert not [d for d in at.dataframe if "precision" in d.value.columns]
    assert open_experiment(copy_of_tiny, "tiny").checkpoints[best].empty  # never offered to the predictor


# ---------------------------------------------------------------- paths outside the results root


def page_text(at) -> str:
    """Everything the page sent to the browser (every element's message, tables included)."""
    out = []

    def walk(node):
        if getattr(node, "proto", None) is not None:
            out.append(str(node.proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    out += [d.value.to_csv() for d in at.dataframe]
    return "\n".join(out)


SECRET = "TOPSECRET-7d1f"


def plant_secret_trial(trial: Path, folder: Path) -> Path:
    """A copy of a trial folder at `folder` whose params.json and result.json carry SECRET (and the
    best accuracy of all, so the page would put it first)."""
    shutil.copytree(trial, folder)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "model": SECRET}))
    rows = [json.loads(x) for x in (folder / "result.json").read_text().splitlines()]
    (folder / "result.json").write_text("".join(json.dumps({**r, "val_acc": 0.999, "note": SECRET}) + "\n"
                                                for r in rows))
    return folder


def test_trial_folder_outside_the_root_is_not_read(app, copy_of_tiny, tiny, tmp_path):
    exp_dir = copy_of_tiny / "tiny"
    outside = plant_secret_trial(exp_dir / f"trial_{tiny.best_trial}", tmp_path / "outside" / "trial_leak")
    (exp_dir / "trial_leak").symlink_to(outside, target_is_directory=True)
    at = app(copy_of_tiny).run()
    no_exception(at)
    assert SECRET not in page_text(at)
    assert set(table_with(at, "trial_id")["trial_id"]) == set(tiny.trials["trial_id"])
    assert "trial leak was not read" in texts(at.warning) and "outside the results root" in texts(at.warning)
    exp = open_experiment(copy_of_tiny, "tiny")
    assert "leak" in exp.refused and "leak" not in exp.checkpoints and "leak" not in set(exp.trials["trial_id"])


def test_files_of_a_trial_outside_the_root_are_not_read(app, copy_of_tiny, tiny, tmp_path):
    """params.json and result.json symlinked out of the root, and a trial id in the experiment state
    that climbs out of its folder: nothing of them reaches the page."""
    exp_dir = copy_of_tiny / "tiny"
    secret = plant_secret_trial(exp_dir / f"trial_{tiny.best_trial}", tmp_path / "outside" / "trial_x")
    victim = next(t for t in tiny.trials["trial_id"] if t != tiny.best_trial)
    for name in ("params.json", "result.json"):
        (exp_dir / f"trial_{victim}" / name).unlink()
        (exp_dir / f"trial_{victim}" / name).symlink_to(secret / name)
    climbing = f"{victim}/../../../outside/trial_x"
    state_file = sorted(exp_dir.glob("experiment_state-*.json"))[-1]
    state = json.loads(state_file.read_text())
    entry = state["trial_data"][0]
    info = json.loads(entry[0]) if isinstance(entry[0], str) else dict(entry[0])
    state["trial_data"].append([json.dumps({**info, "trial_id": climbing}), entry[1]])
    state_file.write_text(json.dumps(state))
    at = app(copy_of_tiny).run()
    no_exception(at)
    assert SECRET not in page_text(at)
    table = table_with(at, "trial_id").set_index("trial_id")
    assert set(table.index) == set(tiny.trials["trial_id"])
    assert table.loc[victim, "epochs_run"] == 0
    warning = texts(at.warning)
    assert f"trial {victim}: params.json leads outside" in warning.replace("\\", "")
    assert f"trial {victim}: result.json leads outside" in warning.replace("\\", "")


def test_symlinks_inside_the_root_are_followed(app, copy_of_tiny, tiny):
    """A trial folder kept elsewhere under the same results root (moved to another disk layout, say)."""
    exp_dir = copy_of_tiny / "tiny"
    moved = next(t for t in tiny.trials["trial_id"] if t != tiny.best_trial)
    (copy_of_tiny / "store").mkdir()
    shutil.move(exp_dir / f"trial_{moved}", copy_of_tiny / "store" / f"trial_{moved}")
    (exp_dir / f"trial_{moved}").symlink_to(copy_of_tiny / "store" / f"trial_{moved}", target_is_directory=True)
    at = app(copy_of_tiny).run()
    no_exception(at)
    assert not at.warning
    table = table_with(at, "trial_id").set_index("trial_id")
    assert len(table) == 4 and table.loc[moved, "best_val_acc"] == pytest.approx(
        float(tiny.trials.set_index("trial_id").loc[moved, "best_val_acc"]))
    at.selectbox(key="explorer_trial").select(moved).run()
    no_exception(at)
    assert len(table_with(at, "precision")) == 10


# ---------------------------------------------------------------- malformed and bloated result.json


BAD_LINES = [
    '{"epoch": 1, "val_acc": "0.9"}',  # a string where a number belongs
    '{"epoch": 1, "val_acc": "NaN"}',
    '{"epoch": ' + "9" * 5000 + ', "val_acc": 0.5}',  # too long for Python's int()
    '{"epoch": 1, "val_loss": ' + "1" * 400 + '}',  # an int beyond float range
    '{"epoch": 1, "val_acc": 1e999}',  # inf
    '{"epoch": 1e300, "val_acc": 0.5}',
    '{"epoch": "three"}',
    '{"epoch": 1, "val_acc": {"a": 1}}',
    '{"epoch": 1, "val_acc": [0.5]}',
    '{"epoch": 1, "val_acc": true}',
    '{"epoch": 1, "done": "yes"}',
    '{"epoch": 1, "checkpoint_dir_name": ["checkpoint_000000"]}',
    "[1, 2]",
    '"just a string"',
    "[" * 100000 + "]" * 100000,  # nesting too deep for the JSON parser
    "not json at all",
]


def test_malformed_result_lines_are_skipped(app, copy_of_tiny, tiny):
    exp_dir = copy_of_tiny / "tiny"
    victim = tiny.best_trial
    result = exp_dir / f"trial_{victim}" / "result.json"
    lines = result.read_text().splitlines()
    result.write_text("\n".join(lines[:1] + BAD_LINES + lines[1:]) + "\n")
    # and a params.json with values no table column holds
    other = next(t for t in tiny.trials["trial_id"] if t != victim)
    params = exp_dir / f"trial_{other}" / "params.json"
    params.write_text(json.dumps({**json.loads(params.read_text()), "seed": 10**30, "huge": 10**400,
                                  "epochs": "lots", "width": {"nested": [1, 2]}, "tags": ["a", {"b": None}]}))

    exp = load_experiment(exp_dir)
    before = tiny.trials.set_index("trial_id")
    row = exp.trials.set_index("trial_id").loc[victim]
    assert row["best_val_acc"] == pytest.approx(before.loc[victim, "best_val_acc"])
    assert row["epochs_run"] == before.loc[victim, "epochs_run"] and row["status"] == before.loc[victim, "status"]
    assert exp.histories[victim]["epoch"].tolist() == tiny.histories[victim]["epoch"].tolist()
    assert exp.notes[victim] == [f"{len(BAD_LINES)} malformed line(s) of result.json skipped"]

    at = app(copy_of_tiny).run()
    no_exception(at)
    table = table_with(at, "trial_id")
    assert set(table["trial_id"]) == set(tiny.trials["trial_id"]) and table["trial_id"][0] == victim
    assert f"{len(BAD_LINES)} malformed line" in texts(at.warning)
    assert len(at.get("plotly_chart")) == 7
    for tid in (other, victim):
        at.selectbox(key="explorer_trial").select(tid).run()
        no_exception(at)
    for param in at.selectbox(key="explorer_param").options:
        at.selectbox(key="explorer_param").select(param).run()
        no_exception(at)


def test_malformed_experiment_state_entry_is_skipped(app, copy_of_tiny, tiny):
    """A number too long for int() in one trial's entry of the experiment state, another entry not a pair: both
    entries are skipped and counted (the trials are still read from their folders), the page says so and shows
    the experiment."""
    exp_dir = copy_of_tiny / "tiny"
    state_file = sorted(exp_dir.glob("experiment_state-*.json"))[-1]
    state = json.loads(state_file.read_text())
    state["trial_data"][0][0] = '{"trial_id": "x", "status": ' + "9" * 5000 + "}"
    state["trial_data"].append(["only one part"])
    state_file.write_text(json.dumps(state))
    exp = load_experiment(exp_dir)
    assert set(exp.trials["trial_id"]) == set(tiny.trials["trial_id"])
    assert exp.state_notes == ["2 malformed trial entries of the experiment state skipped"]
    assert tiny.state_notes == []  # (the experiment as it was: nothing skipped, no note)
    at = app(copy_of_tiny).run()
    no_exception(at)
    assert "2 malformed trial entries of the experiment state skipped" in texts(at.warning)
    assert set(table_with(at, "trial_id")["trial_id"]) == set(tiny.trials["trial_id"])


def _bytes_read() -> int:
    """What this process has read through read() so far (Linux: /proc/self/io rchar)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")).split()[1])


def test_bloated_result_json_is_read_bounded(app, copy_of_tiny, tiny):
    """100,000 lines (23 MB) in one trial's result.json: at most MAX_RESULT_BYTES of it are read (its head and
    tail), at most MAX_HISTORY_ROWS rows kept, with the first, the last and the best of those read; the note says
    so; the trial and the rest of the experiment are shown on the page."""
    from search.layout import MAX_RESULT_BYTES

    exp_dir = copy_of_tiny / "tiny"
    victim = next(t for t in tiny.trials["trial_id"] if t != tiny.best_trial)
    n, best, pad = 100_000, 10_001, "x" * 120  # (the best row is in the head that is read, not a kept stride)
    path = exp_dir / f"trial_{victim}" / "result.json"
    with path.open("w") as f:
        for i in range(1, n + 1):
            f.write(json.dumps({"epoch": i, "training_iteration": i, "val_acc": 0.2 + 0.7 * (i == best),
                                "val_loss": 1.0, "time_total_s": float(i), "done": i == n, "pad": pad}) + "\n")
    assert path.stat().st_size > 2.5 * MAX_RESULT_BYTES
    load_experiment(copy_of_tiny / "nothing-here")  # (first-call imports are not what is measured)
    before = _bytes_read()
    exp = load_experiment(exp_dir)
    read = _bytes_read() - before
    others = sum(p.stat().st_size for p in exp_dir.rglob("*") if p.is_file() and p.suffix != ".pt" and p != path)
    assert read <= MAX_RESULT_BYTES + others, (read, MAX_RESULT_BYTES, others)
    history = exp.histories[victim]
    assert 100 < len(history) <= MAX_HISTORY_ROWS
    assert history["epoch"].iloc[-1] == n and history["epoch"].iloc[0] == 1 and history["epoch"].is_monotonic_increasing
    assert best in set(history["epoch"]) and history["val_acc"].max() == pytest.approx(0.9)
    assert (best - 1) not in set(history["epoch"]) or (best + 1) not in set(history["epoch"])  # (it was thinned)
    row = exp.trials.set_index("trial_id").loc[victim]
    assert row["epochs_run"] == n and row["status"] == "finished" and row["seconds"] == float(n)
    assert row["best_val_acc"] == pytest.approx(0.9)
    assert " of them" in " ".join(exp.notes[victim]) and "only its first and last" in " ".join(exp.notes[victim])
    for tid in tiny.trials["trial_id"]:  # the other trials as they were
        if tid != victim:
            assert exp.histories[tid]["epoch"].tolist() == tiny.histories[tid]["epoch"].tolist()

    at = app(copy_of_tiny).run()
    no_exception(at)
    assert set(table_with(at, "trial_id")["trial_id"]) == set(tiny.trials["trial_id"])
    at.multiselect(key="explorer_curve_trials").set_value(list(tiny.trials["trial_id"])).run()
    no_exception(at)
    asha = explorer_figures.asha_milestones(exp.trials, exp.histories)
    assert len(asha.data[0].x) <= explorer_figures.MAX_BARS and asha.data[0].x[-1] == n
    curve = explorer_figures.learning_curves(exp.histories, [victim], "val_acc")
    assert len(curve.data[0].x) <= MAX_HISTORY_ROWS and curve.layout.xaxis.dtick is None
