"""Every use of Ray internals in this project, in one place.

Ray has no public API for these; each was checked against Ray 2.60 (CHECKED_WITH), and
tests/test_ray_private.py exercises each one on real Ray objects, so a Ray upgrade that renames
or removes one fails there, with the name, instead of deep inside a resumed search.
"""

from __future__ import annotations

from typing import Any

CHECKED_WITH = "2.60"


# ---- a trial's storage (ray.train._internal.storage.StorageContext), from inside the trial

def trial_storage():
    """The running trial's StorageContext: its filesystem (pyarrow) and paths in the experiment storage."""
    from ray import tune

    return tune.get_context().get_storage()


def storage_is_local(storage) -> bool:
    return type(storage.storage_filesystem).__name__ == "LocalFileSystem"


def next_checkpoint_index(storage) -> int:
    """The index Ray gives the trial's next checkpoint folder (checkpoint_<index>)."""
    return storage.current_checkpoint_index + 1


def set_next_checkpoint_index(storage, index: int) -> None:
    # Ray increments current_checkpoint_index before it writes each checkpoint
    storage.current_checkpoint_index = index - 1


# ---- a restored Tuner (ray.tune.Tuner._local_tuner: TunerInternal)

def replace_callbacks(tuner, callbacks: list) -> bool:
    """Give a restored Tuner this session's callbacks. Tuner.restore brings back the run config of
    the first session, callbacks included (printing to a terminal that may be gone), and takes no
    argument for them. False with a ray:// client, which has no local tuner (nothing replaced)."""
    local = getattr(tuner, "_local_tuner", None)
    if local is None:
        return False
    local._run_config.callbacks = callbacks
    return True


# ---- OptunaSearch and ConcurrencyLimiter internals (search/searcher.py)

def optuna_study(searcher) -> Any:
    """The optuna.Study an OptunaSearch asks and tells."""
    return searcher._ot_study


def optuna_trials(searcher) -> dict:
    """Ray trial id -> the optuna trial an OptunaSearch suggested for it (still open)."""
    return searcher._ot_trials


def completed_trials(searcher) -> set:
    """Ray trial ids whose end an OptunaSearch has told its study."""
    return searcher._completed_trials


def define_by_run(searcher):
    """The define-by-run space function an OptunaSearch samples with."""
    return searcher._space


def limits_concurrency(limiter) -> bool:
    """Whether a ConcurrencyLimiter tracks live trials (it does not with max_concurrent <= 0)."""
    return limiter._limit_concurrency


# ---- a trial on the driver (ray.tune.experiment.Trial)

def trial_folder(trial) -> str:
    """Where a trial's files are in the experiment storage (a path on the storage's filesystem)."""
    return trial.storage.trial_fs_path
