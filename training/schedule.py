"""Learning-rate schedules: built per epoch of batches, or for a timed run (config train_seconds) positioned by the
seconds it has had, and moved on after each epoch. No model or data in here."""

from __future__ import annotations

import math
import warnings

import torch

from training.config import TrainConfig


def make_scheduler(c: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """Returns (scheduler or None, when it steps: 'step' | 'epoch' | 'plateau')."""
    total = c.epochs * steps_per_epoch
    if c.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=c.step_size, gamma=c.gamma), "epoch"
    if c.scheduler == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=c.plateau_factor, patience=c.plateau_patience
        )
        return sched, "plateau"
    if c.scheduler == "cosine":
        warm = int(c.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor), "step"
    if c.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=total, pct_start=c.pct_start)
        return sched, "step"
    return None, "none"


# A timed run (config train_seconds) sets its schedule's position from the seconds it has had: the schedule is
# built `TIMED_STEPS` steps long (points along it, not batches) and moved to the point its time has reached.
TIMED_STEPS = 10_000


def schedule_steps_per_epoch(c: TrainConfig, steps: int) -> int:
    """What make_scheduler counts as an epoch's steps: the batches of an epoch, or for a timed run its share of
    TIMED_STEPS."""
    return -(-TIMED_STEPS // c.epochs) if c.train_seconds > 0 else steps


def timed_epochs(c: TrainConfig, seconds: float) -> int:
    """The epochs of a timed run's schedule (`epochs` long, over train_seconds) that `seconds` have passed."""
    return int(min(1.0, seconds / c.train_seconds) * c.epochs)


def position(sched, step: int) -> None:
    """A step-wise schedule moved forward to `step` (never back), its learning rate set for it."""
    if step <= sched.last_epoch:
        return
    sched.last_epoch = step - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": positioning, not training
        warnings.simplefilter("ignore", UserWarning)
        sched.step()  # -> step `step`


def fit_schedule(sched, c: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """A resumed OneCycle schedule restored from a run planned for another length (`--resume
    --epochs N` extends a finished run) would stop at the old total ("Tried to step N times"):
    rebuild it for this run's length, at the step the run has reached. (The cosine schedule
    reads the length from the config, and the step and plateau ones do not depend on it.)"""
    if not isinstance(sched, torch.optim.lr_scheduler.OneCycleLR):
        return sched
    total, done = c.epochs * steps_per_epoch, sched.last_epoch
    if sched.total_steps == total or done >= total:  # (done >= total: nothing is left to train)
        return sched
    fresh = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=total, pct_start=c.pct_start)
    fresh.last_epoch = -1  # (moved to `done` below, its learning rate set for it)
    position(fresh, done)
    return fresh


def epoch_schedule(sched, when: str, c: TrainConfig, m: dict, val_acc: float) -> None:
    """Epoch-wise schedules (step, plateau) after an epoch (its metrics `m`): one step; for a timed run one per
    epoch of its schedule that this epoch's seconds passed (none while within one)."""
    if when not in ("epoch", "plateau"):
        return
    n = 1 if c.train_seconds <= 0 else (timed_epochs(c, m["run_seconds"])
                                         - timed_epochs(c, m["run_seconds"] - m["epoch_seconds"]))
    if when == "plateau":
        if n:  # (one look at the accuracy per epoch: its patience counts epochs)
            sched.step(val_acc)
        return
    for _ in range(n):
        sched.step()
