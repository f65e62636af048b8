"""Where everything of an experiment is on disk, and how each file is read: the one module that
knows Ray Tune's layout (with our trial names) and our own files beside it.

    <exp>/search.json                   the settings the search started with (search.settings.SearchSettings)
    <exp>/experiment_state-*.json       trial statuses, one per driver session (Ray; JSON)
    <exp>/searcher-state-*.pkl          the Optuna study (Ray; pickled, unpickled only by Ray; search.repairs
                                        checks that it is whole, opcode by opcode)
    <exp>/trial_<id>/params.json        the trial's config (TrainConfig overrides)
    <exp>/trial_<id>/result.json        one JSON line per epoch
    <exp>/trial_<id>/checkpoint_<n>/checkpoint.pt   (n counts up per trial)
    <exp>/trial_<id>/events.out.tfevents.*           TensorBoard
    <exp>/summary.json, trials.csv, best.pt          written when the search ends (search/summary.py)
    <exp>/final/                        the final stage (search/final.py): plan.json (search.plan.FinalPlan),
                                        model.pt, report.md, confused_pairs.png, refit/ (a Tune experiment too);
                                        summary.json's "final" is search.final_report.FinalReport
    <exp>/orphaned/, <exp>/damaged/     set aside on --resume (search/repairs.py): trial folders no state
                                        names; files cut short or damaged (Ray's state, sessions.json, summary.json,
                                        final/plan.json), numbered NAME.1, NAME.2 rather than overwritten
    <exp>/budget.json                   each driver session's seconds by phase and the time budget (search/ledger.py)
    <exp>/state-copy/                   the driver's whole copies of Ray's state files (search.repairs.StateKeeper)
    <exp>/trial_<id>/ended.json         the trial ended (its last epoch), written by the driver

Readers never raise on a damaged or half-written file (a search still running, a killed driver,
hostile content): they return what is usable. Given a results root, nothing whose real location is
outside it is opened (`is_inside`).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
from pathlib import Path

from training.fileio import parse_line, read_json, write_bytes

DEFAULT_STORAGE = Path(__file__).resolve().parents[1] / "results"  # where experiments go without --storage
CHECKPOINT_FILE = "checkpoint.pt"  # inside every checkpoint_<n>/ folder (search/trainable.py writes it)
SETTINGS_FILE = "search.json"  # the settings a search started with (search.settings.SearchSettings)
SESSIONS_FILE = "sessions.json"  # seconds of each driver session (the search's wall-clock over resumes)
SUMMARY_FILE = "summary.json"  # written when the search ends (search/summary.py), its "final" by search/final.py
TRIALS_FILE = "trials.csv"  # one row per trial (search/summary.py)
BEST_FILE = "best.pt"  # the best trial's best checkpoint (search/summary.py)
PARAMS_FILE = "params.json"  # in a trial folder: its config
RESULT_FILE = "result.json"  # in a trial folder: one JSON line per epoch
FINAL_DIR = "final"  # <exp>/final/: the final stage (search/final.py)
PLAN_FILE = "plan.json"  # final/plan.json: what the final stage chose and refits (search.plan.FinalPlan)
MODEL_FILE = "model.pt"  # final/model.pt: the delivered model (search/delivery.py)
REPORT_FILE = "report.md"  # final/report.md (search/report.py)
PAIRS_IMAGE = "confused_pairs.png"  # final/confused_pairs.png (search/report.py)
REFIT_DIR = "refit"  # final/refit/: the refit's Ray Tune experiment (search/refit.py)
STATE_GLOB = "experiment_state-*.json"  # Ray's experiment state, one file per driver session
STATE_COPY_DIR = "state-copy"  # the driver's whole copies of Ray's state files (search.repairs.StateKeeper)
ENDED_FILE = "ended.json"  # in a trial folder: the trial ended (search.repairs.StateKeeper)


def read_storage_file(exp_dir: str | Path, name: str) -> bytes | None:
    """A file of the experiment folder, local or at any storage URI Ray writes to (through pyarrow, as Ray
    does); None when it is not there."""
    if not is_uri(exp_dir):
        path = Path(exp_dir) / name
        return path.read_bytes() if path.is_file() else None
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(f"{str(exp_dir).rstrip('/')}/{name}")
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def write_storage_file(exp_dir: str | Path, name: str, data: bytes) -> None:
    """Write a file of the experiment folder (see read_storage_file); whole or not at all on local disk."""
    if not is_uri(exp_dir):
        Path(exp_dir).mkdir(parents=True, exist_ok=True)
        write_bytes(Path(exp_dir) / name, data)
        return
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(str(exp_dir).rstrip("/"))
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(data)


DAMAGED_DIR = "damaged"  # <exp>/damaged/: files set aside because they could not be read back


def own_dir(path: Path) -> Path:
    """A folder of the experiment that this project writes into (final/, damaged/, state-copy/, orphaned/), made
    if missing. One that is a symbolic link (planted: it would lead our writes anywhere) is an OSError."""
    if path.is_symlink():
        raise OSError(f"{path} is a symbolic link, not a folder of the experiment: remove it")
    path.mkdir(exist_ok=True)
    return path


def set_aside(path: Path, exp_dir: Path, why: str = "") -> Path:
    """Move a damaged file of a local experiment to <exp>/damaged/ (never over a file already there: a second
    damaged copy of the same name becomes NAME.1, NAME.2, ...) and say so; returns where it went. Nothing is
    deleted, so whatever the file still held can be looked at."""
    folder = own_dir(Path(exp_dir) / DAMAGED_DIR)
    dest, n = folder / path.name, 0
    while dest.exists() or dest.is_symlink():
        n += 1
        dest = folder / f"{path.name}.{n}"
    os.rename(path, dest)  # (same folder tree: a rename, never a copy)
    if why:
        print(f"  {path.name}: {why}: moved to {dest}", flush=True)
    return dest


def read_sessions(exp_dir: str | Path) -> tuple[list[float], bool]:
    """(how long each earlier driver session of the search ran, oldest first; whether that list is complete).
    sessions.json only feeds the reported wall-clock, so a missing file is no sessions and a damaged one is
    no sessions *and* incomplete, never an error. Its format: {"sessions": [s, ...], "complete": bool}
    (older experiments wrote the bare list)."""
    try:
        data = read_storage_file(exp_dir, SESSIONS_FILE)
        value = json.loads(data) if data is not None else {"sessions": []}
    except (OSError, ValueError, RecursionError):
        return [], False
    complete = True
    if isinstance(value, dict):
        complete = value.get("complete", True) is True
        value = value.get("sessions")
    if not isinstance(value, list):
        return [], False
    good = [float(v) for v in value if isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v) and v >= 0]
    return good, complete and len(good) == len(value)


def add_session(exp_dir: str | Path, seconds: float) -> tuple[list[float], bool]:
    """Record one more driver session of `seconds`; returns (every session's seconds, this one last; whether
    they are all there). A damaged sessions.json is set aside in <exp>/damaged/ (never overwritten), and the
    total is marked incomplete from then on. (A driver killed outright records nothing, so the total can
    only miss time, never count it twice.)"""
    sessions, complete = read_sessions(exp_dir)
    if not complete and not is_uri(exp_dir):
        path = Path(exp_dir) / SESSIONS_FILE
        try:
            if path.exists() or path.is_symlink():
                set_aside(path, Path(exp_dir), "cannot be read (the search's earlier sessions are not counted)")
        except OSError:
            pass
    sessions = [*sessions, float(seconds)]
    try:
        write_storage_file(exp_dir, SESSIONS_FILE, json.dumps({"sessions": sessions, "complete": complete}).encode())
    except (OSError, ValueError):  # (pyarrow's errors are both) the wall-clock is a report: the search
        pass  # that just ran must still be summarised
    return sessions, complete


def checkpoint_index(path: Path) -> int:
    """n of a checkpoint_<n> folder (-1 for another name)."""
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoint_dirs(trial_dir: Path) -> list[Path]:
    """A trial's checkpoint folders, oldest first (Ray numbers them in order)."""
    return sorted((p for p in trial_dir.glob("checkpoint_*") if p.is_dir()), key=checkpoint_index)


def is_uri(path: str | Path) -> bool:
    """A cloud storage location (s3://, gs://, ...) rather than a filesystem path."""
    return "://" in str(path)


def whole_state(path: Path) -> bool:
    """An experiment state file Ray can restore from: JSON holding its trial list (not one cut short by a
    driver killed while Ray wrote it, see search.repairs.set_aside_damaged_state)."""
    state = read_json(path)
    return state is not None and isinstance(state.get("trial_data"), list)


def has_whole_state(exp_dir: str | Path) -> bool:
    """Whether a local experiment has a state Ray can restore from: else no trial was ever recorded (a
    trial writes nothing before the state names it), and the search starts afresh."""
    return Path(exp_dir).is_dir() and any(whole_state(f) for f in Path(exp_dir).glob(STATE_GLOB))


def is_inside(root: str | Path, path: str | Path) -> bool:
    """Whether path, every symlink on the way resolved, is root or lies under it (root resolved too).
    The one containment check of everything the dashboard opens (search/results.py, dashboard/)."""
    try:
        base = Path(root).resolve()
        real = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return False
    return real == base or base in real.parents


MAX_RESULT_BYTES = 8 * 2**20  # of one result.json: a bigger file is read at its head and its tail
MAX_EPOCH = 10**6  # an epoch or iteration number above this is not one
MAX_PARAMS_BYTES = 2**20  # params.json: a bigger one is not read
_COUNTS = ("epoch", "training_iteration")  # whole numbers >= 0
_FRACTIONS = ("val_acc",)  # in [0, 1] (NaN: none); it ranks the trials
_NUMBERS = ("val_loss", "train_loss", "train_acc", "lr", "time_total_s", "time_this_iter_s", "run_seconds")
_FLAGS = ("done", "diverged", "early_stopped", "cut_by_deadline", "schedule_done")
_TEXTS = ("checkpoint_dir_name",)


def as_number(v) -> float | None:
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
        if v is not None and ((f := as_number(v)) is None or not f.is_integer() or not 0 <= f <= MAX_EPOCH):
            return None
    for k in _FRACTIONS:
        v = row.get(k)
        if v is not None and ((f := as_number(v)) is None or not (math.isnan(f) or 0.0 <= f <= 1.0)):
            return None
    for k in _NUMBERS:
        v = row.get(k)
        if v is not None and as_number(v) is None:
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
        row = parse_line(line)
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


def ray_statuses(exp_dir: str | Path, root: str | Path | None = None, fs=None) -> dict[str, dict]:
    """trial id -> {status, num_failures, error_file, config, last_result} from the newest readable
    experiment state (the file Ray restores the trials from). Plain JSON: Ray's cloudpickled
    fields stay opaque dicts, never unpickled. With root, a state file outside it is not read.
    `exp_dir` may be a storage URI (s3://..., file://...), read through pyarrow as Ray does; `fs`: a
    pyarrow filesystem (as Ray's storage context has) that exp_dir is a path on."""
    for read in _state_files(exp_dir, root, fs):
        state = read()
        if state and "trial_data" in state:
            return parse_experiment_state(state)
    return TrialStates()


def _state_files(exp_dir: str | Path, root, fs) -> list:
    """Readers of the experiment's state files, newest first (Ray names them by time)."""
    if fs is None and is_uri(exp_dir):
        import pyarrow.fs

        try:
            fs, exp_dir = pyarrow.fs.FileSystem.from_uri(str(exp_dir))
        except (OSError, ValueError):
            return []
    if fs is None:
        files = sorted(Path(exp_dir).glob(STATE_GLOB), reverse=True)
        return [functools.partial(read_json, f) for f in files if root is None or is_inside(root, f)]
    import pyarrow.fs

    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(str(exp_dir)))
    except (OSError, ValueError):
        return []
    names = sorted((i for i in infos if fnmatch.fnmatch(i.base_name, STATE_GLOB)), key=lambda i: i.base_name,
                   reverse=True)
    return [functools.partial(_read_fs_json, fs, i.path) for i in names]


def _read_fs_json(fs, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            value = json.loads(f.read())
    except (OSError, ValueError, RecursionError):  # being written, or cut short: the older one
        return None
    return value if isinstance(value, dict) else None


class TrialStates(dict):
    """trial id -> its state (ray_statuses), and how many malformed entries of the state file were skipped."""

    skipped: int = 0


def parse_experiment_state(state: dict) -> TrialStates:
    """The trials of one experiment state (see ray_statuses); a malformed entry is skipped and counted."""
    out = TrialStates()
    entries = state.get("trial_data") or []
    out.skipped = 0 if isinstance(entries, list) else 1
    for entry in entries if isinstance(entries, list) else []:
        try:
            info = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
            meta = json.loads(entry[1]) if isinstance(entry[1], str) else entry[1]
            out[info["trial_id"]] = {"status": info.get("status"), "num_failures": meta.get("num_failures", 0),
                                     "error_file": meta.get("error_filename"), "config": info.get("config") or {},
                                     "last_result": meta.get("last_result") or {}}
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, RecursionError):
            out.skipped += 1
    return out


def trial_dirs(exp_dir: Path) -> list[Path]:
    return sorted(p for p in exp_dir.glob("trial_*") if p.is_dir())
