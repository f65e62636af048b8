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

Layout (Ray Tune's, with our trial names):
    <exp>/experiment_state-*.json      trial statuses (JSON; written by the driver)
    <exp>/trial_<id>/params.json       the trial's config (TrainConfig overrides)
    <exp>/trial_<id>/result.json       one JSON line per epoch
    <exp>/trial_<id>/checkpoint_*/checkpoint.pt
    <exp>/trial_<id>/events.out.tfevents.*   TensorBoard
"""

from __future__ import annotations

import functools
import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

CHECKPOINT_FILE = "checkpoint.pt"
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

    @property
    def best_trial(self) -> str | None:
        ok = self.trials[self.trials["best_val_acc"].notna()]
        return None if ok.empty else str(ok.sort_values("best_val_acc", ascending=False).iloc[0]["trial_id"])

    def best_checkpoint(self, trial_id: str | None = None) -> Path | None:
        """Path of the best readable checkpoint of a trial (default: the best trial). A listed file
        that cannot be loaded (damaged or deleted since) is skipped for the next best one."""
        trial_id = trial_id or self.best_trial
        ck = self.checkpoints.get(trial_id) if trial_id else None
        if ck is None or ck.empty:
            return None
        for path in ck.sort_values(["val_acc", "epoch"], ascending=[False, False])["path"]:
            try:
                stat = Path(path).stat()
            except OSError:
                continue
            if _loads(path, stat.st_mtime_ns, stat.st_size):
                return Path(path)
        return None


SETTINGS_FILE = "search.json"  # the settings a search started with (search.run.apply_saved_settings)


def is_uri(path: str | Path) -> bool:
    """A cloud storage location (s3://, gs://, ...) rather than a filesystem path."""
    return "://" in str(path)


@functools.lru_cache(maxsize=512)
def _loads(path: str, mtime_ns: int, size: int) -> bool:
    """Whether a checkpoint file loads; cached per file version (the dashboard asks on every rerun)."""
    from training.checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(path)
    except CheckpointError:
        return False
    return True


def _parse_line(line: str | bytes) -> dict | None:
    """One JSON object, or None for anything else. ValueError covers a number too long for int()
    (Python refuses more than 4300 digits) and bad UTF-8; RecursionError very deep nesting."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def read_json_lines(path: Path) -> list[dict]:
    """Every complete JSON line; a half-written last line (a search still running) is skipped."""
    rows = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if line and (row := _parse_line(line)) is not None:
            rows.append(row)
    return rows


def read_json(path: Path, max_bytes: int | None = None) -> dict | None:
    """A JSON object file; None when missing, unreadable, not an object or (with max_bytes) larger."""
    try:
        if not path.is_file() or (max_bytes is not None and path.stat().st_size > max_bytes):
            return None  # (not a regular file: a FIFO would block the reader)
        value = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def is_inside(root: str | Path, path: str | Path) -> bool:
    """Whether path, every symlink on the way resolved, is root or lies under it (root resolved too).
    The one containment check of everything the dashboard opens (search/results.py, dashboard/)."""
    try:
        base = Path(root).resolve()
        real = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return False
    return real == base or base in real.parents


# ---------------------------------------------------------------- one trial's result.json

MAX_RESULT_BYTES = 8 * 2**20  # of one result.json: a bigger file is read at its head and its tail
MAX_HISTORY_ROWS = 2000  # per-epoch rows kept of one trial for its curves (evenly spaced; last and best kept)
MAX_EPOCH = 10**6  # an epoch or iteration number above this is not one
MAX_PARAMS_BYTES = 2**20  # params.json: a bigger one is not read
_COUNTS = ("epoch", "training_iteration")  # whole numbers >= 0
_FRACTIONS = ("val_acc",)  # in [0, 1] (NaN: none); it ranks the trials
_NUMBERS = ("val_loss", "train_loss", "train_acc", "lr", "time_total_s", "time_this_iter_s")
_FLAGS = ("done", "diverged", "early_stopped")
_TEXTS = ("checkpoint_dir_name",)


def _number(v) -> float | None:
    """v as a float if it is a JSON number (bool excluded) within float range, else None."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        return float(v)
    except OverflowError:  # an int beyond float range
        return None


def clean_result_row(row: dict) -> dict | None:
    """The row if every field this reader and the dashboard use has a value of its type (or is
    missing/null), else None: a string, object, list, bool or huge number where a number belongs,
    an accuracy outside [0, 1], a negative or fractional epoch."""
    for k in _COUNTS:
        v = row.get(k)
        if v is not None and ((f := _number(v)) is None or not f.is_integer() or not 0 <= f <= MAX_EPOCH):
            return None
    for k in _FRACTIONS:
        v = row.get(k)
        if v is not None and ((f := _number(v)) is None or not (math.isnan(f) or 0.0 <= f <= 1.0)):
            return None
    for k in _NUMBERS:
        v = row.get(k)
        if v is not None and _number(v) is None:
            return None
    for k in _FLAGS:
        if row.get(k) not in (None, True, False, 0, 1):
            return None
    for k in _TEXTS:
        if not isinstance(row.get(k), str | None):
            return None
    return row


def _read_bounded(path: Path, max_bytes: int) -> tuple[list[bytes], int, bool]:
    """(whole lines, file size, whether the middle was left out): the whole file up to max_bytes,
    else its first and last max_bytes/2, each cut to whole lines. The file's last line is kept
    even without its newline (the caller decides whether it is complete)."""
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        if size <= max_bytes:
            return f.read(max_bytes).split(b"\n"), size, False
        half = max_bytes // 2
        head = f.read(half)
        f.seek(size - half)
        tail = f.read(half)
    head = head[: head.rfind(b"\n") + 1]  # a line cut at the end of the head is dropped
    tail = tail[tail.find(b"\n") + 1:]  # and one cut at the start of the tail
    return head.split(b"\n")[:-1] + tail.split(b"\n"), size, True


def read_result_rows(path: Path, max_bytes: int = MAX_RESULT_BYTES) -> tuple[list[dict], list[str]]:
    """(the usable rows of a trial's result.json, notes on what was skipped). Reads at most max_bytes
    (see _read_bounded); a malformed line is skipped and counted, a half-written last line (a search
    still running) is skipped silently. Never raises."""
    try:
        if not path.is_file():  # missing, or not a regular file (a FIFO would block the reader)
            return [], []
        lines, size, cut = _read_bounded(path, max_bytes)
    except OSError:
        return [], []
    rows, bad = [], 0
    last = len(lines) - 1
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        row = _parse_line(line)
        if row is None and i == last:
            continue  # no newline yet: still being written
        row = clean_result_row(row) if row is not None else None
        if row is None:
            bad += 1
        else:
            rows.append(row)
    notes = []
    if cut:
        notes.append(f"result.json is {size / 2**20:.0f} MB: only its first and last "
                     f"{max_bytes / 2**21:.0f} MB were read")
    if bad:
        notes.append(f"{bad} malformed line(s) of result.json skipped")
    return rows, notes


def thin_rows(rows: list[dict], limit: int = MAX_HISTORY_ROWS) -> list[dict]:
    """At most `limit` rows, evenly spaced, always with the first, the last (status, epochs run) and
    the best val_acc one."""
    if len(rows) <= limit:
        return rows
    n = len(rows)
    keep = {round(i * (n - 1) / (limit - 2)) for i in range(limit - 1)}
    accs = [(_number(r.get("val_acc")), i) for i, r in enumerate(rows)]
    accs = [(a, i) for a, i in accs if a is not None and not math.isnan(a)]
    if accs:
        keep.add(max(accs)[1])
    return [rows[i] for i in sorted(keep)]


def ray_statuses(exp_dir: Path, root: str | Path | None = None) -> dict[str, dict]:
    """trial id -> {status, num_failures, error_file, config, last_result} from the newest readable
    experiment state (the file Ray restores the trials from). Plain JSON: Ray's cloudpickled
    fields stay opaque dicts, never unpickled. With root, a state file outside it is not read."""
    for state_file in sorted(exp_dir.glob(STATE_GLOB), reverse=True):
        if root is not None and not is_inside(root, state_file):
            continue
        state = read_json(state_file)
        if state and "trial_data" in state:
            return parse_experiment_state(state)
    return {}


STATE_GLOB = "experiment_state-*.json"  # Ray's experiment state, one file per driver session


def parse_experiment_state(state: dict) -> dict[str, dict]:
    """The trials of one experiment state (see ray_statuses)."""
    out = {}
    for entry in state.get("trial_data") or []:
        try:
            info = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
            meta = json.loads(entry[1]) if isinstance(entry[1], str) else entry[1]
            out[info["trial_id"]] = {"status": info.get("status"), "num_failures": meta.get("num_failures", 0),
                                     "error_file": meta.get("error_filename"), "config": info.get("config") or {},
                                     "last_result": meta.get("last_result") or {}}
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, RecursionError):
            continue
    return out


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


def trial_dirs(exp_dir: Path) -> list[Path]:
    return sorted(p for p in exp_dir.glob("trial_*") if p.is_dir())


_TRIAL_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
OUTSIDE = "leads outside the results root"


def load_experiment(exp_dir: str | Path, root: str | Path | None = None) -> Experiment:
    """Read an experiment. With root (the dashboard's results root), every file and folder is
    opened only if its real location is inside root: a trial folder outside is not read at all
    (Experiment.refused), a file outside is left out and named in Experiment.notes."""
    exp_dir = Path(exp_dir)
    inside = (lambda p: True) if root is None else functools.partial(is_inside, root)
    statuses = ray_statuses(exp_dir, root)
    statuses = {t: v for t, v in statuses.items() if isinstance(t, str) and _TRIAL_ID.fullmatch(t)}
    rows, histories, checkpoints, refused, notes = [], {}, {}, {}, {}
    ids = {d.name.removeprefix("trial_"): d for d in trial_dirs(exp_dir)}
    for trial_id in sorted(set(ids) | set(statuses)):
        d = ids.get(trial_id, exp_dir / f"trial_{trial_id}")
        if not inside(d):
            refused[trial_id] = f"its folder {d.name} {OUTSIDE}"
            continue
        note = notes.setdefault(trial_id, [])
        config, results = {}, []
        if inside(d / "params.json"):
            config = read_json(d / "params.json", MAX_PARAMS_BYTES) or {}
        else:
            note.append(f"params.json {OUTSIDE}: not read")
        if inside(d / "result.json"):
            results, skipped = read_result_rows(d / "result.json")
            note += skipped
        else:
            note.append(f"result.json {OUTSIDE}: not read")
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
        rows.append(_trial_row(trial_id, d, config, results, statuses.get(trial_id, {}), bool(ck)))
        if not note:
            del notes[trial_id]
    orphans = sorted(t for t, d in ids.items() if statuses and t not in statuses and t not in refused
                     and not (d / "params.json").is_file())
    trials = pd.DataFrame(rows, columns=_COLUMNS + sorted({k for r in rows for k in r} - set(_COLUMNS)))
    return Experiment(exp_dir, trials, histories, checkpoints, orphans, refused, notes)


_COLUMNS = ["trial_id", "status", "best_val_acc", "last_val_acc", "epochs_run", "max_epochs", "stopped_early",
            "diverged", "seconds", "num_failures", "has_checkpoint"]


def _table_value(v):
    """A params.json value as a table cell: an int beyond 64 bits (no table column holds it) becomes
    a float, or its text when beyond float range too."""
    if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63:
        f = _number(v)
        return f if f is not None else f"{str(v)[:20]}… ({len(str(v))} digits)"
    return v


def _count(v) -> int | None:
    f = _number(v)
    return int(f) if f is not None and f.is_integer() and 0 <= f <= MAX_EPOCH else None


def _trial_row(trial_id: str, d: Path, config: dict, results: list[dict], ray: dict, has_checkpoint: bool) -> dict:
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
        asha = max_epochs is not None and epochs_run < max_epochs and not last.get("early_stopped")
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
    found = [p for p in root.iterdir() if p.is_dir() and (any(p.glob("experiment_state-*.json"))
                                                         or any(p.glob("trial_*")))]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]
