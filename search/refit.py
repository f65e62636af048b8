"""The final stage's refit, the only part of it that runs Ray: the configurations validation chose, trained again
on the whole training split (train + validation) as Ray Tune trials in final/refit/, with the search's resources,
retries and resume (search/final.py, step 2). Under a time budget the members are timed runs fitted to the deadline
first (search/timed_refit.py). The refit's results are read back here too (`refit_models`)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from search.budget import REFIT_END_S
from search.final_settings import FinalError, FinalSettings
from search.layout import (
    CHECKPOINT_FILE,
    PARAMS_FILE,
    REFIT_DIR,
    checkpoint_dirs,
    has_whole_state,
    ray_statuses,
    trial_dirs,
)
from search.plan import Candidate, FinalPlan, members_text
from training.checkpoint import CheckpointError, load_checkpoint
from training.data import EmnistData
from training.fileio import read_json


def plan_refit(cands: list[Candidate], chosen_k: int, settings: FinalSettings) -> list[dict]:
    """One member per (chosen config, seed): its training config on the whole training split."""
    members = []
    for c in cands[:chosen_k]:
        # (under a time budget the refit is a timed run, search.timed_refit.fit_refit: its epochs only shape its
        # schedule, as they shaped its trial's)
        full = settings.refit_epochs == "full" or settings.deadline is not None
        epochs = int(c.config["epochs"]) if full else c.epoch
        for s in range(settings.refit_seeds):
            # A fixed number of epochs: nothing is held out to stop early on, or to pick an epoch with.
            train = {**c.config, "epochs": max(1, epochs), "seed": int(c.config.get("seed", 0)) + s,
                     "early_stop_patience": 0}
            members.append({"source_trial": c.trial_id, "seed_index": s, "epochs": train["epochs"], "train": train})
    return members


def whole_training_split(data: EmnistData) -> EmnistData:
    """Train + validation as the training set. The trainer still evaluates on `val` every epoch;
    for a refit those images are in its training set, so that figure is not a validation score."""
    return EmnistData(torch.cat([data.train_x, data.val_x]), torch.cat([data.train_y, data.val_y]),
                      data.val_x, data.val_y, data.classes, data.split, data.source)


def _refit_trial(config: dict, data: EmnistData, deadline: float | None = None) -> None:
    from search.trainable import train_trial

    # (a timed member that started late, after Ray's start or in a continued final stage, ends by the deadline)
    finish_by = deadline - REFIT_END_S if deadline is not None else None
    train_trial(config["member"]["train"], data, deadline=deadline, finish_by=finish_by)


def _refit_callback(members: list[dict]):
    from ray import tune

    class RefitProgress(tune.Callback):
        """One line per refit epoch (the searcher's Progress speaks of ASHA and best val_acc, which
        mean nothing here)."""

        def __init__(self):
            self.start = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            m = trial.config.get("member", {})
            seconds = (m.get("train") or {}).get("train_seconds")
            done = (f"{result.get('run_seconds', 0):.0f} of {seconds:.0f} s" if seconds
                    else f"epoch {result.get('epoch')}/{m.get('epochs')}")
            print(f"  [refit {time.time() - self.start:5.0f}s] trial {m.get('source_trial')} seed "
                  f"+{m.get('seed_index')}: {done}, train loss {result.get('train_loss', float('nan')):.4f}",
                  flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"  refit trial {trial.trial_id} failed: {trial.error_file or ''}", flush=True)

    return RefitProgress()


def run_refit(final_dir: Path, members: list[dict], data: EmnistData, settings: FinalSettings) -> bool:
    """Train the members (or continue an interrupted refit); True when all have finished."""
    import ray
    from ray import tune

    from search.tuner import init_ray, resources, restore_tuner, run_config_for, trial_name

    refit_dir = final_dir / REFIT_DIR
    if not members:  # (a time budget left no time for one)
        return True
    started = has_whole_state(refit_dir)  # (else no refit trial was recorded: it starts afresh)
    if started and _refit_done(refit_dir, members):
        return True
    own_ray = not ray.is_initialized()
    if own_ray:
        init_ray(settings.address)
    try:
        cpt, gpt, concurrency = resources(settings.res)
        if settings.deadline is not None:  # (a budget's refit: one round, the members sharing the CPUs)
            cpt, gpt, concurrency = settings.res.refit_share(len(members), ray.cluster_resources())
        # (under a budget the refit ends in time for the report: its trials are timed runs that end by then, see
        # fit_refit)
        deadline = settings.deadline - settings.report_s if settings.deadline is not None else None
        trainable = tune.with_resources(tune.with_parameters(_refit_trial, data=whole_training_split(data),
                                                             deadline=deadline), {"cpu": cpt, "gpu": gpt})
        # The newest checkpoint is the model (no epoch is picked on held-out data); it is also what a
        # retried or resumed refit trial continues from.
        run_config = run_config_for(REFIT_DIR, str(final_dir), [_refit_callback(members)],
                                    tune.CheckpointConfig(num_to_keep=1))
        print(f"refit: {len(members)} model(s) on all {len(data.train_x) + len(data.val_x)} training images, "
              f"{concurrency} at once; results in {refit_dir}", flush=True)
        if started:
            print(f"continuing the interrupted refit in {refit_dir}", flush=True)
            tuner = restore_tuner(str(refit_dir), trainable, run_config)
        else:
            tuner = tune.Tuner(trainable, param_space={"member": tune.grid_search(members), "plan": plan_key(members)},
                               tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True,
                                                           trial_name_creator=trial_name,
                                                           trial_dirname_creator=trial_name),
                               run_config=run_config)
        tuner.fit()
    finally:
        if own_ray:
            ray.shutdown()
    return _refit_done(refit_dir, members)


def plan_key(members: list[dict]) -> str:
    """An id of a list of refit members: every refit trial carries its plan's (config "plan"), so a refit on
    disk from another plan is known as such before it is continued."""
    return hashlib.sha256(json.dumps(members, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _refit_done(refit_dir: Path, members: list[dict]) -> bool:
    """True when every planned refit trial has ended; False while some have not (interrupted). A refit whose
    trials have all ended but are not the plan's members is an error: running it again could never finish."""
    statuses = ray_statuses(refit_dir)
    ended = all(s.get("status") in ("TERMINATED", "ERROR") for s in statuses.values())
    if statuses and ended and len(statuses) != len(members):
        raise FinalError(f"the refit in {refit_dir} ran {len(statuses)} trials, but the plan has {len(members)} "
                         f"({members_text(members)}): it was started from another plan; remove {refit_dir.parent} "
                         "to start the final stage afresh")
    return bool(statuses) and ended


def check_refit_matches(refit_dir: Path, plan: FinalPlan) -> None:
    """A refit already on disk must be the plan's: else continuing it could never finish the plan (a damaged
    plan made again with other settings), and each run would end 'interrupted' forever."""
    if not has_whole_state(refit_dir):
        return
    # (a trial folder without its params.json yet holds nothing: Ray writes that file first)
    params = [p for d in trial_dirs(refit_dir) if isinstance(p := read_json(d / PARAMS_FILE), dict)]
    on_disk = [p["member"] for p in params if isinstance(p.get("member"), dict)]
    key = lambda m: json.dumps(m, sort_keys=True, default=str)  # noqa: E731
    other_plan = any(p.get("plan", plan_key(plan.members)) != plan_key(plan.members) for p in params)
    if other_plan or not set(map(key, on_disk)) <= set(map(key, plan.members)) \
            or len(ray_statuses(refit_dir)) > len(plan.members):
        got = members_text(on_disk) or "no readable member"
        raise FinalError(f"the refit in {refit_dir} was started from another plan ({got}) than this one "
                         f"({members_text(plan.members)}); run the final stage with the settings it was started "
                         f"with, or remove {refit_dir.parent} to start it afresh")


def refit_models(refit_dir: Path) -> tuple[list[dict], list[str], list[str]]:
    """(the final checkpoints of the refit trials that completed, loaded, in the plan's order (by source trial,
    then seed); the trials they came from; one line per refit trial that did not complete)."""
    done, problems = [], []
    for d in trial_dirs(refit_dir):
        member = ((read_json(d / PARAMS_FILE) or {}).get("member")) or {}
        want = member.get("epochs")
        timed = isinstance(member.get("train"), dict) and bool(member["train"].get("train_seconds"))
        best = None
        for c in checkpoint_dirs(d):
            try:
                ckpt = load_checkpoint(c / CHECKPOINT_FILE)
            except CheckpointError:
                continue
            if best is None or ckpt["epoch"] > best["epoch"]:
                best = ckpt
        order = (str(member.get("source_trial")), member.get("seed_index", 0))
        # (a timed member, a time budget's, is whole once its seconds were spent: its schedule is done)
        short = best is not None and (not (best.get("metrics") or {}).get("schedule_done") if timed
                                      else want is not None and best["epoch"] < want)
        if best is None or want is None or short:
            got = ("no readable checkpoint" if best is None else "cut before its schedule's end" if timed
                   else f"only {best['epoch']} of {want} epochs")
            problems.append(f"refit {d.name} (from trial {order[0]}, seed +{order[1]}): {got}")
            continue
        done.append((order, best))
    done.sort(key=lambda pair: pair[0])
    return [ckpt for _, ckpt in done], sorted({order[0] for order, _ in done}), problems
