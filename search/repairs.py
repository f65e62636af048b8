"""Resume repairs: what this project adds to Ray Tune's own resume, each for one Ray behaviour.

Ray restores an experiment from its experiment state (the trial list, snapshotted by the driver)
and each trial from the newest checkpoint that state records. A driver interrupted at the wrong
moment (Ctrl+C, SIGKILL, a crash) leaves the disk ahead of that state; these close the gaps:

1. `wait_until_recorded`: Ray starts a trial before its snapshot names it, so a driver killed in
   between left a trial folder no resume knew of (an orphan, trained again under a new id). A
   trial writes nothing to storage until the experiment state there names it.
2. `resume_state`: Ray hands back the newest checkpoint its state records; the trial folder can
   hold a newer one (written after the last snapshot) or the handed one can be unreadable. The
   newest readable checkpoint on disk wins.
3. `unlogged_epochs`: epochs in that newer checkpoint never reached Ray's result.json; they are
   reported from the checkpoint's history instead of trained again.
4. `set_next_checkpoint_folder` / `epoch_folders`: Ray numbers checkpoint folders from the index
   its state recorded, which lags the disk, and wrote a resumed trial's next epoch over an earlier
   epoch's folder; replayed epochs go back to their own folders, new ones past every folder on disk.
5. `set_aside_unknown_trials`: trial folders the restored state does not name (left by an earlier
   version's killed driver) are moved to <exp>/orphaned/, never shown or continued as trials.
6. (search/searcher.py) Ray restores the Optuna study and the trial list from different files; a
   study older than the trial list is told the finished trials it missed.
7. `set_aside_damaged_state`: each driver session writes its own state files, and Ray copies them into
   the experiment folder in place; a driver killed during that copy leaves one cut short. Ray restores
   from the newest by name, and when that one is unreadable it silently starts the experiment over. The
   damaged files go to <exp>/damaged/, so Ray restores from the newest whole session instead.

Ray internals used here go through search/ray_private.py.
"""

from __future__ import annotations

import pickletools
import re
import shutil
import time
from pathlib import Path
from typing import NamedTuple

from search import ray_env  # noqa: F401  (Ray's settings, set before Ray is imported)

# isort: split
from ray import tune

from search import ray_private
from search.layout import (
    CHECKPOINT_FILE,
    checkpoint_dirs,
    checkpoint_index,
    ray_statuses,
    read_json_lines,
    trial_dirs,
    whole_state,
)
from training.checkpoint import CheckpointError, load_checkpoint


class Resume(NamedTuple):
    state: dict | None  # the training state to resume from (None: start over)
    path: Path | None  # the checkpoint file it came from
    note: dict  # for the next result, when it is older than the checkpoint Ray handed back


def resume_state(checkpoint: tune.Checkpoint | None, folder: Path | None) -> Resume:
    """The training state a trial starts from: `checkpoint` is the one Ray hands back (None for
    a fresh trial), `folder` the trial's folder in the experiment storage when that is a
    filesystem path (else None: only the handed checkpoint is considered).

    Ray hands back the newest checkpoint its experiment state knows, but the trial folder can
    hold a better one, in both directions:
    - newer: the experiment was interrupted after a trial had written its next checkpoint but
      before the driver recorded it (Ctrl+C or a kill at that moment; if it was the trial's
      first, Ray hands back none). Resuming from the handed one would train those epochs again,
      and a trial that had finished would train once more.
    - older: the handed file is unreadable (truncated by a full disk or a crash while it was
      copied, or deleted); the epochs after the older one are then run again, with a note
      ({"resumed_from_epoch": N, "resume_warning": why}) that goes into the next result and
      that the driver prints.
    The newest readable checkpoint wins; with none readable the trial starts from scratch.
    """
    handed = Path(checkpoint.path) if checkpoint is not None else None
    candidates = set(folder.glob("checkpoint_*")) if folder is not None else set()
    if handed is not None:
        candidates.add(handed)
    problem = None
    for path in sorted(candidates, key=lambda p: p.name, reverse=True):  # Ray numbers them in order
        try:
            if path == handed:
                with checkpoint.as_directory() as d:
                    state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
            else:
                state = load_checkpoint(path / CHECKPOINT_FILE)
        except (CheckpointError, OSError) as e:
            if path == handed:
                problem = str(e)
            continue
        note = {} if problem is None else {"resumed_from_epoch": int(state["epoch"]), "resume_warning": problem}
        return Resume(state, path / CHECKPOINT_FILE, note)
    if problem is None:
        return Resume(None, None, {})  # a fresh trial
    return Resume(None, None, {"resumed_from_epoch": 0, "resume_warning": problem})


def unlogged_epochs(resume: Resume, checkpoint: tune.Checkpoint | None, folder: Path | None) -> list[dict]:
    """The epochs in a newer checkpoint than the handed one that Ray never logged (the driver was
    interrupted before it got their result): reported from the checkpoint's history instead of
    trained again. An epoch is logged when it is in the trial's result.json in storage, or when it
    is in the checkpoint Ray handed back (Ray records a checkpoint only after logging its result).
    When Ray hands back no checkpoint, it also starts the trial's result.json afresh (it restores
    that file only for trials with a checkpoint), so every epoch the found checkpoint holds is
    reported."""
    if resume.state is None or folder is None:
        return []
    if checkpoint is None:
        return list(resume.state["history"])
    if resume.path.parent == Path(checkpoint.path):
        return []
    try:
        logged = set(range(1, int(load_checkpoint(Path(checkpoint.path) / CHECKPOINT_FILE)["epoch"]) + 1))
    except CheckpointError:
        logged = set()
    for row in read_json_lines(folder / "result.json"):  # (skips a line cut short by a kill)
        try:
            logged.add(int(row["epoch"]))
        except (ValueError, TypeError, KeyError):
            continue
    return [m for m in resume.state["history"] if m["epoch"] not in logged]


def storage_folder() -> Path | None:
    """The trial's folder in the experiment storage, when that is a filesystem path."""
    storage = ray_private.trial_storage()
    if not ray_private.storage_is_local(storage):
        return None
    return Path(storage.trial_fs_path)


RECORD_TIMEOUT_S = 300.0


def recorded_trials(storage) -> set[str]:
    """Trial ids in the newest experiment state in storage (any filesystem Ray writes to)."""
    return set(ray_statuses(storage.experiment_fs_path, fs=storage.storage_filesystem))


def wait_until_recorded(timeout_s: float = RECORD_TIMEOUT_S) -> float:
    """Write nothing to storage until the experiment state there names this trial.

    Ray snapshots its experiment state (the trial list a resume restores) every few seconds; a
    driver killed between a trial's start and the next snapshot used to leave that trial's
    checkpoints and TensorBoard files in a folder no resume knew of: an orphan, trained again
    from scratch under a new id. Waiting for the snapshot (search.tuner sets it to every second)
    means a trial that wrote anything is always one that --resume continues. A trial restored
    from an existing experiment is named at once. Returns the seconds waited."""
    storage = ray_private.trial_storage()
    trial_id = tune.get_context().get_trial_id()
    local = ray_private.storage_is_local(storage)
    start = time.monotonic()
    while trial_id not in recorded_trials(storage):
        if time.monotonic() - start > timeout_s:
            print(f"trial {trial_id}: not in the experiment state after {timeout_s:.0f} s; starting anyway")
            break
        time.sleep(0.1 if local else 1.0)
    return time.monotonic() - start


def set_next_checkpoint_folder(storage, folder: Path | None, index: int | None = None) -> None:
    """Make Ray's next checkpoint go to checkpoint_<index>, or (None) past every folder on disk.

    Ray numbers a trial's checkpoint folders from the index its experiment state recorded, which
    lags the disk when the driver was interrupted: the resumed trial then wrote its next epoch
    over the folder of an earlier one. `current_checkpoint_index` is the StorageContext
    attribute Ray increments before each checkpoint (search/ray_private.py)."""
    if folder is None:
        return
    if index is None:
        on_disk = map(checkpoint_index, folder.glob("checkpoint_*"))
        index = max([ray_private.next_checkpoint_index(storage) - 1, *on_disk]) + 1
    ray_private.set_next_checkpoint_index(storage, index)


def epoch_folders(folder: Path | None) -> dict[int, int]:
    """epoch -> index of a readable checkpoint folder holding it (the newest such folder)."""
    out: dict[int, int] = {}
    for path in checkpoint_dirs(folder) if folder is not None else []:
        try:
            out[int(load_checkpoint(path / CHECKPOINT_FILE)["epoch"])] = checkpoint_index(path)
        except (CheckpointError, OSError, KeyError, TypeError, ValueError):
            continue
    return out


def set_aside_unknown_trials(exp_dir: Path) -> None:
    """Trial folders that the experiment state Ray restores from does not name are no trials of
    this experiment: left by a driver of an earlier version killed before it recorded them (a
    trial now writes nothing before it is recorded, see search.trainable.wait_until_recorded).
    Ray would never continue them, so they would stay as phantom trials beside the real ones: an
    empty one is removed, one with files is moved to <exp>/orphaned/ (nothing is deleted)."""
    known = ray_statuses(exp_dir)
    if not known:
        return
    for d in trial_dirs(exp_dir):
        if d.name.removeprefix("trial_") in known:
            continue
        if not any(d.iterdir()):
            d.rmdir()
            continue
        (exp_dir / "orphaned").mkdir(exist_ok=True)
        shutil.move(str(d), str(exp_dir / "orphaned" / d.name))
        print(f"  {d.name} is not in the experiment state (left by a killed driver of an earlier version): "
              f"moved to {exp_dir / 'orphaned'}; its configuration may be tried again", flush=True)


# Ray's files of one driver session, named by the session's start time: the experiment state (the trial
# list, JSON) and the search algorithm's state (cloudpickle, whatever the extension says).
_SESSION_FILE = re.compile(r"(experiment_state|search_gen_state|searcher-state|basic-variant-state)-(.+)\.(json|pkl)")
DAMAGED_DIR = "damaged"


def _whole_pickle(path: Path) -> bool:
    """A complete pickle stream, checked opcode by opcode without running any of it."""
    try:
        for _ in pickletools.genops(path.read_bytes()):
            pass
    except (OSError, ValueError, EOFError, IndexError, KeyError):  # (cut short, or not a pickle)
        return False
    return True


def set_aside_damaged_state(exp_dir: Path) -> list[Path]:
    """Before Ray restores a local experiment: the state files it would restore from, when cut short
    (a driver killed while Ray copied them into the experiment folder), are moved to <exp>/damaged/, so
    that Ray restores from the newest whole ones. Ray reads the newest experiment state by name, and the
    newest state of the search algorithm by name, separately; with either unreadable it logs an error
    and starts the experiment over from nothing, beside the trials it had.

    - An experiment state newer than the newest readable one goes with every file of its session: the
      search algorithm's state of that session may name trials that the older trial list does not.
      The trials themselves stay; those the restored list does not name are set aside by
      set_aside_unknown_trials, and finished ones keep their newer checkpoints (resume_state).
    - A search-algorithm state that is cut short goes with the rest of that session's search files:
      Ray then restores the study of an earlier session, which search.searcher catches up.
    Returns the files moved. Raises SystemExit, moving nothing, when no whole state is left to
    resume from."""
    sessions: dict[str, dict[str, Path]] = {}
    for f in exp_dir.iterdir():
        m = _SESSION_FILE.fullmatch(f.name)
        if m and f.is_file():
            sessions.setdefault(m[2], {})[m[1]] = f
    if not sessions:
        return []
    newest_first = sorted(sessions, reverse=True)  # (Ray's order: the session's start time, by name)
    with_state = [s for s in newest_first if "experiment_state" in sessions[s]]
    good = next((s for s in with_state if whole_state(sessions[s]["experiment_state"])), None)
    if good is None:
        raise SystemExit(f"error: cannot resume {exp_dir}: none of its experiment state files "
                         f"({', '.join(sessions[s]['experiment_state'].name for s in with_state) or 'none'}) can be "
                         f"read, so Ray has no trial list to continue. The trials' results and checkpoints are "
                         f"untouched in {exp_dir}/trial_*; start a new search under another --name.")
    # file -> why it goes, decided as it is checked
    moves = {f: "cut short" if k == "experiment_state" else "of a driver session whose experiment state is cut "
             "short or was never written" for s in newest_first if s > good for k, f in sessions[s].items()}
    searcher_sessions = [s for s in newest_first if s <= good
                         and any(k != "experiment_state" for k in sessions[s])]
    for s in searcher_sessions:
        whole = {f: _whole_pickle(f) for k, f in sessions[s].items() if k != "experiment_state"}
        if all(whole.values()):
            break
        moves.update({f: "from the same driver session as a file cut short" if ok else "cut short"
                      for f, ok in whole.items()})
    else:
        if searcher_sessions:
            raise SystemExit(f"error: cannot resume {exp_dir}: every saved state of its searcher is cut short, "
                             f"so Ray would start the search over. The trials' results and checkpoints are "
                             f"untouched in {exp_dir}/trial_*; start a new search under another --name.")
    if moves:
        (exp_dir / DAMAGED_DIR).mkdir(exist_ok=True)
    for f, why in moves.items():
        shutil.move(str(f), str(exp_dir / DAMAGED_DIR / f.name))
        print(f"  {f.name}: {why} (its driver was killed while Ray wrote it): moved to {exp_dir / DAMAGED_DIR}; "
              f"resuming from the state of {good}", flush=True)
    return list(moves)
