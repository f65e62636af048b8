"""Read a search experiment directory into pandas tables, without starting Ray.

Used by the end-of-search summary and by the dashboard. It tolerates an experiment that is
still being written: half-written JSON lines, trials without results or checkpoints yet,
and missing state files are shown for what they are, never raised. It also tolerates a damaged
or hostile one: a malformed line of a trial's result.json (not JSON, a string or a huge number
where a number belongs) is skipped and counted in `Experiment.notes`, and what is read of one
trial is bounded (MAX_RESULT_BYTES of its result.json, MAX_HISTORY_ROWS rows kept for its
curves), so one bloated trial cannot stall a reader. Given the results root
(`load_experiment(path, root=...)`, as the dashboard does), nothing whose real location is
outside that root is opened (`is_inside`): such trial folders are listed in `Experiment.refused`.

Where the files are and how each is read: search/layout.py. This module only builds the tables.
"""

from __future__ import annotations

import functools
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from search.layout import (
    CHECKPOINT_FILE,
    ENDED_FILE,
    MAX_EPOCH,
    MAX_PARAMS_BYTES,
    PARAMS_FILE,
    RESULT_FILE,
    STATE_GLOB,
    as_number,
    is_inside,
    ray_statuses,
    read_result_rows,
    trial_dirs,
)
from search.settings import read_settings
from training.fileio import read_json

MAX_HISTORY_ROWS = 2000  # per-epoch rows kept of one trial for its curves (evenly spaced; last and best kept)

RAY_STATUS = {"TERMINATED": "terminated", "ERROR": "error", "RUNNING": "running", "PENDING": "pending",
              "PAUSED": "paused"}


@dataclass
class Experiment:
    path: Path
    trials: pd.DataFrame  # one row per trial
    histories: dict[str, pd.DataFrame] = field(default_factory=dict)  # trial id -> per-epoch rows
    checkpoints: dict[str, pd.DataFrame] = field(default_factory=dict)  # trial id -> path, epoch, val_acc
    # trial folders the experiment state does not know, with no params.json: started by a driver that
    # was killed before it recorded them (a resumed search re-runs them as new trials); listed as pending
    orphans: list[str] = field(default_factory=list)
    # trial id -> why that trial was not read at all (its folder leads outside the results root)
    refused: dict[str, str] = field(default_factory=dict)
    # trial id -> what was skipped or left out while reading it (malformed lines, a bloated result.json,
    # a file outside the results root)
    notes: dict[str, list[str]] = field(default_factory=dict)
    # what was skipped of the experiment state itself (malformed trial entries)
    state_notes: list[str] = field(default_factory=list)

    @property
    def best_trial(self) -> str | None:
        ok = self.trials[self.trials["best_val_acc"].notna()]
        return None if ok.empty else str(ok.sort_values("best_val_acc", ascending=False).iloc[0]["trial_id"])

    def best_checkpoint(self, trial_id: str | None = None) -> Path | None:
        """Path of the best readable checkpoint of a trial (default: the best trial). A listed file
        that cannot be loaded (damaged or deleted since) is skipped for the next best one."""
        for path in self.checkpoint_paths(trial_id):
            try:
                stat = path.stat()
            except OSError:
                continue
            if _loads(str(path), stat.st_mtime_ns, stat.st_size):
                return path
        return None

    def checkpoint_paths(self, trial_id: str | None = None) -> list[Path]:
        """A trial's listed checkpoints (default: the best trial's), best first (val accuracy, then the newest),
        not loaded: a reader that loads them anyway takes the first that loads (best_checkpoint checks)."""
        trial_id = trial_id or self.best_trial
        ck = self.checkpoints.get(trial_id) if trial_id else None
        if ck is None or ck.empty:
            return []
        return [Path(p) for p in ck.sort_values(["val_acc", "epoch"], ascending=[False, False])["path"]]


@functools.lru_cache(maxsize=512)
def _loads(path: str, mtime_ns: int, size: int) -> bool:
    """Whether a checkpoint file loads; cached per file version (the dashboard asks on every rerun)."""
    from training.checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(path)
    except CheckpointError:
        return False
    return True


# ---------------------------------------------------------------- one trial's result.json

def thin_rows(rows: list[dict], limit: int = MAX_HISTORY_ROWS) -> list[dict]:
    """At most `limit` rows, evenly spaced, always with the first, the last (status, epochs run) and
    the best val_acc one."""
    if len(rows) <= limit:
        return rows
    n = len(rows)
    keep = {round(i * (n - 1) / (limit - 2)) for i in range(limit - 1)}
    accs = [(as_number(r.get("val_acc")), i) for i, r in enumerate(rows)]
    accs = [(a, i) for a, i in accs if a is not None and not math.isnan(a)]
    if accs:
        keep.add(max(accs)[1])
    return [rows[i] for i in sorted(keep)]


def _drop_rereported(results: list[dict]) -> list[dict]:
    """Drop Ray's repeat of a trial's final result. A trial whose last epoch was reported (done)
    but that the saved experiment state still had as running (Ctrl+C or a kill right then) is
    resumed from that last checkpoint, trains nothing, and Ray appends its last result once more."""
    out: list[dict] = []
    for r in results:
        prev = out[-1] if out else None
        if prev is not None and r.get("done") and prev.get("done") and r.get("epoch") == prev.get("epoch") \
                and r.get("training_iteration") == prev.get("training_iteration"):
            continue
        out.append(r)
    return out


def _looks_complete(path: Path) -> bool:
    """A cheap check (no tensors read): the file exists and is a whole zip archive, as torch.save
    writes it. A truncated copy has lost the archive's directory at its end."""
    try:
        return path.is_file() and zipfile.is_zipfile(path)
    except OSError:
        return False


_TRIAL_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
OUTSIDE = "leads outside the results root"


def load_experiment(exp_dir: str | Path, root: str | Path | None = None) -> Experiment:
    """Read an experiment. With root (the dashboard's results root), every file and folder is
    opened only if its real location is inside root: a trial folder outside is not read at all
    (Experiment.refused), a file outside is left out and named in Experiment.notes."""
    exp_dir = Path(exp_dir)
    inside = (lambda p: True) if root is None else functools.partial(is_inside, root)
    read = ray_statuses(exp_dir, root)
    statuses = {t: v for t, v in read.items() if isinstance(t, str) and _TRIAL_ID.fullmatch(t)}
    skipped = read.skipped + len(read) - len(statuses)
    state_notes = [f"{skipped} malformed trial entr{'y' if skipped == 1 else 'ies'} of the experiment state "
                   "skipped"] if skipped else []
    rows, histories, checkpoints, refused, notes = [], {}, {}, {}, {}
    ids = {d.name.removeprefix("trial_"): d for d in trial_dirs(exp_dir)}
    max_t = _budget_max_t(exp_dir)
    for trial_id in sorted(set(ids) | set(statuses)):
        d = ids.get(trial_id, exp_dir / f"trial_{trial_id}")
        if not inside(d):
            refused[trial_id] = f"its folder {d.name} {OUTSIDE}"
            continue
        note = notes.setdefault(trial_id, [])
        config, results = {}, []
        if inside(d / PARAMS_FILE):
            config = read_json(d / PARAMS_FILE, MAX_PARAMS_BYTES) or {}
        else:
            note.append(f"{PARAMS_FILE} {OUTSIDE}: not read")
        if inside(d / RESULT_FILE):
            results, skipped = read_result_rows(d / RESULT_FILE)
            note += skipped
        else:
            note.append(f"{RESULT_FILE} {OUTSIDE}: not read")
        results = _drop_rereported(results)
        if len(results) > MAX_HISTORY_ROWS:
            note.append(f"{len(results)} result rows: the curves show {MAX_HISTORY_ROWS} of them")
        histories[trial_id] = pd.DataFrame(thin_rows(results))
        by_name = {r["checkpoint_dir_name"]: r for r in results if isinstance(r.get("checkpoint_dir_name"), str)}
        ck = []
        for c in sorted(d.glob("checkpoint_*")):
            f = c / CHECKPOINT_FILE
            if not inside(f):
                note.append(f"{c.name}/{CHECKPOINT_FILE} {OUTSIDE}: not offered")
            elif _looks_complete(f):  # a deleted or truncated file is not offered
                r = by_name.get(c.name, {})
                ck.append({"path": str(f), "epoch": r.get("epoch"), "val_acc": r.get("val_acc")})
        checkpoints[trial_id] = pd.DataFrame(ck, columns=["path", "epoch", "val_acc"])
        ended = read_json(d / ENDED_FILE, 4096) if inside(d / ENDED_FILE) else None
        rows.append(_trial_row(trial_id, d, config, results, statuses.get(trial_id, {}), bool(ck), ended, max_t))
        if not note:
            del notes[trial_id]
    orphans = sorted(t for t, d in ids.items() if statuses and t not in statuses and t not in refused
                     and not (d / PARAMS_FILE).is_file())
    trials = pd.DataFrame(rows, columns=TRIAL_COLUMNS + sorted({k for r in rows for k in r} - set(TRIAL_COLUMNS)))
    return Experiment(exp_dir, trials, histories, checkpoints, orphans, refused, notes, state_notes)


TRIAL_COLUMNS = ["trial_id", "status", "best_val_acc", "last_val_acc", "epochs_run", "max_epochs", "stopped_early",
                 "diverged", "seconds", "num_failures", "has_checkpoint"]


def _table_value(v):
    """A params.json value as a table cell: an int beyond 64 bits (no table column holds it) becomes
    a float, or its text when beyond float range too."""
    if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63:
        f = as_number(v)
        return f if f is not None else f"{str(v)[:20]}… ({len(str(v))} digits)"
    return v


def _count(v) -> int | None:
    f = as_number(v)
    return int(f) if f is not None and f.is_integer() and 0 <= f <= MAX_EPOCH else None


def had_its_seconds(last: dict, max_t: float | None) -> bool:
    """Whether a timed trial (a time budget's), whose last result is `last`, had all its seconds: its schedule
    done, or ASHA's max_t reached (ASHA stops it at the report that passes max_t, which can come a step before
    the trial's own end). One rule for trials.csv and the progress line."""
    return bool(last.get("schedule_done")) or (
        max_t is not None and (as_number(last.get("run_seconds")) or 0.0) >= max_t)


def _budget_max_t(exp_dir: Path) -> float | None:
    """A time-budgeted search's most seconds per trial (search.json's budget plan), else None (also when search.json
    cannot be read: the table then does without it)."""
    try:
        settings = read_settings(exp_dir)
    except (OSError, ValueError, RecursionError):  # (SettingsError is a ValueError)
        return None
    return float(settings.budget["max_t_s"]) if settings is not None and settings.budget else None


def _trial_row(trial_id: str, d: Path, config: dict, results: list[dict], ray: dict, has_checkpoint: bool,
               ended: dict | None = None, max_t: float | None = None) -> dict:
    # (rows passed clean_result_row: epoch, val_acc, ... are numbers or missing)
    good = [r for r in results if not r.get("diverged") and r.get("val_acc") is not None
            and not math.isnan(r["val_acc"])]
    last = results[-1] if results else {}
    diverged = bool(last.get("diverged"))
    max_epochs = _count(config.get("epochs"))
    epochs_run = _count(last.get("epoch")) or 0
    ray_status = ray.get("status") if isinstance(ray.get("status"), str) else None
    if ray_status == "ERROR" or (ray_status is None and (d / "error.txt").exists() and not last.get("done")):
        status = "error"
    elif diverged:
        status = "diverged"
    elif ray_status == "TERMINATED" or last.get("done"):
        # under a time budget ASHA's resource is seconds: a trial that had them all (a timed trial ends by itself
        # once they are spent, its schedule done) has finished, whatever its count of epochs
        timed = (as_number(config.get("train_seconds")) or 0.0) > 0
        full = had_its_seconds(last, max_t)
        short = timed or (max_epochs is not None and epochs_run < max_epochs)
        asha = short and not last.get("early_stopped") and not full
        if last.get("cut_by_deadline") or (asha and (ended or {}).get("reason") == "budget"):
            status = "budget"  # ended by the search's time budget, at its last report
        else:
            status = "stopped" if asha else "finished"
    elif ray_status in RAY_STATUS:
        status = RAY_STATUS[ray_status]
    else:
        status = "running" if results else "pending"
    return {
        "trial_id": trial_id,
        "status": status,
        "best_val_acc": max((r["val_acc"] for r in good), default=None),
        "last_val_acc": good[-1]["val_acc"] if good else None,
        "epochs_run": epochs_run,
        "max_epochs": max_epochs,
        "stopped_early": status == "stopped",
        "diverged": diverged,
        "seconds": last.get("time_total_s"),
        "num_failures": _count(ray.get("num_failures")) or 0,
        "has_checkpoint": has_checkpoint,
        **{f"config/{k}": _table_value(v) for k, v in sorted(config.items())},
    }


def list_experiments(root: str | Path) -> list[str]:
    """Names of experiment folders directly under the results root (newest first)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (any(p.glob(STATE_GLOB))
                                                         or any(p.glob("trial_*")))]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]
