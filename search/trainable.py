"""The Ray Tune trial: the training core's `train()` with a reporter that hands each epoch
to Tune (metrics + checkpoint), so ASHA can stop it and Optuna can learn from it.

TensorBoard events go into the trial's working directory, which Ray syncs to the
experiment storage (also from other nodes of a cluster). Checkpoints go through
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


def _resume_state(checkpoint: tune.Checkpoint) -> tuple[dict | None, dict]:
    """The training state to resume from, and a note for the trial's next result when it is not
    the newest checkpoint's.

    Ray hands back the trial's newest checkpoint. If that file is unreadable (truncated by a full
    disk or a crash while it was copied, or deleted), the trial falls back to its newest readable
    older checkpoint in the same trial folder (local storage), else restarts from scratch; the
    epochs after the fallback point are then run again. The note ({"resumed_from_epoch": N,
    "resume_warning": why}) goes into the next result, and the driver prints it.
    """
    try:
        with checkpoint.as_directory() as d:
            return load_checkpoint(Path(d) / CHECKPOINT_FILE), {}
    except (CheckpointError, OSError) as e:
        problem = str(e)
    best = None
    if type(checkpoint.filesystem).__name__ == "LocalFileSystem":
        newest = Path(checkpoint.path)
        for other in sorted(newest.parent.glob("checkpoint_*")):
            if other.name >= newest.name:  # only older ones (Ray numbers them in order)
                continue
            try:
                ckpt = load_checkpoint(other / CHECKPOINT_FILE)
            except CheckpointError:
                continue
            if best is None or ckpt["epoch"] > best["epoch"]:
                best = ckpt
    return best, {"resumed_from_epoch": int(best["epoch"]) if best else 0, "resume_warning": problem}


def train_trial(config: dict, data: EmnistData) -> None:
    """Ray Tune function trainable: `tune.with_parameters(train_trial, data=data)`."""
    # One thread per CPU Ray gave this trial: oversubscribed OpenMP threads from trials sharing a
    # machine spin against each other and can make training 10-30x slower.
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))

    trial_dir = Path(tune.get_context().get_trial_dir())
    node_id = ray.get_runtime_context().get_node_id()
    resume, note = None, {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a failure, or a resumed experiment
        resume, note = _resume_state(checkpoint)
    # Checkpoints are written to a scratch dir and handed to Ray, which copies them to storage.
    scratch = Path(tempfile.mkdtemp(prefix="emnist-trial-"))

    def report(metrics: dict, last_path: Path | None) -> None:
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
        with tempfile.TemporaryDirectory(dir=scratch) as d:
            os.link(last_path, Path(d) / CHECKPOINT_FILE)  # hard link: no copy of the weights
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        train(config, data, reporter=report, out_dir=trial_dir, checkpoint_dir=scratch, resume=resume)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
