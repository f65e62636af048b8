"""Final stage of a search: from a leaderboard to the model a user takes away.

    python search/final.py --name NAME [--storage results/] [--ensemble-k 3] [--refit-seeds 1]
                           [--refit-epochs best|full] [--data-dir D] [--device auto]
                           [--gpus-per-trial F] [--cpus-per-trial N] [--address ADDR]

It runs by default at the end of `search/run.py` (--no-final skips it), alone on a finished
experiment, and again after an interruption, continuing where it stopped. This module runs the steps; each
has its own module:

1. Ensemble selection on the validation split (search/selection.py): the top-K trials by validation accuracy
   (distinct configs), each at its best checkpoint, averaged in probability space. k = 1..K is chosen on
   validation; an ensemble is kept only where it beats the best single model there. With the refit's members it
   is the plan, final/plan.json (search/plan.py), fixed before the first refit starts.
2. Refit (search/refit.py, the only part that runs Ray): the chosen configs trained again on the whole training
   split (train + validation) for the epochs that were best in their trial (or the full budget), --refit-seeds
   seeds each, as Ray Tune trials in final/refit/: the same resources, retries and resume as the search.
3. The delivered model, final/model.pt (search/delivery.py): the refitted members, one model or an ensemble file.
   Predictor, predict.py, the dashboard and export load it by default.
4. The test split, read once, here at the very end (search/final_report.py): the best single trial, the ensemble
   of search checkpoints, the delivered model and each top trial, with 95 % Wilson intervals, per-class P/R/F1 and
   the most-confused pairs -> one record, summary.json["final"], rendered as final/report.md and
   final/confused_pairs.png (search/report.py). Nothing here chooses anything on the test split.

Each checkpoint is loaded once per step that needs it: the candidates' by the selection, and again once for the
delivery and the test evaluation (which may run in another process, after an interruption).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from search.delivery import check_test_classes, publish, stage_model, staged_path
from search.final_report import FinalReport, measure
from search.final_settings import FinalError, FinalSettings
from search.layout import (
    FINAL_DIR,
    MODEL_FILE,
    PAIRS_IMAGE,
    PARAMS_FILE,
    PLAN_FILE,
    REFIT_DIR,
    REPORT_FILE,
    SETTINGS_FILE,
    SUMMARY_FILE,
    is_uri,
    own_dir,
    ray_statuses,
    set_aside,
    trial_dirs,
)
from search.options import add_final_args, add_shared_args, settings_from
from search.plan import DamagedPlan, FinalPlan, PlanError, read_plan, relative_checkpoint, write_plan
from search.refit import check_refit_matches, plan_refit, refit_models, run_refit
from search.report import confused_pairs_image, print_final
from search.results import load_experiment
from search.selection import candidates, select_ensemble
from search.settings import data_config, read_settings
from search.signals import sigterm_as_sigint
from search.timed_refit import fit_refit
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import ConfigError
from training.data import EmnistData
from training.fileio import read_json

SUMMARY_KEYS = ("best_trial", "test_acc", "test_n", "per_class", "source_checkpoint")


def read_summary(exp_dir: Path, data_dir, device: str) -> dict:
    """summary.json, checked; a damaged one (cut short, edited, not an object, a field missing) is set aside in
    <exp>/damaged/ and written again from the experiment, as a missing one is: the final stage never writes a
    summary.json that holds only its own part."""
    from search.summary import finish_experiment

    path = exp_dir / SUMMARY_FILE
    for attempt in range(2):
        summary = read_json(path, max_bytes=64 * 2**20) if not path.is_symlink() else None
        if summary is not None and all(k in summary for k in SUMMARY_KEYS) and isinstance(summary["test_acc"], float):
            return summary
        if attempt:
            break
        if path.exists() or path.is_symlink():
            set_aside(path, exp_dir, "damaged (not a whole summary of the search); writing it again")
        if finish_experiment(exp_dir, data_dir, device=device) != 0:
            break
    raise FinalError(f"cannot write {path}: the search has no trial with a readable checkpoint")


def continue_command(exp_dir: Path, settings: FinalSettings) -> str:
    import shlex

    return shlex.join(["python", "search/final.py", "--name", exp_dir.name, "--storage", str(exp_dir.parent),
                       *settings.options()])


def _selection_line(selection: dict, seconds: float) -> str:
    p_by_k = selection.get("p_by_k") or {}
    byk = ", ".join(f"k={k}: {v:.4f}" + (f" (p {p_by_k[k]:.2g})" if k in p_by_k and k != "1" else "")
                    for k, v in selection["val_acc_by_k"].items())
    tta = selection["tta"]
    tta_text = (f"; {tta['views']}-view test-time augmentation {tta['val_acc']:.4f} -> "
                f"{'used' if tta['used'] else 'not used'}" if tta["val_acc"] is not None else "")
    return (f"\nfinal stage: ensemble selection on {selection['n_val']} validation images ({byk}) -> "
            f"{'ensemble of ' + str(selection['chosen_k']) if selection['ensemble_pays'] else 'single model'}"
            f"{tta_text} [{seconds:.0f}s]")


def _plan(exp_dir: Path, final_dir: Path, data: EmnistData, settings: FinalSettings, dev: torch.device,
          data_dir=None) -> FinalPlan:
    """The plan of this final stage: the one on disk, or (none yet, or a damaged one, set aside) a new one,
    chosen on validation and written before any refit trial starts."""
    plan_path = final_dir / PLAN_FILE
    try:
        plan = read_plan(plan_path, exp_dir)
    except DamagedPlan as e:  # nothing of it can be read: plan again (a refit on disk must then be the same)
        set_aside(plan_path, exp_dir, f"cannot be read ({e}); planning the final stage again")
        plan = None
    except PlanError as e:  # read, but a field is wrong (an edit): say which, change nothing
        raise FinalError(f"{e}. Restore it, or remove it to plan the final stage again (a refit already in "
                         f"{final_dir / REFIT_DIR} is then continued only if the new plan is the same)") from None
    if plan is not None:
        if plan.settings != settings.planned():
            was = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in plan.settings.items())
            raise FinalError(f"{final_dir} was started with {was}: give the same to continue it, or remove "
                             f"{final_dir} to start the final stage afresh")
        return plan
    t0 = time.time()
    cands, loaded = candidates(load_experiment(exp_dir), settings.ensemble_k)
    if not cands:
        raise FinalError(f"no trial of {exp_dir.name} has a readable checkpoint with a validation result")
    # (under a budget on CPUs the refit's members share the cores: an ensemble must beat one model beyond chance)
    cpu_budget = settings.deadline is not None and settings.res.on_this_machine(settings.device)[1] == 0
    selection = select_ensemble(cands, loaded, data, dev, settings.tta, significant=cpu_budget)
    del loaded  # (the delivery loads what it needs again, once, possibly in another process after a refit)
    print(_selection_line(selection, time.time() - t0), flush=True)
    members = plan_refit(cands, selection["chosen_k"], settings)
    if settings.deadline is not None:
        n_test = settings.n_test
        if n_test is None:  # (search/run.py knows it; the header and labels only, the images are read at the end)
            from training.data import check_split

            n_test = check_split(data.split, "test", data_dir, data.classes)
        members, report_s = fit_refit(exp_dir, members, settings.deadline, settings.res, settings.device, settings.tta,
                                      len(cands), len(data.val_y), n_test)
        settings.report_s = report_s
    stored = [replace(c, checkpoint=relative_checkpoint(c.checkpoint, exp_dir)) for c in cands]
    plan = FinalPlan(settings.planned(), stored, selection, members, budget=settings.deadline is not None)
    check_refit_matches(final_dir / REFIT_DIR, plan)  # (a plan made again: never over another's refit)
    write_plan(plan_path, plan)  # before any refit trial starts: a resumed final stage refits exactly these
    return plan


def deliver_and_report(exp_dir: Path, final_dir: Path, plan: FinalPlan, data_dir, dev: torch.device,
                       summary: dict | None = None) -> tuple[FinalReport, Path]:
    """(summary.json's "final", the delivered model written beside final/model.pt as a staged file). The caller
    publishes them (search.delivery.publish): the report and the summary, then the staged file over model.pt."""
    from training.data import load_test
    from training.evaluate import eval_precision

    summary = summary or {}
    precision = eval_precision(summary.get("test_precision"))  # the one rule of every test figure
    cands = plan.resolved(exp_dir)
    loaded = [load_checkpoint(c.checkpoint) for c in cands]  # each once: the delivery and the test figures use it
    refitted, sources, problems = refit_models(final_dir / REFIT_DIR)
    model = stage_model(exp_dir, final_dir, plan, cands, loaded, refitted, sources)
    x, y, test_classes = load_test(model.split, data_dir)  # the only read of the test split
    check_test_classes(model, test_classes)
    report, predicted = measure(exp_dir, plan, cands, loaded, model, (x, y, model.classes), dev, precision, summary,
                                problems)
    confused_pairs_image(final_dir / PAIRS_IMAGE, x, y, predicted, model.classes,
                         report.delivered_test["most_confused"])
    return report, model.path


def run_final(exp_dir: str | Path, data: EmnistData, settings: FinalSettings, data_dir=None) -> int:
    """The whole final stage on a finished experiment (the caller holds its lock). 0 when the
    delivered model and report are written, 130 when interrupted (run it again to continue)."""
    from training.inference import resolve_device

    if is_uri(exp_dir):
        print(f"results are in {exp_dir}: run the final stage on a local copy (python search/final.py)")
        return 0
    exp_dir = Path(exp_dir)
    final_dir = exp_dir / FINAL_DIR
    interrupted = (f"nothing finished is lost. Continue with:\n  {continue_command(exp_dir, settings)}")
    try:
        summary = read_summary(exp_dir, data_dir, settings.device)
        try:
            own_dir(final_dir)
        except OSError as e:
            raise FinalError(str(e)) from None
        dev = resolve_device(settings.device)
        plan = _plan(exp_dir, final_dir, data, settings, dev, data_dir)
        check_refit_matches(final_dir / REFIT_DIR, plan)
        t0 = time.time()
        if not run_refit(final_dir, plan.members, data, settings):
            print(f"\nfinal stage interrupted during the refit; {interrupted}", flush=True)
            return 130
        print(f"refit done [{time.time() - t0:.0f}s]", flush=True)
        try:
            report, staged = deliver_and_report(exp_dir, final_dir, plan, data_dir, dev, summary)
        except (CheckpointError, PlanError) as e:  # a planned member's checkpoint deleted or damaged since
            raise FinalError(f"{e}; remove {final_dir} to plan the final stage afresh") from None
        publish(exp_dir, final_dir, report, staged, summary)
    except KeyboardInterrupt:  # (Ctrl+C, or SIGTERM, outside Ray's own handling)
        staged_path(final_dir).unlink(missing_ok=True)  # (model.pt, its report: as they were)
        print(f"\nfinal stage interrupted; {interrupted}", flush=True)
        return 130
    print_final(report)
    print(f"files: {final_dir / MODEL_FILE}, {final_dir / REPORT_FILE}, {final_dir / PAIRS_IMAGE}")
    return 0


# ---------------------------------------------------------------- command line

def search_data(exp_dir: Path, data_dir=None) -> tuple[EmnistData, Path | None]:
    """The training data exactly as the search split it (the same validation images), from the settings it saved
    (search.json: a damaged one is an error naming the field); for experiments without them, from a trial's
    config."""
    from training.data import load_for_config

    saved = read_settings(exp_dir)
    d = saved.data if saved is not None else None
    if d is None:
        params = [read_json(t / PARAMS_FILE) for t in trial_dirs(exp_dir)]
        d = next((p for p in params if isinstance(p, dict) and "split" in p), None)
        if d is None:
            raise FinalError(f"{exp_dir} has neither {SETTINGS_FILE} nor a trial config to read its data settings from")
    if data_dir is None and saved is not None and saved.data_dir:
        data_dir = Path(saved.data_dir)
    return load_for_config(data_config(d), data_dir), data_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Final stage of a finished search: refit, ensemble, test report.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", required=True, help="the experiment's name (its folder under --storage)")
    add_shared_args(p, device_default="auto")
    add_final_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from search.lock import ExperimentLock, LockedError

    a = parse_args(argv)
    sigterm_as_sigint()
    settings = settings_from(a)
    exp_dir = Path(a.storage) / a.name
    try:
        settings.check()
        if is_uri(a.storage):
            raise ConfigError("the final stage runs on a local copy of the experiment, not on cloud storage")
        if not exp_dir.is_dir():
            raise ConfigError(f"no experiment at {exp_dir.resolve()}")
        lock = ExperimentLock(str(exp_dir.resolve())).acquire()
    except (ConfigError, LockedError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        statuses = ray_statuses(exp_dir)
        unfinished = [t for t, s in statuses.items() if s.get("status") not in ("TERMINATED", "ERROR")]
        if not statuses or unfinished:
            raise FinalError(f"the search {a.name} has not finished ({len(unfinished)} trial(s) unfinished); "
                             f"continue it first: python search/run.py --name {a.name} --resume")
        data, data_dir = search_data(exp_dir, a.data_dir)
        return run_final(exp_dir, data, settings, data_dir)  # (writes summary.json first where it is missing)
    except (FinalError, ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the final stage proper (reading the data)
        print(f"\ninterrupted; nothing was changed. Continue with:\n  {continue_command(exp_dir, settings)}")
        return 130
    finally:
        lock.release()


if __name__ == "__main__":
    import os

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
