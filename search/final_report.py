"""summary.json["final"]: what the final stage delivered and what it measured on the test split, as one record,
`FinalReport`, and the one test evaluation that makes it (`measure`).

One writer: the final stage measures once (`measure`), and that one record becomes summary.json's "final"
(search.delivery.publish), final/report.md and the printout (search/report.py). One reader for everything that
reads it back, `FinalReport.from_json` (the dashboard), which refuses an entry that is not whole (an older or
hand-edited summary, a field missing or of the wrong type) with one ReportError naming the file and the field.
`delivered_kind` says which of the tested models (`test`: single, ensemble, refit) final/model.pt is: no reader
has to guess it from the words of `delivered`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from search.layout import SUMMARY_FILE
from search.plan import Candidate, FinalPlan, PlanError, check_selection, relative_checkpoint

SUMMARY_KEY = "final"  # summary.json's entry that holds the record
KINDS = ("single", "ensemble", "refit")  # the models of a report's `test`, in the order they are shown
PRECISIONS = ("fp32", "bf16")  # training.evaluate.TEST_PRECISIONS (not imported: it brings torch)


class ReportError(ValueError):
    """summary.json's "final" cannot be used; the message names the file and the field."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ReportError(what)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fraction(v: Any) -> bool:
    return _number(v) and 0.0 <= v <= 1.0


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _texts(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, str) for t in v)


def _keys(d: Any, where: str, required: set[str], optional: set[str] = frozenset()) -> None:
    _need(isinstance(d, dict), f"{where} is not an object")
    missing, extra = required - set(d), set(d) - required - optional
    _need(not missing, f"{where} has no {', '.join(sorted(missing))}")
    _need(not extra, f"{where} has unknown key(s) {', '.join(sorted(map(str, extra)))}")


def _check_result(r: Any, where: str) -> None:
    """One model's test figures (training.evaluate.scored, as _test_result keeps them)."""
    _keys(r, where, {"label", "accuracy", "ci95", "n", "per_class", "most_confused", "precision"},
          {"trial_id", "members", "source"})
    _need(isinstance(r["label"], str), f"{where}.label is not text")
    _need(_fraction(r["accuracy"]), f"{where}.accuracy is not an accuracy in [0, 1]")
    ci = r["ci95"]
    _need(isinstance(ci, list) and len(ci) == 2 and all(map(_fraction, ci)) and ci[0] <= ci[1],
          f"{where}.ci95 is not an interval in [0, 1]")
    _need(_count(r["n"]), f"{where}.n is not a count of test images")
    _need(r["precision"] in PRECISIONS, f"{where}.precision is not one of {', '.join(PRECISIONS)}")
    for i, row in enumerate(r["per_class"] if isinstance(r["per_class"], list) else [None]):
        _need(isinstance(row, dict) and isinstance(row.get("class"), str) and _count(row.get("support"))
              and all(_fraction(row.get(k)) for k in ("precision", "recall", "f1")),
              f"{where}.per_class[{i}] is not a class's precision, recall, F1 and support")
    for i, p in enumerate(r["most_confused"] if isinstance(r["most_confused"], list) else [None]):
        _need(isinstance(p, dict) and isinstance(p.get("a"), str) and isinstance(p.get("b"), str)
              and all(_count(p.get(k)) for k in ("count", "a_as_b", "b_as_a")),
              f"{where}.most_confused[{i}] is not a confused pair")
    _need(isinstance(r.get("trial_id", ""), str) and isinstance(r.get("source", ""), str)
          and _texts(r.get("members", [])), f"{where}.trial_id, members or source is damaged")


def _check(value: Any) -> None:
    """ReportError naming the first field of a "final" entry without its type or range."""
    _keys(value, "final", {f.name for f in fields(FinalReport)})
    for k in ("model", "delivered", "finished_at"):
        _need(isinstance(value[k], str) and value[k], f"final.{k} is not text")
    sha = value["model_sha256"]
    _need(isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha),
          "final.model_sha256 is not a sha256")
    _need(value["test_precision"] in PRECISIONS, f"final.test_precision is not one of {', '.join(PRECISIONS)}")
    test = value["test"]
    _need(isinstance(test, dict) and "single" in test and set(test) <= set(KINDS),
          f"final.test is not the test figures of the models {', '.join(KINDS)} (single at least)")
    for k, r in test.items():
        _check_result(r, f"final.test.{k}")
    _need(value["delivered_kind"] in test, f"final.delivered_kind is not one of the tested models ({', '.join(test)})")
    _check_result(value["delivered_test"], "final.delivered_test")
    sel = value["selection"]
    try:
        check_selection(sel, len(sel["candidates"]) if isinstance(sel, dict) and isinstance(
            sel.get("candidates"), list) else 100)
    except PlanError as e:
        raise ReportError(f"final.{e}") from None
    refit = value["refit"]
    _keys(refit, "final.refit", {"epochs_mode", "seeds", "members", "finished"}, {"budget"})
    _need(isinstance(refit["epochs_mode"], str) and _count(refit["seeds"]) and _count(refit["finished"])
          and refit.get("budget", True) is True, "final.refit's settings are damaged")
    for i, m in enumerate(refit["members"] if isinstance(refit["members"], list) else [None]):
        _keys(m, f"final.refit.members[{i}]", {"source_trial", "seed_index", "epochs"}, {"seconds"})
        _need(isinstance(m["source_trial"], str) and _count(m["seed_index"]) and _count(m["epochs"])
              and _number(m.get("seconds", 0)), f"final.refit.members[{i}] is damaged")
    for i, t in enumerate(value["test_trials"] if isinstance(value["test_trials"], list) else [None]):
        _keys(t, f"final.test_trials[{i}]", {"trial_id", "val_acc", "accuracy", "ci95", "f1"})
        _need(isinstance(t["trial_id"], str) and _fraction(t["val_acc"]) and _fraction(t["accuracy"])
              and isinstance(t["ci95"], list) and len(t["ci95"]) == 2 and all(map(_fraction, t["ci95"]))
              and isinstance(t["f1"], dict) and all(_fraction(v) for v in t["f1"].values()),
              f"final.test_trials[{i}] is not a trial's test figures")
    _need(_texts(value["problems"]), "final.problems is not a list of text")


@dataclass
class FinalReport:
    """What the final stage delivered (final/model.pt) and every test figure of it (the test split read once)."""

    model: str  # final/model.pt's path when it was written
    model_sha256: str  # of final/model.pt: a reader tells a model.pt from a report of another one
    delivered: str  # what model.pt is, in words ("refit ensemble of 2 (2 config(s) x 1 seed(s))")
    delivered_kind: str  # which of `test`'s models model.pt is: "single", "ensemble" or "refit"
    delivered_test: dict  # model.pt's own test figures (those of test[delivered_kind], labelled as delivered)
    test_precision: str  # of every figure here (training.evaluate.eval_precision)
    selection: dict  # what validation chose (the plan's)
    refit: dict  # epochs_mode, seeds, members (source_trial, seed_index, epochs[, seconds]), finished[, budget]
    test: dict  # kind -> that model's test figures: label, accuracy, ci95, n, per_class, most_confused, precision
    test_trials: list  # each top trial's own best checkpoint: trial_id, val_acc, accuracy, ci95, f1 by class
    problems: list  # one line per refit trial that did not complete
    finished_at: str

    @property
    def delivered_result(self) -> dict:
        return self.test[self.delivered_kind]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any, where: str = SUMMARY_FILE) -> FinalReport:
        """The record of a "final" entry, or ReportError naming `where` and the first field that is not whole."""
        try:
            _check(value)
        except ReportError as e:
            raise ReportError(f"{where}: {e}") from None
        return cls(**value)


# ---------------------------------------------------------------- the one test evaluation

def _test_result(label: str, probs, y, classes: list[str], precision: str, **extra) -> dict:
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


def measure(exp_dir: Path, plan: FinalPlan, cands: list[Candidate], loaded: list[dict], model, test, dev,
            precision: str, summary: dict, problems: list[str]):
    """(the final report, the delivered model's predictions on the test images). Every test figure of the final
    stage, from the test split `test` (x, y, classes: read once, by the caller): the best single trial (the
    summary's own measurement where it is of the same checkpoint), the ensemble of the search's checkpoints (also
    when it was not chosen, so the choice can be checked), the delivered file itself (`model`: the staged
    search.delivery.StagedModel; what a user loads is what the report measures) and each top trial. `loaded`: the
    candidates' checkpoints (each built once here)."""
    import torch

    from training.checkpoint import build_from_checkpoint, load_checkpoint
    from training.evaluate import class_probs

    x, y, classes = test
    cand_probs = [class_probs(build_from_checkpoint(ckpt, dev, where=c.checkpoint), x, dev, precision)
                  for c, ckpt in zip(cands, loaded, strict=True)]
    single = _summary_single(summary, cands[0], exp_dir, precision, len(y)) or _test_result(
        f"best single trial {cands[0].trial_id}", cand_probs[0], y, classes, precision, trial_id=cands[0].trial_id)
    results = {"single": single}
    sel = plan.selection
    k = sel["chosen_k"] if sel["ensemble_pays"] else len(cands)
    if k > 1:  # shown even when it did not pay on validation, so the choice can be checked
        results["ensemble"] = _test_result(
            f"top-{k} search checkpoints averaged" + ("" if sel["ensemble_pays"] else " (not chosen on validation)"),
            torch.stack(cand_probs[:k]).mean(0), y, classes, precision, members=[c.trial_id for c in cands[:k]])
    staged = build_from_checkpoint(load_checkpoint(model.path), dev, where=str(model.path))
    probs = class_probs(staged, x, dev, precision)
    delivered_test = _test_result(model.description, probs, y, classes, precision)
    if model.kind == "refit":
        results["refit"] = delivered_test
    elif model.kind == "single":  # the delivered model is the best single trial's checkpoint: one model, one figure
        delivered_test = {**single, "label": model.description}
    test_trials = []
    for i, (c, p) in enumerate(zip(cands, cand_probs, strict=True)):
        r = single if i == 0 else _test_result(c.trial_id, p, y, classes, precision)
        test_trials.append({"trial_id": c.trial_id, "val_acc": c.val_acc, "accuracy": r["accuracy"],
                            "ci95": r["ci95"], "f1": {row["class"]: row["f1"] for row in r["per_class"]}})
    refit = {"epochs_mode": plan.settings["refit_epochs"], "seeds": plan.settings["refit_seeds"],
             "members": [{**{k: m[k] for k in ("source_trial", "seed_index", "epochs")},
                          **({"seconds": m["train"]["train_seconds"]} if m["train"].get("train_seconds") else {})}
                         for m in plan.members],
             "finished": model.members if model.kind == "refit" else 0, **({"budget": True} if plan.budget else {})}
    report = FinalReport(str(model.target), model.sha256, model.description, model.kind, delivered_test, precision,
                         sel, refit, results, test_trials, problems, time.strftime("%Y-%m-%d %H:%M:%S"))
    return report, probs.argmax(1)
