"""search/repairs.py's policies, each on files made here (no search runs, no Ray cluster): which checkpoint a
resumed trial starts from and which epochs it reports without training them, trial folders the experiment
does not know set aside, and Ray's state files cut short set aside so that Ray restores the newest whole session.
The searches that show them end to end, killed and resumed, are in tests/test_faults.py."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from search.layout import ray_statuses
from search.results import load_experiment
from tests.helpers import truncate
from training.trainer import train


def _trial_checkpoints(tmp_path: Path, digits_data, tiny_config, epochs: int = 4) -> Path:
    """A trial folder as Ray leaves it: checkpoint_00000<epoch - 1>/checkpoint.pt for each epoch."""
    trial = tmp_path / "trial_x"

    def keep(m, last):
        d = trial / f"checkpoint_{m['epoch'] - 1:06d}"
        d.mkdir(parents=True)
        (d / "checkpoint.pt").write_bytes(Path(last).read_bytes())

    train({**tiny_config, "epochs": epochs}, digits_data, reporter=keep, checkpoint_dir=tmp_path / "scratch")
    return trial


def test_resume_picks_the_newest_readable_checkpoint(digits_data, tiny_config, tmp_path):
    """Which state a resumed trial starts from, given the checkpoint Ray hands back (`handed`) and
    the files in its folder. Real tune.Checkpoint objects; no Ray cluster needed."""
    from ray import tune

    from search.repairs import resume_state, unlogged_epochs

    trial = _trial_checkpoints(tmp_path, digits_data, tiny_config)
    handed = tune.Checkpoint.from_directory(trial / "checkpoint_000002")  # epoch 3
    # Ray's state lags the disk (interrupted right after epoch 4 was written): take epoch 4, or the
    # trial would train epoch 4 again, and a finished trial would be run once more.
    r = resume_state(handed, trial)
    assert r.state["epoch"] == 4 and r.path == trial / "checkpoint_000003" / "checkpoint.pt" and r.note == {}
    # epoch 4 is reported from the checkpoint unless result.json has it already
    assert [m["epoch"] for m in unlogged_epochs(r, handed, trial)] == [4]
    lines = [json.dumps({"epoch": e, "val_acc": 0.5}) for e in (1, 2, 3)]
    (trial / "result.json").write_text("\n".join(lines) + "\n")
    assert [m["epoch"] for m in unlogged_epochs(r, handed, trial)] == [4]
    (trial / "result.json").write_text("\n".join([*lines, json.dumps({"epoch": 4}), '{"epoch": 5, "va']))
    assert unlogged_epochs(r, handed, trial) == []  # (a line cut short by a kill is skipped)
    # Ray hands back none (the trial's first checkpoint was not recorded): the newest in the folder,
    # and all its epochs are reported, logged or not: Ray then starts the trial's result.json afresh
    # (CI once lost epoch 1 of such a trial when it was taken as logged)
    r = resume_state(None, trial)
    assert r.state["epoch"] == 4 and r.note == {}
    assert [m["epoch"] for m in unlogged_epochs(r, None, trial)] == [1, 2, 3, 4]
    (trial / "result.json").write_text("\n".join(lines) + "\n")  # epochs 1-3 logged, as Ray leaves it
    # a fresh trial: its folder is empty
    (tmp_path / "fresh").mkdir()
    assert resume_state(None, tmp_path / "fresh") == (None, None, {})
    # cloud storage (no folder): only the handed checkpoint
    assert resume_state(handed, None).state["epoch"] == 3
    # the newer file is damaged: the handed one, silently, and nothing to replay
    truncate(trial / "checkpoint_000003" / "checkpoint.pt")
    r = resume_state(handed, trial)
    assert r.state["epoch"] == 3 and r.note == {} and unlogged_epochs(r, handed, trial) == []
    # the handed one is damaged too: the newest older readable one, and a note for the driver
    truncate(trial / "checkpoint_000002" / "checkpoint.pt")
    r = resume_state(handed, trial)
    assert r.state["epoch"] == 2 and r.note["resumed_from_epoch"] == 2
    assert "checkpoint_000002" in r.note["resume_warning"] and unlogged_epochs(r, handed, trial) == []
    # deleted instead of damaged: same
    shutil.rmtree(trial / "checkpoint_000002")
    r = resume_state(handed, trial)
    assert r.state["epoch"] == 2 and r.note["resumed_from_epoch"] == 2
    # nothing readable: start over
    for f in trial.glob("checkpoint_*/checkpoint.pt"):
        truncate(f)
    r = resume_state(handed, trial)
    assert r.state is None and r.note["resumed_from_epoch"] == 0 and r.note["resume_warning"]


def test_unknown_trial_folders_are_moved_and_empty_ones_removed(tmp_path):
    """The policy of search.repairs.set_aside_unknown_trials (through `run.py --resume`:
    tests/test_search.py::test_resume_sets_aside_trial_folders_the_experiment_does_not_know): a folder set
    aside before is never merged into or overwritten."""
    from search.repairs import set_aside_unknown_trials

    exp = tmp_path / "exp"
    info = json.dumps({"trial_id": "aaaa_00000", "status": "TERMINATED", "config": {}})
    (exp / "trial_aaaa_00000").mkdir(parents=True)
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [[info, json.dumps({"num_failures": 0})]]}))
    (exp / "trial_bbbb_00001" / "checkpoint_000000").mkdir(parents=True)
    (exp / "trial_bbbb_00001" / "checkpoint_000000" / "checkpoint.pt").write_bytes(b"weights")
    (exp / "orphaned" / "trial_bbbb_00001").mkdir(parents=True)  # set aside by an earlier resume
    (exp / "orphaned" / "trial_bbbb_00001" / "older").write_bytes(b"older")
    (exp / "trial_cccc_00002").mkdir()
    assert load_experiment(exp).orphans == ["bbbb_00001", "cccc_00002"]
    set_aside_unknown_trials(exp)
    assert sorted(p.name for p in exp.glob("trial_*")) == ["trial_aaaa_00000"]
    assert sorted(p.name for p in (exp / "orphaned").iterdir()) == ["trial_bbbb_00001", "trial_bbbb_00001.1"]
    assert (exp / "orphaned" / "trial_bbbb_00001" / "older").read_bytes() == b"older"
    assert (exp / "orphaned" / "trial_bbbb_00001.1" / "checkpoint_000000" / "checkpoint.pt").read_bytes() == b"weights"
    assert load_experiment(exp).trials["trial_id"].tolist() == ["aaaa_00000"]


def _session_files(exp: Path, session: str, trials: int = 1, cut: tuple[str, ...] = ()) -> dict[str, Path]:
    """One driver session's state files as Ray writes them (an experiment state naming `trials` trials,
    the searcher's and search generator's pickles), those named in `cut` cut short."""
    infos = [[json.dumps({"trial_id": f"t{i}", "status": "TERMINATED", "config": {}}), json.dumps({})]
             for i in range(trials)]
    files = {"experiment_state": exp / f"experiment_state-{session}.json",
             "searcher-state": exp / f"searcher-state-{session}.pkl",
             "search_gen_state": exp / f"search_gen_state-{session}.json"}
    files["experiment_state"].write_text(json.dumps({"trial_data": infos, "runner_data": {}}))
    files["searcher-state"].write_bytes(pickle.dumps({"study": list(range(trials)), "session": session}))
    files["search_gen_state"].write_bytes(pickle.dumps({"counter": trials}))
    for kind in cut:
        data = files[kind].read_bytes()
        files[kind].write_bytes(data[: len(data) // 2])
    return files


def test_damaged_state_files_are_set_aside_so_ray_restores_the_newest_whole_session(tmp_path, capsys):
    """Ray restores from the newest state files by name and, when one is unreadable, starts the
    experiment over from nothing. set_aside_damaged_state moves what is cut short (with its session's
    other files where they belong together) to damaged/, and refuses, moving nothing, when no whole
    state is left. Real files in Ray's formats; no Ray cluster needed."""
    from search.layout import DAMAGED_DIR, has_whole_state
    from search.repairs import set_aside_damaged_state

    exp = tmp_path / "exp"
    exp.mkdir()
    a = _session_files(exp, "2026-01-01_00-00-00", trials=1)
    b = _session_files(exp, "2026-01-02_00-00-00", trials=2, cut=("experiment_state",))
    # the newest trial list is cut short: its whole session goes (its searcher knew trials the older list does not)
    assert sorted(p.name for p in set_aside_damaged_state(exp)) == sorted(p.name for p in b.values())
    assert all(not p.exists() and (exp / DAMAGED_DIR / p.name).is_file() for p in b.values())
    assert all(p.is_file() for p in a.values())
    assert ray_statuses(exp).keys() == {"t0"}
    assert "cut short" in capsys.readouterr().out
    assert set_aside_damaged_state(exp) == []  # nothing left to do: a second resume moves nothing

    # the trial list is whole but the newest searcher state is cut short: only that session's searcher files go
    c = _session_files(exp, "2026-01-03_00-00-00", trials=3, cut=("searcher-state",))
    moved = set_aside_damaged_state(exp)
    assert sorted(p.name for p in moved) == sorted([c["searcher-state"].name, c["search_gen_state"].name])
    assert c["experiment_state"].is_file() and ray_statuses(exp).keys() == {"t0", "t1", "t2"}
    # a file in damaged/ is never overwritten by a later move of the same name: names carry the session
    assert len(list((exp / DAMAGED_DIR).iterdir())) == 5

    # nothing whole to resume from: a clear refusal, and every file stays where it was
    only = tmp_path / "only"
    only.mkdir()
    d = _session_files(only, "2026-01-01_00-00-00", cut=("experiment_state",))
    with pytest.raises(SystemExit, match="none of its experiment state files"):
        set_aside_damaged_state(only)
    # (search/run.py and the refit never get there: with no whole state no trial was recorded, so
    # --resume starts the search afresh, as after a kill before Ray's first snapshot)
    assert not has_whole_state(only) and has_whole_state(exp)
    blind = tmp_path / "blind"
    blind.mkdir()
    e = _session_files(blind, "2026-01-01_00-00-00", cut=("searcher-state",))
    with pytest.raises(SystemExit, match="every saved state of its searcher is cut short"):
        set_aside_damaged_state(blind)
    assert all(p.is_file() for p in [*d.values(), *e.values()])
    assert not (only / DAMAGED_DIR).exists() and not (blind / DAMAGED_DIR).exists()
