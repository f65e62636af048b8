"""Final model page (dashboard/final.py) and the final model in the predictor: the figures built from
summary.json's "final" entry, and the pages through AppTest over synthetic experiment folders (a
summary.json with the schema search/final.py writes, a real final/model.pt made by
training.ensemble.save_model). No search runs here except the shared tiny one for the predictor."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard import final as final_page
from dashboard import final_figures
from dashboard import predictor as page
from dashboard.common import ENV_RESULTS, open_experiment
from training.checkpoint import load_checkpoint, save_checkpoint, save_model

pytestmark = pytest.mark.usefixtures("loopback_server")

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboard" / "app.py")
CLASSES = [str(d) for d in range(10)]


# ---------------------------------------------------------------- a synthetic final stage


def _result(label: str, acc: float, f1: list[float], **extra) -> dict:
    return {"label": label, "accuracy": acc, "ci95": [acc - 0.01, acc + 0.01], "n": 2000,
            "per_class": [{"class": c, "precision": f, "recall": f, "f1": f, "support": 200}
                          for c, f in zip(CLASSES, f1, strict=True)],
            "most_confused": [{"a": "7", "b": "1", "count": 9, "a_as_b": 6, "b_as_a": 3},
                              {"a": "5", "b": "3", "count": 4, "a_as_b": 1, "b_as_a": 3}], **extra}


F1 = {
    "single": [0.90, 0.95, 0.80, 0.85, 0.91, 0.70, 0.93, 0.88, 0.86, 0.89],
    "ensemble": [0.92, 0.96, 0.83, 0.86, 0.92, 0.74, 0.94, 0.90, 0.88, 0.90],
    "refit": [0.93, 0.97, 0.84, 0.88, 0.93, 0.76, 0.95, 0.91, 0.89, 0.91],
}


def final_entry() -> dict:
    """summary.json's "final", all three models tested, the refit ensemble delivered."""
    return {
        "model": "/somewhere/else/final/model.pt",  # never opened: the page reads final/model.pt
        "delivered": "refit ensemble of 3",
        "selection": {"metric": "val_acc", "chosen_k": 3, "ensemble_pays": True,
                      "val_acc_by_k": {"1": 0.9051, "2": 0.9070, "3": 0.9082},
                      "candidates": [{"trial_id": t, "val_acc": a} for t, a in
                                     (("a1b2c3", 0.9051), ("d4e5f6", 0.903), ("g7h8i9", 0.901))]},
        "refit": {"epochs": 12, "seeds": 1, "members": [{"trial_id": t, "seed": 0, "refit_trial": f"r{i}"}
                                                        for i, t in enumerate(["a1b2c3", "d4e5f6", "g7h8i9"])]},
        "test": {"single": _result("best single trial a1b2c3", 0.9052, F1["single"]),
                 "ensemble": _result("ensemble of 3", 0.9071, F1["ensemble"], members=["a1b2c3", "d4e5f6", "g7h8i9"]),
                 "refit": _result("refit ensemble of 3", 0.9082, F1["refit"])},
        "test_trials": [{"trial_id": "a1b2c3", "val_acc": 0.9051, "accuracy": 0.9052, "ci95": [0.9, 0.91],
                         "f1": dict(zip(CLASSES, F1["single"], strict=True))},
                        {"trial_id": "d4e5f6", "val_acc": 0.903, "accuracy": 0.904, "ci95": [0.9, 0.91],
                         "f1": {c: 0.5 for c in CLASSES[:9]}}],  # no value for class 9
    }


def _png(path: Path) -> None:
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(path)


def make_experiment(root: Path, final: object = None, name: str = "exp", files: bool = True) -> Path:
    """An experiment folder the dashboard lists (an experiment state, no trials), with a summary.json
    whose "final" is `final` (None: no "final" key) and, with files, final/report.md and the PNG."""
    exp = root / name
    exp.mkdir(parents=True)
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    summary = {"experiment": name, "best_trial": "a1b2c3", "test_acc": 0.9052}
    if final is not None:
        summary["final"] = final
    (exp / "summary.json").write_text(json.dumps(summary))
    if files:
        (exp / "final").mkdir()
        (exp / "final" / "report.md").write_text("# Final model\n\nThe refit ensemble wins.\n\n"
                                                 "![pairs](confused_pairs.png) ![x](https://example.com/t.png)\n")
        _png(exp / "final" / "confused_pairs.png")
    return root


def _app(monkeypatch, root: Path, page_name: str = "Final model") -> AppTest:
    monkeypatch.setenv(ENV_RESULTS, str(root))
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.sidebar.radio[0].set_value(page_name).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _table(at: AppTest, column: str):
    """The first table with this column (AppTest does not expose a dataframe's key)."""
    found = [d.value for d in at.dataframe if column in d.value.columns]
    assert found, [list(d.value.columns) for d in at.dataframe]
    return found[0]


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


# ---------------------------------------------------------------- figures


def test_f1_heatmap_one_row_per_model_one_column_per_class():
    final = final_entry()
    matrix = final_figures.f1_matrix(final)
    fig = final_figures.f1_heatmap(matrix)
    heat = fig.data[0]
    assert list(heat.y) == ["single: best single trial a1b2c3", "ensemble: ensemble of 3",
                            "refit (delivered): refit ensemble of 3", "trial a1b2c3", "trial d4e5f6"]
    assert list(heat.x) == CLASSES
    z = np.array(heat.z, dtype=float)
    assert z.shape == (5, 10)
    for row, key in enumerate(("single", "ensemble", "refit")):
        assert z[row] == pytest.approx(F1[key])
    assert z[3] == pytest.approx(F1["single"])
    assert z[4, :9] == pytest.approx([0.5] * 9) and math.isnan(z[4, 9])  # missing: NaN (an empty cell), not 0
    assert heat.texttemplate == "%{z:.2f}" and "F1" in heat.hovertemplate
    # The hardest classes: lowest mean F1 over the models (5 and 2 here), in class order.
    assert final_figures.hardest_classes(matrix, 2) == ["2", "5"]
    assert list(final_figures.f1_heatmap(matrix[["2", "5"]]).data[0].x) == ["2", "5"]


def test_final_figures_and_tables():
    final = final_entry()
    assert final_figures.delivered_key(final) == "refit"
    table = final_figures.final_results_table(final)
    assert table["model"].tolist() == ["single", "ensemble", "refit"]
    assert table["delivered"].tolist() == [False, False, True]
    assert table["test acc"].tolist() == pytest.approx([0.9052, 0.9071, 0.9082])
    fig = final_figures.final_accuracy_figure(final)
    assert list(fig.data[0].x) == ["single", "ensemble", "refit (delivered)"]
    assert list(fig.data[0].error_y.array) == pytest.approx([0.01] * 3)
    sel = final_figures.selection_by_k(final)
    assert sel["k"].tolist() == [1, 2, 3] and sel["chosen"].tolist() == [False, False, True]
    assert len(final_figures.selection_figure(final).data[0].x) == 3
    assert final_figures.top_trials_table(final)["trial"].tolist() == ["a1b2c3", "d4e5f6"]


@pytest.mark.parametrize("delivered, present, expected", [
    ("refit", ("single", "refit"), "refit"),
    ("refit of the best config", ("single", "ensemble", "refit"), "refit"),
    ("none: no refit finished", ("single", "ensemble"), None),
    ("ensemble of 3", ("single", "ensemble"), "ensemble"),
    ("best single trial a1b2c3", ("single",), "single"),
    ("refit ensemble of 3", ("single",), None),  # the delivered model was not tested
    (None, ("single", "ensemble", "refit"), None),
])
def test_delivered_key(delivered, present, expected):
    final = final_entry()
    final["delivered"] = delivered
    final["test"] = {k: v for k, v in final["test"].items() if k in present}
    assert final_figures.delivered_key(final) == expected


def test_delivered_kind_wins_over_the_words():
    final = final_entry()
    final["delivered"], final["delivered_kind"] = "best single trial a1b2c3 (no refit finished)", "single"
    assert final_figures.delivered_key(final) == "single"
    final["delivered_kind"] = "refit"  # not among the tested models: the words decide
    final["test"].pop("refit")
    assert final_figures.delivered_key(final) == "single"


def test_a_whole_record_says_which_model_was_delivered(tmp_path):
    """summary.json's "final" as the final stage writes it (search.final_report.FinalReport): the page takes which
    model final/model.pt is from the record's delivered_kind, whatever its words say; an entry that is not a whole
    record (an older or hand-edited summary) has none, and the page falls back on its words."""
    from dashboard.final_summary import read_final
    from tests.test_records import report

    final = report().to_json()
    final["delivered"] = "the ensemble of the best single trials"  # words that would make a guess say "ensemble"
    state = read_final(make_experiment(tmp_path / "results", final), "exp")
    assert state.kind == "refit"
    assert read_final(make_experiment(tmp_path / "older", final_entry()), "exp").kind is None


@pytest.mark.parametrize("final", [
    None, [], "x", {"test": "junk"}, {"test": {"single": 3, "refit": {"accuracy": "hi"}}},
    {"selection": {"val_acc_by_k": {"one": "x", "2": None}}, "test_trials": [1, {"f1": 2}]},
])
def test_final_figures_on_malformed_entries(final):
    """Anything summary.json may hold: empty tables and figures that say so, never an exception."""
    final_figures.final_results_table(final)
    final_figures.top_trials_table(final)
    assert final_figures.selection_by_k(final).empty
    for fig in (final_figures.final_accuracy_figure(final), final_figures.selection_figure(final),
                final_figures.f1_heatmap(final_figures.f1_matrix(final))):
        assert not fig.data and fig.layout.annotations


# ---------------------------------------------------------------- the page


def test_page_all_three_models(monkeypatch, tmp_path):
    at = _app(monkeypatch, make_experiment(tmp_path / "results", final_entry()))
    assert not at.error, _texts(at.error)
    assert [h.value for h in at.header] == ["Final model · exp"]
    metrics = {m.label: m.value for m in at.metric}
    assert "**final/model.pt** is the refit ensemble of 3 (refit)." in _texts(at.markdown)
    assert metrics["Test accuracy"] == "0.9082"
    assert metrics["95 % CI"] == "0.8982 – 0.9182" and metrics["Test images"] == "2,000"
    assert metrics["Chosen k"] == "3" and metrics["Ensemble pays"] == "yes"
    results = _table(at, "delivered")
    assert results["model"].tolist() == ["single", "ensemble", "refit"]
    assert results["delivered"].tolist() == [False, False, True]
    assert len(at.get("plotly_chart")) == 3  # test accuracy, selection by k, per-class F1
    assert at.selectbox(key="final_pairs_model:exp").value == "refit"
    assert _table(at, "pair")["pair"].tolist() == ["7 ↔ 1", "5 ↔ 3"]
    assert [c for img in at.get("image") for c in img.captions] == ["final/confused_pairs.png"]
    report = [m.value for m in at.markdown if "The refit ensemble wins" in m.value]
    assert report and "https://example.com" not in report[0] and "](confused_pairs.png)" not in report[0]
    assert "Not in this run" not in _texts(at.caption)
    assert "The Predictor page offers it" not in _texts(at.caption)  # no final/model.pt here
    assert "final/model.pt is missing" in _texts(at.warning)


def test_page_only_some_models(monkeypatch, tmp_path):
    final = final_entry()
    final["delivered"] = "best single trial a1b2c3"
    del final["test"]["ensemble"], final["test"]["refit"]
    final["selection"].update(chosen_k=1, ensemble_pays=False)
    # the refit's record as search/final.py writes it today, and a refit that failed
    final["refit"] = {"epochs_mode": "best", "seeds": 1, "finished": 0,
                      "members": [{"source_trial": "a1b2c3", "seed_index": 0, "epochs": 7}]}
    final["problems"] = ["refit r0 (from trial a1b2c3, seed +0): diverged"]
    at = _app(monkeypatch, make_experiment(tmp_path / "results", final, files=False))
    assert not at.error, _texts(at.error)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Test accuracy"] == "0.9052" and metrics["Ensemble pays"] == "no"
    assert _table(at, "delivered")["delivered"].tolist() == [True]
    assert _table(at, "source_trial")["epochs"].tolist() == ["7"]
    assert "reported problems" in _texts(at.warning) and "diverged" in _texts(at.warning)
    captions = _texts(at.caption)
    assert "Not in this run: no ensemble" in captions and "no refit" in captions
    assert "confused_pairs.png is not there" in captions and "report.md is not there" in captions
    assert len(at.get("plotly_chart")) == 3


def test_page_many_classes_can_show_only_the_hardest(monkeypatch, tmp_path):
    """bymerge has 47 classes: the heatmap can be narrowed to the 15 with the lowest mean F1."""
    classes = CLASSES + [chr(c) for c in range(ord("A"), ord("A") + 37)]
    per_class = [{"class": c, "f1": f} for c, f in zip(classes, np.linspace(0.5, 1.0, len(classes)), strict=True)]
    final = final_entry()
    final["test"] = {"refit": {"accuracy": 0.9, "per_class": per_class}}
    final["test_trials"] = []
    at = _app(monkeypatch, make_experiment(tmp_path / "results", final, files=False))
    heat = json.loads(at.get("plotly_chart")[-1].proto.spec)["data"][0]
    assert len(heat["x"]) == 47 and "texttemplate" not in heat  # too many classes to write F1 in the cells
    radio = at.radio(key="final_f1_classes:exp")
    radio.set_value(radio.options[1]).run()
    assert json.loads(at.get("plotly_chart")[-1].proto.spec)["data"][0]["x"] == classes[:15]


def test_page_without_final_shows_the_command(monkeypatch, tmp_path):
    root = make_experiment(tmp_path / "results", None, files=False)
    at = _app(monkeypatch, root)
    assert not at.error
    assert "has no final model yet" in _texts(at.info)
    assert [c.value for c in at.code] == [f"python search/final.py --name exp --storage {root.resolve()}"]
    assert final_page.final_command(final_page.DEFAULT_STORAGE, "my run") == "python search/final.py --name 'my run'"
    # No summary.json at all (a search still running): the same command.
    (root / "exp" / "summary.json").unlink()
    at.run()
    assert "no summary.json yet" in _texts(at.info) and len(at.code) == 1


def test_page_malformed_final_never_crashes(monkeypatch, tmp_path):
    root = make_experiment(tmp_path / "results", ["not", "an", "object"])
    at = _app(monkeypatch, root)
    assert "\"final\" entry is damaged" in _texts(at.error) and len(at.code) == 1
    summary = root / "exp" / "summary.json"
    summary.write_text('{"final": {"test": ')  # cut mid-way
    at.run()
    assert "not valid JSON" in _texts(at.error)
    # A "final" object whose parts are all the wrong shape: each part says so, nothing raises.
    bad = {"delivered": 7, "test": {"single": "x", "refit": {"accuracy": "high", "ci95": [1], "per_class": 3,
                                                             "most_confused": [None, {"a": "1"}]}},
           "selection": [1], "refit": "r", "test_trials": [None, {"trial_id": "t", "f1": {"0": "x"}}]}
    summary.write_text(json.dumps({"final": bad}))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, _texts(at.error)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Test accuracy"] == "–" and "No model was delivered" in _texts(at.warning)
    (root / "exp" / "final" / "model.pt").write_bytes(b"whatever")  # a model, but which one is unknown
    at.run()
    assert not at.exception and "does not say which" in _texts(at.warning)
    assert "no record of the selection" in _texts(at.info)
    assert "no per-class results" in _texts(at.info)


def test_page_files_outside_the_root_are_not_read(monkeypatch, tmp_path):
    root = make_experiment(tmp_path / "results", final_entry())
    outside = make_experiment(tmp_path / "outside", final_entry(), name="leak") / "leak"
    (outside / "final" / "report.md").write_text("SECRET REPORT")
    for f in ("report.md", "confused_pairs.png"):
        (root / "exp" / "final" / f).unlink()
        (root / "exp" / "final" / f).symlink_to(outside / "final" / f)
    at = _app(monkeypatch, root)
    assert not at.error
    assert "SECRET" not in _texts(at.markdown) and not at.get("image")
    (root / "exp" / "summary.json").unlink()
    (root / "exp" / "summary.json").symlink_to(outside / "summary.json")
    at.run()
    assert "leads outside the results root" in _texts(at.error)


def test_read_png_refuses_what_is_not_a_small_png(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert final_page.read_png(bad)[0] is None
    Image.new("L", (5000, 4000)).save(tmp_path / "big.png")
    assert "megapixels" in final_page.read_png(tmp_path / "big.png")[1]
    Image.new("L", (10, 10)).save(tmp_path / "img.jpg")
    assert "not a PNG" in final_page.read_png(tmp_path / "img.jpg")[1]


# ---------------------------------------------------------------- the predictor offers the final model first


@pytest.fixture
def with_final(tiny_experiment, tmp_path) -> Path:
    """A copy of the tiny experiment whose final/model.pt is an ensemble of its two best trials
    (training.ensemble.save_model), described in summary.json as the refit ensemble of 2."""
    root = tmp_path / "results"
    shutil.copytree(tiny_experiment / "tiny", root / "tiny", ignore=shutil.ignore_patterns("final"))
    exp = open_experiment(root, "tiny")
    best = exp.trials.sort_values("best_val_acc", ascending=False)["trial_id"].tolist()[:2]
    members = [load_checkpoint(exp.best_checkpoint(t)) for t in best]
    (root / "tiny" / "final").mkdir()
    save_model(root / "tiny" / "final" / "model.pt", members, members[0]["classes"], "digits")
    final = final_entry()
    final["delivered"] = "refit ensemble of 2"
    summary_path = root / "tiny" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary_path.write_text(json.dumps({**summary, "final": final}))
    return root


def test_predictor_offers_the_final_model_first(monkeypatch, with_final):
    from tests.test_dashboard_predictor import _glyph_png

    at = _app(monkeypatch, with_final, "Predictor")
    assert not at.error and not at.warning
    exp = open_experiment(with_final, "tiny")
    trial = at.selectbox(key="predictor_trial:tiny")
    assert trial.options[0] == "final model (refit ensemble of 2) · test acc 0.908"
    assert trial.options[1].startswith(exp.best_trial) and trial.options[1].endswith("· best")
    assert trial.value == page.FINAL_ID and len(trial.options) == len(exp.trials) + 1
    assert at.multiselect(key="predictor_compare:tiny").value[:2] == [page.FINAL_ID, exp.best_trial]
    # It predicts with the ensemble: the same top-5 as loading final/model.pt directly.
    data = _glyph_png("4", seed=2)
    direct = page.Predictor.from_checkpoint(with_final / "tiny" / "final" / "model.pt").predict(
        page.read_upload(data).image)[0].top[0]
    at.file_uploader(key="predictor_upload").set_value(("four.png", data, "image/png")).run()
    assert not at.exception and not at.error
    assert f"### Prediction: `{direct[0]}` ({direct[1]:.1%})" in _texts(at.markdown)
    shown = _texts(at.markdown).replace("\\", "")  # md_text escapes the brackets
    assert any(t.startswith("**final model (refit ensemble of 2)** · test 0.908") for t in shown.splitlines())


def test_predictor_final_model_that_does_not_load(monkeypatch, with_final):
    path = with_final / "tiny" / "final" / "model.pt"
    ckpt = load_checkpoint(path)
    bad = copy.copy(ckpt)
    bad["members"] = [{**m, "config": {**m["config"], "model": "no_such_model"}} for m in ckpt["members"]]
    save_checkpoint(path, bad)
    at = _app(monkeypatch, with_final, "Predictor")
    assert "final model (final/model.pt) cannot be used" in _texts(at.warning)
    assert str(with_final) not in _texts(at.warning)  # no server paths
    exp = open_experiment(with_final, "tiny")
    assert at.selectbox(key="predictor_trial:tiny").value == exp.best_trial
    assert not at.error
