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

from search.layout import (
    CHECKPOINT_FILE,
    SETTINGS_FILE,
    checkpoint_dirs,
    has_whole_state,
    is_uri,
    ray_statuses,
    read_json,
    trial_dirs,
)
from search.resources import Resources
from search.results import load_experiment
from training import augment
from training.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint, write_atomic
from training.config import ConfigError
from training.data import EmnistData

FINAL_DIR = "final"
MODEL_FILE = "model.pt"
PLAN_FILE = "plan.json"
REPORT_FILE = "report.md"
PAIRS_IMAGE = "confused_pairs.png"
REFIT_NAME = "refit"
EPOCHS_MODES = ("best", "full")
TTA_MODES = ("auto", "off")
TTA_VIEWS = len(augment.TTA_VIEWS)  # identity, 4 one-pixel shifts, +-8 degrees


@dataclass
class FinalSettings:
    ensemble_k: int = 3  # the largest ensemble considered (1 = never an ensemble)
    refit_seeds: int = 1
    refit_epochs: str = "best"  # best: the epoch that was best in the trial; full: the trial's budget
    tta: str = "auto"  # auto: test-time augmentation where it pays on validation; off
    device: str = "auto"  # for selection and the test evaluation (refit trials use their config's)
    res: Resources = field(default_factory=Resources)  # per refit trial, as for the search's trials
    address: str | None = None

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


class FinalError(RuntimeError):
    """The final stage cannot go on; the message says why and what to do."""


# ---------------------------------------------------------------- 1. selection on validation

@dataclass
class Candidate:
    trial_id: str
    val_acc: float
    epoch: int  # of its best checkpoint
    config: dict
    checkpoint: str


def candidates(exp, k: int) -> list[Candidate]:
    """The top-k trials by validation accuracy with a readable best checkpoint, one per config
    (Optuna can suggest a config twice; averaging a model with its twin adds nothing)."""
    t = exp.trials[exp.trials["best_val_acc"].notna() & ~exp.trials["diverged"].fillna(False).astype(bool)]
    t = t[~t["trial_id"].isin(exp.orphans)]
    out: list[Candidate] = []
    seen: set[str] = set()
    for _, row in t.sort_values(["best_val_acc", "trial_id"], ascending=[False, True]).iterrows():
        path = exp.best_checkpoint(row["trial_id"])
        if path is None:
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError:
            continue
        key = json.dumps({k: v for k, v in ckpt["config"].items() if k != "device"}, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        val = (ckpt.get("metrics") or {}).get("val_acc", row["best_val_acc"])
        out.append(Candidate(str(row["trial_id"]), float(val), int(ckpt["epoch"]), dict(ckpt["config"]), str(path)))
        if len(out) == k:
            break
    return out


def _probs(model: torch.nn.Module, x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    from training.trainer import predict_logits

    # fp32: the probabilities that are averaged and compared should not carry bf16 rounding
    return predict_logits(model.to(dev), x.to(dev), batch_size=1024, precision="fp32").softmax(1).cpu()


def _checkpoint_probs(paths: list[str], x: torch.Tensor, dev: torch.device, tta: int = 1) -> list[torch.Tensor]:
    from training.ensemble import TestTimeAugment

    out = []
    for p in paths:
        model = build_from_checkpoint(load_checkpoint(p), dev, where=p)
        out.append(_probs(TestTimeAugment(model, tta) if tta > 1 else model, x, dev))
    return out


def choose_k(probs: list[torch.Tensor], y: torch.Tensor) -> tuple[int, dict[int, float]]:
    """(k, accuracy by k) for the averages of the first 1, 2, ... len(probs) probability tables
    (ranked best single model first): the k kept is the smallest with the best accuracy, so an
    ensemble must beat the single model, not tie it, to be chosen."""
    by_k = {}
    for k in range(1, len(probs) + 1):
        pred = torch.stack(probs[:k]).mean(0).argmax(1)
        by_k[k] = float((pred == y).float().mean())
    return min(by_k, key=lambda k: (-by_k[k], k)), by_k


def select_ensemble(cands: list[Candidate], data: EmnistData, dev: torch.device, tta: str = "auto") -> dict:
    """The ensemble size, then whether test-time augmentation pays for it, both chosen on the
    validation split (never the test split)."""
    probs = _checkpoint_probs([c.checkpoint for c in cands], data.val_x, dev)
    chosen, by_k = choose_k(probs, data.val_y)
    without = by_k[chosen]
    views, with_tta = 1, None
    if tta == "auto":  # the chosen model's prediction averaged over TTA_VIEWS views of each image
        tta_probs = _checkpoint_probs([c.checkpoint for c in cands[:chosen]], data.val_x, dev, TTA_VIEWS)
        with_tta = float((torch.stack(tta_probs).mean(0).argmax(1) == data.val_y).float().mean())
        views = TTA_VIEWS if with_tta > without else 1  # it must gain, not tie
    return {"metric": "val_acc", "n_val": len(data.val_y), "val_acc_by_k": {str(k): v for k, v in by_k.items()},
            "chosen_k": chosen, "ensemble_pays": chosen > 1,
            "tta": {"views": TTA_VIEWS, "val_acc": with_tta, "val_acc_without": without, "used": views > 1},
            "candidates": [{"trial_id": c.trial_id, "val_acc": c.val_acc, "epoch": c.epoch} for c in cands]}


# ---------------------------------------------------------------- 2. refit as Ray Tune trials

def plan_refit(cands: list[Candidate], selection: dict, settings: FinalSettings) -> list[dict]:
    """One member per (chosen config, seed): its training config on the whole training split."""
    members = []
    for c in cands[: selection["chosen_k"]]:
        epochs = c.epoch if settings.refit_epochs == "best" else int(c.config["epochs"])
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


def _refit_trial(config: dict, data: EmnistData) -> None:
    from search.trainable import train_trial

    train_trial(config["member"]["train"], data)


def _refit_callback(members: list[dict]):
    from ray import tune

    class RefitProgress(tune.Callback):
        """One line per refit epoch (the searcher's Progress speaks of ASHA and best val_acc, which
        mean nothing here)."""

        def __init__(self):
            self.start = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            m = trial.config.get("member", {})
            print(f"  [refit {time.time() - self.start:5.0f}s] trial {m.get('source_trial')} seed "
                  f"+{m.get('seed_index')}: epoch {result.get('epoch')}/{m.get('epochs')}, train loss "
                  f"{result.get('train_loss', float('nan')):.4f}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"  refit trial {trial.trial_id} failed: {trial.error_file or ''}", flush=True)

    return RefitProgress()


def run_refit(final_dir: Path, members: list[dict], data: EmnistData, settings: FinalSettings) -> bool:
    """Train the members (or continue an interrupted refit); True when all have finished."""
    import ray
    from ray import tune

    from search.tuner import init_ray, resources, restore_tuner, run_config_for, trial_name

    refit_dir = final_dir / REFIT_NAME
    started = has_whole_state(refit_dir)  # (else no refit trial was recorded: it starts afresh)
    if started and _refit_done(refit_dir, members):
        return True
    own_ray = not ray.is_initialized()
    if own_ray:
        init_ray(settings.address)
    try:
        cpt, gpt, concurrency = resources(settings.res)
        trainable = tune.with_resources(tune.with_parameters(_refit_trial, data=whole_training_split(data)),
                                        {"cpu": cpt, "gpu": gpt})
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
            tuner = tune.Tuner(trainable, param_space={"member": tune.grid_search(members)},
                               tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True,
                                                           trial_name_creator=trial_name,
                                                           trial_dirname_creator=trial_name),
                               run_config=run_config)
        tuner.fit()
    finally:
        if own_ray:
            ray.shutdown()
    return _refit_done(refit_dir, members)


def _refit_done(refit_dir: Path, members: list[dict]) -> bool:
    statuses = ray_statuses(refit_dir)
    finished = [s for s in statuses.values() if s.get("status") in ("TERMINATED", "ERROR")]
    return len(statuses) == len(members) and len(finished) == len(members)


def refit_models(refit_dir: Path) -> tuple[list[dict], list[str]]:
    """(loaded final checkpoints of the refit trials that completed, one line per trial that did
    not), in the plan's order."""
    done, problems = [], []
    for d in trial_dirs(refit_dir):
        member = ((read_json(d / "params.json") or {}).get("member")) or {}
        want = member.get("epochs")
        best = None
        for c in checkpoint_dirs(d):
            try:
                ckpt = load_checkpoint(c / CHECKPOINT_FILE)
            except CheckpointError:
                continue
            if best is None or ckpt["epoch"] > best["epoch"]:
                best = ckpt
        order = (str(member.get("source_trial")), member.get("seed_index", 0))
        if best is None or want is None or best["epoch"] < want:
            got = "no readable checkpoint" if best is None else f"only {best['epoch']} of {want} epochs"
            problems.append(f"refit {d.name} (from trial {order[0]}, seed +{order[1]}): {got}")
            continue
        done.append({**best, "_order": order, "_source": order[0]})
    return done, problems


# ---------------------------------------------------------------- 3-4. deliver, evaluate, report

def _test_result(label: str, probs: torch.Tensor, y: torch.Tensor, classes: list[str], **extra) -> dict:
    from training.metrics import summarize, wilson_interval

    s = summarize(y, probs.argmax(1), classes)
    correct = round(s["accuracy"] * s["n"])
    return {"label": label, "accuracy": s["accuracy"], "ci95": list(wilson_interval(correct, s["n"])), "n": s["n"],
            "per_class": s["per_class"], "most_confused": s["most_confused"], **extra}


def confused_pairs_image(path: Path, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, classes: list[str],
                         pairs: list[dict], per_side: int = 6, scale: int = 2) -> Path:
    """One row per confused pair: test images of a read as b, then of b read as a (as the model
    saw them, upright), labelled."""
    from PIL import Image, ImageDraw

    cell, label_w = 28 * scale + 4, 150
    rows = max(1, len(pairs))
    img = Image.new("RGB", (label_w + cell * (2 * per_side + 1), cell * rows + 4), "white")
    draw = ImageDraw.Draw(img)
    index = {c: i for i, c in enumerate(classes)}
    for r, p in enumerate(pairs):
        a, b = index[p["a"]], index[p["b"]]
        top = 2 + r * cell
        draw.text((4, top + 4), f"{p['a']} read as {p['b']}: {p['a_as_b']}", fill="black")
        draw.text((4, top + cell // 2), f"{p['b']} read as {p['a']}: {p['b_as_a']}", fill="black")
        for side, (t, q) in enumerate(((a, b), (b, a))):
            hits = ((y == t) & (pred == q)).nonzero().flatten()[:per_side].tolist()
            for j, i in enumerate(hits):
                glyph = Image.fromarray((255 - x[i].numpy()).astype("uint8")).resize((28 * scale, 28 * scale))
                img.paste(glyph, (label_w + (side * (per_side + 1) + j) * cell, top))
    if not pairs:
        draw.text((4, 10), "no confusions", fill="black")
    img.save(path)
    return path


def _row(name: str, r: dict | None) -> str:
    if not r:
        return f"| {name} | - | - | - |"
    lo, hi = r["ci95"]
    return f"| {name} | {r['label']} | {r['accuracy']:.4f} | [{lo:.4f}, {hi:.4f}] |"


def _tta_sentence(tta: dict | None) -> str:
    if not tta or tta.get("val_acc") is None:
        return "Test-time augmentation: not tried (--tta off). "
    return (f"Test-time augmentation ({tta['views']} views of each image, averaged): val accuracy "
            f"{tta['val_acc']:.4f} against {tta['val_acc_without']:.4f} without, so "
            f"{'used' if tta['used'] else 'not used'}. ")


def write_report(path: Path, name: str, final: dict) -> Path:
    t = final["test"]
    sel = final["selection"]
    lines = [f"# {name}: final model", "",
             f"Delivered: `{final['model'] or 'none'}` ({final['delivered']}).", "",
             f"## Test accuracy ({next(iter(t.values()))['n'] if t else 0} test images, 95 % Wilson interval)", "",
             "| model | what | test accuracy | 95 % interval |", "| --- | --- | --- | --- |",
             _row("best single trial", t.get("single")), _row("ensemble of search checkpoints", t.get("ensemble")),
             _row("refit (delivered)", t.get("refit")), "",
             *([] if t.get("refit") else [f"No refit finished: delivered {final['delivered']}, test accuracy "
                                          f"{final['delivered_test']['accuracy']:.4f}.", ""]),
             "The test split was read once, for this table. Everything was chosen on the validation split:", "",
             "## Selection on the validation split", "",
             f"{sel['n_val']} validation images; an ensemble is kept only where it beats the best single model.", "",
             "| k (top trials averaged) | val accuracy |", "| --- | --- |",
             *[f"| {k} | {v:.4f} |" for k, v in sel["val_acc_by_k"].items()], "",
             f"Chosen: k = {sel['chosen_k']} ({'ensemble' if sel['ensemble_pays'] else 'single model'}). "
             + _tta_sentence(sel.get("tta")) +
             f"Refit: {final['refit']['seeds']} seed(s) per config, "
             f"on train + validation, epochs: {final['refit']['epochs_mode']}.", ""]
    if final.get("problems"):
        lines += ["## Problems", "", *[f"- {p}" for p in final["problems"]], ""]
    lines += ["## Top trials on the test split", "", "| trial | val accuracy | test accuracy | 95 % interval |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['trial_id']} | {r['val_acc']:.4f} | {r['accuracy']:.4f} | "
              f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] |" for r in final["test_trials"]]
    main = final.get("delivered_test")
    if main:
        lines += ["", f"## Most confused pairs ({main['label']})", "", f"![confused pairs]({PAIRS_IMAGE})", "",
                  "| pair | mistakes | a read as b | b read as a |", "| --- | --- | --- | --- |",
                  *[f"| {p['a']} / {p['b']} | {p['count']} | {p['a_as_b']} | {p['b_as_a']} |"
                    for p in main["most_confused"]],
                  "", f"## Per class ({main['label']})", "", "| class | precision | recall | F1 | support |",
                  "| --- | --- | --- | --- | --- |",
                  *[f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
                    for r in main["per_class"]]]
    write_atomic(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return path


def deliver_and_report(exp_dir: Path, final_dir: Path, plan: dict, data_dir, dev: torch.device) -> dict:
    from training.data import load_test
    from training.ensemble import save_model

    cands = [Candidate(**c) for c in plan["candidates"]]
    sel = plan["selection"]
    done, problems = refit_models(final_dir / REFIT_NAME)
    done.sort(key=lambda m: m.pop("_order"))
    model_path = final_dir / MODEL_FILE
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
        delivered = (f"ensemble of {len(chosen)} search checkpoints" if len(chosen) > 1
                     else f"best single trial {chosen[0].trial_id}") + " (no refit finished)"
        members = [load_checkpoint(c.checkpoint) for c in chosen]
    tta = (sel.get("tta") or {}).get("used")
    if tta:
        delivered += f", with {TTA_VIEWS}-view test-time augmentation"
    save_model(model_path, members, classes, split, {"delivered": delivered, "experiment": exp_dir.name,
                                                     "source_trials": sources, "whole_training_split": bool(done)},
               tta=TTA_VIEWS if tta else 1)

    x, y, test_classes = load_test(split, data_dir)  # the only read of the test split
    if test_classes != classes:
        raise FinalError(f"the {split} test files have other classes than the training files the models learnt")
    cand_probs = _checkpoint_probs([c.checkpoint for c in cands], x, dev)
    test = {"single": _test_result(f"best single trial {cands[0].trial_id}", cand_probs[0], y, classes,
                                   trial_id=cands[0].trial_id)}
    k = sel["chosen_k"] if sel["ensemble_pays"] else len(cands)
    if k > 1:  # shown even when it did not pay on validation, so the choice can be checked
        test["ensemble"] = _test_result(
            f"top-{k} search checkpoints averaged" + ("" if sel["ensemble_pays"] else " (not chosen on validation)"),
            torch.stack(cand_probs[:k]).mean(0), y, classes, members=[c.trial_id for c in cands[:k]])
    # the delivered file itself is evaluated: what a user loads is what the report measures
    probs = _probs(build_from_checkpoint(load_checkpoint(model_path), dev, where=str(model_path)), x, dev)
    delivered_test = _test_result(delivered, probs, y, classes)
    if done:
        test["refit"] = delivered_test
    confused_pairs_image(final_dir / PAIRS_IMAGE, x, y, probs.argmax(1), classes, delivered_test["most_confused"])
    test_trials = []
    for c, p in zip(cands, cand_probs, strict=True):
        r = _test_result(c.trial_id, p, y, classes)
        test_trials.append({"trial_id": c.trial_id, "val_acc": c.val_acc, "accuracy": r["accuracy"],
                            "ci95": r["ci95"], "f1": {row["class"]: row["f1"] for row in r["per_class"]}})
    kind = "refit" if done else ("ensemble" if len(chosen) > 1 else "single")  # which of `test` model.pt is
    return {"model": str(model_path), "delivered": delivered, "delivered_kind": kind, "delivered_test": delivered_test,
            "selection": sel,
            "refit": {"epochs_mode": plan["settings"]["refit_epochs"], "seeds": plan["settings"]["refit_seeds"],
                      "members": [{k: m[k] for k in ("source_trial", "seed_index", "epochs")} for m in plan["members"]],
                      "finished": len(done)},
            "test": test, "test_trials": test_trials, "problems": problems,
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_final(exp_dir: str | Path, data: EmnistData, settings: FinalSettings, data_dir=None) -> int:
    """The whole final stage on a finished experiment (the caller holds its lock). 0 when the
    delivered model and report are written, 130 when interrupted (run it again to continue)."""
    from training.trainer import resolve_device

    if is_uri(exp_dir):
        print(f"results are in {exp_dir}: run the final stage on a local copy (python search/final.py)")
        return 0
    exp_dir = Path(exp_dir)
    final_dir = exp_dir / FINAL_DIR
    final_dir.mkdir(exist_ok=True)
    dev = resolve_device(settings.device)
    plan_path = final_dir / PLAN_FILE
    plan = read_json(plan_path) if plan_path.is_file() else None
    if plan is not None and plan.get("settings") != settings.planned():
        was = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (plan.get("settings") or {}).items())
        raise FinalError(f"{final_dir} was started with {was}: give the same to continue it, or remove "
                         f"{final_dir} to start the final stage afresh")
    if plan is None:
        t0 = time.time()
        cands = candidates(load_experiment(exp_dir), settings.ensemble_k)
        if not cands:
            raise FinalError(f"no trial of {exp_dir.name} has a readable checkpoint with a validation result")
        selection = select_ensemble(cands, data, dev, settings.tta)
        byk = ", ".join(f"k={k}: {v:.4f}" for k, v in selection["val_acc_by_k"].items())
        tta = selection["tta"]
        tta_text = (f"; {tta['views']}-view test-time augmentation {tta['val_acc']:.4f} -> "
                    f"{'used' if tta['used'] else 'not used'}" if tta["val_acc"] is not None else "")
        print(f"\nfinal stage: ensemble selection on {selection['n_val']} validation images ({byk}) -> "
              f"{'ensemble of ' + str(selection['chosen_k']) if selection['ensemble_pays'] else 'single model'}"
              f"{tta_text} [{time.time() - t0:.0f}s]", flush=True)
        plan = {"settings": settings.planned(), "candidates": [asdict(c) for c in cands], "selection": selection,
                "members": plan_refit(cands, selection, settings)}
        # Written before any refit trial starts: a resumed final stage refits exactly these.
        write_atomic(plan_path, lambda f: f.write(json.dumps(plan, indent=1).encode()))
    t0 = time.time()
    if not run_refit(final_dir, plan["members"], data, settings):
        print(f"\nfinal stage interrupted during the refit; nothing finished is lost. Continue with:\n  "
              f"python search/final.py --name {exp_dir.name} --storage {exp_dir.parent}", flush=True)
        return 130
    print(f"refit done [{time.time() - t0:.0f}s]", flush=True)
    try:
        final = deliver_and_report(exp_dir, final_dir, plan, data_dir, dev)
    except CheckpointError as e:  # a planned member's checkpoint deleted or damaged since the plan was made
        raise FinalError(f"{e}; remove {final_dir} to plan the final stage afresh") from None
    summary_path = exp_dir / "summary.json"
    summary = read_json(summary_path) or {}
    summary["final"] = final
    write_atomic(summary_path, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    write_report(final_dir / REPORT_FILE, exp_dir.name, final)
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


def main(argv: list[str] | None = None) -> int:
    from search.lock import ExperimentLock, LockedError
    from search.run import DEFAULT_STORAGE

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
    a = p.parse_args(argv)
    settings = FinalSettings(a.ensemble_k, a.refit_seeds, a.refit_epochs, a.tta, a.device,
                             Resources(a.gpus_per_trial, a.cpus_per_trial, a.concurrency), a.address)
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
        if not (exp_dir / "summary.json").is_file():
            from search.summary import finish_experiment

            finish_experiment(exp_dir, data_dir, device=a.device)
        return run_final(exp_dir, data, settings, data_dir)
    except (FinalError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        lock.release()


if __name__ == "__main__":
    import os

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
