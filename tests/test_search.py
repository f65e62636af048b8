"""The real thing, small: Ray Tune + Optuna + ASHA over the training core, on CPU."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from search import layout
from search.layout import ray_statuses
from search.results import load_experiment
from training.checkpoint import load_checkpoint
from training.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
# The search alone: the final stage (refit, ensemble, test report) is tested in tests/test_final.py
# and by the real-data searches, not after every small search here.
RUN = [sys.executable, str(REPO / "search" / "run.py"), "--no-final"]

BASE = "split: digits\nbatch_size: 32\neval_batch_size: 256\nhist_every: 0\nlr: 3.0e-3\nscheduler: none\n"


def write_space(folder: Path, samples: int, max_epochs: int, grace: int, space: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(BASE)
    path = folder / "space.yaml"
    path.write_text(f"base: base.yaml\nsamples: {samples}\nmax_epochs: {max_epochs}\n"
                    f"asha: {{grace_period: {grace}, reduction_factor: 2}}\nspace:\n{space}")
    return path


def run_search(*args, timeout=600, **kw):
    return subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)


@pytest.fixture(scope="module")
def search_run(digits_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    # One good learning rate and one far too small: ASHA must stop the slow ones at its first rung.
    space = write_space(tmp, samples=5, max_epochs=3, grace=1,
                        space="  lr: {choice: [3.0e-3, 1.0e-6]}\n  aug_strength: {uniform: [0.0, 1.0]}\n")
    r = run_search("--config", space, "--data-dir", digits_dir, "--storage", tmp / "results", "--name", "exp",
                   "--concurrency", "1", "--seed", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "results" / "exp", r.stdout


def test_every_trial_finished_or_was_stopped(search_run):
    exp_dir, stdout = search_run
    exp = load_experiment(exp_dir)
    t = exp.trials
    assert len(t) == 5
    assert set(t["status"]) <= {"finished", "stopped"}
    assert (t["status"] == "stopped").sum() >= 1, t[["trial_id", "status", "epochs_run", "config/lr"]]
    assert (t.loc[t["status"] == "finished", "epochs_run"] == 3).all()
    assert (t.loc[t["status"] == "stopped", "epochs_run"] < 3).all()
    # the default config (lr 3e-3 from base.yaml) was evaluated, as the first trial
    first = next(iter(ray_statuses(exp_dir)))  # Ray's experiment state lists trials in creation order
    assert t.set_index("trial_id").loc[first, "config/lr"] == pytest.approx(3e-3)
    assert "trials 5/5 done" in stdout and "best trial" in stdout


def test_optuna_received_every_result(search_run):
    exp_dir, _ = search_run
    exp = load_experiment(exp_dir)
    state_file = sorted(exp_dir.glob("searcher-state-*.pkl"))[-1]
    with open(state_file, "rb") as f:  # our own file, written by this test's search
        state = pickle.load(f)
    study = state["_ot_study"]  # OptunaSearch pickles its __dict__
    completed = [tr for tr in study.trials if tr.state.name == "COMPLETE"]
    assert len(completed) == 5
    last_val = exp.trials.set_index("trial_id")["last_val_acc"]
    assert sorted(round(tr.value, 6) for tr in completed) == sorted(round(v, 6) for v in last_val)


def test_tensorboard_events_per_trial(search_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp_dir, _ = search_run
    for d in sorted(exp_dir.glob("trial_*")):
        acc = EventAccumulator(str(d))
        acc.Reload()
        steps = [e.step for e in acc.Scalars("accuracy/val")]
        assert steps == list(range(1, len(steps) + 1)) and steps, d
    # no duplicate TensorBoard output from Ray's own logger
    assert all(len(list(d.glob("events.out.tfevents.*"))) == 1 for d in exp_dir.glob("trial_*"))


def test_summary_trials_csv_and_best_pt_are_consistent(search_run):
    exp_dir, _ = search_run
    summary = json.loads((exp_dir / "summary.json").read_text())
    trials = pd.read_csv(exp_dir / "trials.csv", dtype={"trial_id": str})
    best = trials.sort_values("best_val_acc", ascending=False).iloc[0]
    assert summary["best_trial"] == best["trial_id"]
    assert summary["val_acc"] == pytest.approx(best["best_val_acc"])
    assert 0 < summary["test_acc"] <= 1 and len(summary["per_class"]) == 10
    assert {"status", "stopped_early", "diverged", "epochs_run", "seconds", "config/lr"} <= set(trials.columns)
    ckpt = load_checkpoint(exp_dir / "best.pt")
    assert ckpt["config"]["lr"] == pytest.approx(summary["config"]["lr"])
    assert ckpt["metrics"]["val_acc"] == pytest.approx(summary["val_acc"])
    pred = Predictor.from_checkpoint(exp_dir / "best.pt")
    assert pred.classes == list("0123456789")
    # Ray kept the best two checkpoints per trial by validation accuracy (plus the latest, which
    # it always keeps for resuming), and the trial's best epoch is among them.
    exp = load_experiment(exp_dir)
    best_acc = exp.trials.set_index("trial_id")["best_val_acc"]
    for trial_id, ck in exp.checkpoints.items():
        assert 1 <= len(ck) <= 3
        assert ck["val_acc"].max() == pytest.approx(best_acc[trial_id])


def test_bad_arguments_fail_before_ray_starts(tmp_path, digits_dir, cli):
    from search.run import main

    bad = write_space(tmp_path, 2, 2, 1, "  lr: {uniform: [0.1, 0.01]}\n")
    for args, message in [
        (["--config", bad], "empty range"),
        (["--samples", "0"], "--samples must be between 1 and 100000, got 0"),
        (["--resume"], "--resume needs --name"),
        (["--name", "nope", "--resume", "--storage", tmp_path], "no experiment at"),
        (["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
        (["--split", "kanji"], "split must be one of"),
    ]:
        r = cli(main, "--no-final", *args)  # (asserts that Ray never started)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_resume_keeps_the_saved_settings(tmp_path, digits_dir, cli):
    """--resume reads the experiment's saved settings; a contradicting one is refused (before Ray)."""
    space = write_space(tmp_path, 4, 2, 1, "  lr: {uniform: [0.001, 0.01]}\n")
    exp = tmp_path / "results" / "exp"
    exp.mkdir(parents=True)
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    from search.run import main, parse_args, settings_of

    args = parse_args(["--config", str(space), "--data-dir", str(digits_dir)])
    args.samples, args.seed = 4, 0
    (exp / "search.json").write_text(json.dumps(settings_of(args).to_json()))
    common = ["--name", "exp", "--storage", tmp_path / "results", "--resume"]
    for extra, message in [
        (["--samples", "5"], "--samples 5 differs from the experiment's setting (4,"),
        (["--seed", "1"], "--seed 1 differs from the experiment's setting (0,"),
        (["--split", "letters"], "--split letters differs from the experiment's setting (not given: the space file"),
        (["--config", REPO / "configs" / "search" / "smoke.yaml"], "--config"),
    ]:
        r = cli(main, *common, *extra)  # (asserts that Ray never started)
        assert r.returncode == 2 and message in r.stderr and "Leave it out" in r.stderr, (extra, r.stderr)
    space.write_text(space.read_text().replace("0.01]", "0.02]"))
    r = cli(main, *common)
    assert r.returncode == 2 and f"{space} changed since the experiment started" in r.stderr, r.stderr
    space.unlink()
    r = cli(main, *common)
    assert r.returncode == 2 and f"search space {space} is gone" in r.stderr, r.stderr


def test_edited_or_damaged_settings_and_sessions_on_resume(search_run, tmp_path, cli):
    """Before: `samples` raised from 5 to 6 in a finished search's search.json made --resume print 'interrupted with
    5 of 6 trials done ... Continue with' and exit 130 forever; {"samples": "many", "seed": [1]} was a TypeError; a
    damaged sessions.json was overwritten (the wall-clock fell to the last session's)."""
    import shutil

    from search.run import main

    exp = shutil.copytree(search_run[0], tmp_path / "results" / "exp", symlinks=True)
    settings = json.loads((exp / "search.json").read_text())
    common = ["--storage", tmp_path / "results", "--name", "exp", "--resume"]
    for bad, message in (({"samples": "many", "seed": [1]}, "'samples' is 'many', not a int"),
                         ({"config": None}, "'config' is None"), ({"max_epochs": True}, "'max_epochs' is True")):
        (exp / "search.json").write_text(json.dumps({**settings, **bad}))
        r = cli(main, "--no-final", *common)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    (exp / "search.json").write_text(json.dumps({**settings, "samples": settings["samples"] + 1}))
    (exp / "sessions.json").write_text('{"sessions": [12.5, ')  # cut short
    r = run_search(*common, env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Continue with" not in r.stdout and f"runs {settings['samples']} trials, as it was started" in r.stdout
    assert (exp / "damaged" / "sessions.json").read_text() == '{"sessions": [12.5, '
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["search_wall_complete"] is False and summary["search_sessions"] == 1
    assert "incomplete" in r.stdout


def test_resume_sets_aside_trial_folders_the_experiment_does_not_know(search_run, tmp_path):
    """Folders an older version's killed driver left behind (files but no trial in the experiment state) are moved
    to orphaned/ by `run.py --resume`, not shown as phantom trials; an empty one is removed (not moved); the
    experiment's own trials stay as they were."""
    import shutil

    from tests.test_faults import snapshot

    exp = shutil.copytree(search_run[0], tmp_path / "results" / "exp", symlinks=True)
    before = snapshot(exp)
    (exp / "trial_bbbb_00001" / "checkpoint_000000").mkdir(parents=True)
    (exp / "trial_bbbb_00001" / "checkpoint_000000" / "checkpoint.pt").write_bytes(b"weights")
    (exp / "trial_cccc_00002").mkdir()
    assert load_experiment(exp).orphans == ["bbbb_00001", "cccc_00002"]
    r = run_search("--storage", tmp_path / "results", "--name", "exp", "--resume",
                   env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "trial_bbbb_00001 is not in the experiment state" in r.stdout
    assert (exp / "orphaned" / "trial_bbbb_00001" / "checkpoint_000000" / "checkpoint.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in (exp / "orphaned").iterdir()) == ["trial_bbbb_00001"]  # the empty one: removed
    assert not (exp / "trial_cccc_00002").exists() and not (exp / "trial_bbbb_00001").exists()
    after = load_experiment(exp)
    assert after.orphans == [] and sorted(after.trials["trial_id"]) == sorted(before)
    assert {t: v["rows"] for t, v in snapshot(exp).items()} == {t: v["rows"] for t, v in before.items()}


@pytest.mark.slow
def test_sigterm_stops_the_search_as_ctrl_c_does(digits_dir, tmp_path):
    """SLURM, Kubernetes and `timeout` send SIGTERM. Before: exit 1 after 2.7 s, Ray's stack dump, no resume
    command, the session's seconds lost. Now: as Ctrl+C, and the printed command (run as printed) continues it."""
    import shlex

    space = write_space(tmp_path, samples=3, max_epochs=3, grace=3, space="  aug_strength: {uniform: [0.0, 1.0]}\n")
    exp_dir = tmp_path / "results" / "term"
    args = ["--config", space, "--data-dir", digits_dir, "--storage", tmp_path / "results", "--name", "term",
            "--concurrency", "1"]
    proc = subprocess.Popen([*RUN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env={**os.environ, "RAY_ADDRESS": "local"})
    assert _wait_for(lambda: proc.poll() is not None or any(
        s["status"] == "TERMINATED" for s in ray_statuses(exp_dir).values())), proc.kill() or proc.stdout.read()
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert len(layout.read_sessions(exp_dir)[0]) == 1
    command = shlex.split(out.split("Continue with:\n")[1].split("\n")[0])
    assert command[:2] == ["python", "search/run.py"] and "--no-final" in command
    r = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert summary["search_sessions"] == 2 and summary["trials"] == {"finished": 3}


def _wait_for(predicate, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_interrupt_then_resume(digits_dir, tmp_path):
    """Ctrl+C with one trial finished and one part-way: exit 130 and a command that, run as printed, continues
    the search. Finished trials are kept as they were, the part-way one continues from its checkpoint (the
    epochs it had are kept as measured), 4 trials in total, and the searcher's state (the Optuna study)
    holds every result once."""
    import shlex

    from tests.test_faults import (
        assert_no_epoch_lost_or_trained_again,
        assert_nothing_finished_changed,
        assert_searcher_state,
        assert_tensorboard_complete,
        snapshot,
    )

    space = write_space(tmp_path, samples=4, max_epochs=4, grace=4, space="  aug_strength: {uniform: [0.0, 1.0]}\n")
    storage, name = tmp_path / "results", "resumable"
    exp_dir = storage / name
    args = ["--config", space, "--data-dir", digits_dir, "--storage", storage, "--name", name, "--concurrency", "1"]
    marker = tmp_path / "stopped-mid-trial"
    # the second trial's worker stops itself after its first epoch (training/failpoint.py; the first trial
    # passed there 3 times): the Ctrl+C lands while it is part-way for certain (a trial takes seconds here)
    proc = subprocess.Popen([*RUN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env={**os.environ, "EMNIST_TUNE_STOP_AT": f"trial:mid-run#4={marker}"})
    from tests.test_faults import stopped_at

    stopped_at(marker, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    before = snapshot(exp_dir)
    part_way = [t for t, v in before.items() if v["status"] != "finished" and v["rows"]]
    assert sorted(len(v["rows"]) for v in before.values()) == [1, 4] and len(part_way) == 1, {  # landed mid-trial
        t: (v["status"], len(v["rows"])) for t, v in before.items()}
    # the command it prints continues the search as it was started (space, data, samples), run as printed
    command = shlex.split(out.split("Continue with:\n")[1].split("\n")[0])
    assert command[:2] == ["python", "search/run.py"] and "--resume" in command and "--config" not in command
    assert "--no-final" in command  # (it was started so: tests.test_search.RUN)
    r = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = snapshot(exp_dir)
    assert_nothing_finished_changed(before, after, "after resume")  # finished trials not run again
    assert_no_epoch_lost_or_trained_again(before, after, "after resume")  # the part-way one continued
    assert len(after) == 4 and {t["status"] for t in after.values()} == {"finished"}, after
    for t, v in after.items():  # no epoch lost or repeated in any trial
        assert v["epochs"] == [1, 2, 3, 4], (t, v["epochs"])
    assert_tensorboard_complete(exp_dir, after)
    assert_searcher_state(exp_dir, 4)
    # the reported wall-clock covers both sessions, not only the resumed one
    sessions = json.loads((exp_dir / "sessions.json").read_text())["sessions"]
    assert len(sessions) == 2 and all(s > 0 for s in sessions)
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert summary["search_sessions"] == 2 and summary["search_wall_seconds"] == pytest.approx(sum(sessions))
    assert "over 2 sessions" in r.stdout


def test_session_record_never_stops_a_search(tmp_path):
    """sessions.json only feeds the reported wall-clock: a damaged one counts as no earlier sessions, is set aside
    in damaged/ (never overwritten, never overwriting an earlier damaged copy) and the total says it is incomplete."""
    assert layout.read_sessions(tmp_path) == ([], True)
    assert layout.add_session(tmp_path, 12.5) == ([12.5], True)
    assert layout.add_session(tmp_path, 3) == ([12.5, 3.0], True)
    assert layout.read_sessions(tmp_path) == ([12.5, 3.0], True)
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / layout.SESSIONS_FILE).write_text("an older damaged copy")
    for i, damaged in enumerate(("{not json", '{"a": 1}', '[1, "x", -2, 5]', '{"sessions": [1, 2], "complete": "y"}')):
        (tmp_path / layout.SESSIONS_FILE).write_text(damaged)
        partial = [1.0, 5.0] if damaged.startswith("[") else [1.0, 2.0] if "sessions" in damaged else []
        assert layout.read_sessions(tmp_path) == (partial, False)
        assert layout.add_session(tmp_path, 4) == ([*partial, 4.0], False)
        assert (tmp_path / "damaged" / f"{layout.SESSIONS_FILE}.{i + 1}").read_text() == damaged
        assert layout.read_sessions(tmp_path) == ([*partial, 4.0], False)  # incomplete from then on
    assert (tmp_path / "damaged" / layout.SESSIONS_FILE).read_text() == "an older damaged copy"
    (tmp_path / layout.SESSIONS_FILE).write_text("[7.5, 2]")  # an older experiment's bare list
    assert layout.read_sessions(tmp_path) == ([7.5, 2.0], True)
    uri = f"file://{tmp_path / 'cloud' / 'exp'}"  # any storage Ray writes to, through pyarrow
    assert layout.add_session(uri, 7) == ([7.0], True) and layout.read_sessions(uri) == ([7.0], True)
    blocked = tmp_path / "a-file"  # storage that cannot be written: the session is reported, not recorded
    blocked.write_text("")
    assert layout.add_session(blocked / "exp", 4) == ([4.0], True)
    assert layout.read_sessions(blocked / "exp") == ([], True)
    assert layout.add_session("nosuchscheme://bucket/exp", 4)[0] == [4.0]


@pytest.mark.slow
def test_shipped_smoke_search_on_real_data(smoke_search):
    """`python search/run.py --config configs/search/smoke.yaml` as a user runs it (real EMNIST)."""
    root, r = smoke_search
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((root / "smoke" / "summary.json").read_text())
    assert summary["test_acc"] > 0.5 and summary["trials"].get("finished", 0) >= 1
    assert "best trial" in r.stdout and "most confused" in r.stdout
    # ...and its final stage: the delivered model, refit on train + validation, and the test report
    final = summary["final"]
    assert Path(final["model"]) == root / "smoke" / "final" / "model.pt"
    assert final["test"]["refit"]["accuracy"] > 0.5 and final["test"]["refit"]["n"] == summary["test_n"]
    assert final["test"]["single"]["accuracy"] == pytest.approx(summary["test_acc"])
    assert (root / "smoke" / "final" / "report.md").read_text().count("| 0.") >= 3
    assert "delivered" in r.stdout and Predictor.from_checkpoint(root / "smoke").classes[:3] == ["0", "1", "2"]


@pytest.mark.slow
def test_divergence_and_transient_failure(digits_dir, tmp_path):
    """Trial 1 (the defaults) fails twice at epoch 2 and is retried from its checkpoint each time, then finishes;
    trial 2 (a `start:` point) fails three times: after its 2 retries it ends in error, the search goes on; trial 3
    gets an absurd learning rate, diverges in its first epoch, is marked diverged, scored 0 for Optuna, and is not
    retried."""
    space = write_space(tmp_path, samples=3, max_epochs=3, grace=3,
                        space="  lr: {choice: [3.0e-3, 1.0e+5]}\n  aug_strength: {uniform: [0.0, 1.0]}\n"
                              "start:\n  - {lr: 3.0e-3, aug_strength: 0.5}\n  - {lr: 1.0e+5, aug_strength: 0.25}\n")
    marker = tmp_path / "failures"
    r = run_search("--config", space, "--data-dir", digits_dir, "--storage", tmp_path / "results", "--name", "faults",
                   "--concurrency", "1", env={**os.environ, "EMNIST_TUNE_FAULT_ONCE": f"{marker}:2:2,3"})
    exp_dir = tmp_path / "results" / "faults"
    exp = load_experiment(exp_dir)
    t = exp.trials.set_index("trial_id")
    order = list(ray_statuses(exp_dir))  # creation order: the defaults, the start point, the diverging one
    assert len(order) == 3, (r.stdout[-3000:], r.stderr[-3000:])
    first, second, bad = order
    failures = marker.read_text().split()  # one line per injected failure, naming the trial
    assert failures == [first, first, second, second, second], failures
    assert t.loc[first, "status"] == "finished" and t.loc[first, "num_failures"] == 2
    assert exp.histories[first]["epoch"].tolist() == [1, 2, 3]  # resumed at epoch 2 twice, nothing repeated
    assert t.loc[second, "status"] == "error" and t.loc[second, "num_failures"] == 3  # 1 run + 2 retries, no more
    assert exp.histories[second]["epoch"].tolist() == [1]
    assert t.loc[bad, "config/lr"] > 1
    assert t.loc[bad, "status"] == "diverged" and t.loc[bad, "epochs_run"] == 1 and t.loc[bad, "num_failures"] == 0
    assert bool(t.loc[bad, "diverged"])
    assert json.loads((exp_dir / "summary.json").read_text())["best_trial"] == first
    # Optuna was told the diverged trial's score: 0
    with open(max(exp_dir.glob("searcher-state-*.pkl")), "rb") as f:  # our own file, written by this search
        study = pickle.load(f)["_ot_study"]
    told = {round(tr.params["aug_strength"], 9): tr for tr in study.trials}
    diverged = told[round(t.loc[bad, "config/aug_strength"], 9)]
    assert diverged.state.name == "COMPLETE" and diverged.value == 0.0, diverged
    assert told[round(t.loc[first, "config/aug_strength"], 9)].value == pytest.approx(t.loc[first, "last_val_acc"])


@pytest.mark.slow
def test_cloud_storage_saves_the_settings_so_resume_needs_only_the_name(digits_dir, tmp_path):
    """search.json goes to the storage through pyarrow (as Ray's files do), here a file:// URI: --resume
    with only --name and --storage then keeps the space and samples it was started with. (Without them
    it would take the default space's 50 samples and report 2 of 50 done, exit 130.)"""
    space = write_space(tmp_path, samples=2, max_epochs=1, grace=1, space="  lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    storage = f"file://{tmp_path / 'cloud'}"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    r = run_search("--config", space, "--data-dir", digits_dir, "--storage", storage, "--name", "c", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    saved = json.loads((tmp_path / "cloud" / "c" / "search.json").read_text())
    assert saved["config"] == str(space) and saved["samples"] == 2
    r = run_search("--storage", storage, "--name", "c", "--resume", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming" in r.stdout and "2 trials" in r.stdout
