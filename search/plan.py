"""The final stage's plan, `<exp>/final/plan.json`, as one record, `FinalPlan`: what it chose on validation (the
candidates, the selection) and which models it refits (the members).

It is fixed before the first refit trial starts, so a resumed final stage refits exactly the same models. One
writer (`write_plan`) and one reader (`read_plan`, through `FinalPlan.from_json`): it is read back, so it is checked
like any input: a file that is not whole, or whose fields do not have their types and ranges (a hand edit, an
extra key, a field missing), is a `PlanError` with one line that names the file and the field, never a KeyError
or TypeError further on. Checkpoint paths are stored relative to the experiment folder, so a copied or moved
experiment refits and reports its own checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from search.layout import PLAN_FILE
from training.fileio import write_json

MAX_PLAN_BYTES = 16 * 2**20  # a plan holds a few configs and numbers: a larger file is not one
SETTING_TYPES = {"ensemble_k": int, "refit_seeds": int, "refit_epochs": str, "tta": str}


class PlanError(ValueError):
    """plan.json cannot be used; the message says why."""


class DamagedPlan(PlanError):
    """plan.json is not whole JSON (cut short, overwritten): nothing in it can be read back."""


def relative_checkpoint(path: str | Path, exp_dir: Path) -> str:
    """A checkpoint's path inside the experiment, relative to it ("trial_x/checkpoint_000001/checkpoint.pt").
    An absolute path from another place (a plan or summary written before the experiment was copied or moved)
    keeps its part from the trial folder on."""
    path = Path(path)
    if not path.is_absolute():
        return PurePosixPath(*path.parts).as_posix()
    try:
        return path.resolve().relative_to(exp_dir.resolve()).as_posix()
    except (ValueError, OSError, RuntimeError):
        pass
    parts = path.parts
    start = next((i for i, p in enumerate(parts) if p.startswith("trial_")), None)
    if start is None:
        raise PlanError(f"checkpoint {path} is not inside an experiment's trial folder")
    return PurePosixPath(*parts[start:]).as_posix()


def checkpoint_in(exp_dir: Path, rel: str) -> Path:
    """The file a relative checkpoint path names inside the experiment; a path that would leave it (.., an
    absolute path, a link out of the folder) is a PlanError."""
    rel_path = PurePosixPath(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts or not rel_path.parts:
        raise PlanError(f"checkpoint path {rel!r} is not a path inside the experiment")
    path = exp_dir.joinpath(*rel_path.parts)
    try:
        inside = path.resolve().is_relative_to(exp_dir.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise PlanError(f"checkpoint {rel!r} leads outside the experiment folder")
    return path


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise PlanError(what)


def _is_int(v: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def _is_fraction(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


def _keys(d: Any, where: str, required: set[str], optional: set[str] = frozenset()) -> None:
    _need(isinstance(d, dict), f"{where} is not an object")
    missing, extra = required - set(d), set(d) - required - optional
    _need(not missing, f"{where} has no {', '.join(sorted(missing))}")
    _need(not extra, f"{where} has unknown key(s) {', '.join(sorted(map(str, extra)))}")


def check_selection(sel: Any, n_candidates: int) -> None:
    """PlanError naming the first field of a selection (search.selection.select_ensemble) without its type or range;
    also the check of the selection summary.json's "final" carries."""
    _keys(sel, "selection", {"metric", "n_val", "val_acc_by_k", "chosen_k", "ensemble_pays", "tta", "candidates"},
          {"p_by_k"})
    p_by_k = sel.get("p_by_k", {})
    _need(isinstance(p_by_k, dict) and all(_is_fraction(v) for v in p_by_k.values()),
          "selection.p_by_k is not p-values by ensemble size")
    _need(_is_int(sel["chosen_k"], 1, n_candidates),
          f"selection.chosen_k is not a number of candidates (1..{n_candidates})")
    _need(isinstance(sel["ensemble_pays"], bool), "selection.ensemble_pays is not true or false")
    _need(_is_int(sel["n_val"]), "selection.n_val is not a count")
    by_k = sel["val_acc_by_k"]
    _need(isinstance(by_k, dict) and by_k and all(_is_fraction(v) for v in by_k.values())
          and all(k.isdigit() for k in by_k), "selection.val_acc_by_k is not accuracies by ensemble size")
    _need(isinstance(sel["candidates"], list), "selection.candidates is not a list")
    tta = sel["tta"]
    _keys(tta, "selection.tta", {"views", "val_acc", "val_acc_without", "used"})
    _need(_is_int(tta["views"], 1) and isinstance(tta["used"], bool) and _is_fraction(tta["val_acc_without"])
          and (tta["val_acc"] is None or _is_fraction(tta["val_acc"])), "selection.tta is damaged")


def _check_plan(plan: Any, exp_dir: Path | None) -> None:
    """PlanError naming the first field without its type or range (with exp_dir, also a checkpoint path that does
    not lead to a file inside that experiment)."""
    _keys(plan, "the plan", {"settings", "candidates", "selection", "members"}, {"budget"})
    _need(plan.get("budget", True) is True, "budget is not true")
    settings = plan["settings"]
    _keys(settings, "settings", set(SETTING_TYPES))
    for k, t in SETTING_TYPES.items():
        _need(isinstance(settings[k], t) and not isinstance(settings[k], bool), f"settings.{k} is not a {t.__name__}")
    cands = plan["candidates"]
    _need(isinstance(cands, list) and 1 <= len(cands) <= 100, "candidates is not a list of 1 to 100 trials")
    for i, c in enumerate(cands):
        where = f"candidates[{i}]"
        _keys(c, where, {"trial_id", "val_acc", "epoch", "config", "checkpoint"})
        _need(isinstance(c["trial_id"], str) and c["trial_id"] and "/" not in c["trial_id"],
              f"{where}.trial_id is not a trial id")
        _need(_is_fraction(c["val_acc"]), f"{where}.val_acc is not an accuracy in [0, 1]")
        _need(_is_int(c["epoch"]), f"{where}.epoch is not a count of epochs")
        _need(isinstance(c["config"], dict) and isinstance(c["config"].get("split"), str),
              f"{where}.config is not a training config")
        _need(isinstance(c["checkpoint"], str) and c["checkpoint"], f"{where}.checkpoint is not a path")
        if exp_dir is not None:
            try:
                checkpoint_in(exp_dir, relative_checkpoint(c["checkpoint"], exp_dir))
            except PlanError as e:
                raise PlanError(f"{where}.checkpoint: {e}") from None
    check_selection(plan["selection"], len(cands))
    members = plan["members"]
    # (no member: a time budget left no time for a refit)
    _need(isinstance(members, list) and len(members) <= 400 and (members or plan.get("budget")),
          "members is not a list of refits")
    ids = {c["trial_id"] for c in cands}
    for i, m in enumerate(members):
        where = f"members[{i}]"
        _keys(m, where, {"source_trial", "seed_index", "epochs", "train"})
        _need(m["source_trial"] in ids, f"{where}.source_trial is not one of the candidates")
        _need(_is_int(m["seed_index"], 0, 99), f"{where}.seed_index is not a seed index")
        _need(_is_int(m["epochs"], 1, 10**6), f"{where}.epochs is not a number of epochs")
        _need(isinstance(m["train"], dict) and m["train"].get("epochs") == m["epochs"],
              f"{where}.train is not its training config")


@dataclass
class Candidate:
    """One of the top trials at its best checkpoint (search.selection.candidates)."""

    trial_id: str
    val_acc: float
    epoch: int  # of its best checkpoint
    config: dict
    checkpoint: str  # in a plan: relative to the experiment folder (relative_checkpoint)


@dataclass
class FinalPlan:
    """What the final stage chose on validation and which models it refits."""

    settings: dict  # the final stage's settings it was made with (search.final_settings.FinalSettings.planned)
    candidates: list[Candidate]  # the top trials, best first, each checkpoint path relative to the experiment
    selection: dict  # what validation chose (search.selection.select_ensemble)
    members: list[dict] = field(default_factory=list)  # the refits: source_trial, seed_index, epochs, train
    budget: bool = False  # made under a time budget (which may leave no time for a refit: no members)

    def to_json(self) -> dict:
        return {"settings": dict(self.settings), "candidates": [asdict(c) for c in self.candidates],
                "selection": self.selection, "members": self.members, **({"budget": True} if self.budget else {})}

    @classmethod
    def from_json(cls, value: Any, where: str = PLAN_FILE, exp_dir: Path | None = None) -> FinalPlan:
        """The plan of a plan.json object, if every field has its type and range (and, with exp_dir, every
        checkpoint path leads to a file inside that experiment), else PlanError naming `where` and the field."""
        try:
            _check_plan(value, exp_dir)
        except PlanError as e:
            raise PlanError(f"{where}: {e}") from None
        return cls(dict(value["settings"]), [Candidate(**c) for c in value["candidates"]], value["selection"],
                   value["members"], bool(value.get("budget")))

    @property
    def chosen_k(self) -> int:
        return self.selection["chosen_k"]

    def resolved(self, exp_dir: Path) -> list[Candidate]:
        """The candidates, each checkpoint path resolved inside this experiment (PlanError otherwise)."""
        return [Candidate(**{**asdict(c), "checkpoint": str(checkpoint_in(exp_dir, relative_checkpoint(
            c.checkpoint, exp_dir)))}) for c in self.candidates]


def read_plan(path: Path, exp_dir: Path | None = None) -> FinalPlan | None:
    """The checked plan (FinalPlan.from_json); None when there is none; PlanError naming the file when it is there
    but cannot be used (DamagedPlan: not even JSON)."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise PlanError(f"{path}: {path.name} is not a regular file")
    if path.stat().st_size > MAX_PLAN_BYTES:
        raise PlanError(f"{path}: {path.name} is larger than a plan can be ({MAX_PLAN_BYTES // 2**20} MB)")
    try:
        plan = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise DamagedPlan(f"{path.name} is not whole JSON ({type(e).__name__})") from None
    return FinalPlan.from_json(plan, str(path), exp_dir)


def write_plan(path: Path, plan: FinalPlan) -> None:
    """plan.json, whole or not at all."""
    write_json(path, plan.to_json(), indent=1)


def members_text(members: list[dict]) -> str:
    """What a list of refit members is, for a message: "trial a x seeds +0..1, trial b x seed +0"."""
    by_trial: dict[str, list[int]] = {}
    for m in members:
        by_trial.setdefault(str(m.get("source_trial")), []).append(int(m.get("seed_index", 0)))
    return ", ".join(f"trial {t} x seed(s) +{min(s)}..{max(s)}" if len(s) > 1 else f"trial {t} x seed +{s[0]}"
                     for t, s in by_trial.items())
