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
8. `StateKeeper`: that fallback to an older session lost what the cut session had recorded (its
   finished trials were set aside as orphans, trials ASHA had stopped were trained on). The driver
   keeps a whole copy of its session's state files in <exp>/state-copy/ (taken after each of Ray's
   snapshots, written atomically), a trial writes nothing before that copy names it, and a state
   file cut short is replaced by its copy: nothing the copy knew is lost. A trial that ended also
   leaves `ended.json` in its folder, so that a resume from a state that lagged its end (a kill in
   the last snapshot's second) does not train a trial ASHA had stopped.

Ray internals used here go through search/ray_private.py.
"""

from __future__ import annotations

import json
import pickletools
import re
import time
from pathlib import Path
from typing import NamedTuple

from search import ray_env  # noqa: F401  (Ray's settings, set before Ray is imported)

# isort: split
from ray import tune

from search import ray_private
from search.layout import (
    CHECKPOINT_FILE,
    ENDED_FILE,
    RESULT_FILE,
    STATE_COPY_DIR,
    checkpoint_dirs,
    checkpoint_index,
    own_dir,
    ray_statuses,
    set_aside,
    trial_dirs,
    whole_state,
)
from training.checkpoint import CheckpointError, load_checkpoint
from training.fileio import read_json, read_json_lines, write_atomic


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
    for row in read_json_lines(folder / RESULT_FILE):  # (skips a line cut short by a kill)
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
    """Trial ids in the newest experiment state in storage (any filesystem Ray writes to); where the driver
    keeps whole copies of its state (a local experiment, see StateKeeper), in the newest copy: a trial that
    writes only once the copy names it is never lost when Ray's own file is cut short."""
    if ray_private.storage_is_local(storage):
        copies = Path(storage.experiment_fs_path) / STATE_COPY_DIR
        if copies.is_dir() and not copies.is_symlink():
            return set(ray_statuses(copies))
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
        own_dir(exp_dir / "orphaned")
        dest, n = exp_dir / "orphaned" / d.name, 0
        while dest.exists():  # (never into or over a folder set aside before)
            n += 1
            dest = exp_dir / "orphaned" / f"{d.name}.{n}"
        d.rename(dest)
        print(f"  {d.name} is not in the experiment state (left by a killed driver of an earlier version): "
              f"moved to {dest}; its configuration may be tried again", flush=True)


# Ray's files of one driver session, named by the session's start time: the experiment state (the trial
# list, JSON) and the search algorithm's state (cloudpickle, whatever the extension says).
_SESSION_FILE = re.compile(r"(experiment_state|search_gen_state|searcher-state|basic-variant-state)-(.+)\.(json|pkl)")


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
    restore_from_copies(exp_dir)
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
    for f, why in moves.items():
        set_aside(f, exp_dir, f"{why} (its driver was killed while Ray wrote it); resuming from the state of {good}")
    return list(moves)


def _whole(name: str, data: bytes) -> bool:
    """A state file's bytes are whole: the experiment state JSON with its trial list, or a complete pickle."""
    if name.startswith("experiment_state"):
        try:
            state = json.loads(data)
        except (ValueError, RecursionError):
            return False
        return isinstance(state, dict) and isinstance(state.get("trial_data"), list)
    try:
        for _ in pickletools.genops(data):
            pass
    except (ValueError, EOFError, IndexError, KeyError):
        return False
    return True


def restore_from_copies(exp_dir: Path) -> list[str]:
    """Before Ray restores: every state file of the experiment that is cut short (or gone) while the driver's
    whole copy of it (StateKeeper) is there is set aside in <exp>/damaged/ and replaced by that copy. Returns
    the names restored."""
    copies = exp_dir / STATE_COPY_DIR
    restored = []
    if not copies.is_dir() or copies.is_symlink():
        return restored
    for copy in sorted(copies.iterdir()):
        if not _SESSION_FILE.fullmatch(copy.name) or copy.is_symlink() or not copy.is_file():
            continue
        live = exp_dir / copy.name
        try:
            if live.is_file() and not live.is_symlink() and _whole(live.name, live.read_bytes()):
                continue
            data = copy.read_bytes()
        except OSError:
            continue
        if not _whole(copy.name, data):
            continue
        if live.exists() or live.is_symlink():
            set_aside(live, exp_dir, "cut short; replaced by the driver's whole copy of it")
        write_atomic(live, lambda f, data=data: f.write(data))
        restored.append(copy.name)
    return restored


class StateKeeper(tune.Callback):
    """The driver's whole copy of its session's Ray state files, in <exp>/state-copy/ (see the module doc, 8).

    Ray writes its state files in place, so a driver killed while it writes them, or a hand that cuts one,
    leaves them unreadable. After each of Ray's snapshots (checked at most every `every_s`), the files of the
    newest session are read; when each is whole and none changed while they were read, they are copied, each
    atomically, the experiment state last (what a waiting trial reads). Also writes a trial's `ended.json`
    when it ends. Local experiments only (a cloud one has no folder to keep them in)."""

    def __init__(self, exp_dir: str | Path, deadline: float | None = None, every_s: float = 0.2):
        self.exp_dir, self.every_s, self.deadline = Path(exp_dir), every_s, deadline
        self.copies = self.exp_dir / STATE_COPY_DIR
        self._last = 0.0
        self._seen: dict[str, tuple[int, int]] = {}

    def setup(self, **info):
        try:
            own_dir(self.copies)  # from now on, trials wait for the copy (recorded_trials)
        except OSError as e:  # (a link planted there: no copies, trials wait for Ray's own state as before)
            print(f"  no copies of the experiment state are kept: {e}", flush=True)
            self.copies = None

    def _active(self) -> bool:
        return self.copies is not None

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.copy()

    def on_experiment_end(self, trials, **info):
        self.copy()

    def on_trial_complete(self, iteration, trials, trial, **info):
        folder = Path(ray_private.trial_folder(trial))
        if folder.is_dir():  # (a trial that never started has none)
            last = trial.last_result or {}
            ended = {"trial_id": trial.trial_id, "epoch": last.get("epoch")}
            # ended by the time budget: cut at the deadline, or past it (a resumed trial with no time left)
            if last.get("cut_by_deadline") or (self.deadline is not None and time.time() >= self.deadline
                                                and not last.get("diverged") and not last.get("early_stopped")
                                                and not last.get("schedule_done")):
                ended["reason"] = "budget"
            write_atomic(folder / ENDED_FILE, lambda f: f.write(json.dumps(ended).encode()))

    def copy(self) -> bool:
        """Copy the newest session's state files when all are whole and changed; True when copied."""
        if not self._active():
            return False
        sessions: dict[str, list[Path]] = {}
        for f in self.exp_dir.glob("*-*"):
            m = _SESSION_FILE.fullmatch(f.name)
            if m and f.is_file() and not f.is_symlink():
                sessions.setdefault(m[2], []).append(f)
        if not sessions:
            return False
        files = sessions[max(sessions)]
        try:
            before = {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in files}
            if before == {k: v for k, v in self._seen.items() if k in before} and len(self._seen) >= len(before):
                return False
            data = {f.name: f.read_bytes() for f in files}
            after = {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in files}
        except OSError:
            return False
        if before != after or not all(_whole(n, d) for n, d in data.items()):
            return False  # (Ray is writing them: the next step tries again)
        if not any(n.startswith("experiment_state") for n in data):
            return False
        for name in sorted(data, key=lambda n: n.startswith("experiment_state")):  # the trial list last
            write_atomic(self.copies / name, lambda f, d=data[name]: f.write(d))
        self._seen = after
        return True


def ended_epoch(folder: Path | None) -> int | None:
    """The epoch at which a trial ended, by the ended.json StateKeeper left in its folder (None: it has not
    ended, or the file is not one)."""
    if folder is None:
        return None
    ended = read_json(folder / ENDED_FILE, max_bytes=4096)
    epoch = (ended or {}).get("epoch")
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None
