"""Each Ray internal this project uses (search/ray_private.py), on real Ray objects: a Ray upgrade
that renames or removes one fails here, by name, not inside a resumed search."""

from __future__ import annotations

import json

import optuna
import pyarrow.fs
import ray
from ray import tune
from ray.train._internal.storage import StorageContext
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from search import ray_private
from search.layout import ray_statuses


def test_checked_against_this_ray():
    assert ray.__version__.startswith(ray_private.CHECKED_WITH), (
        f"search/ray_private.py was checked against Ray {ray_private.CHECKED_WITH}, this is {ray.__version__}: "
        "run this file and tests/test_faults.py, then update CHECKED_WITH")


def test_storage_context_checkpoint_index(tmp_path):
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp", trial_dir_name="trial_x")
    assert ray_private.storage_is_local(storage)
    assert storage.trial_fs_path.endswith("exp/trial_x") and storage.experiment_fs_path.endswith("exp")
    assert ray_private.next_checkpoint_index(storage) == 0
    ray_private.set_next_checkpoint_index(storage, 5)
    storage._update_checkpoint_index({})  # what Ray calls before it persists a checkpoint
    assert storage.checkpoint_fs_path.endswith("trial_x/checkpoint_000005")


def test_restored_tuner_callbacks_can_be_replaced():
    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(callbacks=[tune.Callback()]))
    mine = [tune.Callback()]
    assert ray_private.replace_callbacks(tuner, mine)
    assert tuner._local_tuner.get_run_config().callbacks is mine


def test_optuna_search_internals():
    def space(trial):
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)

    searcher = OptunaSearch(space=space, metric="val_acc", mode="max", sampler=optuna.samplers.TPESampler(seed=0))
    assert isinstance(ray_private.optuna_study(searcher), optuna.study.Study)
    assert ray_private.define_by_run(searcher) is space
    config = searcher.suggest("t1")
    assert set(config) == {"lr"} and set(ray_private.optuna_trials(searcher)) == {"t1"}
    searcher.on_trial_complete("t1", {"val_acc": 0.5})
    assert "t1" in ray_private.completed_trials(searcher)
    assert [t.value for t in ray_private.optuna_study(searcher).trials] == [0.5]
    assert ray_private.limits_concurrency(ConcurrencyLimiter(searcher, max_concurrent=2))


def test_experiment_state_read_through_a_storage_filesystem(tmp_path):
    """The trials' reader (through Ray's pyarrow filesystem) and the driver's (local) agree."""
    entry = [json.dumps({"trial_id": "a1", "status": "TERMINATED", "config": {"lr": 0.1}}),
             json.dumps({"num_failures": 1, "last_result": {"epoch": 2}})]
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": [entry]}))
    (tmp_path / "experiment_state-2026-01-02_00-00-00.json").write_text('{"trial_da')  # cut short: the older one
    local = ray_statuses(tmp_path)
    assert local["a1"]["status"] == "TERMINATED" and local["a1"]["num_failures"] == 1
    assert ray_statuses(str(tmp_path), fs=pyarrow.fs.LocalFileSystem()) == local
