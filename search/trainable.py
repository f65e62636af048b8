"""The Ray Tune trial: the training core's `train()` with a reporter that hands each epoch
to Tune (metrics + checkpoint), so ASHA can stop it and Optuna can learn from it.

TensorBoard events go straight into the trial's folder in the experiment storage when that is
a filesystem path (local or shared); for cloud storage into the trial's working directory,
which Ray syncs there. (Ray's sync runs in the background: a driver killed right after a trial
finished left that trial's last epochs out of the stored events.) Checkpoints go through
`tune.report(checkpoint=...)`, so Ray keeps the best ones in storage and hands the latest
back when a trial is retried or an experiment resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import ray
import torch
from ray import tune

from search.results import STATE_GLOB, parse_experiment_state, read_json_lines
from training.checkpoint import CheckpointError, load_checkpoint
from training.data import EmnistData
from training.trainer import train

CHECKPOINT_FILE = "checkpoint.pt"
FAULT_ENV = "EMNIST_TUNE_FAULT_ONCE"  # tests: "<marker file>:<epoch>" -> raise once at that epoch


def _maybe_inject_fault(epoch: int) -> None:
    """A transient failure for the fault-tolerance tests: raise once, remembered by a marker file."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    marker, _, at = spec.rpartition(":")
    if epoch == int(at) and not Path(marker).exists():
        Path(marker).write_text("failed once")
        raise RuntimeError(f"injected transient failure at epoch {epoch}")


class Resume(NamedTuple):
    state: dict | None  # the training state to resume from (None: start over)
    path: Path | None  # the checkpoint file it came from
    note: dict  # for the next result, when it is older than the checkpoint Ray handed back


def _resume_state(checkpoint: tune.Checkpoint | None, folder: Path | None) -> Resume:
    """The training state a trial starts from: `checkpoint` is the one Ray hands back (None for
    a fresh trial), `folder` the trial's folder in the experiment storage when that is a
    filesystem path (else None: only the handed checkpoint is considered).

    Ray hands back the newest checkpoint its experiment state knows, but the trial folder can
    hold a better one, in both directions:
    - newer: the experiment was interrupted after a trial had written its next checkpoint but
      before the driver recorded it (Ctrl+C or a kill at that moment; if it was the trial's
      first, Ray hands back none). Resuming from the handed one would train those epochs again,
      and a trial that had finished would train once more.
    - older: the handed file is unreadable (truncated by a full disk or a crash while it was
      copied, or deleted); the epochs after the older one are then run again, with a note
      ({"resumed_from_epoch": N, "resume_warning": why}) that goes into the next result and
      that the driver prints.
    The newest readable checkpoint wins; with none readable the trial starts from scratch.
    """
    handed = Path(checkpoint.path) if checkpoint is not None else None
    candidates = set(folder.glob("checkpoint_*")) if folder is not None else set()
    if handed is not None:
        candidates.add(handed)
    problem = None
    for path in sorted(candidates, key=lambda p: p.name, reverse=True):  # Ray numbers them in order
        try:
            if path == handed:
                with checkpoint.as_directory() as d:
                    state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
            else:
                state = load_checkpoint(path / CHECKPOINT_FILE)
        except (CheckpointError, OSError) as e:
            if path == handed:
                problem = str(e)
            continue
        note = {} if problem is None else {"resumed_from_epoch": int(state["epoch"]), "resume_warning": problem}
        return Resume(state, path / CHECKPOINT_FILE, note)
    if problem is None:
        return Resume(None, None, {})  # a fresh trial
    return Resume(None, None, {"resumed_from_epoch": 0, "resume_warning": problem})


def _unlogged_epochs(resume: Resume, checkpoint: tune.Checkpoint | None, folder: Path | None) -> list[dict]:
    """The epochs in a newer checkpoint than the handed one that Ray never logged (the driver was
    interrupted before it got their result): reported from the checkpoint's history instead of
    trained again. An epoch is logged when it is in the trial's result.json in storage, or when it
    is in the checkpoint Ray handed back (Ray records a checkpoint only after logging its result).
    When Ray hands back no checkpoint, it also starts the trial's result.json afresh (it restores
    that file only for trials with a checkpoint), so every epoch the found checkpoint holds is
    reported."""
    if resume.state is None or folder is None:
        return []
    if checkpoint is None:
        return list(resume.state["history"])
    if resume.path.parent == Path(checkpoint.path):
        return []
    try:
        logged = set(range(1, int(load_checkpoint(Path(checkpoint.path) / CHECKPOINT_FILE)["epoch"]) + 1))
    except CheckpointError:
        logged = set()
    for row in read_json_lines(folder / "result.json"):  # (skips a line cut short by a kill)
        try:
            logged.add(int(row["epoch"]))
        except (ValueError, TypeError, KeyError):
            continue
    return [m for m in resume.state["history"] if m["epoch"] not in logged]


def _storage_folder() -> Path | None:
    """The trial's folder in the experiment storage, when that is a filesystem path."""
    storage = tune.get_context().get_storage()
    if type(storage.storage_filesystem).__name__ != "LocalFileSystem":
        return None
    return Path(storage.trial_fs_path)


RECORD_TIMEOUT_S = 300.0


def _recorded_trials(storage) -> set[str]:
    """Trial ids in the newest experiment state in storage (any filesystem Ray writes to)."""
    import pyarrow.fs

    fs = storage.storage_filesystem
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(storage.experiment_fs_path))
    except (OSError, ValueError):
        return set()
    prefix, suffix = STATE_GLOB.split("*")
    for info in sorted((i for i in infos if i.base_name.startswith(prefix) and i.base_name.endswith(suffix)),
                       key=lambda i: i.base_name, reverse=True):
        try:
            with fs.open_input_stream(info.path) as f:
                state = json.loads(f.read())
        except (OSError, ValueError):
            continue  # being written, or cut short: the older one
        if isinstance(state, dict) and "trial_data" in state:
            return set(parse_experiment_state(state))
    return set()


def _wait_until_recorded(timeout_s: float = RECORD_TIMEOUT_S) -> float:
    """Write nothing to storage until the experiment state there names this trial.

    Ray snapshots its experiment state (the trial list a resume restores) every few seconds; a
    driver killed between a trial's start and the next snapshot used to leave that trial's
    checkpoints and TensorBoard files in a folder no resume knew of: an orphan, trained again
    from scratch under a new id. Waiting for the snapshot (search.tuner sets it to every second)
    means a trial that wrote anything is always one that --resume continues. A trial restored
    from an existing experiment is named at once. Returns the seconds waited."""
    storage = tune.get_context().get_storage()
    trial_id = tune.get_context().get_trial_id()
    local = type(storage.storage_filesystem).__name__ == "LocalFileSystem"
    start = time.monotonic()
    while trial_id not in _recorded_trials(storage):
        if time.monotonic() - start > timeout_s:
            print(f"trial {trial_id}: not in the experiment state after {timeout_s:.0f} s; starting anyway")
            break
        time.sleep(0.1 if local else 1.0)
    return time.monotonic() - start


def _checkpoint_index(path: Path) -> int:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _set_next_checkpoint_folder(storage, folder: Path | None, index: int | None = None) -> None:
    """Make Ray's next checkpoint go to checkpoint_<index>, or (None) past every folder on disk.

    Ray numbers a trial's checkpoint folders from the index its experiment state recorded, which
    lags the disk when the driver was interrupted: the resumed trial then wrote its next epoch
    over the folder of an earlier one. `current_checkpoint_index` is the StorageContext
    attribute Ray increments before each checkpoint (checked against Ray 2.60)."""
    if folder is None:
        return
    if index is None:
        index = max([storage.current_checkpoint_index, *map(_checkpoint_index, folder.glob("checkpoint_*"))]) + 1
    storage.current_checkpoint_index = index - 1


def _epoch_folders(folder: Path | None) -> dict[int, int]:
    """epoch -> index of a readable checkpoint folder holding it (the newest such folder)."""
    out: dict[int, int] = {}
    for path in sorted(folder.glob("checkpoint_*"), key=_checkpoint_index) if folder is not None else []:
        try:
            out[int(load_checkpoint(path / CHECKPOINT_FILE)["epoch"])] = _checkpoint_index(path)
        except (CheckpointError, OSError, KeyError, TypeError, ValueError):
            continue
    return out


def train_trial(config: dict, data: EmnistData) -> None:
    """Ray Tune function trainable: `tune.with_parameters(train_trial, data=data)`."""
    # One thread per CPU Ray gave this trial: oversubscribed OpenMP threads from trials sharing a
    # machine spin against each other and can make training 10-30x slower.
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))

    waited = _wait_until_recorded()
    storage = tune.get_context().get_storage()
    folder = _storage_folder()
    tb_dir = folder if folder is not None else Path(tune.get_context().get_trial_dir())
    node_id = ray.get_runtime_context().get_node_id()
    checkpoint = tune.get_checkpoint()  # set when the trial is retried or its experiment resumed
    resume = _resume_state(checkpoint, folder)
    unlogged = _unlogged_epochs(resume, checkpoint, folder)
    # a replayed epoch's checkpoint goes back into its own folder, so Ray knows it where it is
    on_disk = _epoch_folders(folder) if unlogged else {}
    note = {**resume.note, "recorded_wait_s": round(waited, 3)}  # first result only: start-up accounting
    # Checkpoints are written to a scratch dir and handed to Ray, which copies them to storage.
    scratch = Path(tempfile.mkdtemp(prefix="emnist-trial-"))

    def report(metrics: dict, last_path: Path | None, replay: bool = False, index: int | None = None) -> None:
        if not replay:
            _maybe_inject_fault(metrics["epoch"])
        result = {k: v for k, v in metrics.items() if v is not None}
        result["node_id"] = node_id  # which cluster node ran this epoch
        result.update(note)  # once: how this run resumed, when its newest checkpoint was unusable
        note.clear()
        if metrics["diverged"]:
            # Reported as a bad score so Optuna steers away; the trial then ends (no retry).
            result.update(val_acc=0.0, diverged=True)
            tune.report(result)
            return
        if last_path is None:
            tune.report(result)
            return
        _set_next_checkpoint_folder(storage, folder, index)
        with tempfile.TemporaryDirectory(dir=scratch) as d:
            if replay:  # a copy: Ray writes it back over the very file it came from
                shutil.copyfile(last_path, Path(d) / CHECKPOINT_FILE)
            else:
                os.link(last_path, Path(d) / CHECKPOINT_FILE)  # hard link: no copy of the weights
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        for m in unlogged:  # each with its checkpoint, where one is on disk
            index = on_disk.get(m["epoch"])
            if index is not None:
                report(m, folder / f"checkpoint_{index:06d}" / CHECKPOINT_FILE, replay=True, index=index)
            else:
                report(m, resume.path if m["epoch"] == resume.state["epoch"] else None, replay=True)
        train(config, data, reporter=report, out_dir=tb_dir, checkpoint_dir=scratch, resume=resume.state)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
