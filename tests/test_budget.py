"""A search under a time budget (search/budget.py): durations, the plan, the trainer's deadline and short epochs,
and real budgeted searches on tiny data (the deadline, the final stage's share, resume with the budget left, a
budget too small). No timing thresholds: how close a run comes to its budget is measured by benchmarks.budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from search import budget, ledger
from search.results import load_experiment
from tests.test_search import REPO, write_space
from training.checkpoint import load_checkpoint
from training.config import ConfigError

RUN = [sys.executable, str(REPO / "search" / "run.py")]
ENV = {**os.environ, "RAY_ADDRESS": "local"}


def _run(*args, timeout=600, env=ENV):
    return subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("45", 45),
                                           ("1.5m", 90), (" 2 H ", 7200), ("10min", 600)])
def test_durations(text, seconds):
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "abc", "30x", "nan", "inf", "1e400s", "m", "5m-"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ConfigError, match="--time-budget must be a duration"):
        budget.parse_duration(text)


def test_asha_resource_and_rungs():
    assert budget.asha_rungs(2, 3, 12) == [2, 6, 12]
    assert budget.expected_resource(2, 3, 12) == pytest.approx(2 + 4 / 3 + 6 / 9)


def _calibration(train_ips=4000.0, eval_ips=8000.0, n_train=90000, n_val=10000):
    speed = budget.Speed("small_cnn", train_ips, eval_ips, 128)
    return budget.Calibration([speed, budget.Speed("vgg", train_ips / 10, eval_ips / 10, 128)], 3.0, 1,
                              n_train, n_val)


def test_the_plan_splits_the_budget_and_names_the_smallest_that_works():
    cal = _calibration()
    p = budget.plan(1800, 20, cal, 2, 17000)
    assert p.search_s + p.final_s + p.elapsed_s <= 1800  # (the rest: margin and Ray's start)
    assert p.grace_s < p.max_t_s <= p.search_s and p.rungs[-1] == p.max_t_s and p.rungs[0] == p.grace_s
    assert 128 <= p.epoch_images <= cal.n_train and p.epoch_images % 128 == 0
    # the first rung costs tens of seconds of the default config, not epochs of minutes
    assert p.epoch_images / cal.default.train_ips < p.grace_s < 120
    with pytest.raises(ConfigError, match="smallest budget that would work here is about") as e:
        budget.plan(30, 20, cal, 2, 17000)
    words = str(e.value).rsplit("about ", 1)[1]
    smallest = sum(float(n) * {"h": 3600, "min": 60, "s": 1}[u] for n, u in zip(words.split()[::2],
                                                                                   words.split()[1::2], strict=True))
    budget.plan(smallest, 20, cal, 2, 17000)  # what it names is enough


def test_the_trainer_ends_at_a_deadline_with_a_checkpoint(digits_data, tmp_path):
    """A deadline in the middle of an epoch: the epoch ends at its next step, is evaluated, checkpointed, reported as
    cut by the deadline, and the run stops there. Short epochs: epoch_images images each."""
    from training.trainer import train

    config = {"split": "digits", "epochs": 50, "batch_size": 32, "hist_every": 0, "epoch_images": 64}
    reports = []
    r = train(config, digits_data, reporter=lambda m, p: reports.append((m, p)), out_dir=tmp_path / "a",
              deadline=time.time() + 1.0)
    assert 1 <= r.epochs_run < 50 and reports[-1][0]["cut_by_deadline"]
    assert load_checkpoint(reports[-1][1])["epoch"] == r.epochs_run
    assert all(m["images_per_sec"] > 0 and m["run_seconds"] > 0 for m, _ in reports)
    assert [m["run_seconds"] for m, _ in reports] == sorted(m["run_seconds"] for m, _ in reports)
    full = train({**config, "epochs": 2, "epoch_images": 0}, digits_data, out_dir=tmp_path / "b")
    assert full.epochs_run == 2 and not any(h.get("cut_by_deadline") for h in full.history)


def test_a_timed_run_spreads_its_schedule_over_its_seconds(digits_data, tmp_path):
    """train_seconds: the run ends once its seconds are spent (its epochs are only the reports), its schedule then
    at its end (onecycle's last learning rate), and it says so; a run cut by a deadline resumes on the same clock
    and ends at the same point; `finish_by` gives a run fewer seconds so that it is done by then."""
    from training.trainer import train

    cfg = {"split": "digits", "epochs": 4, "batch_size": 32, "hist_every": 0, "epoch_images": 64, "lr": 2e-3,
           "scheduler": "onecycle", "train_seconds": 1.5}
    r = train(cfg, digits_data, out_dir=tmp_path / "a")
    last = r.history[-1]
    assert last["schedule_done"] and last["run_seconds"] >= 1.5 and not last.get("cut_by_deadline")
    assert last["lr"] < 2e-3 * 1e-3  # annealed: OneCycleLR's last steps (its final rate is 2e-3 / 25 / 1e4)
    lrs = [h["lr"] for h in r.history]
    peak = lrs.index(max(lrs))
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)

    # cut by a deadline half-way, then resumed: the same clock goes on to the schedule's end
    cut = train({**cfg, "train_seconds": 3.0}, digits_data, out_dir=tmp_path / "b", deadline=time.time() + 1.0)
    assert cut.history[-1]["cut_by_deadline"] and not cut.history[-1].get("schedule_done")
    at_cut = cut.history[-1]["run_seconds"]
    assert at_cut < 3.0
    done = train({**cfg, "train_seconds": 3.0}, digits_data, out_dir=tmp_path / "b", resume=tmp_path / "b" / "last.pt")
    first = done.history[len(cut.history)]  # the resumed run's first epoch: the same clock, not a new one
    assert first["epoch"] == cut.history[-1]["epoch"] + 1 and first["run_seconds"] > at_cut
    assert done.history[-1]["schedule_done"] and done.history[-1]["run_seconds"] >= 3.0
    again = train({**cfg, "train_seconds": 3.0}, digits_data, out_dir=tmp_path / "b", resume=tmp_path / "b" / "last.pt")
    assert again.epochs_run == done.epochs_run  # a timed run that had ended trains nothing more

    # finish_by: the schedule is shortened to end by then, and the checkpoint says with how many seconds
    ends = time.time() + 1.0
    short = train({**cfg, "train_seconds": 1000.0}, digits_data, out_dir=tmp_path / "c", finish_by=ends)
    assert short.history[-1]["schedule_done"] and short.history[-1]["lr"] < 2e-3 * 1e-3
    assert load_checkpoint(tmp_path / "c" / "last.pt")["config"]["train_seconds"] < 1000.0


def test_a_timed_step_schedule_counts_epochs_of_its_shape(digits_data, tmp_path):
    """step and plateau schedules of a timed run step once per epoch of the schedule's shape (`epochs` over the
    seconds), however many reports fall in one: 4 epochs of step_size 1 decay 4 times, whatever the report size."""
    from training.trainer import train

    cfg = {"split": "digits", "epochs": 4, "batch_size": 32, "hist_every": 0, "epoch_images": 64, "lr": 1e-2,
           "scheduler": "step", "step_size": 1, "gamma": 0.5, "train_seconds": 2.0}
    r = train(cfg, digits_data, out_dir=tmp_path)
    assert r.history[-1]["schedule_done"]
    final_lr = load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"][0]["lr"]
    assert final_lr == pytest.approx(1e-2 * 0.5**4)
    assert {round(h["lr"] / 1e-2, 6) for h in r.history} <= {round(0.5**k, 6) for k in range(5)}


def test_the_portfolio_is_never_stopped_at_a_rung_but_sets_its_bar():
    """PortfolioASHA (Ray's ASHA): a portfolio point (the default config, the space's start points) worse than the
    others at the rung trains on to max_t; its result still sets the rung's bar for the searcher's trials."""
    from types import SimpleNamespace

    from search.tuner import PortfolioASHA

    asha = PortfolioASHA([{"model": "vgg", "width": 1.0}], time_attr="run_seconds", metric="val_acc", mode="max",
                         max_t=90.0, grace_period=30.0, reduction_factor=3)
    trials = {name: SimpleNamespace(trial_id=name, config=config) for name, config in (
        ("good", {"model": "small_cnn", "width": 1.0}), ("portfolio", {"model": "vgg", "width": 1.0, "lr": 0.1}),
        ("worse", {"model": "vgg", "width": 1.5}), ("better", {"model": "resnet", "width": 1.0}))}
    for t in trials.values():
        asha.on_trial_add(None, t)

    def result(name, seconds, acc):
        return asha.on_trial_result(None, trials[name], {"run_seconds": seconds, "val_acc": acc})

    assert result("good", 31.0, 0.80) == asha.CONTINUE  # the first at its rung
    assert result("portfolio", 32.0, 0.60) == asha.CONTINUE  # worse, but a portfolio point: trains on
    assert result("worse", 33.0, 0.65) == asha.STOP  # below the bar the two before it set
    assert result("better", 31.0, 0.85) == asha.CONTINUE
    assert result("portfolio", 60.0, 0.70) == asha.CONTINUE and result("portfolio", 91.0, 0.9) == asha.STOP  # max_t
    assert asha.is_protected({"model": "vgg", "width": 1.0, "depth": 2}) and not asha.is_protected({"model": "vgg"})


def test_a_timed_trial_that_had_its_seconds_is_finished_in_the_table_and_the_progress_line():
    """ASHA stops a timed trial at the report that passes max_t, which can come a step before the trial's own end
    (no schedule_done): it had its seconds, so it is finished both in trials.csv's rule and on the progress line;
    one that ended before max_t without schedule_done was stopped at a rung."""
    from search.results import had_its_seconds
    from search.tuner import ended_by_asha

    timed = {"train_seconds": 330.5}
    at_max_t, at_rung = {"run_seconds": 330.8, "epoch": 34}, {"run_seconds": 113.2, "epoch": 24}
    assert had_its_seconds(at_max_t, 330.0) and not had_its_seconds(at_rung, 330.0)
    assert not ended_by_asha(at_max_t, timed, 12, 330.0) and ended_by_asha(at_rung, timed, 12, 330.0)
    assert not ended_by_asha({**at_rung, "schedule_done": True}, timed, 12, 330.0)
    assert not ended_by_asha({**at_rung, "cut_by_deadline": True}, timed, 12, 330.0)
    assert ended_by_asha({"epoch": 2}, {}, 12) and not ended_by_asha({"epoch": 12}, {}, 12)  # epoch rungs


def test_a_budget_too_small_is_one_line_before_ray_starts(digits_dir, tmp_path):
    from tests.conftest import assert_ray_never_started, ray_tmp_dir

    space = write_space(tmp_path, samples=4, max_epochs=2, grace=1, space="  lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    ray_tmp = ray_tmp_dir()  # a Ray session would write its files here
    r = _run("--config", space, "--data-dir", digits_dir, "--storage", tmp_path / "results", "--name", "tiny",
             "--time-budget", "3s", timeout=120, env={**ENV, "RAY_TMPDIR": str(ray_tmp)})
    assert_ray_never_started(ray_tmp)
    ray_tmp.parent.rmdir()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "smallest budget that would work here is about" in lines[0], \
        r.stdout + r.stderr
    assert "experiment tiny" not in r.stdout and not (tmp_path / "results" / "tiny").exists()
    r = _run("--config", space, "--data-dir", digits_dir, "--storage", tmp_path / "results", "--time-budget", "soon",
             timeout=120)
    assert r.returncode == 2 and "--time-budget must be a duration" in r.stderr


@pytest.mark.slow
def test_an_unbudgeted_search_prints_its_estimate_first(digits_dir, tmp_path):
    space = write_space(tmp_path, samples=2, max_epochs=1, grace=1, space="  lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    r = _run("--no-final", "--config", space, "--data-dir", digits_dir, "--storage", tmp_path / "results")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = r.stdout.strip().splitlines()[0]
    assert first.startswith("estimated ") and "for 2 trials (ASHA 1 epochs" in first, first


@pytest.fixture(scope="module")
def budgeted(digits_dir, tmp_path_factory):
    """A budgeted search with its final stage, interrupted (Ctrl+C) once its first trial ended, then resumed with
    the command it printed: (experiment folder, first output, resumed run)."""
    import shlex

    tmp = tmp_path_factory.mktemp("budget")
    space = write_space(tmp, samples=40, max_epochs=2, grace=1,
                        space="  lr: {loguniform: [1.0e-3, 1.0e-2]}\n  width: {uniform: [0.5, 1.0]}\n")
    exp = tmp / "results" / "b"
    args = ["--config", space, "--data-dir", digits_dir, "--storage", tmp / "results", "--name", "b",
            "--time-budget", "130s", "--ensemble-k", "2"]
    proc = subprocess.Popen([*RUN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=ENV)
    end = time.time() + 300
    while time.time() < end and proc.poll() is None and not list(exp.glob("trial_*/ended.json")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    first, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, first[-3000:]
    command = shlex.split(first.split("Continue with:\n")[1].split("\n")[0])
    r = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=REPO, env=ENV,
                       timeout=600)
    return exp, first, r


@pytest.mark.slow
def test_a_budgeted_search_delivers_and_says_where_its_time_went(budgeted):
    exp, first, r = budgeted
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "time budget 2 min 10 s on this machine" in first and "ASHA on each trial's own seconds" in first
    assert (exp / "final" / "model.pt").is_file() and (exp / "final" / "report.md").is_file()
    summary = json.loads((exp / "summary.json").read_text())
    spent = summary["budget"]
    assert spent["budget_s"] == 130 and spent["sessions"] == 2
    assert set(spent["phases"]) >= {"startup", "search", "summary", "final"}
    assert spent["spent_s"] == pytest.approx(sum(spent["phases"].values()), rel=0.02)
    assert spent["left_s"] == pytest.approx(130 - spent["spent_s"])
    assert "## Time" in (exp / "final" / "report.md").read_text() and "time budget 2 min 10 s: spent" in r.stdout
    settings = json.loads((exp / "search.json").read_text())
    assert settings["time_budget"] == 130 and settings["budget"]["max_t_s"] > settings["budget"]["grace_s"] > 0


@pytest.mark.slow
def test_the_refit_of_a_budget_is_timed_to_its_deadline_and_shares_the_cpus(budgeted):
    """The final stage's refit under a budget on CPUs: the configs validation chose (an ensemble only beyond chance,
    McNemar), sharing every CPU, each a timed run over the time left on one report per pass, done to its schedule's
    end; the report says so. Its members' epochs shape the schedule as their trial's did."""
    from search.resources import Resources

    exp, _, r = budgeted
    plan = json.loads((exp / "final" / "plan.json").read_text())
    members = plan["members"]
    assert len(members) == plan["selection"]["chosen_k"] and "p_by_k" in plan["selection"], r.stdout[-3000:]
    cpus = Resources().refit_on_this_machine(len(members), "cpu")[0]
    assert cpus == max(1, (os.cpu_count() or 1) // len(members)) and f"on {cpus:g} CPU(s) each" in r.stdout
    trials = {t["trial_id"]: t for t in plan["candidates"]}
    for m in members:
        assert m["train"]["train_seconds"] > 0 and m["train"]["epoch_images"] == 0
        assert m["epochs"] == m["train"]["epochs"] == trials[m["source_trial"]]["config"]["epochs"]
    for d in (exp / "final" / "refit").glob("trial_*"):
        last = load_checkpoint(sorted(d.glob("checkpoint_*/checkpoint.pt"))[-1])
        assert last["metrics"]["schedule_done"] and last["config"]["train_seconds"] <= members[0]["train"][
            "train_seconds"] + 1e-6
    assert "each trained for" in (exp / "final" / "report.md").read_text()
    assert "refit of" in r.stdout and " each, " in r.stdout


@pytest.mark.slow
def test_every_trial_of_a_budgeted_search_is_listed_with_a_status_and_usable_checkpoints(budgeted):
    exp, *_ = budgeted
    trials = load_experiment(exp).trials
    listed = __import__("pandas").read_csv(exp / "trials.csv")
    assert sorted(listed["trial_id"].astype(str)) == sorted(d.name.removeprefix("trial_") for d in exp.glob("trial_*"))
    assert set(trials["status"]) <= {"finished", "stopped", "budget"}, trials["status"].tolist()
    for tid in trials[trials["status"] == "budget"]["trial_id"]:
        ckpts = sorted((exp / f"trial_{tid}").glob("checkpoint_*/checkpoint.pt"))
        assert ckpts and load_checkpoint(ckpts[-1])["epoch"] >= 1
    plan = json.loads((exp / "search.json").read_text())["budget"]
    for _, t in trials.iterrows():  # every trial trained in epochs of the planned size
        assert t["config/epoch_images"] == plan["epoch_images"]


@pytest.mark.slow
def test_resume_continues_with_the_budget_left(budgeted):
    exp, first, r = budgeted
    sessions = json.loads((exp / "budget.json").read_text())["sessions"]
    assert len(sessions) == 2 and all(s["seconds"] > 0 for s in sessions)
    left = 130 - sessions[0]["seconds"]
    line = next(x for x in r.stdout.splitlines() if x.startswith("time budget: "))
    shown = line.split("time budget: ")[1].split(" left")[0]
    assert budget.parse_duration(shown.replace(" min ", "m").replace(" s", "s").replace(" ", "")) <= left + 1


@pytest.mark.slow
def test_trials_at_the_deadline_end_there_with_their_checkpoints(digits_dir, tmp_path):
    """The search's deadline falls while trials train (long schedules, short epochs): they end at their next step,
    reported as cut by the deadline, listed with status 'budget' and a loadable checkpoint; no trial starts after."""
    space = write_space(tmp_path, 50, 400, 1, "  lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    script = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from search.space import load_search_spec
from search.tuner import run_search
from search.resources import Resources
from training.data import load_for_config
spec = load_search_spec({str(space)!r})
spec.fixed['epoch_images'] = 64
spec.fixed['train_seconds'] = 500.0  # (as search.run.apply_plan sets a budget's trials)
base = spec.trial_base()
data = load_for_config(base, {str(digits_dir)!r})
plan = {{'grace_s': 1.0, 'max_t_s': 500.0, 'search_s': 12.0, 'epoch_images': 64}}
out = run_search(spec, data, {str(tmp_path / 'results' / 'd')!r}, 'd', {str(tmp_path / 'results')!r}, 50,
                 res=Resources(concurrency=2), budget=plan, deadline=time.time() + 12)
print('DONE', out.done, out.samples, out.complete)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    done, samples, complete = r.stdout.split("DONE")[1].split()
    assert complete == "True" and int(done) == int(samples) < 50
    trials = load_experiment(tmp_path / "results" / "d").trials
    cut = trials[trials["status"] == "budget"]
    assert len(cut) >= 1, trials[["trial_id", "status", "epochs_run"]]
    for tid in cut["trial_id"]:
        folder = tmp_path / "results" / "d" / f"trial_{tid}"
        rows = [json.loads(x) for x in (folder / "result.json").read_text().splitlines() if x.strip()]
        assert rows[-1].get("cut_by_deadline") and json.loads((folder / "ended.json").read_text())["epoch"]
        assert load_checkpoint(sorted(folder.glob("checkpoint_*/checkpoint.pt"))[-1])["epoch"] == rows[-1]["epoch"]


def test_auto_precision_keeps_depthwise_models_in_fp32_on_the_cpu(monkeypatch):
    """benchmarks.precision: mobile_cnn's depthwise convolutions are 0.6x slower in bf16 on CPUs with native bf16,
    the other models 1.7-2.5x faster. `auto` follows the layer type; an explicit precision is always obeyed."""
    import torch

    from models import build_model
    from training import inference

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda n=native: n)
        for name in ("small_cnn", "vgg", "resnet", "mobile_cnn"):
            model = build_model(name, 10)
            want = native and name != "mobile_cnn"
            assert inference.use_bf16(cpu, "auto", model) is want, (name, native)
            assert inference.use_bf16(cpu, "bf16", model) and not inference.use_bf16(cpu, "fp32", model)


def test_the_budget_as_a_reader_sees_it(tmp_path):
    """budget.json as the dashboard reads it: spent counts on while the driver's heartbeat is fresh; a damaged or
    hostile file is no budget, never an exception."""
    now = 1_000_000.0
    path = tmp_path / ledger.BUDGET_FILE
    path.write_text(json.dumps({"budget_s": 600, "sessions": [{"started": now - 400, "seconds": 100},
                                                              {"started": now - 50, "seconds": 48}]}))
    b = ledger.read_budget(tmp_path, now=now)
    assert b["running"] and b["spent_s"] == pytest.approx(150) and b["left_s"] == pytest.approx(450)
    b = ledger.read_budget(tmp_path, now=now + 600)  # the heartbeat stopped: the session ended (or was killed)
    assert not b["running"] and b["spent_s"] == pytest.approx(148)
    for bad in ("{", "[]", '{"budget_s": "x", "sessions": []}', '{"budget_s": 600, "sessions": [{"seconds": -1}]}',
                '{"budget_s": 600, "sessions": [1]}', '{"budget_s": Infinity, "sessions": [{"seconds": 1}]}'):
        path.write_text(bad)
        assert ledger.read_budget(tmp_path, now=now) is None, bad
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.json")
    assert ledger.read_budget(tmp_path) is None


def test_a_ledger_counts_every_session_and_sets_a_damaged_record_aside(tmp_path):
    first = ledger.Ledger(tmp_path, 100.0, started=time.time() - 10)
    first.enter("search")
    first.close()
    second = ledger.Ledger(tmp_path, 100.0, started=time.time() - 5)
    assert second.spent_before == pytest.approx(10, abs=0.5) and second.left() == pytest.approx(85, abs=1)
    second.close()
    s = second.summary()
    assert s["sessions"] == 2 and set(s["phases"]) == {"startup", "search"}
    (tmp_path / ledger.BUDGET_FILE).write_text("{cut")
    third = ledger.Ledger(tmp_path, 100.0)
    assert third.earlier == [] and (tmp_path / "damaged" / ledger.BUDGET_FILE).read_text() == "{cut"
