"""The delivered model, `<exp>/final/model.pt` (search/final.py, step 3): the refitted members (one model or an
ensemble file, training.checkpoint.save_model), or, where no refit finished, the search's own checkpoints that
validation chose. It is written beside model.pt first (`stage_model`), measured there (search.final_report), and
put in place last, after the report and summary.json that describe it (`publish`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from search.final_report import SUMMARY_KEY, FinalReport
from search.final_settings import FinalError
from search.layout import MODEL_FILE, REPORT_FILE, SUMMARY_FILE
from search.plan import Candidate, FinalPlan
from search.report import write_report
from search.selection import TTA_VIEWS
from training.fileio import write_json


@dataclass
class StagedModel:
    """The delivered model, written beside final/model.pt until `publish` moves it there."""

    path: Path  # final/.model.pt.staged
    target: Path  # final/model.pt
    description: str  # what it is, in words ("refit ensemble of 2 (2 config(s) x 1 seed(s))")
    kind: str  # which of the report's tested models it is: "refit", "ensemble" or "single"
    members: int  # models averaged in it
    classes: list[str]
    split: str
    sha256: str


def staged_path(final_dir: Path) -> Path:
    return final_dir / f".{MODEL_FILE}.staged"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def stage_model(exp_dir: Path, final_dir: Path, plan: FinalPlan, cands: list[Candidate], loaded: list[dict],
                refitted: list[dict], sources: list[str]) -> StagedModel:
    """Write the delivered model beside final/model.pt: the refitted members (`refitted`, loaded, from the trials
    `sources`), or where none finished the chosen candidates' checkpoints (`loaded`, as the caller loaded them)."""
    from training.checkpoint import save_model

    chosen = cands[: plan.chosen_k]
    if refitted:
        seeds = plan.settings["refit_seeds"]
        delivered = (f"refit ensemble of {len(refitted)} ({len(sources)} config(s) x {seeds} seed(s))"
                     if len(refitted) > 1 else "refit of the best config")
        members, kind = refitted, "refit"
    else:
        # No refit finished (every one diverged or failed): the search's own checkpoints are still a
        # model, the one validation chose; deliver that rather than nothing.
        sources = [c.trial_id for c in chosen]
        why = " (no refit: the time budget left none)" if not plan.members else " (no refit finished)"
        delivered = (f"ensemble of {len(chosen)} search checkpoints" if len(chosen) > 1
                     else f"best single trial {chosen[0].trial_id}") + why
        members, kind = loaded[: len(chosen)], "ensemble" if len(chosen) > 1 else "single"
    tta = (plan.selection.get("tta") or {}).get("used")
    if tta:
        delivered += f", with {TTA_VIEWS}-view test-time augmentation"
    classes, split = list(loaded[0]["classes"]), cands[0].config["split"]
    staged = staged_path(final_dir)
    save_model(staged, members, classes, split, {"delivered": delivered, "experiment": exp_dir.name,
                                                 "source_trials": sources, "whole_training_split": bool(refitted)},
               tta=TTA_VIEWS if tta else 1)
    return StagedModel(staged, final_dir / MODEL_FILE, delivered, kind, len(members), classes, split, _sha256(staged))


def check_test_classes(model: StagedModel, test_classes: list[str]) -> None:
    if test_classes != model.classes:
        raise FinalError(f"the {model.split} test files have other classes than the training files the models learnt")


def publish(exp_dir: Path, final_dir: Path, report: FinalReport, staged: Path, summary: dict) -> None:
    """Write what a reader sees of the delivered model: the report and summary.json's "final" (each whole or not
    at all), then the model file, moved over final/model.pt last. The report and the summary carry the model's
    sha256, so a reader (the dashboard) can tell a model.pt from a report of another one; a kill between the
    writes leaves that mismatch, never a half file, and running the final stage again delivers anew."""
    write_report(final_dir / REPORT_FILE, exp_dir.name, report)
    write_json(exp_dir / SUMMARY_FILE, {**summary, SUMMARY_KEY: report.to_json()})
    staged.replace(final_dir / MODEL_FILE)

