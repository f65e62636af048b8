"""Hyperparameter search: Ray Tune trials of the training core, Optuna (TPE) suggesting
configs, ASHA stopping weak trials early.

    python search/run.py [--samples 50] [--config configs/search/default.yaml] [--name NAME]
                         [--storage results/] [--address ADDR] [--max-epochs N]
                         [--gpus-per-trial F] [--cpus-per-trial N] [--concurrency N] [--resume]
                         [--data-dir D] [--split S] [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shlex
import sys
import time
from pathlib import Path

from search.budget import clock, parse_duration
from search.final_settings import FinalError, FinalSettings
from search.layout import SETTINGS_FILE, has_whole_state, is_uri
from search.ledger import Ledger
from search.lock import LOCK_FILE, ExperimentLock, LockedError
from search.options import add_final_args, add_shared_args, settings_from
from search.resources import Resources
from search.settings import DATA_KEYS, SearchSettings, SettingsError, read_settings, settings_path, space_copy
from search.signals import sigterm_as_sigint
from search.space import SearchSpec, default_point, load_search_spec
from search.storage import check_storage
from training.config import ConfigError, check_device, make_config
from training.data import REPO_ROOT, DataNotFoundError
from training.idx import IdxError

DEFAULT_SEARCH = REPO_ROOT / "configs" / "search" / "default.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Ray Tune + Optuna + ASHA search over EMNIST training configs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--samples", type=int, default=None, help="number of trials (default: the YAML's, else 50)")
    p.add_argument("--config", type=Path, default=None,
                   help=f"search space YAML (default: {DEFAULT_SEARCH.relative_to(REPO_ROOT)})")
    p.add_argument("--name", default=None, help="experiment name (default: <config>-<time>); needed for --resume")
    add_shared_args(p, device_default=None)  # (a resumed search keeps its own device when none is given)
    p.add_argument("--max-epochs", type=int, default=None, help="ASHA budget per trial (default: the YAML's)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted experiment --name, with the settings it was started with")
    p.add_argument("--split", default=None)
    p.add_argument("--seed", type=int, default=None, help="seeds the Optuna sampler (default 0)")
    p.add_argument("--mps", action="store_true",
                   help="run the trials sharing a GPU through NVIDIA MPS (started for this search, stopped after)")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="end the whole command, search and final stage, within this time (90s, 30m, 2h): "
                        "the driver plans the split and ASHA compares trials at equal cost")
    p.add_argument("--no-final", action="store_true",
                   help="stop after the search: no refit, ensemble or test report (search/final.py can run it later)")
    add_final_args(p)
    return p.parse_args(argv)


MAX_SEED = 2**32 - 1  # Optuna's sampler seeds numpy, which takes 0..2**32-1
MAX_SAMPLES = 100_000


def check_args(args: argparse.Namespace, spec: SearchSpec) -> None:
    """Every argument problem is reported here, before Ray or the data are touched (and before the experiment
    folder is made)."""
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    for name in ("gpus_per_trial", "cpus_per_trial"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.time_budget is not None and not isinstance(args.time_budget, float):
        args.time_budget = parse_duration(args.time_budget)
    if args.time_budget is not None and args.max_epochs is not None and not args.resume:
        raise ConfigError("--max-epochs and --time-budget: under a budget the driver plans each trial's epochs "
                          "from what this machine measures; leave --max-epochs out")
    if args.samples is not None and not 1 <= args.samples <= MAX_SAMPLES:
        raise ConfigError(f"--samples must be between 1 and {MAX_SAMPLES}, got {args.samples}")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ConfigError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if args.max_epochs is not None and args.max_epochs < spec.grace_period:
        raise ConfigError(f"--max-epochs {args.max_epochs} is below the ASHA grace period {spec.grace_period}")
    if args.gpus_per_trial is not None and not 0 <= args.gpus_per_trial <= 8:
        raise ConfigError(f"--gpus-per-trial must be between 0 and 8, got {args.gpus_per_trial}")
    if args.cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.resume and not args.name:
        raise ConfigError("--resume needs --name of the experiment to continue")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise ConfigError(f"--name must be a plain folder name, got {args.name!r}")


# What a resumed search must keep: Ray restores the trials, the searcher and the total number of
# trials as they were, so these are read back from the experiment and a different value given
# with --resume is an error rather than silently ignored (or, for --split, a crash in every trial).
KEPT = ("config", "samples", "max_epochs", "split", "seed", "device")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def settings_of(args: argparse.Namespace, base: dict | None = None) -> SearchSettings:
    """The settings to save with a new experiment (written by search.tuner just before it starts);
    `data` is how the training split was divided (the final stage reads the same validation images)."""
    config = Path(args.config).resolve()
    return SearchSettings(config=str(config), config_sha256=_sha256(config), **space_copy(config),
                          samples=args.samples, max_epochs=args.max_epochs, split=args.split, seed=args.seed,
                          device=args.device, data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,
                          data={k: base[k] for k in DATA_KEYS} if base else None, time_budget=args.time_budget,
                          budget=getattr(args, "budget_plan", None))


def apply_saved_settings(args: argparse.Namespace, exp_dir: str) -> None:
    """For --resume: fill in what was not given from the experiment's saved settings (local or in
    cloud storage), and refuse what contradicts them. Experiments from before the settings were
    saved have none: their command line is taken as it is."""
    path = settings_path(exp_dir)
    try:
        saved = read_settings(exp_dir)
    except SettingsError as e:  # (it names the file and the setting)
        raise ConfigError(f"--resume: {e}; restore it, or start a new search with another --name") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: cannot read {path}: {e}") from None
    if saved is None:
        return
    for key in KEPT:
        given, was = getattr(args, key), getattr(saved, key)
        if key == "config" and given is not None:
            given = str(Path(given).resolve())
        if given is None:
            setattr(args, key, Path(was) if key == "config" and was else was)
        elif given != was:
            was = "not given: the space file's value" if was is None else was
            raise ConfigError(f"--{key.replace('_', '-')} {given} differs from the experiment's setting ({was}, "
                              f"saved in {path}): a resumed search keeps its settings. Leave it out, or "
                              "start a new search with another --name")
    if args.data_dir is None and saved.data_dir:
        args.data_dir = Path(saved.data_dir)
    budget = saved.time_budget
    if args.time_budget is not None and parse_duration(args.time_budget) != budget:
        raise ConfigError(f"--time-budget {args.time_budget} differs from the experiment's "
                          f"({clock(budget) if budget else 'none'}, saved in {path}): a resumed search continues with "
                          "what is left of its own budget. Leave it out, or start a new search with another --name")
    args.time_budget, args.budget_plan = budget, saved.budget
    config = Path(args.config)
    if not config.is_file():
        raise ConfigError(f"--resume: the experiment's search space {config} is gone; restore it or pass --config")
    if saved.config_sha256 and _sha256(config) != saved.config_sha256:
        raise ConfigError(f"--resume: {config} changed since the experiment started (the resumed trials and "
                          "searcher keep the old space); restore the file or start a new search with another --name")


def resume_command(args: argparse.Namespace, name: str) -> str:
    """The command that continues this experiment, shell-quoted: names and paths with spaces or quotes
    paste as they are. For cloud storage it also lists the settings (the same as those saved there,
    so harmless), for a driver on a machine that cannot read them back."""
    cmd = ["python", "search/run.py", "--name", name, "--storage", str(args.storage), "--resume"]
    if is_uri(args.storage):
        for key in (*KEPT, "data_dir"):
            value = getattr(args, key)
            if value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
    # The final stage's settings are not saved with the search (its plan keeps them once made): a resumed
    # run must be asked the same, or its final stage is refused.
    final = FinalSettings(args.ensemble_k, args.refit_seeds, args.refit_epochs, args.tta)
    cmd += ["--no-final"] if args.no_final else final.options()
    return shlex.join(cmd)


def end_of_search(args: argparse.Namespace, name: str, exp_dir: str, spec: SearchSpec, data, outcome,
                  final: FinalSettings, ledger=None) -> int:
    """What follows the trials: the resume command when interrupted, else the summary (test split
    of the best trial) and the final stage (refit, ensemble, delivered model)."""
    from search.final import run_final
    from search.summary import add_budget, finish_experiment

    if not outcome.complete:
        print(f"\nsearch interrupted with {outcome.done} of {outcome.samples} trials done; nothing finished is lost. "
              f"Continue with:\n  {resume_command(args, name)}")
        return 130
    if ledger is not None:
        ledger.enter("summary")
    code = finish_experiment(exp_dir, data_dir=args.data_dir, device=args.device or "auto")
    if code == 0 and not args.no_final:
        if ledger is not None:
            ledger.enter("final")
            if ledger.budget_s is not None:  # the final stage ends by the budget's end (less a margin for its report)
                final.deadline = time.time() + ledger.left() - max(3.0, 0.01 * ledger.budget_s)
        try:
            code = run_final(exp_dir, data, final, args.data_dir)
        except FinalError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
    if ledger is not None and code == 0 and not is_uri(exp_dir):
        ledger.close()
        for line in add_budget(exp_dir, ledger.summary()):
            print(line)
    return code


def fit_to_machine(args, spec: SearchSpec, base: dict, data, res: Resources, n_test: int, samples: int, ledger):
    """Measure this machine on the space (a few seconds), then print what the search will cost here, or, with a
    time budget, plan it (search.budget.plan; a budget too small is an error naming the smallest that works).
    Returns the spec and trial base the search runs with."""
    from search.budget import calibrate, estimate, plan

    concurrency = res.on_this_machine(base["device"])[2]
    cal = calibrate(spec, data, threads=int(max(1, args.cpus_per_trial)), seed=args.seed, samples=3)
    speeds = ", ".join(f"{s.train_ips:,.0f}" for s in cal.speeds)
    where = f"{concurrency} trial(s) at once"
    if args.time_budget is None:
        est = estimate(spec, samples, concurrency, cal, n_test, ledger.elapsed() if ledger else 0.0)
        rungs = "/".join(f"{r:g}" for r in est.rungs)
        advice = ("; --time-budget 30m fits the search and its final stage into 30 minutes"
                  if est.total_s > 45 * 60 else "")
        print(f"estimated {clock(est.total_s)} on this machine for {samples} trials (ASHA {rungs} epochs, {where}) "
              f"and the final stage: the search {clock(est.search_s)}, the final stage {clock(est.final_s)} "
              f"(measured {speeds} training images/s per trial in {cal.seconds:.0f} s){advice}", flush=True)
        return spec, base
    p = plan(args.time_budget, ledger.elapsed() if ledger else cal.seconds, cal, concurrency, n_test,
             tta=args.tta != "off")
    args.budget_plan = p.to_dict()
    print(f"time budget {clock(args.time_budget)} on this machine ({where}; measured {speeds} training images/s per "
          f"trial): the search {clock(p.search_s)}, its final stage {clock(p.final_s)}; ASHA on each trial's own "
          f"seconds, rungs {'/'.join(f'{r:.0f}' for r in p.rungs)} s; an epoch is {p.epoch_images:,} images",
          flush=True)
    return apply_plan(args, spec, args.budget_plan)


def apply_plan(args, spec: SearchSpec, budget_plan: dict | None):
    """The trials of a budgeted search: timed runs of `max_t_s` seconds, their schedules spread over them (so a trial
    that ASHA keeps to the last rung has annealed there, however fast it trains: equal cost, equal schedule), which
    report every `epoch_images` images. The space's epochs keep giving the schedules their shape."""
    if not budget_plan:
        return spec, spec.trial_base()
    spec.fixed["train_seconds"] = float(budget_plan["max_t_s"])
    spec.fixed["epoch_images"] = int(budget_plan["epoch_images"])
    if "early_stop_patience" not in spec.params:  # ASHA and the deadline stop trials; a patience counted in
        spec.fixed["early_stop_patience"] = 0  # short epochs would end them on noise (measured: 8 of 32 trials)
    return spec, spec.trial_base()


def experiment_dir(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if is_uri(storage) else str(Path(storage).resolve() / name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_as_sigint()  # SIGTERM (SLURM, Kubernetes, timeout) stops the search as Ctrl+C does
    lock = ledger = None
    args.budget_plan = None
    try:
        check_storage(args.storage, args.name or "")  # a file, read-only, unreachable, a name too long
        if args.resume and args.name:
            apply_saved_settings(args, experiment_dir(args.storage, args.name))
        args.config = args.config or DEFAULT_SEARCH
        args.seed = 0 if args.seed is None else args.seed
        spec = load_search_spec(args.config)
        check_args(args, spec)
        final = settings_from(args)  # (its resources are the search's: the refit's trials run as the search's do)
        res = final.res
        final.check()
        if args.max_epochs is not None:
            spec.max_epochs = args.max_epochs
        overrides = {k: v for k, v in (("split", args.split), ("device", args.device)) if v is not None}
        spec.fixed.update(overrides)
        base = spec.trial_base()  # validates fixed + overrides
        if not args.address:  # (a cluster's workers may have the GPU its driver lacks)
            check_device(base["device"])
        make_config(default_point(spec), base=base)
        samples = args.samples = args.samples or spec.samples or 50
        name = args.name or f"{args.config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp_dir = experiment_dir(args.storage, name)
        if args.resume and not is_uri(exp_dir) and not Path(exp_dir).is_dir():
            raise ConfigError(f"--resume: no experiment at {exp_dir}")
        # One driver per experiment, from before anything is written until this process ends.
        try:
            lock = ExperimentLock(exp_dir).acquire()
        except OSError as e:
            raise ConfigError(f"cannot write the experiment folder {exp_dir}: {e.strerror or e}") from None
        if not is_uri(exp_dir):
            started = has_whole_state(exp_dir)
            if args.resume and not started:
                if not (Path(exp_dir) / SETTINGS_FILE).is_file():
                    raise ConfigError(f"--resume: no experiment at {exp_dir}")
                # Stopped before Ray's first snapshot was whole: no trial had written anything (a trial
                # waits until the experiment state names it, see search.trainable), so start it afresh.
                print(f"{exp_dir} was stopped before its first trial was recorded; starting its search afresh")
                args.resume = False
            elif not args.resume and any(p.name != LOCK_FILE for p in Path(exp_dir).iterdir()):
                raise ConfigError(f"{exp_dir} already exists; use --resume to continue it or another --name")
        from training.data import check_split, load_for_config

        # Read once by the driver; trials receive it through Ray's object store.
        data = load_for_config(base, args.data_dir)
        # The test split is read only for the final summary: check its files now, not after every trial.
        n_test = final.n_test = check_split(base["split"], "test", args.data_dir, data.classes)
        ledger = Ledger(exp_dir, args.time_budget) if not is_uri(exp_dir) else None
        if not args.resume:  # what it will cost here, measured before any trial runs (search/budget.py)
            spec, base = fit_to_machine(args, spec, base, data, res, n_test, samples, ledger)
        elif args.time_budget is not None:
            spec, base = apply_plan(args, spec, args.budget_plan)
    except (ConfigError, DataNotFoundError, IdxError, ValueError, LockedError, KeyboardInterrupt) as e:
        if lock is not None:
            lock.release(discard=True)  # (a folder it made for nothing goes again)
        if isinstance(e, KeyboardInterrupt):
            print("\ninterrupted before the search started; nothing was written", file=sys.stderr)
            return 130
        print(f"error: {e}", file=sys.stderr)
        return 2

    stop_mps = None
    if args.mps:
        from search.mps import MpsError, start_mps

        try:  # before Ray starts, so that every trial process inherits the MPS pipe
            if not args.address:  # (the daemon, too, ends with a driver that was killed: search/reaper.py)
                from search.reaper import start_reaper

                start_reaper()
            stop_mps = start_mps()
        except MpsError as e:
            lock.release()
            print(f"error: {e}", file=sys.stderr)
            return 2
    from search.tuner import run_search  # Ray is imported only from here on

    try:
        deadline = None
        if ledger is not None:
            ledger.enter("search")
            ledger.start_heartbeat()
            if args.time_budget is not None:  # the search ends where the final stage's share begins
                final_s = float((args.budget_plan or {}).get("final_s", 0.0))
                margin = float((args.budget_plan or {}).get("margin_s", 0.0))
                deadline = time.time() + max(0.0, ledger.left() - final_s - margin)
                print(f"time budget: {clock(ledger.left())} left; the search ends in {clock(deadline - time.time())}, "
                      f"then {clock(final_s)} for its final stage", flush=True)
        outcome = run_search(spec, data, exp_dir, name, args.storage, samples, seed=args.seed, res=res,
                             address=args.address, resume=args.resume,
                             settings=None if args.resume else settings_of(args, base),
                             budget=args.budget_plan, deadline=deadline)
        return end_of_search(args, name, exp_dir, spec, data, outcome, final, ledger)
    except KeyboardInterrupt:  # a second Ctrl+C during Ray's shutdown, or one during the summary
        print(f"\ninterrupted; nothing finished is lost. Continue with:\n  {resume_command(args, name)}", flush=True)
        return 130
    finally:
        if ledger is not None:
            ledger.close()
        if stop_mps is not None:
            stop_mps()
        lock.release()


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
