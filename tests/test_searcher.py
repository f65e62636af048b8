"""The Optuna searcher catches its study up with the experiment (no Ray cluster needed; the
end-to-end case is tests/test_faults.py::test_stale_searcher_state_is_caught_up_on_resume)."""

from __future__ import annotations

import json

import optuna
import pytest

from search.layout import ray_statuses
from search.searcher import ResumableOptunaSearch
from search.space import DefineByRun, load_search_spec
from tests.test_space import GOOD, _write

Complete = optuna.trial.TrialState.COMPLETE


@pytest.fixture
def searcher(tmp_path):
    spec = load_search_spec(_write(tmp_path, GOOD))
    return ResumableOptunaSearch(space=DefineByRun(spec), metric="val_acc", mode="max",
                                 sampler=optuna.samplers.TPESampler(seed=0))


def _flat(config: dict, **metrics) -> dict:
    """A result as Ray hands it to the searcher: flattened, config included."""
    return {**metrics, **{f"config/{k}": v for k, v in config.items()}}


SGD = {"lr": 0.01, "width": 1.5, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9, "scheduler": "step",
       "step_size": 2, "gamma": 0.2, "epochs": 4, "split": "digits"}


def test_a_trial_the_study_never_asked_for_is_added_when_it_ends(searcher):
    config = searcher.suggest("asked")
    searcher.on_trial_result("asked", {"val_acc": 0.5, "training_iteration": 1})
    searcher.on_trial_complete("asked", _flat(config, val_acc=0.5))
    searcher.on_trial_result("stranger", {"val_acc": 0.7, "training_iteration": 1})  # ignored, no KeyError
    searcher.on_trial_complete("stranger", _flat(SGD, val_acc=0.7))
    searcher.on_trial_complete("stranger", _flat(SGD, val_acc=0.7))  # told once only
    trials = searcher._ot_study.trials
    assert [t.state for t in trials] == [Complete, Complete] and [t.value for t in trials] == [0.5, 0.7]
    added = trials[1]
    # exactly the sampled names of the active branches, with the space's distributions
    assert added.params == {"lr": 0.01, "width": 1.5, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9,
                            "scheduler": "step", "step_size": 2, "gamma": 0.2}
    assert added.distributions["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert added.distributions["step_size"] == optuna.distributions.IntDistribution(1, 3)
    # TPE goes on sampling with both
    assert searcher.suggest("next")["optimizer"] in ("adamw", "sgd")


def test_restore_catches_the_study_up_with_the_experiment_state(searcher, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    first = searcher.suggest("t1")
    searcher.on_trial_complete("t1", _flat(first, val_acc=0.4))
    searcher.save_to_dir(str(exp), session_str="2026-01-01_00-00-00")  # the study as the killed driver left it
    second = searcher.suggest("t2")  # suggested and finished after that snapshot

    def entry(tid, status, config, last):
        return [json.dumps({"trial_id": tid, "status": status, "config": config,
                            "storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": "80"}}),
                json.dumps({"last_result": last})]

    state = {"trial_data": [entry("t1", "TERMINATED", first, {"val_acc": 0.4}),
                            entry("t2", "TERMINATED", second, {"val_acc": 0.6, "config": second}),
                            entry("t3", "TERMINATED", SGD, {"val_acc": 0.8}),
                            entry("t4", "RUNNING", SGD, {"val_acc": 0.1})]}
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    (exp / "experiment_state-2026-01-01_00-00-09.json").write_text(json.dumps(state)[:500])  # cut short by the kill
    assert list(ray_statuses(exp)) == ["t1", "t2", "t3", "t4"]

    restored = ResumableOptunaSearch(space=searcher._space, metric="val_acc", mode="max",
                                     sampler=optuna.samplers.TPESampler(seed=0))
    restored.restore_from_dir(str(exp))
    done = sorted((t.value, t.params["lr"]) for t in restored._ot_study.trials if t.state == Complete)
    assert done == sorted([(0.4, first["lr"]), (0.6, second["lr"]), (0.8, SGD["lr"])])  # t4 is still running
    assert restored._completed_trials == {"t1", "t2", "t3"}
    restored.on_trial_complete("t3", _flat(SGD, val_acc=0.8))  # Ray's own word on it later: no second copy
    assert len([t for t in restored._ot_study.trials if t.state == Complete]) == 3


def test_summary_names_only_what_each_trial_sampled(tmp_path):
    """The end-of-search top-5 lists a conditional parameter only for trials on its branch."""
    from search.summary import _sampled_names

    (tmp_path / "search.json").write_text(json.dumps({"config": str(_write(tmp_path, GOOD))}))
    names = _sampled_names(tmp_path)
    assert names(SGD) == {"lr", "width", "batch_size", "optimizer", "momentum", "scheduler", "step_size", "gamma"}
    adamw = {**SGD, "optimizer": "adamw", "scheduler": "none"}  # momentum etc. still in its config
    assert names(adamw) == {"lr", "width", "batch_size", "optimizer", "scheduler"}
    assert names({"lr": 0.01}) is None  # not a config of this space
    assert _sampled_names(tmp_path / "elsewhere")(SGD) is None  # no saved settings
