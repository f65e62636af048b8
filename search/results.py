"""Read a search experiment directory into pandas tables, without starting Ray.

Used by the end-of-search summary and by the dashboard. It tolerates an experiment that is
still being written: half-written JSON lines, trials without results or checkpoints yet,
and missing state files are shown for what they are, never raised.

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


def read_json_lines(path: Path) -> list[dict]:
    """Every complete JSON line; a half-written last line (a search still running) is skipped."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def ray_statuses(exp_dir: Path) -> dict[str, dict]:
    """trial id -> {status, num_failures, error_file, config, last_result} from the newest readable
    experiment state (the file Ray restores the trials from). Plain JSON: Ray's cloudpickled
    fields stay opaque dicts, never unpickled."""
    for state_file in sorted(exp_dir.glob(STATE_GLOB), reverse=True):
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
        except (KeyError, IndexError, TypeError, AttributeError, json.JSONDecodeError):
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


def load_experiment(exp_dir: str | Path) -> Experiment:
    exp_dir = Path(exp_dir)
    statuses = ray_statuses(exp_dir)
    rows, histories, checkpoints = [], {}, {}
    ids = {d.name.removeprefix("trial_"): d for d in trial_dirs(exp_dir)}
    orphans = sorted(t for t, d in ids.items() if statuses and t not in statuses and not (d / "params.json").is_file())
    for trial_id in sorted(set(ids) | set(statuses)):
        d = ids.get(trial_id, exp_dir / f"trial_{trial_id}")
        config = read_json(d / "params.json") or {}
        results = _drop_rereported(read_json_lines(d / "result.json"))
        history = pd.DataFrame(results)
        histories[trial_id] = history
        ck = []
        for c in sorted(d.glob("checkpoint_*")):
            f = c / CHECKPOINT_FILE
            if _looks_complete(f):  # a deleted or truncated file is not offered
                match = [r for r in results if r.get("checkpoint_dir_name") == c.name]
                r = match[-1] if match else {}
                ck.append({"path": str(f), "epoch": r.get("epoch"), "val_acc": r.get("val_acc")})
        checkpoints[trial_id] = pd.DataFrame(ck, columns=["path", "epoch", "val_acc"])
        rows.append(_trial_row(trial_id, d, config, results, statuses.get(trial_id, {})))
    trials = pd.DataFrame(rows, columns=_COLUMNS + sorted({k for r in rows for k in r} - set(_COLUMNS)))
    return Experiment(exp_dir, trials, histories, checkpoints, orphans)


_COLUMNS = ["trial_id", "status", "best_val_acc", "last_val_acc", "epochs_run", "max_epochs", "stopped_early",
            "diverged", "seconds", "num_failures", "has_checkpoint"]


def _trial_row(trial_id: str, d: Path, config: dict, results: list[dict], ray: dict) -> dict:
    good = [r for r in results if not r.get("diverged") and r.get("val_acc") is not None]
    last = results[-1] if results else {}
    diverged = bool(last.get("diverged"))
    max_epochs = config.get("epochs")
    epochs_run = int(last.get("epoch", 0)) if results else 0
    ray_status = ray.get("status")
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
        "num_failures": ray.get("num_failures", 0),
        "has_checkpoint": any(_looks_complete(f) for f in d.glob(f"checkpoint_*/{CHECKPOINT_FILE}")),
        **{f"config/{k}": v for k, v in sorted(config.items())},
    }


def list_experiments(root: str | Path) -> list[str]:
    """Names of experiment folders directly under the results root (newest first)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (any(p.glob("experiment_state-*.json"))
                                                         or any(p.glob("trial_*")))]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]
