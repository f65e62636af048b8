"""Ray Tune wiring: resources, Optuna searcher, ASHA scheduler, storage, resume, progress."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from search import ray_env  # noqa: F401  (Ray's settings, set before Ray is imported)

# isort: split
import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from search import ray_private, repairs
from search.budget import FACTOR, clock
from search.layout import SETTINGS_FILE, add_session, is_uri, ray_statuses
from search.reaper import start_reaper
from search.resources import Resources
from search.results import had_its_seconds
from search.searcher import ForwardingLimiter, ResumableOptunaSearch
from search.settings import SearchSettings, write_settings
from search.signals import sigterm_as_sigint
from search.space import DefineByRun, SearchSpec, cheapest_point, default_point, start_points
from search.trainable import train_trial
from training.data import EmnistData
from training.failpoint import stop_here

METRIC, MODE = "val_acc", "max"


class Progress(tune.Callback):
    """One readable status line when something changes (at most every few seconds), instead
    of Ray's per-result tables: trial counts by state, best accuracy so far, an ETA."""

    def __init__(self, samples: int, max_epochs: int, every_s: float = 5.0, deadline: float | None = None,
                 epochs_per_trial: float | None = None, concurrency: int = 1, max_t_s: float | None = None):
        self.samples, self.max_epochs, self.every_s, self.deadline = samples, max_epochs, every_s, deadline
        self.max_t_s = max_t_s  # a time budget's ASHA max_t (seconds)
        # the ETA: trial-epochs still expected (ASHA's expected resource per trial) x measured seconds per epoch
        self.epochs_per_trial, self.concurrency = epochs_per_trial, max(1, concurrency)
        self.epoch_s = [0.0, 0]  # measured: summed seconds, epochs
        self.start = time.time()
        self.last_print = 0.0
        self.best: tuple[float, str] = (-1.0, "")
        self.done_epochs = 0
        self.ray_samples: int | None = None  # the total Ray's (restored) search algorithm will run

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        # A restored experiment runs the number of trials it was started with, whatever search.json says now.
        self.ray_samples = total_num_samples if isinstance(total_num_samples, int) and total_num_samples > 0 else None
        if self.ray_samples:
            self.samples = self.ray_samples

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.done_epochs += 1
        if isinstance(result.get("epoch_seconds"), int | float):
            self.epoch_s[0] += result["epoch_seconds"]
            self.epoch_s[1] += 1
        if result.get("resume_warning"):  # see search.repairs.resume_state
            start = result.get("resumed_from_epoch") or 0
            how = f"resumed from epoch {start}" if start else "restarted from scratch"
            print(f"  trial {trial.trial_id}: newest checkpoint unusable, {how} "
                  f"(epochs after {start} run again): {result['resume_warning']}", flush=True)
        if result.get(METRIC, -1) > self.best[0] and not result.get("diverged"):
            self.best = (result[METRIC], trial.trial_id)
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print(trials, force=True, ending=(trial, "TERMINATED"))

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"  trial {trial.trial_id} failed: {trial.error_file or ''}", flush=True)
        self._print(trials, force=True, ending=(trial, "ERROR"))

    def _print(self, trials, force: bool = False, ending=None) -> None:
        now = time.time()
        if not force and now - self.last_print < self.every_s:
            return
        self.last_print = now
        counts: dict[str, int] = {}
        stopped = diverged = 0
        for t in trials:
            # Callbacks run just before Ray updates the ending trial's status.
            status = ending[1] if ending and t is ending[0] else t.status
            counts[status] = counts.get(status, 0) + 1
            last = t.last_result or {}
            if status == "TERMINATED":
                if last.get("diverged"):
                    diverged += 1
                elif ended_by_asha(last, t.config, self.max_epochs, self.max_t_s):
                    stopped += 1
        finished = counts.get("TERMINATED", 0) + counts.get("ERROR", 0)
        elapsed = now - self.start
        eta = ""
        if self.deadline is not None:  # under a time budget the search ends at its deadline, not at `samples`
            eta = f", search ends in {_clock(max(0.0, self.deadline - now))}"
        elif self.epochs_per_trial and self.epoch_s[1]:  # from the speeds measured so far
            left = max(0.0, self.samples * self.epochs_per_trial - self.done_epochs)
            eta = f", ETA ~{_clock(left * self.epoch_s[0] / self.epoch_s[1] / self.concurrency)}"
        elif finished:
            eta = f", ETA ~{_clock(elapsed / finished * (self.samples - finished))}"
        best = f"best val_acc {self.best[0]:.4f} ({self.best[1]})" if self.best[1] else "best val_acc -"
        errored, running, pending = (counts.get(k, 0) for k in ("ERROR", "RUNNING", "PENDING"))
        print(
            f"[{_clock(elapsed)}] trials {finished}/{self.samples} done ({stopped} stopped by ASHA, "
            f"{diverged} diverged, {errored} errored), {running} running, {pending} pending "
            f"| {best} | {self.done_epochs} epochs{eta}",
            flush=True,
        )


def ended_by_asha(last: dict, config: dict, max_epochs: int, max_t_s: float | None = None) -> bool:
    """Whether a trial that ended with result `last` was stopped by ASHA: it ended before its epochs, or a timed
    trial (a time budget's, ASHA's max_t `max_t_s` seconds) before its seconds, and neither its patience nor the
    search's deadline ended it."""
    if last.get("early_stopped") or last.get("stopped_early") or last.get("cut_by_deadline"):
        return False
    if (config.get("train_seconds") or 0) > 0:  # (it ends by itself once its seconds are spent)
        return not had_its_seconds(last, max_t_s)
    return last.get("epoch", max_epochs) < max_epochs


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def init_ray(address: str | None) -> None:
    # Trials' own output stays in Ray's logs; failures surface through Progress and error.txt.
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": True,
              "logging_level": "WARNING"}
    if address:
        # Ship this project's packages to the cluster's workers, so nodes only need the dependencies.
        import models
        import search
        import training

        kwargs["runtime_env"] = {"py_modules": [os.path.dirname(m.__file__) for m in (training, models, search)]}
        ray.init(address=address, **kwargs)
    else:
        # A fresh local instance, never a cluster that happens to run on this machine
        # (use --address auto for that). Its processes end with this driver, however it ends (search/reaper.py).
        start_reaper()
        ray.init(address="local", **kwargs)
    # ray.init installs its own SIGTERM handler (exit at once, with a stack dump): SIGTERM stops as Ctrl+C does
    sigterm_as_sigint()


def resources(res: Resources) -> tuple[float, float, int]:
    """(cpus per trial, gpus per trial, concurrency) that fit this machine or cluster."""
    try:
        return res.fit(ray.cluster_resources())
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def run_config_for(name: str, storage: str, callbacks: list,
                   checkpoint_config: tune.CheckpointConfig, deadline: float | None = None) -> tune.RunConfig:
    """The run settings every Tune experiment of this project shares (search and refit)."""
    return tune.RunConfig(
        name=name,
        storage_path=storage if is_uri(storage) else os.path.abspath(storage),
        checkpoint_config=checkpoint_config,
        failure_config=tune.FailureConfig(max_failures=2),  # transient errors: retry from the checkpoint
        # Trial working dirs (our TensorBoard events) are uploaded to storage, also from other nodes.
        sync_config=tune.SyncConfig(sync_artifacts=True),
        # (a local experiment: the driver keeps whole copies of Ray's state files, search.repairs.StateKeeper)
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), *callbacks,
                   *([] if is_uri(storage) else [repairs.StateKeeper(Path(storage).resolve() / name, deadline)])],
        verbose=0,
    )


def make_run_config(name: str, storage: str, callbacks: list, deadline: float | None = None) -> tune.RunConfig:
    # Best two checkpoints per trial by validation accuracy (Ray also keeps the latest).
    return run_config_for(name, storage, callbacks, tune.CheckpointConfig(
        num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE), deadline=deadline)


def restore_tuner(path: str, trainable, run_config: tune.RunConfig) -> tune.Tuner:
    """Tuner.restore, continuing unfinished and errored trials, with this session's callbacks.
    Ray restores the run config saved by the first session, callbacks included (which print to a
    terminal that may be gone) and has no argument for them (search/ray_private.py). State files cut
    short by a killed driver are set aside first: Ray would start the experiment over from nothing."""
    if not is_uri(path):
        try:
            repairs.set_aside_damaged_state(Path(path))
        except OSError as e:  # (damaged/ a planted link, a read-only folder)
            raise SystemExit(f"error: cannot set aside the damaged state files of {path}: {e}") from None
    tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    ray_private.replace_callbacks(tuner, run_config.callbacks)
    return tuner


class PortfolioASHA(ASHAScheduler):
    """ASHA that lets the portfolio, the default config and the space's `start:` points, train to the end: their
    results set the bar at each rung for the trials the searcher suggests, but are never stopped there themselves.

    Why (under a time budget): a rung judges a trial at a third of its time, where the configurations that are fast
    per image lead whatever they reach at the end. Measured on the 2-core machine (30-minute budget, bymerge), the
    portfolio's vgg width 1 stood at 0.870 val at its rung against the default small_cnn's ~0.88, and was stopped,
    though at the end of the same time it is ahead (0.8998 against 0.8909 test, 330 s timed runs). Points known to
    do well are worth their whole time; the searcher's guesses are what early stopping is for."""

    def __init__(self, protected: list[dict], **kwargs):
        super().__init__(**kwargs)
        self.protected = [dict(p) for p in protected]

    def is_protected(self, config: dict) -> bool:
        return any(all(config.get(k) == v for k, v in p.items()) for p in self.protected)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if (action == self.STOP and result.get(self._time_attr, 0) < self._max_t
                and self.is_protected(trial.config)):
            self._num_stopped -= 1
            return self.CONTINUE
        return action


def scheduler_for(spec: SearchSpec, budget: dict | None) -> ASHAScheduler:
    """ASHA on epochs; under a time budget on each trial's own seconds of training and validation (run_seconds),
    with the rungs the budget planned (search.budget): trials compared at equal cost, the portfolio (the default
    config and the space's start points) trained to the end (PortfolioASHA)."""
    if budget:
        return PortfolioASHA([default_point(spec), *start_points(spec)], time_attr="run_seconds",
                             max_t=float(budget["max_t_s"]), grace_period=float(budget["grace_s"]),
                             reduction_factor=FACTOR)
    return ASHAScheduler(time_attr="epoch", max_t=spec.max_epochs, grace_period=spec.grace_period,
                         reduction_factor=spec.reduction_factor)


def make_tuner(trainable, spec: SearchSpec, samples: int, concurrency: int, seed: int,
               run_config: tune.RunConfig, reuse_actors: bool = True, budget: dict | None = None,
               ray_time_budget_s: float | None = None) -> tune.Tuner:
    # The default config first (never worse than it), the space's `start:` portfolio, then, under a budget, the
    # space's cheapest corner (FLAML's low-cost start: what a short budget can afford to train well)
    points = [default_point(spec)]
    for p in [*start_points(spec), *([cheapest_point(spec)] if budget else [])]:
        if p not in points:
            points.append(p)
    searcher = ResumableOptunaSearch(  # Optuna, caught up with the experiment on --resume
        space=DefineByRun(spec),
        metric=METRIC,
        mode=MODE,
        points_to_evaluate=points,
        sampler=_sampler(seed),
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ForwardingLimiter(searcher, max_concurrent=concurrency),
            scheduler=scheduler_for(spec, budget),
            num_samples=samples,
            # a backstop only: under a budget the trials end at the search's deadline themselves (training.trainer)
            # (ray_time_budget_s: Ray's own budget alone, the baseline benchmarks.budget compares with)
            time_budget_s=float(budget["search_s"]) + 120.0 if budget else ray_time_budget_s,
            metric=METRIC,
            mode=MODE,
            # Reusing actors saves ~1.5 s of start-up per trial. On a cluster a node can vanish, and Ray
            # then retries the trial on the cached (dead) actor until max_failures is spent, so there
            # each trial gets a fresh actor (tests/test_cluster.py::test_worker_node_killed_mid_search).
            reuse_actors=reuse_actors,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=run_config,
    )


@dataclass
class SearchOutcome:
    samples: int  # the trials the experiment runs in all (Ray's own count when it restored one)
    done: int  # trials that ended (finished, stopped, diverged or errored)
    sessions: list[float]  # seconds of every driver session of the search (a first run, each --resume), this one last
    sessions_complete: bool = True  # False: an earlier session's record was damaged, so the total misses time
    unfinished: int = 0  # trials in the experiment state that had not ended

    @property
    def total_seconds(self) -> float:
        return sum(self.sessions)

    @property
    def complete(self) -> bool:
        return self.done >= self.samples and not self.unfinished


def run_search(spec: SearchSpec, data: EmnistData, exp_dir: str, name: str, storage: str, samples: int, *,
               seed: int = 0, res: Resources | None = None, address: str | None = None, resume: bool = False,
               settings: SearchSettings | None = None, budget: dict | None = None, deadline: float | None = None,
               ray_time_budget_s: float | None = None) -> SearchOutcome:
    """Run (or with resume continue) the search. `settings` are saved with a new experiment so that
    --resume needs only its name (search.run.apply_saved_settings). Ray runs only inside this call.
    Under a time budget (`budget`: search.budget.Plan as a dict) the search ends by `deadline` (time.time()):
    no trial starts that could not reach ASHA's first rung, and running trials end at their next step."""
    init_ray(address)
    ForwardingLimiter.start_until = deadline - float(budget["grace_s"]) if deadline and budget else deadline
    try:
        cpt, gpt, concurrency = resources(res or Resources())
        trainable = tune.with_resources(tune.with_parameters(train_trial, data=data, deadline=deadline),
                                        {"cpu": cpt, "gpu": gpt})
        each = (f"up to {clock(spec.fixed['train_seconds'])} each" if spec.fixed.get("train_seconds")
                else f"up to {spec.max_epochs} epochs each")
        print(f"experiment {name}: {samples} trials, {each}, {concurrency} at once "
              f"({cpt:g} CPU{f' + {gpt:g} GPU' if gpt else ''} per trial)")
        print(f"data: {data.split}, {len(data.train_x)} train / {len(data.val_x)} val images; results in {exp_dir}")
        from search.budget import expected_resource

        progress = Progress(samples, spec.max_epochs, deadline=deadline, concurrency=concurrency,
                            max_t_s=float(budget["max_t_s"]) if budget else None,
                            epochs_per_trial=None if budget else expected_resource(
                                spec.grace_period, spec.reduction_factor, spec.max_epochs))
        run_config = make_run_config(name, storage, [progress], deadline=deadline)
        if resume:
            print(f"resuming {exp_dir}: finished trials are kept, unfinished ones continue from their checkpoints")
            tuner = restore_tuner(exp_dir, trainable, run_config)  # (sets aside damaged state files first)
            if not is_uri(exp_dir):
                repairs.set_aside_unknown_trials(Path(exp_dir))
        else:
            tuner = make_tuner(trainable, spec, samples, concurrency, seed, run_config, reuse_actors=not address,
                               budget=budget, ray_time_budget_s=ray_time_budget_s)
        if settings is not None:
            write_settings(exp_dir, settings)
        stop_here("search:before-fit")  # (the fault tests kill the driver here: training/failpoint.py)
        start = time.time()
        try:
            tuner.fit()
        finally:  # (also when a second Ctrl+C cuts Ray's own shutdown short: the session still counts)
            sessions, sessions_complete = add_session(exp_dir, time.time() - start)
    finally:
        ray.shutdown()
    # Counted from the experiment state Ray saved, not from the Trial objects in memory: on Ctrl+C,
    # Ray saves the state and then stops the running trials, which marks them TERMINATED in memory;
    # an interrupted last trial must not count as done, or the search would end as if complete.
    saved = ray_statuses(exp_dir)
    done = sum(t.get("status") in ("TERMINATED", "ERROR") for t in saved.values())
    total = progress.ray_samples or samples
    if deadline is not None and time.time() >= ForwardingLimiter.start_until and done == len(saved):
        total = samples = done  # the budget's search is over: what ran is the search (every trial has ended)
    if total != samples:
        print(f"note: the experiment runs {total} trials, as it was started with (Ray's saved state), not the "
              f"{samples} that {exp_dir}/{SETTINGS_FILE} says now", flush=True)
    return SearchOutcome(total, done, sessions, sessions_complete, unfinished=len(saved) - done)


def _sampler(seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.samplers.TPESampler(seed=seed)


if __name__ == "__main__":
    sys.exit("run search/run.py instead")
