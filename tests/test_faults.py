"""Fault injection on the search, end to end (real searches, killed or interrupted, then resumed): the driver
SIGKILLed mid-run and resumed, the searcher's state after a resume, a trial whose newest checkpoint is damaged
before it is resumed, two drivers on one experiment, and Ray's state files cut short. The policies of
search/repairs.py that these searches rely on are tested without a search in tests/test_repairs.py.

Every test takes a before/after record of the experiment (trial ids, configs, per-trial epochs,
result.json of finished trials, checkpoint files and their sha256) and checks that nothing that
had finished was lost or run twice."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from search.layout import ray_statuses
from search.results import load_experiment
from tests.helpers import truncate
from tests.test_search import REPO, RUN, run_search, write_space
from training.checkpoint import load_checkpoint
from training.trainer import train

# Every test here runs real searches (10 s to 90 s each on 2 cores): all are in the slow tier, which `make test`
# runs and `make test-fast` leaves out.
pytestmark = pytest.mark.slow

RAY_DAEMONS = ("raylet", "gcs_server")
EPOCH_CONTENT = ("epoch", "train_loss", "val_loss", "val_acc", "lr", "epoch_seconds")


# ---------------------------------------------------------------- helpers


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(exp_dir: Path) -> dict:
    """What the experiment holds now, per trial: status, config, epochs, result.json, checkpoints."""
    if not exp_dir.exists():
        return {}
    exp = load_experiment(exp_dir)
    out = {}
    for row in exp.trials.to_dict("records"):
        tid = row["trial_id"]
        d = exp_dir / f"trial_{tid}"
        h = exp.histories.get(tid)
        out[tid] = {
            "status": row["status"],
            "config": (d / "params.json").read_text() if (d / "params.json").is_file() else None,
            "epochs": [] if h is None or h.empty or "epoch" not in h else h["epoch"].astype(int).tolist(),
            # the epoch rows as read (Ray's repeat of an already-final result is not a second run)
            "result": [] if h is None or h.empty else [
                {k: v for k, v in r.items() if v == v}  # (a key only some rows have is NaN in the others)
                for r in h.drop(columns=["iterations_since_restore", "time_since_restore"],
                                errors="ignore").to_dict("records")],
            # what each epoch measured, as it was trained: a trial trained again from scratch has the same
            # epoch numbers (and on a CPU even the same accuracies), never the same seconds
            "rows": [] if h is None or h.empty else [
                tuple(None if r.get(k) != r.get(k) else r.get(k) for k in EPOCH_CONTENT)  # (NaN: absent)
                for r in h.to_dict("records")],
            "checkpoints": {p.parent.name: _sha(p) for p in sorted(d.glob("checkpoint_*/checkpoint.pt"))},
            "events": {p.name: _sha(p) for p in sorted(d.glob("events.out.tfevents.*"))},
        }
    return out


def tensorboard_epochs(trial_dir: Path) -> list[int]:
    """The epochs of a trial's TensorBoard validation accuracy, as TensorBoard shows them (a
    resumed run's event file purges the steps it runs again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trial_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("accuracy/val")] if "accuracy/val" in acc.Tags()["scalars"] else []


def assert_tensorboard_complete(exp_dir: Path, snap: dict) -> None:
    """Every finished trial's TensorBoard curve has each of its epochs once."""
    for tid, t in snap.items():
        if t["status"] == "finished":
            assert sorted(tensorboard_epochs(exp_dir / f"trial_{tid}")) == sorted(set(t["epochs"])), tid


def n_finished(snap: dict) -> int:
    return sum(t["status"] == "finished" for t in snap.values())


def n_epochs(snap: dict) -> int:
    return sum(len(t["epochs"]) for t in snap.values())


def assert_nothing_finished_changed(before: dict, after: dict, where: str) -> None:
    """A trial finished in `before` is still there, unchanged: same config, same result.json
    (so not run again), same checkpoint files and TensorBoard event files with the same content."""
    for tid, t in before.items():
        assert tid in after, f"{where}: trial {tid} disappeared"
        assert after[tid]["config"] == t["config"], f"{where}: trial {tid} changed its config"
        if t["status"] == "finished":
            assert after[tid]["status"] == "finished", (where, tid, after[tid]["status"])
            assert after[tid]["result"] == t["result"], f"{where}: finished trial {tid} was run again"
            assert after[tid]["checkpoints"] == t["checkpoints"], f"{where}: finished trial {tid}'s checkpoints changed"
            assert after[tid]["events"] == t["events"], f"{where}: finished trial {tid}'s TensorBoard events changed"


def assert_no_epoch_lost_or_trained_again(before: dict, after: dict, where: str) -> None:
    """Every epoch a trial had in `before` is in `after` as it was measured then (same seconds, same
    accuracy: kept or replayed from its checkpoint, not trained again), its checkpoint files unchanged,
    and every trial's epochs run 1..N once."""
    for tid, t in before.items():
        rows = after[tid]["rows"]
        assert rows[:len(t["rows"])] == t["rows"], f"{where}: trial {tid}'s epochs changed: {t['rows']} -> {rows}"
        for name, sha in t["checkpoints"].items():
            if name in after[tid]["checkpoints"]:  # (Ray deletes the ones it does not keep)
                assert after[tid]["checkpoints"][name] == sha, f"{where}: trial {tid}'s {name} was written again"
    for tid, t in after.items():
        assert [r[0] for r in t["rows"]] == list(range(1, len(t["rows"]) + 1)), (where, tid, t["rows"])


def assert_checkpoints_hold_their_epochs(exp_dir: Path, snap: dict) -> None:
    """Each checkpoint file holds the epoch (and that epoch's measured seconds) its trial's results name."""
    for tid, t in snap.items():
        by_epoch = {r[0]: r for r in t["rows"]}
        for f in sorted((exp_dir / f"trial_{tid}").glob("checkpoint_*/checkpoint.pt")):
            m = load_checkpoint(f)["metrics"]
            row = by_epoch.get(int(m["epoch"]))
            assert row is not None and row[-1] == m["epoch_seconds"], (tid, f.parent.name, m["epoch"], row)


def _ppids() -> dict[int, int]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
                out[int(p.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _cmd(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    return _state(pid) not in ("", "Z")


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below `pid` (Ray's daemons and workers of that driver)."""
    ppids = _ppids()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, pp in ppids.items():
            if pp == parent and child not in found:
                found[child] = _cmd(child)
                frontier.append(child)
    return found


def _wait_for(predicate, timeout=300, every=0.5):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


def _start(args: list, **env) -> subprocess.Popen:
    return subprocess.Popen([*RUN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env={**os.environ, "RAY_ADDRESS": "local", **env})


def stopped_at(marker: Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Wait until a process reached the failpoint that `marker` names (training/failpoint.py) and stopped
    itself there; its pid. Fails when the driver ended first: the kill would not land where intended."""
    assert _wait_for(lambda: marker.is_file() and marker.read_text().endswith("\n") or proc.poll() is not None,
                     timeout=timeout, every=0.02), f"the failpoint of {marker.name} was never reached"
    assert proc.poll() is None, f"the driver ended (exit {proc.returncode}) before its failpoint {marker.name}"
    pid = int(marker.read_text())
    assert _wait_for(lambda: _state(pid) == "T", timeout=10, every=0.02), (pid, _state(pid))
    return pid


def _state(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _search_args(digits_dir, tmp_path: Path, name: str, samples: int, max_epochs: int, *extra) -> tuple[Path, list]:
    """The experiment folder and run.py arguments of a search over aug_strength: `samples` trials
    of `max_epochs` epochs (ASHA's grace period is the whole budget), one trial at a time."""
    space = write_space(tmp_path, samples=samples, max_epochs=max_epochs, grace=max_epochs,
                        space="  aug_strength: {uniform: [0.0, 1.0]}\n")
    storage = tmp_path / "results"
    args = ["--config", space, "--data-dir", digits_dir, "--storage", storage, "--name", name, "--concurrency", "1",
            *extra]
    return storage / name, args


def _interrupt(proc: subprocess.Popen) -> None:
    """Ctrl+C to the driver: it saves the experiment and exits 130."""
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]


def _newest_state(exp_dir: Path) -> dict:
    state_file = max(exp_dir.glob("searcher-state-*.pkl"))  # the newest by name, as Ray picks it
    with open(state_file, "rb") as f:  # our own file, written by this test's search
        return pickle.load(f)


def assert_searcher_state(exp_dir: Path, samples: int) -> None:
    """The newest searcher state is still an Optuna TPE study that received every finished trial's
    result once, and never suggested the same configuration twice."""
    import optuna

    state = _newest_state(exp_dir)
    study = state["_ot_study"]  # OptunaSearch pickles its __dict__
    assert isinstance(study, optuna.study.Study)
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    exp = load_experiment(exp_dir)
    finished = exp.trials[exp.trials["status"] == "finished"]
    assert len(finished) == samples
    complete = [tr for tr in study.trials if tr.state == optuna.trial.TrialState.COMPLETE]
    # Optuna holds every finished trial's result, with that trial's value, and nothing else
    by_config = {round(a, 9): v for a, v in zip(finished["config/aug_strength"], finished["last_val_acc"],
                                                strict=True)}
    told = {round(tr.params["aug_strength"], 9): tr.value for tr in complete}
    assert told.keys() == by_config.keys(), (sorted(told), sorted(by_config))
    for key, value in by_config.items():
        assert told[key] == pytest.approx(value)
    # aug_strength is continuous: the same value twice means a trial was suggested (or told) twice
    suggested = [tr.params["aug_strength"] for tr in complete]
    assert len(set(suggested)) == len(suggested), suggested
    # every Ray trial's config came from a distinct Optuna suggestion
    real = exp.trials[~exp.trials["trial_id"].isin(exp.orphans)]  # orphans: see search.results.Experiment
    assert real["config/aug_strength"].round(9).is_unique


# ---------------------------------------------------------------- 1 + 2: SIGKILL of the driver, three times


def _kill_and_wait(proc: subprocess.Popen, timeout: float = 60, ray_up: bool = True) -> dict[int, str]:
    """SIGKILL the driver (no handler, no final snapshot) and wait until every process it had started
    (Ray's daemons, agents and workers, the reaper) is gone; returns those still alive then."""
    below = descendants(proc.pid)
    if ray_up:
        assert any(d in c for c in below.values() for d in RAY_DAEMONS), f"no Ray below the driver: {below}"
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.returncode  # the kill landed: the driver was still running
    _wait_for(lambda: not any(_alive(p) for p in below), timeout=timeout, every=0.5)
    return {p: c for p, c in below.items() if _alive(p)}


def test_sigkill_driver_three_times_then_resume(digits_dir, tmp_path):
    samples, max_epochs = 4, 3
    exp_dir, args = _search_args(digits_dir, tmp_path, "killed", samples, max_epochs, "--seed", "0")
    records, lingering, kills, outputs = [{}], [], 0, []
    try:
        for attempt in range(6):
            resume = ["--resume"] if attempt else []
            start = records[-1]
            proc = _start([*args, *resume])
            lines: list[str] = []
            threading.Thread(target=_read_lines, args=(proc, lines), daemon=True).start()
            # wait until this run made progress: two more epochs on disk than when it started
            goal = n_epochs(start) + 2
            advanced = _wait_for(lambda proc=proc, goal=goal: proc.poll() is not None
                                 or n_epochs(snapshot(exp_dir)) >= goal)
            if kills < 3 and proc.poll() is None and advanced:
                at_kill = snapshot(exp_dir)
                # the kill lands mid-search: a trial is part-way, not every trial finished
                assert n_finished(at_kill) < samples, f"run {attempt}: nothing left to kill"
                lingering.append(_kill_and_wait(proc))
                kills += 1
            else:
                proc.wait(timeout=900)
            time.sleep(0.5)  # (the reader thread takes the last lines)
            outputs.append("".join(lines))
            snap = snapshot(exp_dir)
            where = f"after run {attempt} ({'killed' if proc.returncode == -signal.SIGKILL else proc.returncode})"
            assert_nothing_finished_changed(records[-1], snap, where)
            assert_no_epoch_lost_or_trained_again(records[-1], snap, where)
            assert n_finished(snap) >= n_finished(records[-1]), where
            records.append(snap)
            if proc.returncode == 0:
                break
            assert proc.returncode == -signal.SIGKILL, outputs[-1][-3000:]
        assert kills == 3, f"the search finished before it was killed three times ({kills})"
        assert proc.returncode == 0, outputs[-1][-3000:]
        final = records[-1]
        # A trial writes nothing before the experiment state names it, so no killed driver leaves
        # a trial folder that the resumed search does not continue (an orphan).
        assert load_experiment(exp_dir).orphans == []
        assert sorted(d.name.removeprefix("trial_") for d in exp_dir.glob("trial_*")) == sorted(final)
        assert len(final) == samples, sorted(final)
        assert all(t["status"] == "finished" for t in final.values()), {k: t["status"] for k, t in final.items()}
        for tid, t in final.items():
            assert t["epochs"] == list(range(1, max_epochs + 1)), (tid, t["epochs"])
        # every epoch any run had measured is in the end result as measured then, across all kills
        for i, earlier in enumerate(records[1:-1]):
            assert_no_epoch_lost_or_trained_again(earlier, final, f"run {i} -> the end")
        assert_checkpoints_hold_their_epochs(exp_dir, final)
        assert "trials 4/4 done" in outputs[-1] and "best trial" in outputs[-1]
        # no process a killed driver started (Ray's daemons, agents, workers; the reaper) outlives it for long
        assert not any(lingering), f"processes of a killed driver still alive after 60 s: {lingering}"
        assert_tensorboard_complete(exp_dir, final)
        # 2: the searcher state survived three hard kills and resumes
        assert_searcher_state(exp_dir, samples)
    finally:
        for group in lingering:  # our own leftovers only, by pid
            for pid in group:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- 2: the searcher's state
# (after Ctrl+C and --resume: tests/test_search.py::test_interrupt_then_resume)


def test_stale_searcher_state_is_caught_up_on_resume(digits_dir, tmp_path):
    """The searcher's state (the pickled Optuna study) is older than the experiment's trial list,
    as a driver killed between writing the two leaves it: here the searcher files are put back to
    a copy taken when one trial had finished, after three had. The resumed study must still hold
    every finished trial's result, once, and suggest no configuration twice."""
    samples = 5
    exp_dir, args = _search_args(digits_dir, tmp_path, "stale", samples, 2)
    proc = _start(args)

    def ray_finished() -> int:
        return sum(s["status"] == "TERMINATED" for s in ray_statuses(exp_dir).values()) if exp_dir.exists() else 0

    early = {}

    def copy_when_one_finished():
        if ray_finished() >= 1 and any(exp_dir.glob("searcher-state-*.pkl")):
            early.update({f.name: f.read_bytes() for f in exp_dir.glob("*.pkl")})
            return True
        return proc.poll() is not None

    assert _wait_for(copy_when_one_finished, every=0.05) and early, proc.kill() or proc.stdout.read()
    study = pickle.loads(early[next(k for k in early if k.startswith("searcher-state"))])["_ot_study"]
    assert len(study.trials) < samples  # the copy is from before the later trials
    assert _wait_for(lambda: proc.poll() is not None or ray_finished() >= 3, every=0.1) and proc.poll() is None, \
        proc.kill() or proc.stdout.read()
    _interrupt(proc)
    for f in exp_dir.glob("*.pkl"):  # the searcher (and its wrappers) back to the early copy
        if f.name in early:
            f.write_bytes(early[f.name])
    before = snapshot(exp_dir)
    assert n_finished(before) >= 3

    r = run_search(*args, "--resume", env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = snapshot(exp_dir)
    assert_nothing_finished_changed(before, after, "after resume")
    assert len(after) == samples and all(t["status"] == "finished" for t in after.values()), after
    assert_tensorboard_complete(exp_dir, after)
    assert_searcher_state(exp_dir, samples)


# ---------------------------------------------------------------- 3: a damaged newest checkpoint


def _interrupted_with_two_checkpoints(digits_dir, tmp_path, name):
    """An experiment SIGINTed while its first trial (of 2, 6 epochs each) has logged 3 epochs, so
    that Ray's saved state knows at least two of its checkpoints (it can lag the files by one)."""
    exp_dir, args = _search_args(digits_dir, tmp_path, name, 2, 6)
    proc = _start(args)

    def two_checkpoints():
        logged = (f.read_text().count("\n") for f in exp_dir.glob("trial_*/result.json"))
        return proc.poll() is not None or any(n >= 3 for n in logged)

    assert _wait_for(two_checkpoints, every=0.1) and proc.poll() is None, proc.kill() or proc.stdout.read()
    _interrupt(proc)
    return exp_dir, args


@pytest.fixture(scope="module")
def interrupted(digits_dir, tmp_path_factory):
    """_interrupted_with_two_checkpoints, made once for the module's resume tests, and a copy of it as it was:
    each test puts that copy back in the experiment's own place (Ray's state holds absolute paths: a copy
    elsewhere is another experiment to Ray) and damages it in its own way."""
    exp_dir, args = _interrupted_with_two_checkpoints(digits_dir, tmp_path_factory.mktemp("interrupted"), "shared")
    template = shutil.copytree(exp_dir, exp_dir.parent.parent / "as-interrupted", symlinks=True)
    return exp_dir, args, template


def _fresh_copy(interrupted) -> tuple[Path, list]:
    exp_dir, args, template = interrupted
    shutil.rmtree(exp_dir)
    shutil.copytree(template, exp_dir, symlinks=True)
    return exp_dir, args


def _checkpoint_epochs(exp_dir: Path, tid: str) -> dict[int, Path]:
    """epoch -> file of every checkpoint of the trial on disk, read from the files themselves."""
    return {int(load_checkpoint(f)["epoch"]): f for f in (exp_dir / f"trial_{tid}").glob("checkpoint_*/checkpoint.pt")}


def _handed_back(exp_dir: Path, tid: str) -> str:
    """The checkpoint folder Ray hands the trial when the experiment is resumed: the latest one in
    the newest experiment state (it can lag the files on disk and result.json by one epoch)."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    state = json.loads(max(exp_dir.glob("experiment_state-*.json")).read_text())
    for info, meta in state["trial_data"]:
        if json.loads(info)["trial_id"] == tid:
            latest = _TrainingRunMetadata.from_json_state(meta).checkpoint_manager.latest_checkpoint_result
            return Path(latest.checkpoint.path).name
    raise AssertionError(f"trial {tid} not in the experiment state")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_newest_checkpoint_falls_back_on_resume(interrupted, damage):
    exp_dir, args = _fresh_copy(interrupted)
    before = snapshot(exp_dir)
    tid = next(t for t, v in before.items() if v["status"] != "finished")
    # Damage the checkpoint Ray will hand back and any newer file (a resumed trial takes the newest
    # readable one), so that the trial must fall back to an older one.
    name = _handed_back(exp_dir, tid)
    on_disk = _checkpoint_epochs(exp_dir, tid)
    damaged = [f for f in on_disk.values() if f.parent.name >= name]
    newest = exp_dir / f"trial_{tid}" / name / "checkpoint.pt"
    fallback_epoch = max(e for e, f in on_disk.items() if f.parent.name < name)
    for f in damaged:
        if damage == "truncate":
            truncate(f)
        else:
            f.unlink()

    # The reader skips the damaged file and offers the older readable one.
    exp = load_experiment(exp_dir)
    assert str(newest) not in set(exp.checkpoints[tid]["path"])
    best = exp.best_checkpoint(tid)
    assert best is not None and best != newest
    load_checkpoint(best)

    r = run_search(*args, "--resume", env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the driver says which trial fell back to which epoch
    assert f"trial {tid}: newest checkpoint unusable, resumed from epoch {fallback_epoch}" in r.stdout, r.stdout
    after = snapshot(exp_dir)
    assert_nothing_finished_changed(before, after, "after resume")
    assert len(after) == 2 and set(before) <= set(after) and all(t["status"] == "finished" for t in after.values())
    t = after[tid]
    # the epochs logged before were run once; those after the fallback point again
    assert t["epochs"] == [*before[tid]["epochs"], *range(fallback_epoch + 1, 7)], t["epochs"]
    rows = load_experiment(exp_dir).histories[tid]
    assert rows["resumed_from_epoch"].dropna().astype(int).tolist() == [fallback_epoch]
    # whatever the experiment now offers as the trial's best checkpoint loads
    exp = load_experiment(exp_dir)
    assert exp.trials.set_index("trial_id").loc[tid, "epochs_run"] == 6
    load_checkpoint(exp.best_checkpoint(tid))
    assert_tensorboard_complete(exp_dir, after)  # the epochs run again replace theirs in TensorBoard


@pytest.mark.parametrize("logged", [False, True])
def test_epoch_the_driver_never_recorded_is_not_trained_again(interrupted, digits_data, tmp_path, logged):
    """Interrupted right after a trial wrote its next checkpoint, before the driver recorded it:
    Ray hands back the older checkpoint. The trial resumes from the newer one; its epoch is
    reported from the checkpoint (or, when result.json already has it, not at all) and is not
    trained again. The newer checkpoint is made here (one more epoch, trained outside Ray), so the
    test does not depend on hitting that moment with a signal."""
    exp_dir, args = _fresh_copy(interrupted)
    before = snapshot(exp_dir)
    tid = next(t for t, v in before.items() if v["status"] != "finished")
    trial = exp_dir / f"trial_{tid}"
    newest = max(trial.glob("checkpoint_*"), key=lambda p: p.name)
    state = load_checkpoint(newest / "checkpoint.pt")
    logged_epochs = before[tid]["epochs"]
    assert logged_epochs == list(range(1, len(logged_epochs) + 1)) and len(logged_epochs) <= state["epoch"] < 6

    class Stop(Exception):
        pass

    extra = []

    def one_epoch(m, _):
        extra.append(m)
        raise Stop

    with pytest.raises(Stop):
        train(state["config"], digits_data, reporter=one_epoch, checkpoint_dir=tmp_path / "offline", resume=state)
    unrecorded = trial / f"checkpoint_{int(newest.name.split('_')[1]) + 1:06d}"
    unrecorded.mkdir()
    shutil.copyfile(tmp_path / "offline" / "last.pt", unrecorded / "checkpoint.pt")
    history = load_checkpoint(unrecorded / "checkpoint.pt")["history"]
    if logged:  # the driver had logged their results too (but had not recorded the checkpoints)
        with open(trial / "result.json", "a") as f:
            for m in history[len(logged_epochs):]:
                f.write(json.dumps({**m, "trial_id": tid, "training_iteration": m["epoch"]}) + "\n")

    r = run_search(*args, "--resume", env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = snapshot(exp_dir)
    assert_nothing_finished_changed(before, after, "after resume")
    assert after[tid]["status"] == "finished" and after[tid]["epochs"] == [1, 2, 3, 4, 5, 6], after[tid]["epochs"]
    rows = load_experiment(exp_dir).histories[tid].set_index("epoch")
    # the rows of the checkpoint's epochs are those computed before (times never come out the same twice)
    for m in history:
        assert rows.loc[m["epoch"], "epoch_seconds"] == m["epoch_seconds"], m["epoch"]
        assert rows.loc[m["epoch"], "val_acc"] == m["val_acc"], m["epoch"]
    assert extra[0]["epoch"] in rows.index


# ---------------------------------------------------------------- one driver per experiment


def _read_lines(proc: subprocess.Popen, into: list) -> None:
    for line in proc.stdout:
        into.append(line)


def test_one_driver_per_experiment(digits_dir, tmp_path):
    """Two drivers started together on one experiment: one runs it, the other is refused at once,
    naming the driver that holds it; so is a --resume while the first still runs. The experiment
    ends with exactly --samples trials, and after the holder is gone --resume is accepted."""
    samples = 2
    exp_dir, args = _search_args(digits_dir, tmp_path, "shared", samples, 2)
    a, b = _start(args), _start(args)
    assert _wait_for(lambda: a.poll() is not None or b.poll() is not None, timeout=120, every=0.1)
    loser = a if a.poll() is not None else b
    winner = b if loser is a else a
    out, _ = loser.communicate(timeout=60)
    assert loser.returncode == 2, out[-3000:]
    assert f"is in use by driver pid {winner.pid} on host" in out and "--resume" in out, out
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(winner, lines), daemon=True)
    reader.start()
    # a --resume while the holder still runs is refused the same way, and changes nothing
    assert _wait_for(lambda: any(exp_dir.glob("experiment_state-*.json")) or winner.poll() is not None, every=0.1)
    if winner.poll() is None:
        r = run_search(*args, "--resume", timeout=120, env={**os.environ, "RAY_ADDRESS": "local"})
        assert r.returncode == 2 and f"in use by driver pid {winner.pid}" in r.stderr, r.stdout + r.stderr
    winner.wait(timeout=600)
    reader.join(timeout=10)
    assert winner.returncode == 0, "".join(lines)[-3000:]
    assert f"trials {samples}/{samples} done" in "".join(lines)
    exp = load_experiment(exp_dir)
    assert len(exp.trials) == samples and set(exp.trials["status"]) == {"finished"}, exp.trials
    assert len(pd_read_csv(exp_dir / "trials.csv")) == samples
    # the lock is released with its driver: a later driver may take the experiment
    r = run_search(*args, "--resume", timeout=300, env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def pd_read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path, dtype={"trial_id": str})


# ---------------------------------------------------------------- SIGKILL at chosen moments: no orphans


def _checkpoint_folders_agree(exp_dir: Path) -> None:
    """Every checkpoint folder holds the epoch its results say, and later folders hold later
    epochs (a resumed trial once wrote a later epoch over an earlier epoch's folder)."""
    exp = load_experiment(exp_dir)
    for tid, h in exp.histories.items():
        folders = sorted((exp_dir / f"trial_{tid}").glob("checkpoint_*/checkpoint.pt"))
        epochs = [int(load_checkpoint(f)["epoch"]) for f in folders]
        assert epochs == sorted(set(epochs)), (tid, [f.parent.name for f in folders], epochs)
        named = {r["checkpoint_dir_name"]: int(r["epoch"]) for r in h.to_dict("records")
                 if isinstance(r.get("checkpoint_dir_name"), str)}
        for f, epoch in zip(folders, epochs, strict=True):
            assert named.get(f.parent.name) == epoch, (tid, f.parent.name, epoch, named)


def test_sigkill_at_every_stage_leaves_no_orphan(digits_dir, tmp_path):
    """The driver is SIGKILLed at three failpoints (training/failpoint.py), each confirmed reached
    before the kill: before Ray's first snapshot, while a trial has written a checkpoint and has
    epochs left, and in the middle of the summary's atomic write of summary.json (temporary file
    written, not yet renamed). Each time `--resume` continues. At the end the experiment holds
    exactly --samples trials, each trained once through epochs 1..N, none hidden (every trial folder
    is a listed trial with its config and results), none trained twice (Optuna suggested and was
    told each configuration once), and the summary files are whole."""
    samples, max_epochs = 3, 3
    exp_dir, args = _search_args(digits_dir, tmp_path, "stages", samples, max_epochs, "--seed", "0")
    outputs, record, lingering = [], {}, []
    stages = [("before the first snapshot", "search:before-fit"), ("mid-trial", "trial:mid-run"),
              ("mid-write of summary.json", "write:summary.json")]
    for i, (stage, point) in enumerate(stages):
        marker = tmp_path / f"stop-{i}"
        proc = _start([*args, *(["--resume"] if outputs else [])], EMNIST_TUNE_STOP_AT=f"{point}={marker}")
        lines: list[str] = []
        threading.Thread(target=_read_lines, args=(proc, lines), daemon=True).start()
        stopped = stopped_at(marker, proc)
        if stage == "before the first snapshot":  # Ray is up; no experiment state yet, no trial folder
            assert stopped == proc.pid and not list(exp_dir.glob("experiment_state-*.json")), stage
            assert not list(exp_dir.glob("trial_*")) and (exp_dir / "search.json").is_file()
        elif stage == "mid-trial":  # a trial worker stopped after reporting an epoch (with its checkpoint)
            assert stopped != proc.pid and any(exp_dir.glob("trial_*/checkpoint_*/checkpoint.pt"))
            at_kill = snapshot(exp_dir)
            assert n_finished(at_kill) < samples, at_kill
        else:  # the driver, between writing summary.json's temporary file and renaming it
            assert stopped == proc.pid and not (exp_dir / "summary.json").exists()
            assert list(exp_dir.glob(".summary.json.*.tmp")), sorted(p.name for p in exp_dir.iterdir())
        lingering.append(_kill_and_wait(proc, ray_up=not stage.startswith("mid-write")))  # (Ray ended before)
        time.sleep(0.5)
        outputs.append("".join(lines))
        snap = snapshot(exp_dir)
        assert_nothing_finished_changed(record, snap, stage)
        assert_no_epoch_lost_or_trained_again(record, snap, stage)
        if stage.startswith("mid-write"):  # the summary was never half written: absent, not cut short
            assert not (exp_dir / "summary.json").exists()
        record = snap

    assert not any(lingering), f"processes of a killed driver still alive after 60 s: {lingering}"
    # the run after the first kill found no trial recorded and started afresh (the same trials, once)
    assert "starting its search afresh" in outputs[1], outputs[1][-3000:]
    r = run_search(*args, "--resume", env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    final = snapshot(exp_dir)
    assert_nothing_finished_changed(record, final, "after the last resume")
    assert_no_epoch_lost_or_trained_again(record, final, "after the last resume")
    exp = load_experiment(exp_dir)
    assert exp.orphans == [], exp.orphans
    folders = sorted(d.name.removeprefix("trial_") for d in exp_dir.glob("trial_*"))
    assert folders == sorted(final) and len(final) == samples, (folders, sorted(final))
    for tid, t in final.items():
        assert t["status"] == "finished" and t["epochs"] == list(range(1, max_epochs + 1)), (tid, t["epochs"])
        assert t["config"] is not None, f"trial {tid} has no params.json"
    csv = pd_read_csv(exp_dir / "trials.csv")
    assert sorted(csv["trial_id"]) == sorted(final) and set(csv["status"]) == {"finished"}
    summary = json.loads((exp_dir / "summary.json").read_text())  # whole: written again by the resume
    assert summary["best_trial"] in final and load_checkpoint(exp_dir / "best.pt")
    assert "best trial" in r.stdout, r.stdout  # (every trial had ended before: the summary is what is left)
    assert_tensorboard_complete(exp_dir, final)
    assert_searcher_state(exp_dir, samples)
    _checkpoint_folders_agree(exp_dir)
    assert_checkpoints_hold_their_epochs(exp_dir, final)


# ---------------------------------------------------------------- Ray's own state files cut short by a kill


def _asha_search(digits_dir, tmp_path: Path, name: str, samples: int) -> tuple[Path, list]:
    """Two trials at once, 3 epochs, ASHA's first rung at epoch 1, and a learning rate of 1e-6 in half the
    choices: ASHA stops trials at epoch 1 or 2."""
    space = write_space(tmp_path, samples=samples, max_epochs=3, grace=1,
                        space="  lr: {choice: [3.0e-3, 1.0e-6]}\n  aug_strength: {uniform: [0.0, 1.0]}\n")
    storage = tmp_path / "results"
    return storage / name, ["--config", space, "--data-dir", digits_dir, "--storage", storage, "--name", name,
                            "--concurrency", "2"]


def _two_sessions(exp_dir: Path, args: list) -> None:
    """Ctrl+C after 1 trial ended, --resume, Ctrl+C after 3 (the search must still be running each time)."""
    def ended() -> int:
        return sum(s["status"] == "TERMINATED" for s in ray_statuses(exp_dir).values())

    for run, n in ((args, 1), ([*args, "--resume"], 3)):
        proc = _start(run)
        assert _wait_for(lambda p=proc, n=n: p.poll() is not None or ended() >= n, every=0.05), "no progress"
        assert proc.poll() is None, proc.stdout.read()
        _interrupt(proc)


def test_cut_short_state_loses_no_trial_the_session_recorded(digits_dir, tmp_path):
    """Issue 18: after a search interrupted and resumed once, the newest experiment state cut to 100 bytes made
    --resume fall back to the first session's state: the trials finished in the second (the best among them) went
    to orphaned/, a trial ASHA had stopped at epoch 1 was trained on. Now the driver's whole copy of its state
    (search.repairs.StateKeeper) replaces the cut file: every trial the second session had ended is kept exactly,
    no trial is set aside, nothing ASHA stopped trains again, and a file already in damaged/ is not overwritten."""
    samples = 6
    exp_dir, args = _asha_search(digits_dir, tmp_path, "cut100", samples)
    _two_sessions(exp_dir, args)
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    assert len(states) == 2, states
    ended_before = {t for t, s in ray_statuses(exp_dir).items() if s["status"] == "TERMINATED"}
    before = snapshot(exp_dir)
    cut = states[-1]
    (exp_dir / "damaged").mkdir()
    (exp_dir / "damaged" / cut.name).write_text("set aside by an earlier resume")
    cut.write_bytes(cut.read_bytes()[:100])
    second = ended_before - {t for t, s in ray_statuses(exp_dir).items() if s["status"] == "TERMINATED"}
    assert second, "the cut must hide trials that ended in the second session (else the test shows nothing)"

    r = run_search(*args, "--resume", env={**os.environ, "RAY_ADDRESS": "local"}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "replaced by the driver's whole copy" in r.stdout and "orphaned" not in r.stdout, r.stdout[-3000:]
    assert not (exp_dir / "orphaned").exists()
    assert (exp_dir / "damaged" / cut.name).read_text() == "set aside by an earlier resume"
    assert (exp_dir / "damaged" / f"{cut.name}.1").stat().st_size == 100
    after = snapshot(exp_dir)
    for tid in ended_before:  # finished or stopped: the same files, not one more epoch
        assert tid in after, tid
        for key in ("status", "result", "checkpoints", "events"):
            assert after[tid][key] == before[tid][key], (tid, key, before[tid][key], after[tid][key])
    assert len(after) == samples and {t["status"] for t in after.values()} <= {"finished", "stopped"}
    for tid, t in after.items():  # every trial ran each of its epochs once
        assert t["epochs"] == list(range(1, len(t["epochs"]) + 1)), (tid, t["epochs"])
    # the study was told each trial once (finished or stopped by ASHA) and suggested no configuration twice
    import optuna

    study = _newest_state(exp_dir)["_ot_study"]
    told = [tr.params["aug_strength"] for tr in study.trials if tr.state != optuna.trial.TrialState.RUNNING]
    assert len(told) == samples and len({round(a, 9) for a in told}) == samples, told
    assert sorted(round(a, 9) for a in told) == sorted(round(a, 9) for a in load_experiment(exp_dir).trials[
        "config/aug_strength"])


def test_a_trial_that_ended_is_not_trained_when_the_state_lags_its_end(digits_dir, tmp_path):
    """A driver killed in the second between a trial's end and Ray's next snapshot leaves a state that lists the
    trial as running; on --resume Ray continues it. ended.json, written by the driver when the trial ended, makes
    the trial report what it has and stop: a trial ASHA stopped is not trained on."""
    exp_dir, args = _asha_search(digits_dir, tmp_path, "lag", 4)
    r = run_search(*args, env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    before = snapshot(exp_dir)
    stopped = [t for t, v in before.items() if v["status"] == "stopped"] or list(before)
    assert all((exp_dir / f"trial_{t}" / "ended.json").is_file() for t in before)
    # the state (and the driver's copy) as it would be a second before those trials ended
    for state in [*exp_dir.glob("experiment_state-*.json"), *exp_dir.glob("state-copy/experiment_state-*.json")]:
        data = json.loads(state.read_text())
        for entry in data["trial_data"]:
            info = json.loads(entry[0])
            if info["trial_id"] in stopped:
                info["status"] = "RUNNING"
                entry[0] = json.dumps(info)
        state.write_text(json.dumps(data))
    assert {t for t, s in ray_statuses(exp_dir).items() if s["status"] == "RUNNING"} == set(stopped)
    r = run_search(*args, "--resume", env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = snapshot(exp_dir)
    for tid in stopped:
        assert after[tid]["epochs"] == before[tid]["epochs"], (tid, before[tid]["epochs"], after[tid]["epochs"])
        assert after[tid]["checkpoints"] == before[tid]["checkpoints"] and after[tid]["events"] == before[tid]["events"]
    assert {t for t, s in ray_statuses(exp_dir).items() if s["status"] == "TERMINATED"} == set(before)


def test_resume_after_the_newest_experiment_state_was_cut_short(digits_dir, tmp_path):
    """CI once SIGKILLed a resumed driver while Ray copied its experiment state into the experiment
    folder: the next --resume found that file empty, Ray logged "Failed to restore the run state" and
    started the experiment over. Here two sessions end with Ctrl+C and the second's experiment state is
    then cut in half: the resume continues from the first session's state, trains no finished epoch
    again, and ends with exactly --samples finished trials."""
    samples = 4
    exp_dir, args = _search_args(digits_dir, tmp_path, "cut", samples, 2)

    def finished() -> int:
        return sum(s["status"] == "TERMINATED" for s in ray_statuses(exp_dir).values())

    for run, n in ((args, 1), ([*args, "--resume"], 2)):
        proc = _start(run)
        assert _wait_for(lambda p=proc, n=n: p.poll() is not None or finished() >= n, every=0.05), "no progress"
        assert proc.poll() is None, proc.stdout.read()  # (the search must not be over yet)
        _interrupt(proc)
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    assert len(states) == 2, states
    before = snapshot(exp_dir)
    cut = states[-1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    shutil.rmtree(exp_dir / "state-copy")  # as an experiment of an earlier version, which kept no copies
    # what the first session's state, the one the resume falls back to, knows as finished
    known = {t for t, s in ray_statuses(exp_dir).items() if s["status"] == "TERMINATED"}
    assert known and known < {t for t, v in before.items() if v["status"] == "finished"}, (known, before.keys())

    r = run_search(*args, "--resume", env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Failed to restore the run state" not in r.stdout + r.stderr
    assert f"{cut.name}: cut short" in r.stdout, r.stdout
    assert (exp_dir / "damaged" / cut.name).is_file() and not cut.exists()
    after = snapshot(exp_dir)
    assert_nothing_finished_changed({t: before[t] for t in known}, after, "after resume")
    for tid in {t for t, v in before.items() if v["status"] == "finished"} - known:
        # finished in the session whose state was cut: Ray restores it as unfinished
        if tid in after:  # named by the older state: its epochs are reported from its checkpoints, not trained again
            assert after[tid]["checkpoints"] == before[tid]["checkpoints"], tid
            assert after[tid]["events"] == before[tid]["events"], tid  # (no TensorBoard writer: nothing trained)
            same = ("epoch", "epoch_seconds", "val_acc", "train_loss")  # (times never come out the same twice)
            assert [{k: r[k] for k in same} for r in after[tid]["result"]] == \
                [{k: r[k] for k in same} for r in before[tid]["result"]], tid
        else:  # started after it: set aside with its files (search.repairs.set_aside_unknown_trials)
            assert list((exp_dir / "orphaned" / f"trial_{tid}").glob("checkpoint_*/checkpoint.pt")), tid
    assert n_finished(after) == samples and len(after) == samples, {t: v["status"] for t, v in after.items()}
    for tid, t in after.items():
        assert t["epochs"] == [1, 2], (tid, t["epochs"])
    assert f"trials {samples}/{samples} done" in r.stdout
    assert_searcher_state(exp_dir, samples)
