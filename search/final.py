"""Final stage of a search: from a leaderboard to the model a user takes away.

    python search/final.py --name NAME [--storage results/] [--ensemble-k 3] [--refit-seeds 1]
                           [--refit-epochs best|full] [--data-dir D] [--device auto]
                           [--gpus-per-trial F] [--cpus-per-trial N] [--address ADDR]

It runs by default at the end of `search/run.py` (--no-final skips it), alone on a finished
experiment, and again after an interruption, continuing where it stopped:

1. Ensemble selection on the validation split: the top-K trials by validation accuracy (distinct
   configs), each at its best checkpoint, averaged in probability space. k = 1..K is chosen on
   validation; an ensemble is kept only where it beats the best single model there.
2. Refit: the chosen configs trained again on the whole training split (train + validation) for
   the epochs that were best in their trial (or the full budget), --refit-seeds seeds each. They
   run as Ray Tune trials in final/refit/: the same resources, retries and resume as the search.
3. The delivered model, final/model.pt: the refitted members, one model or an ensemble file
   (training/ensemble.py). Predictor, predict.py, the dashboard and export load it by default.
4. The test split, read once, here at the very end: the best single trial, the ensemble of search
   checkpoints, the delivered model and each top trial, with 95 % Wilson intervals, per-class
   P/R/F1 and the most-confused pairs -> summary.json["final"], final/report.md and
   final/confused_pairs.png. Nothing here chooses anything on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from search.budget import REFIT_END_S
from search.layout import (
    CHECKPOINT_FILE,
    SETTINGS_FILE,
    SUMMARY_FILE,
    checkpoint_dirs,
    has_whole_state,
    is_uri,
    own_dir,
    ray_statuses,
    set_aside,
    trial_dirs,
)
from search.plan import PLAN_FILE, DamagedPlan, PlanError, checkpoint_in, members_text, read_plan, relative_checkpoint
from search.report import PAIRS_IMAGE, confused_pairs_image, write_report
from search.resources import Resources
from search.results import load_experiment
from search.selection import TTA_VIEWS, Candidate, candidates, select_ensemble
from search.signals import sigterm_as_sigint
from search.timed_refit import fit_refit
from training.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from training.config import ConfigError
from training.data import EmnistData
from training.fileio import read_json, write_atomic

FINAL_DIR = "final"
MODEL_FILE = "model.pt"
REPORT_FILE = "report.md"
REFIT_NAME = "refit"
EPOCHS_MODES = ("best", "full")
TTA_MODES = ("auto", "off")


@dataclass
class FinalSettings:
    ensemble_k: int = 3  # the largest ensemble considered (1 = never an ensemble)
    refit_seeds: int = 1
    refit_epochs: str = "best"  # best: the epoch that was best in the trial; full: the trial's budget
    tta: str = "auto"  # auto: test-time augmentation where it pays on validation; off
    device: str = "auto"  # for selection and the test evaluation (refit trials use their config's)
    res: Resources = field(default_factory=Resources)  # per refit trial, as for the search's trials
    address: str | None = None
    deadline: float | None = None  # time.time() the final stage must end by (a search's --time-budget)
    report_s: float = 0.0  # of which the test report's share (fit_refit)

    def check(self) -> None:
        if not 1 <= self.ensemble_k <= 20:
            raise ConfigError(f"--ensemble-k must be between 1 and 20, got {self.ensemble_k}")
        if not 1 <= self.refit_seeds <= 20:
            raise ConfigError(f"--refit-seeds must be between 1 and 20, got {self.refit_seeds}")
        if self.tta not in TTA_MODES:
            raise ConfigError(f"--tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        if self.refit_epochs not in EPOCHS_MODES:
            raise ConfigError(f"--refit-epochs must be one of {', '.join(EPOCHS_MODES)}, got {self.refit_epochs!r}")

    def planned(self) -> dict:
        """What a plan is made with: a resumed final stage must be asked the same."""
        return {"ensemble_k": self.ensemble_k, "refit_seeds": self.refit_seeds, "refit_epochs": self.refit_epochs,
                "tta": self.tta}

    def options(self) -> list[str]:
        """These settings as final.py's options, for a command to paste (only those that are not the default)."""
        default = FinalSettings()
        out = [f"--{k.replace('_', '-')}={v}" for k, v in self.planned().items() if v != default.planned()[k]]
        if self.device != default.device:
            out.append(f"--device={self.device}")
        return out


class FinalError(RuntimeError):
    """The final stage cannot go on; the message says why and what to do."""


# ---------------------------------------------------------------- 2. refit as Ray Tune trials

def plan_refit(cands: list[Candidate], selection: dict, settings: FinalSettings) -> list[dict]:
    """One member per (chosen config, seed): its training config on the whole training split."""
    members = []
    for c in cands[: selection["chosen_k"]]:
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

    refit_dir = final_dir / REFIT_NAME
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
        run_config = run_config_for(REFIT_NAME, str(final_dir), [_refit_callback(members)],
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
    import hashlib

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


def refit_models(refit_dir: Path) -> tuple[list[dict], list[str]]:
    """(loaded final checkpoints of the refit trials that completed, one line per trial that did
    not), in the plan's order."""
    done, problems = [], []
    for d in trial_dirs(refit_dir):
        member = ((read_json(d / "params.json") or {}).get("member")) or {}
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
        done.append({**best, "_order": order, "_source": order[0]})
    return done, problems


# ---------------------------------------------------------------- 3-4. deliver, evaluate, report

def _test_result(label: str, probs: torch.Tensor, y: torch.Tensor, classes: list[str], precision: str,
                 **extra) -> dict:
    from training.evaluate import scored

    r = scored(probs, y, classes, precision)
    return {"label": label, **{k: r[k] for k in ("accuracy", "ci95", "n", "per_class", "most_confused", "precision")},
            **extra}


def _summary_single(summary: dict, cand: Candidate, exp_dir: Path, precision: str, n: int) -> dict | None:
    """The end-of-search summary's test figures of the best trial, when they are of this candidate's checkpoint at
    this precision on these n test images: the final stage reports them as they are, so that one model has one
    test accuracy (summary.json's test_acc and the report's best single trial are the same measurement)."""
    from training.metrics import wilson_interval

    try:
        same = (summary.get("best_trial") == cand.trial_id and summary.get("test_precision") == precision
                and summary.get("test_n") == n
                and relative_checkpoint(summary["source_checkpoint"], exp_dir)
                == relative_checkpoint(cand.checkpoint, exp_dir))
        acc = float(summary["test_acc"])
    except (KeyError, TypeError, ValueError, PlanError):
        return None
    if not same or not 0 <= acc <= 1 or not isinstance(summary.get("per_class"), list):
        return None
    return {"label": f"best single trial {cand.trial_id}", "accuracy": acc,
            "ci95": list(wilson_interval(round(acc * n), n)), "n": n, "per_class": summary["per_class"],
            "most_confused": summary.get("most_confused") or [], "precision": precision,
            "trial_id": cand.trial_id, "source": SUMMARY_FILE}


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def plan_candidates(plan: dict, exp_dir: Path) -> list[Candidate]:
    """The plan's candidates, each checkpoint path resolved inside this experiment (PlanError otherwise)."""
    return [Candidate(**{**c, "checkpoint": str(checkpoint_in(exp_dir, relative_checkpoint(c["checkpoint"], exp_dir)))})
            for c in plan["candidates"]]


def deliver_and_report(exp_dir: Path, final_dir: Path, plan: dict, data_dir, dev: torch.device,
                       summary: dict | None = None) -> tuple[dict, Path]:
    """(summary.json's "final", the delivered model written beside final/model.pt as a staged file). The caller
    writes the report and the summary, then moves the staged file over model.pt: see deliver()."""
    from training.checkpoint import save_model
    from training.data import load_test
    from training.evaluate import class_probs, eval_precision

    summary = summary or {}
    precision = eval_precision(summary.get("test_precision"))  # the one rule of every test figure
    cands = plan_candidates(plan, exp_dir)
    sel = plan["selection"]
    done, problems = refit_models(final_dir / REFIT_NAME)
    done.sort(key=lambda m: m.pop("_order"))
    staged = final_dir / f".{MODEL_FILE}.staged"
    classes, split = None, cands[0].config["split"]
    ckpt0 = load_checkpoint(cands[0].checkpoint)
    classes = list(ckpt0["classes"])
    chosen = cands[: sel["chosen_k"]]
    if done:
        sources = sorted({m.pop("_source") for m in done})
        seeds = plan["settings"]["refit_seeds"]
        delivered = (f"refit ensemble of {len(done)} ({len(sources)} config(s) x {seeds} seed(s))" if len(done) > 1
                     else "refit of the best config")
        members = done
    else:
        # No refit finished (every one diverged or failed): the search's own checkpoints are still a
        # model, the one validation chose; deliver that rather than nothing.
        sources = [c.trial_id for c in chosen]
        why = " (no refit: the time budget left none)" if not plan["members"] else " (no refit finished)"
        delivered = (f"ensemble of {len(chosen)} search checkpoints" if len(chosen) > 1
                     else f"best single trial {chosen[0].trial_id}") + why
        members = [load_checkpoint(c.checkpoint) for c in chosen]
    tta = (sel.get("tta") or {}).get("used")
    if tta:
        delivered += f", with {TTA_VIEWS}-view test-time augmentation"
    save_model(staged, members, classes, split, {"delivered": delivered, "experiment": exp_dir.name,
                                                 "source_trials": sources, "whole_training_split": bool(done)},
               tta=TTA_VIEWS if tta else 1)

    x, y, test_classes = load_test(split, data_dir)  # the only read of the test split
    if test_classes != classes:
        raise FinalError(f"the {split} test files have other classes than the training files the models learnt")
    cand_probs = [class_probs(build_from_checkpoint(load_checkpoint(c.checkpoint), dev, where=c.checkpoint), x, dev,
                              precision) for c in cands]
    single = _summary_single(summary, cands[0], exp_dir, precision, len(y)) or _test_result(
        f"best single trial {cands[0].trial_id}", cand_probs[0], y, classes, precision, trial_id=cands[0].trial_id)
    test = {"single": single}
    k = sel["chosen_k"] if sel["ensemble_pays"] else len(cands)
    if k > 1:  # shown even when it did not pay on validation, so the choice can be checked
        test["ensemble"] = _test_result(
            f"top-{k} search checkpoints averaged" + ("" if sel["ensemble_pays"] else " (not chosen on validation)"),
            torch.stack(cand_probs[:k]).mean(0), y, classes, precision, members=[c.trial_id for c in cands[:k]])
    # the delivered file itself is evaluated: what a user loads is what the report measures
    probs = class_probs(build_from_checkpoint(load_checkpoint(staged), dev, where=str(staged)), x, dev, precision)
    delivered_test = _test_result(delivered, probs, y, classes, precision)
    if done:
        test["refit"] = delivered_test
    elif len(chosen) == 1:  # the delivered model is the best single trial's checkpoint: one model, one figure
        delivered_test = {**single, "label": delivered}
    confused_pairs_image(final_dir / PAIRS_IMAGE, x, y, probs.argmax(1), classes, delivered_test["most_confused"])
    test_trials = []
    for i, (c, p) in enumerate(zip(cands, cand_probs, strict=True)):
        r = single if i == 0 else _test_result(c.trial_id, p, y, classes, precision)
        test_trials.append({"trial_id": c.trial_id, "val_acc": c.val_acc, "accuracy": r["accuracy"],
                            "ci95": r["ci95"], "f1": {row["class"]: row["f1"] for row in r["per_class"]}})
    kind = "refit" if done else ("ensemble" if len(chosen) > 1 else "single")  # which of `test` model.pt is
    final = {"model": str(final_dir / MODEL_FILE), "model_sha256": _sha256(staged), "delivered": delivered,
             "delivered_kind": kind, "delivered_test": delivered_test, "test_precision": precision,
             "selection": sel,
             "refit": {"epochs_mode": plan["settings"]["refit_epochs"], "seeds": plan["settings"]["refit_seeds"],
                       "members": [{**{k: m[k] for k in ("source_trial", "seed_index", "epochs")},
                                    **({"seconds": m["train"]["train_seconds"]} if m["train"].get("train_seconds")
                                       else {})} for m in plan["members"]],
                       "finished": len(done), **({"budget": True} if plan.get("budget") else {})},
             "test": test, "test_trials": test_trials, "problems": problems,
             "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    return final, staged


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


def _plan(exp_dir: Path, final_dir: Path, data: EmnistData, settings: FinalSettings, dev: torch.device,
          data_dir=None) -> dict:
    """The plan of this final stage: the one on disk, or (none yet, or a damaged one, set aside) a new one,
    chosen on validation and written before any refit trial starts."""
    plan_path = final_dir / PLAN_FILE
    try:
        plan = read_plan(plan_path, exp_dir)
    except DamagedPlan as e:  # nothing of it can be read: plan again (a refit on disk must then be the same)
        set_aside(plan_path, exp_dir, f"cannot be read ({e}); planning the final stage again")
        plan = None
    except PlanError as e:  # read, but a field is wrong (an edit): say which, change nothing
        raise FinalError(f"{plan_path}: {e}. Restore it, or remove it to plan the final stage again (a refit "
                         f"already in {final_dir / REFIT_NAME} is then continued only if the new plan is the "
                         "same)") from None
    if plan is not None:
        if plan["settings"] != settings.planned():
            was = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in plan["settings"].items())
            raise FinalError(f"{final_dir} was started with {was}: give the same to continue it, or remove "
                             f"{final_dir} to start the final stage afresh")
        return plan
    t0 = time.time()
    cands = candidates(load_experiment(exp_dir), settings.ensemble_k)
    if not cands:
        raise FinalError(f"no trial of {exp_dir.name} has a readable checkpoint with a validation result")
    # (under a budget on CPUs the refit's members share the cores: an ensemble must beat one model beyond chance)
    cpu_budget = settings.deadline is not None and settings.res.on_this_machine(settings.device)[1] == 0
    selection = select_ensemble(cands, data, dev, settings.tta, significant=cpu_budget)
    p_by_k = selection.get("p_by_k") or {}
    byk = ", ".join(f"k={k}: {v:.4f}" + (f" (p {p_by_k[k]:.2g})" if k in p_by_k and k != "1" else "")
                    for k, v in selection["val_acc_by_k"].items())
    tta = selection["tta"]
    tta_text = (f"; {tta['views']}-view test-time augmentation {tta['val_acc']:.4f} -> "
                f"{'used' if tta['used'] else 'not used'}" if tta["val_acc"] is not None else "")
    print(f"\nfinal stage: ensemble selection on {selection['n_val']} validation images ({byk}) -> "
          f"{'ensemble of ' + str(selection['chosen_k']) if selection['ensemble_pays'] else 'single model'}"
          f"{tta_text} [{time.time() - t0:.0f}s]", flush=True)
    stored = [{**asdict(c), "checkpoint": relative_checkpoint(c.checkpoint, exp_dir)} for c in cands]
    members = plan_refit(cands, selection, settings)
    if settings.deadline is not None:
        from training.data import check_split

        n_test = check_split(data.split, "test", data_dir, data.classes)
        members, report_s = fit_refit(exp_dir, members, settings.deadline, settings.res, settings.device, settings.tta,
                                      len(cands), len(data.val_y), n_test)
        settings.report_s = report_s
    plan = {"settings": settings.planned(), "candidates": stored, "selection": selection, "members": members,
            **({"budget": True} if settings.deadline is not None else {})}
    _check_refit_matches(final_dir / REFIT_NAME, plan)  # (a plan made again: never over another's refit)
    # Written before any refit trial starts: a resumed final stage refits exactly these.
    write_atomic(plan_path, lambda f: f.write(json.dumps(plan, indent=1).encode()))
    return plan


def _check_refit_matches(refit_dir: Path, plan: dict) -> None:
    """A refit already on disk must be the plan's: else continuing it could never finish the plan (a damaged
    plan made again with other settings), and each run would end 'interrupted' forever."""
    if not has_whole_state(refit_dir):
        return
    # (a trial folder without its params.json yet holds nothing: Ray writes that file first)
    params = [p for d in trial_dirs(refit_dir) if isinstance(p := read_json(d / "params.json"), dict)]
    on_disk = [p["member"] for p in params if isinstance(p.get("member"), dict)]
    key = lambda m: json.dumps(m, sort_keys=True, default=str)  # noqa: E731
    other_plan = any(p.get("plan", plan_key(plan["members"])) != plan_key(plan["members"]) for p in params)
    if other_plan or not set(map(key, on_disk)) <= set(map(key, plan["members"])) \
            or len(ray_statuses(refit_dir)) > len(plan["members"]):
        got = members_text(on_disk) or "no readable member"
        raise FinalError(f"the refit in {refit_dir} was started from another plan ({got}) than this one "
                         f"({members_text(plan['members'])}); run the final stage with the settings it was started "
                         f"with, or remove {refit_dir.parent} to start it afresh")


def deliver(exp_dir: Path, final_dir: Path, final: dict, staged: Path, summary: dict) -> None:
    """Write what a reader sees of the delivered model: the report and summary.json's "final" (each whole or not
    at all), then the model file, moved over final/model.pt last. The report and the summary carry the model's
    sha256, so a reader (the dashboard) can tell a model.pt from a report of another one; a kill between the
    writes leaves that mismatch, never a half file, and running the final stage again delivers anew."""
    summary = {**summary, "final": final}
    write_report(final_dir / REPORT_FILE, exp_dir.name, final)
    write_atomic(exp_dir / SUMMARY_FILE, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    staged.replace(final_dir / MODEL_FILE)


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
        _check_refit_matches(final_dir / REFIT_NAME, plan)
        t0 = time.time()
        if not run_refit(final_dir, plan["members"], data, settings):
            print(f"\nfinal stage interrupted during the refit; {interrupted}", flush=True)
            return 130
        print(f"refit done [{time.time() - t0:.0f}s]", flush=True)
        try:
            final, staged = deliver_and_report(exp_dir, final_dir, plan, data_dir, dev, summary)
        except (CheckpointError, PlanError) as e:  # a planned member's checkpoint deleted or damaged since
            raise FinalError(f"{e}; remove {final_dir} to plan the final stage afresh") from None
        deliver(exp_dir, final_dir, final, staged, summary)
    except KeyboardInterrupt:  # (Ctrl+C, or SIGTERM, outside Ray's own handling)
        (final_dir / f".{MODEL_FILE}.staged").unlink(missing_ok=True)  # (model.pt, its report: as they were)
        print(f"\nfinal stage interrupted; {interrupted}", flush=True)
        return 130
    print_final(final)
    print(f"files: {final_dir / MODEL_FILE}, {final_dir / REPORT_FILE}, {final_dir / PAIRS_IMAGE}")
    return 0


def print_final(final: dict) -> None:
    print("test accuracy, 95 % interval (the test split is read only here):")
    for key in ("single", "ensemble", "refit"):
        r = final["test"].get(key)
        if r:
            lo, hi = r["ci95"]
            mark = "  <- delivered (final/model.pt)" if key == final.get("delivered_kind") else ""
            print(f"  {r['accuracy']:.4f}  [{lo:.4f}, {hi:.4f}]  {key:8s}  {r['label']}{mark}")
    if "refit" not in final["test"]:
        r = final["delivered_test"]
        print(f"  {r['accuracy']:.4f}  [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]  delivered: {final['delivered']}")
    for p in final["problems"]:
        print(f"  problem: {p}")


# ---------------------------------------------------------------- command line

def search_data(exp_dir: Path, data_dir=None) -> tuple[EmnistData, Path | None]:
    """The training data exactly as the search split it (the same validation images), from the
    settings it saved; for experiments without them, from a trial's config."""
    from training.data import load_for_config

    saved = read_json(exp_dir / SETTINGS_FILE) or {}
    d = saved.get("data")
    if not isinstance(d, dict):
        params = [read_json(t / "params.json") for t in trial_dirs(exp_dir)]
        d = next((p for p in params if isinstance(p, dict) and "split" in p), None)
        if d is None:
            raise FinalError(f"{exp_dir} has neither {SETTINGS_FILE} nor a trial config to read its data settings from")
    if data_dir is None and saved.get("data_dir"):
        data_dir = Path(saved["data_dir"])
    data = load_for_config({"val_fraction": 0.1, "seed": 0, "train_limit": 0, "val_limit": 0, **d}, data_dir)
    return data, data_dir


def add_final_args(p: argparse.ArgumentParser) -> None:
    """The final stage's options, shared by search/run.py and this script."""
    p.add_argument("--ensemble-k", type=int, default=3, help="largest ensemble of top trials considered (1 = none)")
    p.add_argument("--refit-seeds", type=int, default=1, help="refits per chosen config, each with its own seed")
    p.add_argument("--refit-epochs", choices=EPOCHS_MODES, default="best",
                   help="refit for the epochs that were best in the trial, or the full budget")
    p.add_argument("--tta", choices=TTA_MODES, default="auto",
                   help=f"auto: average the delivered model over {TTA_VIEWS} shifted/rotated views of each image "
                        "where that pays on validation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from search.layout import DEFAULT_STORAGE

    p = argparse.ArgumentParser(description="Final stage of a finished search: refit, ensemble, test report.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", required=True, help="the experiment's name (its folder under --storage)")
    p.add_argument("--storage", default=str(DEFAULT_STORAGE))
    add_final_args(p)
    p.add_argument("--data-dir", type=Path, default=None, help="default: the one the search used")
    p.add_argument("--device", default="auto", help="for selection and the test evaluation")
    p.add_argument("--gpus-per-trial", type=float, default=None)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--address", default=None, help="Ray cluster to run the refit on")
    return p.parse_args(argv)


def settings_from(a: argparse.Namespace) -> FinalSettings:
    return FinalSettings(a.ensemble_k, a.refit_seeds, a.refit_epochs, a.tta, a.device,
                         Resources(a.gpus_per_trial, a.cpus_per_trial, a.concurrency), a.address)


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
