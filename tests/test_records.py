"""The records that pass between the stages: search.json (search.settings.SearchSettings), final/plan.json
(search.plan.FinalPlan) and summary.json's "final" (search.final_report.FinalReport). Each reads back what it
wrote, and refuses a damaged file with one error that names the file and the field."""

from __future__ import annotations

import copy
import json

import pytest

from search.final_report import FinalReport, ReportError
from search.plan import Candidate, FinalPlan, PlanError, read_plan, write_plan
from search.settings import SearchSettings, SettingsError, read_settings, write_settings

CLASSES = ["0", "1", "2"]


def settings() -> SearchSettings:
    return SearchSettings(config="/repo/configs/search/smoke.yaml", config_sha256="ab" * 32,
                          space_text="space: {lr: {loguniform: [0.001, 0.01]}}\n", base_text=None, samples=8,
                          max_epochs=3, split="digits", seed=0, device="cpu", data_dir="/data/emnist",
                          data={"split": "digits", "val_fraction": 0.1, "seed": 0, "train_limit": 0, "val_limit": 0},
                          time_budget=1800.0, budget={"max_t_s": 337.5, "grace_s": 112.5, "epoch_images": 4096,
                                                      "final_s": 900.0, "margin_s": 30.0, "rungs": [112.5, 337.5]})


def selection() -> dict:
    return {"metric": "val_acc", "n_val": 200, "val_acc_by_k": {"1": 0.9, "2": 0.92}, "chosen_k": 2,
            "ensemble_pays": True, "tta": {"views": 7, "val_acc": 0.915, "val_acc_without": 0.92, "used": False},
            "candidates": [{"trial_id": "a", "val_acc": 0.9, "epoch": 3},
                           {"trial_id": "b", "val_acc": 0.88, "epoch": 2}]}


def plan() -> FinalPlan:
    config = {"split": "digits", "epochs": 3, "seed": 0, "lr": 0.01}
    cands = [Candidate("a", 0.9, 3, config, "trial_a/checkpoint_000003/checkpoint.pt"),
             Candidate("b", 0.88, 2, {**config, "lr": 0.02}, "trial_b/checkpoint_000002/checkpoint.pt")]
    members = [{"source_trial": t, "seed_index": 0, "epochs": e, "train": {**c.config, "epochs": e,
                                                                          "early_stop_patience": 0}}
               for t, e, c in (("a", 3, cands[0]), ("b", 2, cands[1]))]
    return FinalPlan({"ensemble_k": 3, "refit_seeds": 1, "refit_epochs": "best", "tta": "auto"}, cands, selection(),
                     members)


def result(label: str, acc: float, **extra) -> dict:
    return {"label": label, "accuracy": acc, "ci95": [acc - 0.02, acc + 0.02], "n": 300,
            "per_class": [{"class": c, "precision": acc, "recall": acc, "f1": acc, "support": 100} for c in CLASSES],
            "most_confused": [{"a": "1", "b": "2", "count": 4, "a_as_b": 3, "b_as_a": 1}], "precision": "fp32",
            **extra}


def report() -> FinalReport:
    refit = result("refit ensemble of 2 (2 config(s) x 1 seed(s))", 0.93)
    return FinalReport(
        model="/results/exp/final/model.pt", model_sha256="0f" * 32, delivered=refit["label"],
        delivered_kind="refit", delivered_test=refit, test_precision="fp32", selection=selection(),
        refit={"epochs_mode": "best", "seeds": 1, "finished": 2,
               "members": [{"source_trial": "a", "seed_index": 0, "epochs": 3},
                           {"source_trial": "b", "seed_index": 0, "epochs": 2, "seconds": 120.0}]},
        test={"single": result("best single trial a", 0.9, trial_id="a", source="summary.json"),
              "ensemble": result("top-2 search checkpoints averaged", 0.91, members=["a", "b"]), "refit": refit},
        test_trials=[{"trial_id": "a", "val_acc": 0.9, "accuracy": 0.9, "ci95": [0.88, 0.92],
                      "f1": dict.fromkeys(CLASSES, 0.9)}],
        problems=[], finished_at="2026-01-01 00:00:00")


def _through_json(value: dict) -> dict:
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------- search.json


def test_settings_round_trip(tmp_path):
    s = settings()
    assert SearchSettings.from_json(_through_json(s.to_json())) == s
    write_settings(tmp_path, s)
    assert read_settings(tmp_path) == s
    assert read_settings(tmp_path / "none") is None  # (an experiment from before settings were saved)
    older = {"config": s.config, "samples": 8}  # an older search wrote fewer keys, a newer one may write more
    assert read_settings_of(tmp_path, {**older, "someday": 1}) == SearchSettings(config=s.config, samples=8)


def read_settings_of(folder, value) -> SearchSettings:
    (folder / "search.json").write_text(json.dumps(value))
    return read_settings(folder)


@pytest.mark.parametrize("edit, field", [
    (lambda v: v.update(samples="many"), "'samples' is 'many', not a int"),
    (lambda v: v.update(config=None), "'config' is None, not a str"),
    (lambda v: v.update(time_budget=-5), "'time_budget' is -5.0, not a float"),
    (lambda v: v["data"].update(seed=[1]), "'data.seed' is [1], not a int"),
    (lambda v: v["budget"].pop("max_t_s"), "'budget.max_t_s' is None, not a float"),
])
def test_a_damaged_search_json_names_the_file_and_the_field(tmp_path, edit, field):
    value = settings().to_json()
    edit(value)
    with pytest.raises(SettingsError) as e:
        read_settings_of(tmp_path, value)
    assert str(e.value) == f"{tmp_path}/search.json is damaged: {field}"


def test_a_search_json_that_is_not_json_names_the_file(tmp_path):
    (tmp_path / "search.json").write_text('{"config": "a", ')
    with pytest.raises(SettingsError, match=r"search\.json is damaged: it is not JSON"):
        read_settings(tmp_path)
    (tmp_path / "search.json").write_text("[1]")
    with pytest.raises(SettingsError, match=r"search\.json is damaged: it is not a JSON object"):
        read_settings(tmp_path)


# ---------------------------------------------------------------- final/plan.json


def _experiment(tmp_path):
    exp = tmp_path / "exp"
    for c in plan().candidates:
        (exp / c.checkpoint).parent.mkdir(parents=True)
        (exp / c.checkpoint).write_bytes(b"")
    (exp / "final").mkdir()
    return exp


def test_plan_round_trip(tmp_path):
    p = plan()
    assert FinalPlan.from_json(_through_json(p.to_json())) == p
    exp = _experiment(tmp_path)
    write_plan(exp / "final" / "plan.json", p)
    assert read_plan(exp / "final" / "plan.json", exp) == p
    assert [c.checkpoint for c in p.resolved(exp)] == [str(exp / c.checkpoint) for c in p.candidates]
    budget = FinalPlan(p.settings, p.candidates, p.selection, [], budget=True)  # a budget left no time for a refit
    assert FinalPlan.from_json(_through_json(budget.to_json())) == budget


@pytest.mark.parametrize("edit, message", [
    (lambda v: v["members"][1].update(seed_index="x"), "members[1].seed_index is not a seed index"),
    (lambda v: v["candidates"][1].update(checkpoint=7), "candidates[1].checkpoint is not a path"),
    (lambda v: v["candidates"][0].update(checkpoint="../../x.pt"), "candidates[0].checkpoint: checkpoint path "),
    (lambda v: v["selection"].update(chosen_k=3), "selection.chosen_k is not a number of candidates (1..2)"),
    (lambda v: v.pop("members"), "the plan has no members"),
])
def test_a_damaged_plan_names_the_file_and_the_field(tmp_path, edit, message):
    exp = _experiment(tmp_path)
    value = plan().to_json()
    edit(value)
    path = exp / "final" / "plan.json"
    path.write_text(json.dumps(value))
    with pytest.raises(PlanError) as e:
        read_plan(path, exp)
    assert str(e.value).startswith(f"{path}: {message}"), e.value


# ---------------------------------------------------------------- summary.json's "final"


def test_final_report_round_trip():
    r = report()
    assert FinalReport.from_json(_through_json(r.to_json())) == r
    assert r.delivered_result is r.test["refit"]
    single = FinalReport(**{**r.to_json(), "delivered_kind": "single", "test": {"single": r.test["single"]}})
    assert FinalReport.from_json(_through_json(single.to_json())) == single


@pytest.mark.parametrize("edit, message", [
    (lambda v: v["test"]["refit"].update(accuracy=2), "final.test.refit.accuracy is not an accuracy in [0, 1]"),
    (lambda v: v["test"].pop("refit"), "final.delivered_kind is not one of the tested models (single, ensemble)"),
    (lambda v: v.pop("delivered_kind"), "final has no delivered_kind"),
    (lambda v: v["selection"].update(chosen_k="two"), "final.selection.chosen_k is not a number of candidates"),
    (lambda v: v["test_trials"][0]["f1"].update({"1": "x"}), "final.test_trials[0] is not a trial's test figures"),
    (lambda v: v["delivered_test"]["per_class"][2].pop("f1"), "final.delivered_test.per_class[2] is not a class's"),
    (lambda v: v.update(model_sha256="x"), "final.model_sha256 is not a sha256"),
])
def test_a_damaged_final_report_names_the_file_and_the_field(edit, message):
    value = copy.deepcopy(report().to_json())
    edit(value)
    with pytest.raises(ReportError) as e:
        FinalReport.from_json(value, "/results/exp/summary.json")
    assert str(e.value).startswith(f"/results/exp/summary.json: {message}"), e.value
