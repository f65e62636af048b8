"""The final stage (search/final.py): ensemble chosen on validation, refit on the whole training
split as real Ray Tune trials, the delivered model file, the test report, and its resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from search.final import run_final
from search.final_settings import FinalError, FinalSettings
from search.layout import ray_statuses, trial_dirs
from search.refit import whole_training_split
from search.selection import choose_k
from tests.test_search import REPO, RUN, write_space
from training import ensemble
from training.checkpoint import CheckpointError, load_checkpoint, save_model
from training.data import load_test
from training.ensemble import Ensemble
from training.fileio import read_json_lines
from training.metrics import wilson_interval
from training.predict import Predictor

FINAL = [sys.executable, str(REPO / "search" / "final.py")]
ENV = {**os.environ, "RAY_ADDRESS": "local"}


def _run(cmd, env=ENV, **kw):
    return subprocess.run([*cmd], capture_output=True, text=True, cwd=REPO, env=env, timeout=600, **kw)


@pytest.fixture(scope="module")
def final_run(digits_dir, tmp_path_factory):
    """A 4-trial search without its final stage; then `search/final.py` with two refit seeds per
    chosen config, SIGKILLed while a refit trial that has reported an epoch (with its checkpoint)
    has epochs left (the failpoint "trial:mid-run" stops that trial's worker there, so the kill lands
    mid-refit for certain), and run again."""
    from tests.test_faults import _kill_and_wait, stopped_at

    tmp = tmp_path_factory.mktemp("final")
    space = write_space(tmp, samples=4, max_epochs=3, grace=3,
                        space="  lr: {loguniform: [1.0e-3, 1.0e-2]}\n  width: {uniform: [0.5, 1.5]}\n")
    storage = tmp / "results"
    r = _run([*RUN, "--config", space, "--data-dir", digits_dir, "--storage", storage, "--name", "exp",
              "--concurrency", "2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = storage / "exp"
    assert not (exp / "final").exists()  # --no-final (tests.test_search.RUN)
    args = ["--name", "exp", "--storage", storage, "--refit-seeds", "2", "--concurrency", "2"]
    marker = tmp / "stopped-mid-refit"
    proc = subprocess.Popen([*FINAL, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env={**ENV, "EMNIST_TUNE_STOP_AT": f"trial:mid-run={marker}"})
    try:
        stopped_at(marker, proc)
        at_kill = {"plan": (exp / "final" / "plan.json").read_text(),
                   "checkpoints": {f: (f.read_bytes(), load_checkpoint(f)["metrics"])
                                   for f in (exp / "final" / "refit").glob("trial_*/checkpoint_*/checkpoint.pt")}}
        # the killed driver's Ray processes (gcs, raylet, agents, workers) go with it (search/reaper.py)
        leftovers = _kill_and_wait(proc, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = proc.stdout.read()
    r = _run([*FINAL, *map(str, args)])
    return exp, not leftovers, first + f"\nleft behind: {leftovers}", r, at_kill


def _carrying(token_prefix: str) -> list[str]:
    """Processes whose environment carries a reaper token of the driver with that pid: '<pid> <name>'."""
    from search.reaper import TOKEN_VAR

    mark = f"{TOKEN_VAR}={token_prefix}".encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if any(e.startswith(mark) for e in f.read().split(b"\0")):
                        out.append(f"{d} {open(f'/proc/{d}/comm').read().strip()}")
            except OSError:
                continue
    return out


def _wait_gone(find, timeout: float) -> list:
    end = time.time() + timeout
    while (found := find()) and time.time() < end:
        time.sleep(0.5)
    return found


def _copy(exp, tmp_path):
    import shutil

    return shutil.copytree(exp, tmp_path / "results" / "exp", symlinks=True)


def _final(exp, *args):
    return _run([*FINAL, "--name", exp.name, "--storage", str(exp.parent), "--concurrency", "2", *map(str, args)])


def _one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_damaged_summary_is_set_aside_and_written_again(final_run, tmp_path):
    """Before: after `truncate -s 300 summary.json`, final.py exited 0 with a summary.json holding only "final"."""
    exp = _copy(final_run[0], tmp_path)
    whole = json.loads((exp / "summary.json").read_text())
    (exp / "summary.json").write_bytes((exp / "summary.json").read_bytes()[:300])
    r = _final(exp, "--refit-seeds", 2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "summary.json: damaged" in r.stdout
    assert (exp / "damaged" / "summary.json").stat().st_size == 300
    summary = json.loads((exp / "summary.json").read_text())
    for key in ("best_trial", "test_acc", "per_class", "most_confused", "trials", "val_acc"):
        assert summary[key] == whole[key], key
    assert summary["search_wall_seconds"] == pytest.approx(whole["search_wall_seconds"])  # from sessions.json
    assert summary["final"]["test"]["single"]["accuracy"] == summary["test_acc"]


@pytest.mark.slow
def test_a_damaged_plan_never_loops(final_run, tmp_path):
    """Before: a truncated plan.json was planned again with the new --refit-seeds 1 while Ray restored the old
    refit of 2 seeds, and every run ended 'interrupted during the refit' (exit 130) forever; a plan with a wrong
    field gave a TypeError or KeyError."""
    exp = _copy(final_run[0], tmp_path)
    plan_path = exp / "final" / "plan.json"
    good = plan_path.read_text()
    plan_path.write_text(good[: len(good) // 3])
    line = _one_line_error(_final(exp, "--refit-seeds", 1))
    assert "was started from another plan" in line and "seed(s) +0..1" in line
    assert (exp / "damaged" / "plan.json").is_file()
    r = _final(exp, "--refit-seeds", 2)  # the settings it was started with: planned again, the same, delivered
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(plan_path.read_text())["members"] == json.loads(good)["members"]
    for edit, message in ((lambda p: p.update(extra=1), "unknown key(s) extra"),
                          (lambda p: p.pop("selection"), "has no selection"),
                          (lambda p: p["selection"].update(chosen_k="two"), "selection.chosen_k is not a number"),
                          (lambda p: p["candidates"][0].update(checkpoint="../../../etc/passwd"),
                           "is not a path inside the experiment"),
                          (lambda p: p.update(members=[]), "members is not a list of refits")):
        plan = json.loads(good)
        edit(plan)
        plan_path.write_text(json.dumps(plan))
        line = _one_line_error(_final(exp, "--refit-seeds", 2))
        assert message in line and "plan.json" in line, line
        assert json.loads(plan_path.read_text()) == plan  # nothing changed


@pytest.mark.parametrize("planted", ["final", "damaged"])
@pytest.mark.slow
def test_a_planted_link_for_a_folder_of_the_experiment_is_refused(final_run, tmp_path, planted):
    """final/ or damaged/ as a symbolic link would lead the final stage's writes anywhere: one line, exit 2,
    nothing written where it points."""
    import shutil

    exp = _copy(final_run[0], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if planted == "final":
        shutil.rmtree(exp / "final")
    else:
        (exp / "summary.json").write_text("{")  # (to be set aside in damaged/)
    (exp / planted).symlink_to(elsewhere)
    line = _one_line_error(_final(exp, "--refit-seeds", 2))
    assert "is a symbolic link" in line
    assert not list(elsewhere.iterdir())


def test_the_continue_command_carries_the_final_settings(tmp_path):
    """Before, the printed command left out --ensemble-k, --refit-seeds ... and pasting it was refused."""
    import shlex

    from search.final import continue_command, parse_args
    from search.options import settings_from

    settings = FinalSettings(ensemble_k=2, refit_seeds=3, refit_epochs="full", tta="off", device="cpu")
    cmd = shlex.split(continue_command(tmp_path / "my results" / "e x", settings))
    assert cmd[:2] == ["python", "search/final.py"]
    back = settings_from(parse_args(cmd[2:]))
    assert back.planned() == settings.planned() and back.device == "cpu"
    assert parse_args(cmd[2:]).name == "e x" and parse_args(cmd[2:]).storage == str(tmp_path / "my results")


@pytest.mark.slow
def test_an_interrupted_delivery_leaves_the_model_and_its_report_together(final_run, tmp_path, monkeypatch, capsys):
    """Ctrl+C while the report is written: model.pt, report.md and summary.json stay as they were (before, model.pt
    was already new), the command to continue is printed (with its settings), no traceback. A model.pt that is not
    the one the report is about is told apart by its sha256 (the dashboard says so)."""
    import search.delivery as final_module  # (it writes the report: search.delivery.publish)
    from dashboard.final_summary import model_matches
    from search.final import parse_args
    from search.final import search_data as read_data
    from search.options import settings_from

    exp = _copy(final_run[0], tmp_path)
    files = {n: (exp / n).read_bytes() for n in ("summary.json", "final/model.pt", "final/report.md")}
    summary = json.loads(files["summary.json"])
    assert model_matches(exp / "final" / "model.pt", summary["final"]) is True

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(final_module, "write_report", interrupted)
    data, data_dir = read_data(exp)
    settings = settings_from(parse_args(["--name", "exp", "--refit-seeds", "2"]))
    assert run_final(exp, data, settings, data_dir) == 130
    out = capsys.readouterr().out
    assert "Continue with:" in out and "--refit-seeds=2" in out
    assert {n: (exp / n).read_bytes() for n in files} == files
    assert not list((exp / "final").glob(".model.pt*"))
    other = exp / "final" / "other.pt"
    other.write_bytes(files["final/model.pt"] + b"x")
    assert model_matches(other, summary["final"]) is False and model_matches(other, {}) is None


@pytest.mark.slow
def test_interrupted_final_stage_resumes_and_delivers(final_run):
    exp, gone, first, r, at_kill = final_run
    assert gone, "the killed final stage left processes behind:\n" + first[-2000:]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "continuing the interrupted refit" in r.stdout
    assert (exp / "final" / "plan.json").read_text() == at_kill["plan"]  # the plan was kept, not made again
    plan = json.loads(at_kill["plan"])
    k = plan["selection"]["chosen_k"]
    assert len(plan["members"]) == 2 * k
    refits = trial_dirs(exp / "final" / "refit")
    statuses = ray_statuses(exp / "final" / "refit")
    assert len(refits) == len(statuses) == 2 * k  # the killed driver left no extra trial
    assert {s["status"] for s in statuses.values()} == {"TERMINATED"}
    rows = {d: read_json_lines(d / "result.json") for d in refits}
    for d in refits:  # every planned epoch once, also in the trial that was killed mid-way
        member = json.loads((d / "params.json").read_text())["member"]
        assert [row["epoch"] for row in rows[d]] == list(range(1, member["epochs"] + 1)), (d.name, rows[d])
        assert member["train"]["early_stop_patience"] == 0
    # the epochs trained before the kill were continued from, not trained again: each checkpoint written
    # then is the same file now (where Ray kept it), and its epoch's row has the seconds measured then
    assert at_kill["checkpoints"], "no refit checkpoint when the driver was killed"
    for f, (content, metrics) in at_kill["checkpoints"].items():
        assert not f.exists() or f.read_bytes() == content, f
        row = next(row for row in rows[f.parent.parent] if row["epoch"] == metrics["epoch"])
        assert row["epoch_seconds"] == metrics["epoch_seconds"] and row["val_acc"] == metrics["val_acc"], (f, row)


@pytest.mark.slow
def test_refit_plan_follows_the_selection(final_run, digits_data):
    exp, *_ = final_run
    plan = json.loads((exp / "final" / "plan.json").read_text())
    sel = plan["selection"]
    by_k = {int(k): v for k, v in sel["val_acc_by_k"].items()}
    assert sel["chosen_k"] == min(k for k, v in by_k.items() if v == max(by_k.values()))
    assert sel["ensemble_pays"] == (by_k[sel["chosen_k"]] > by_k[1])
    tta = sel["tta"]  # test-time augmentation: used only where it beats the chosen model on validation
    assert tta["val_acc_without"] == by_k[sel["chosen_k"]] and tta["used"] == (tta["val_acc"] > by_k[sel["chosen_k"]])
    assert load_checkpoint(exp / "final" / "model.pt").get("tta", 1) == (7 if tta["used"] else 1)
    cands = plan["candidates"]
    assert [c["val_acc"] for c in cands] == sorted((c["val_acc"] for c in cands), reverse=True)
    chosen = {c["trial_id"]: c for c in cands[: sel["chosen_k"]]}
    assert {m["source_trial"] for m in plan["members"]} == set(chosen)
    for m in plan["members"]:
        src = chosen[m["source_trial"]]
        assert m["epochs"] == src["epoch"]  # --refit-epochs best: the epoch that was best in the trial
        assert m["train"]["seed"] == src["config"]["seed"] + m["seed_index"]
        assert {**m["train"], "seed": 0, "epochs": 0, "early_stop_patience": 0} == \
            {**src["config"], "seed": 0, "epochs": 0, "early_stop_patience": 0}


@pytest.mark.slow
def test_delivered_model_and_report(final_run, digits_dir):
    exp, *_ = final_run
    summary = json.loads((exp / "summary.json").read_text())
    final = summary["final"]
    assert summary["best_trial"] == final["test"]["single"]["trial_id"]
    path = exp / "final" / "model.pt"
    assert final["model"] == str(path)
    ckpt = torch.load(path, weights_only=True)  # plain tensors and containers only
    members = ckpt["members"]
    assert len(members) == final["refit"]["finished"] == len(final["refit"]["members"])
    # the delivered model is what Predictor loads from the experiment folder, and its test figure is real
    predictor = Predictor.from_checkpoint(exp)
    model = predictor.model.model if isinstance(predictor.model, ensemble.TestTimeAugment) else predictor.model
    assert isinstance(model, Ensemble) and len(model.members) == len(members)
    x, y, classes = load_test("digits", digits_dir)
    acc = int((predictor.probabilities(x).argmax(1) == y).sum()) / len(y)
    assert final["test"]["refit"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    for key in ("single", "refit"):
        r = final["test"][key]
        assert r["n"] == len(y) and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert len(r["per_class"]) == len(classes) and r["most_confused"]
    assert [t["trial_id"] for t in final["test_trials"]] == [c["trial_id"] for c in final["selection"]["candidates"]]
    report = (exp / "final" / "report.md").read_text()
    for needle in ("best single trial", "refit (delivered)", "95 % interval", "Selection on the validation split",
                   f"{final['test']['refit']['accuracy']:.4f}", "confused_pairs.png", "| class | precision"):
        assert needle in report, needle
    from PIL import Image

    with Image.open(exp / "final" / "confused_pairs.png") as im:
        assert im.width > 200 and im.height >= 28


@pytest.mark.slow
def test_the_records_read_back_what_the_stage_wrote(final_run):
    """final/plan.json and summary.json's "final", as the final stage wrote them, are whole records (search.plan,
    search.final_report): their readers accept them and give back the same JSON."""
    from search.final_report import FinalReport
    from search.plan import read_plan

    exp, *_ = final_run
    plan = read_plan(exp / "final" / "plan.json", exp)
    assert plan.to_json() == json.loads((exp / "final" / "plan.json").read_text())
    final = json.loads((exp / "summary.json").read_text())["final"]
    report = FinalReport.from_json(final, str(exp / "summary.json"))
    assert report.to_json() == final and report.delivered_kind == "refit"


@pytest.mark.slow
def test_no_finished_refit_delivers_the_search_model(final_run, tmp_path):
    """Every refit trial fails for real (a transient error injected after its first epoch, each time: Ray retries
    it twice, then it ends in error): the search's own model that validation chose is delivered, the weights of
    its checkpoints unchanged, and the report says no refit finished."""
    import shutil

    exp = _copy(final_run[0], tmp_path)
    shutil.rmtree(exp / "final")
    failures = tmp_path / "refit-failures"
    r = _run([*FINAL, "--name", "exp", "--storage", str(exp.parent), "--refit-seeds", "1", "--concurrency", "2"],
             env={**ENV, "EMNIST_TUNE_FAULT_ONCE": f"{failures}:1:" + ",".join(["3"] * 16)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    plan = json.loads((exp / "final" / "plan.json").read_text())
    chosen = plan["candidates"][: plan["selection"]["chosen_k"]]
    refits = ray_statuses(exp / "final" / "refit")
    assert len(refits) == len(plan["members"]) == len(chosen)
    assert {s["status"] for s in refits.values()} == {"ERROR"}, refits
    failed = failures.read_text().split()  # one line per failure, naming the trial: 1 + 2 retries each
    assert sorted(failed.count(t) for t in set(failed)) == [3] * len(refits), failed
    final = json.loads((exp / "summary.json").read_text())["final"]
    from search.final_report import FinalReport

    assert FinalReport.from_json(final).to_json() == final  # (a whole record also without a refit)
    assert "no refit finished" in final["delivered"] and "refit" not in final["test"]
    assert final["refit"]["finished"] == 0 and final["delivered_kind"] == ("ensemble" if len(chosen) > 1 else "single")
    ckpt = load_checkpoint(exp / "final" / "model.pt")
    members = ckpt.get("members", [ckpt])
    assert len(members) == len(chosen)
    for member, c in zip(members, chosen, strict=True):  # each member is that search checkpoint's weights
        source = load_checkpoint(exp / c["checkpoint"])["model"]
        assert source.keys() == member["model"].keys()
        assert all(torch.equal(v, source[k]) for k, v in member["model"].items()), c["trial_id"]
    report = (exp / "final" / "report.md").read_text()
    assert "No refit finished: delivered" in report and "no refit finished" in report
    assert f"{final['delivered_test']['accuracy']:.4f}" in report
    if len(chosen) == 1:
        assert final["delivered_test"]["accuracy"] == final["test"]["single"]["accuracy"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.slow
def test_one_model_has_one_test_accuracy_at_either_precision(final_run, digits_dir, tmp_path, monkeypatch, precision):
    """The search's summary and the final stage's report give the best trial one test accuracy: the final stage
    reuses the summary's measurement, and every test figure uses the precision the summary recorded. Forced
    both ways, so a CPU without native bf16 runs the bf16 path too (bf16 autocast works on any CPU, slowly), and
    on a copy of the experiment in another folder (the plan's checkpoint paths are relative to it)."""
    import shutil

    from search.final import deliver_and_report
    from search.plan import read_plan
    from search.summary import finish_experiment
    from training.checkpoint import build_from_checkpoint
    from training.evaluate import class_probs, evaluate_checkpoint

    exp, *_ = final_run
    copy = shutil.copytree(exp, tmp_path / "moved" / "exp", symlinks=True)
    (copy / "summary.json").unlink()
    monkeypatch.setenv("EMNIST_TEST_PRECISION", precision)
    assert finish_experiment(copy, digits_dir, device="cpu") == 0
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["test_precision"] == precision
    direct = evaluate_checkpoint(copy / "best.pt", digits_dir, "cpu", precision=precision)
    assert summary["test_acc"] == direct["accuracy"] and summary["per_class"] == direct["per_class"]
    # the precision is real: bf16 and fp32 give other probabilities for the same model and images
    x, y, _ = load_test("digits", digits_dir)
    model = build_from_checkpoint(load_checkpoint(copy / "best.pt"))
    p32, p16 = (class_probs(model, x, torch.device("cpu"), p) for p in ("fp32", "bf16"))
    assert not torch.equal(p32, p16) and torch.allclose(p32, p16, atol=0.1)

    monkeypatch.setenv("EMNIST_TEST_PRECISION", "fp32" if precision == "bf16" else "bf16")  # the recorded one wins
    plan = read_plan(copy / "final" / "plan.json")
    final, staged = deliver_and_report(copy, copy / "final", plan, digits_dir, torch.device("cpu"), summary)
    final, plan = final.to_json(), plan.to_json()  # (the records as summary.json and plan.json hold them)
    assert final["test_precision"] == precision
    assert final["test"]["single"]["accuracy"] == summary["test_acc"] == final["test_trials"][0]["accuracy"]
    assert final["test"]["single"]["per_class"] == summary["per_class"]
    assert {r["precision"] for r in final["test"].values()} == {precision}
    delivered = build_from_checkpoint(load_checkpoint(staged))
    acc = int((class_probs(delivered, x, torch.device("cpu"), precision).argmax(1) == y).sum()) / len(y)
    assert final["test"]["refit"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert str(copy) in str(staged) and str(exp) not in json.dumps(plan)  # the copy's own checkpoints


@pytest.mark.slow
def test_final_stage_settings_are_kept(final_run, digits_data, capsys):
    exp, *_ = final_run
    with pytest.raises(FinalError, match="--refit-seeds 2"):
        run_final(exp, digits_data, FinalSettings(refit_seeds=1))
    from search.final import main

    for args, message in ((["--name", "nope"], "no experiment at"), (["--name", "exp", "--ensemble-k", "0"],
                                                                     "--ensemble-k must be")):
        assert main([*args, "--storage", str(exp.parent)]) == 2
        assert message in capsys.readouterr().err


def test_choose_k_needs_a_real_gain():
    y = torch.tensor([0, 1, 2, 0])
    eye = torch.eye(3)
    a = eye[[0, 1, 1, 0]] * 0.6 + 0.1  # 3/4 right
    b = eye[[0, 2, 2, 0]] * 0.9 + 0.03  # 3/4 right, other mistake; a+b: still 3/4
    c = eye[[1, 1, 2, 0]] * 0.9 + 0.03  # with a and b: the third image goes right
    k, by_k, p_by_k = choose_k([a, b, c], y)
    assert by_k == {1: 0.75, 2: 0.75, 3: 1.0} and k == 3
    k, by_k, _ = choose_k([a, b], y)  # a tie is no gain: the single model is kept
    assert k == 1
    # with `significant` (a budget's refit on CPUs) one image more out of four is chance, not a gain
    assert p_by_k[1] == 1.0 and p_by_k[3] == 1.0  # (one discordant image: p = 2 * 1/2)
    assert choose_k([a, b, c], y, significant=True)[0] == 1


def test_an_ensemble_under_a_cpu_budget_must_beat_one_model_beyond_chance():
    """McNemar's exact test on the images exactly one of the two gets right: 60 against 40 of 100 discordant is
    p = 0.057 (kept single), 62 against 38 p = 0.021 (the ensemble)."""
    from search.selection import mcnemar_p

    def right(n_both, n_a, n_b, n_none):
        a = torch.tensor([True] * n_both + [True] * n_a + [False] * n_b + [False] * n_none)
        b = torch.tensor([True] * n_both + [False] * n_a + [True] * n_b + [False] * n_none)
        return a, b

    assert mcnemar_p(*right(800, 40, 60, 100)) == pytest.approx(0.0569, abs=1e-4)
    assert mcnemar_p(*right(800, 38, 62, 100)) == pytest.approx(0.0210, abs=1e-4)
    assert mcnemar_p(*right(900, 0, 0, 100)) == 1.0 and mcnemar_p(*right(0, 5, 5, 0)) == 1.0
    y = torch.zeros(1000, dtype=torch.long)
    for ensemble_only, single_only, want in ((62, 38, 2), (60, 40, 1)):
        # 800 both right; the single model's own (the ensemble turns them wrong); the ensemble's own; both wrong
        none = 200 - single_only - ensemble_only
        rows = [([1.0, 0.0], [1.0, 0.0])] * 800 + [([0.6, 0.4], [0.0, 1.0])] * single_only \
            + [([0.4, 0.6], [1.0, 0.0])] * ensemble_only + [([0.0, 1.0], [0.0, 1.0])] * none
        single, other = (torch.tensor([r[i] for r in rows]) for i in (0, 1))
        k, by_k, p_by_k = choose_k([single, other], y, significant=True)
        assert by_k[2] > by_k[1] and k == want, (by_k, p_by_k)
        assert choose_k([single, other], y)[0] == 2  # (without the test, any gain is taken)


def test_wilson_interval():
    lo, hi = wilson_interval(90, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.8256, 0.9448)  # textbook values
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_whole_training_split(digits_data):
    full = whole_training_split(digits_data)
    assert len(full.train_x) == len(digits_data.train_x) + len(digits_data.val_x)
    assert torch.equal(full.train_x[len(digits_data.train_x):], digits_data.val_x)


def _members(n: int) -> list[dict]:
    from models import build_model

    out = []
    for seed, name in zip(range(n), ("small_cnn", "mobile_cnn", "small_cnn"), strict=False):
        torch.manual_seed(seed)
        out.append({"model": build_model(name, 10).state_dict(), "config": {"model": name, "split": "digits"},
                    "epoch": 1})
    return out


def test_ensemble_file_round_trip(tmp_path):
    path = save_model(tmp_path / "m.pt", _members(2), list("0123456789"), "digits", {"delivered": "test"})
    model = Predictor.from_checkpoint(path).model
    x = torch.randn(5, 1, 28, 28)
    want = torch.stack([m(x).softmax(1) for m in model.members]).mean(0)
    assert torch.allclose(model(x).softmax(1), want, atol=1e-6)
    single = save_model(tmp_path / "s.pt", _members(1), list("0123456789"), "digits")
    assert "members" not in torch.load(single, weights_only=True)


class Payload:
    """Unpickled, it creates the file at `marker` (open(marker, "w")): proof that the pickled code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_ensemble_file_refuses_pickled_and_damaged_members(tmp_path):
    members = _members(2)
    path = save_model(tmp_path / "m.pt", members, list("0123456789"), "digits")
    ckpt = torch.load(path, weights_only=True)
    ran = tmp_path / "pickled-code-ran"
    ckpt["members"][1]["config"] = Payload(ran)
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        Predictor.from_checkpoint(tmp_path / "evil.pt")
    assert not ran.exists(), "the pickled payload ran"
    torch.load(tmp_path / "evil.pt", weights_only=False)  # (the payload is real: an unsafe load runs it)
    assert ran.exists()
    for damage, message in (([], "not a list of ensemble members"), ([{"model": {}}], "member 0 is not a checkpoint"),
                            ([{**members[0], "model": {"w": 1}}], "member 0: 'model'")):
        torch.save({**torch.load(path, weights_only=True), "members": damage}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / "bad.pt")
    other = {**members[1], "config": {"model": "vgg", "split": "digits"}}  # weights of another architecture
    save_model(tmp_path / "mixed.pt", [members[0], other], list("0123456789"), "digits")
    with pytest.raises(CheckpointError, match=r"member 1\) does not fit"):
        Predictor.from_checkpoint(tmp_path / "mixed.pt")


def test_test_time_augmentation_file(tmp_path, digits_data):
    from training.inference import predict_probs

    path = save_model(tmp_path / "m.pt", _members(1), list("0123456789"), "digits", tta=7)
    predictor = Predictor.from_checkpoint(path)
    assert isinstance(predictor.model, ensemble.TestTimeAugment)
    x = digits_data.val_x[:32]
    # the module (what is delivered and exported) is the trainer's TTA, up to the latter's uint8 rounding
    want = predict_probs(predictor.model.model, x, precision="fp32", tta=7)
    assert torch.allclose(predictor.probabilities(x), want, atol=1e-4)
    for bad in (0, 8, True, 2.5, "7"):
        torch.save({**torch.load(path, weights_only=True), "tta": bad}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match="'tta' is not a number of views"):
            load_checkpoint(tmp_path / "bad.pt")


def test_predictor_folder_defaults(tmp_path):
    from training.predict import resolve_model

    with pytest.raises(CheckpointError, match="holds no model"):
        resolve_model(tmp_path)
    save_model(tmp_path / "best.pt", _members(1), list("0123456789"), "digits")
    assert resolve_model(tmp_path) == tmp_path / "best.pt"
    save_model(tmp_path / "final" / "model.pt", _members(2), list("0123456789"), "digits")
    assert resolve_model(tmp_path) == tmp_path / "final" / "model.pt"
    assert resolve_model(tmp_path / "best.pt") == tmp_path / "best.pt"
