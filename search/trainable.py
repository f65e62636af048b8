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

import os
import shutil
import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from search import ray_private, repairs
from search.layout import CHECKPOINT_FILE
from training.data import EmnistData
from training.failpoint import fail_after_epoch, stop_here
from training.trainer import train


def train_trial(config: dict, data: EmnistData, deadline: float | None = None, finish_by: float | None = None) -> None:
    """Ray Tune function trainable: `tune.with_parameters(train_trial, data=data)`. `deadline` (time.time()):
    the search's time budget ends then, and so does the trial, at its next step; `finish_by`: a timed trial's
    schedule ends by then (a budget's refit; training.trainer.train)."""
    # One thread per CPU Ray gave this trial: oversubscribed OpenMP threads from trials sharing a
    # machine spin against each other and can make training 10-30x slower.
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))

    waited = repairs.wait_until_recorded()
    storage = ray_private.trial_storage()
    folder = repairs.storage_folder()
    tb_dir = folder if folder is not None else Path(tune.get_context().get_trial_dir())
    node_id = ray.get_runtime_context().get_node_id()
    trial_id = tune.get_context().get_trial_id()
    epochs = 0 if config.get("train_seconds") else int(config.get("epochs") or 0)  # (a timed run's are unknown)
    checkpoint = tune.get_checkpoint()  # set when the trial is retried or its experiment resumed
    resume = repairs.resume_state(checkpoint, folder)
    unlogged = repairs.unlogged_epochs(resume, checkpoint, folder)
    # a replayed epoch's checkpoint goes back into its own folder, so Ray knows it where it is
    on_disk = repairs.epoch_folders(folder) if unlogged else {}
    note = {**resume.note, "recorded_wait_s": round(waited, 3)}  # first result only: start-up accounting
    # Checkpoints are written to a scratch dir and handed to Ray, which copies them to storage.
    scratch = Path(tempfile.mkdtemp(prefix="emnist-trial-"))

    def report(metrics: dict, last_path: Path | None, replay: bool = False, index: int | None = None) -> None:
        if not replay:
            fail_after_epoch(metrics["epoch"], trial_id)
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
        repairs.set_next_checkpoint_folder(storage, folder, index)
        with tempfile.TemporaryDirectory(dir=scratch) as d:
            if replay:  # a copy: Ray writes it back over the very file it came from
                shutil.copyfile(last_path, Path(d) / CHECKPOINT_FILE)
            else:
                os.link(last_path, Path(d) / CHECKPOINT_FILE)  # hard link: no copy of the weights
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))
        if not replay and metrics["epoch"] < epochs:
            stop_here("trial:mid-run")  # (the fault tests kill the driver here: training/failpoint.py)

    # A trial that had ended (finished, stopped by ASHA, diverged) but that the restored state still lists as
    # running (it lagged the end by its last second): its epochs are reported, nothing is trained again.
    ended = repairs.ended_epoch(folder)
    try:
        for m in unlogged:  # each with its checkpoint, where one is on disk
            index = on_disk.get(m["epoch"])
            if index is not None:
                report(m, folder / f"checkpoint_{index:06d}" / CHECKPOINT_FILE, replay=True, index=index)
            else:
                report(m, resume.path if m["epoch"] == resume.state["epoch"] else None, replay=True)
        if ended is None:
            train(config, data, reporter=report, out_dir=tb_dir, checkpoint_dir=scratch, resume=resume.state,
                  deadline=deadline, finish_by=finish_by)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
