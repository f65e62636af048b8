"""The benchmark scripts run, print what they measure, and compare like with like."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_tutorial_baseline_puts_the_model_on_the_trial_device():
    """benchmarks.search's baseline moves its model (and batches) to the trial's device, as the Ray Tune
    tutorial does; it once trained on the CPU on the GPU machine, which made any ratio meaningless."""
    from benchmarks.search import tutorial_model
    from training.config import make_config

    model, device = tutorial_model(make_config({"split": "digits"}), 10)
    assert {p.device.type for p in model.parameters()} == {device.type}
    if not torch.cuda.is_available():
        pytest.skip("no CUDA here: the baseline's device is the CPU, which says nothing (runs on the GPU machine)")
    assert device.type == "cuda"


@pytest.mark.slow
def test_search_bench_runs_both_trainables(digits_dir):
    r = subprocess.run([sys.executable, "-m", "benchmarks.search", "--data-dir", str(digits_dir), "--samples", "2",
                        "--max-epochs", "1", "--limit", "300", "--workers", "0", "--split", "digits"],
                       capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "device: " in r.stdout and "project   trainable" in r.stdout and "tutorial  trainable" in r.stdout
    assert "ratio tutorial/project" in r.stdout
    # the project's time budget: every part measured, the parts adding up to the slot-seconds
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("budget:"))
    slot_s = float(line.split(" = ")[1].split(" slot-s")[0])
    parts = [float(x) for x in re.findall(r" (\d+\.\d) s \(\d+ %\)", line)]
    assert len(parts) == 6 and parts[0] > 0 and parts[3] > 0  # training steps, start-up
    assert sum(parts) == pytest.approx(slot_s, abs=1.5)
    assert "per trial: start-up" in r.stdout and "trial-epochs: training" in r.stdout


def test_concurrent_trainers_bench_prints_summed_throughput():
    """benchmarks.concurrent: N trainer processes at once, their summed images/s (CPU here, tiny)."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.concurrent", "--procs", "1,2", "--synthetic", "600",
                        "--split", "digits", "--epochs", "2", "--device", "cpu", "--set", "batch_size=64",
                        "--set", "width=0.5"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if "trainer(s)" in ln]
    assert r.stdout.startswith("device: CPU") and len(lines) == 2, r.stdout
    summed = [float(ln.split("img/s each,")[1].split()[0]) for ln in lines]
    assert all(s > 0 for s in summed)
    bad = subprocess.run([sys.executable, "-m", "benchmarks.concurrent", "--procs", "two"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "--procs must be comma-separated integers" in bad.stderr
    # A trainer that fails (here: an unknown model) ends the benchmark with its error, not a wait for ever.
    failed = subprocess.run([sys.executable, "-m", "benchmarks.concurrent", "--procs", "2", "--synthetic", "200",
                             "--split", "digits", "--device", "cpu", "--set", "model=no_such_net"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert failed.returncode == 1 and "of 2 trainer processes failed" in failed.stderr, failed.stderr[-3000:]
    assert "no_such_net" in failed.stderr


@pytest.mark.slow
def test_eval_bench_prints_each_batch_size_and_the_default():
    r = subprocess.run([sys.executable, "-m", "benchmarks.eval", "--limit", "300", "--repeats", "1", "--models",
                        "small_cnn", "--batch-sizes", "256,64", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "device: cpu" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("small_cnn"))
    for size in (1024, 256, 64):  # 1024 uncapped is always run: the baseline of the default
        assert re.search(rf"bs {size} +\d+/s", line), line
    assert re.search(r"project default \(eval_batch_size 1024 -> 128 on cpu\): \d+/s vs 1024 uncapped \d+/s: "
                     r"[\d.]+x", r.stdout), r.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.eval", "--models", "no_such_net"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "unknown model(s) no_such_net" in bad.stderr


def test_search_report_of_the_gpu_script(tiny_search, tmp_path):
    """benchmarks/gpu.sh's figures of a timed search, on the session's tiny search (generated digits; no real
    data needed): trial-epochs from the experiment, throughput over the search's own seconds (not its final
    stage), the final test accuracies."""
    import json
    import re

    from benchmarks.search_report import report
    from search.results import load_experiment

    root, r = tiny_search
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp_dir = root / "tiny"
    lines = report(exp_dir, r.stdout, wall_seconds=1e9, util="41\n63\n0\n[N/A]\n")
    text = "\n".join(lines)
    epochs = int(load_experiment(exp_dir).trials["epochs_run"].sum())
    assert f"4 trials, {epochs} trial-epochs" in text
    assert "GPU utilisation during the search: mean 35 % over 3 s" in text
    summary = json.loads((exp_dir / "summary.json").read_text())
    train_n = int(re.search(r"^data: \S+, (\d+) train", r.stdout, re.MULTILINE).group(1))
    rate = int(re.search(r"summed trial throughput: ([\d,]+) img/s", text).group(1).replace(",", ""))
    assert rate == pytest.approx(epochs * train_n / summary["search_wall_seconds"], abs=1)  # not the 1e9 s given
    assert text.count("final stage, ") == 3 and re.search(r"final stage, refit: test acc [01]\.\d", text)
    # where the search's time went: over its own seconds and the trials it ran at once
    at_once = int(re.search(r"^experiment tiny: .*, (\d+) at once", r.stdout, re.MULTILINE).group(1))
    assert f"budget: {summary['search_wall_seconds']:.1f} s x {at_once} trials at once" in text
    assert re.search(r"per trial: start-up \d+\.\d\d s", text) and re.search(r"checkpoint save \d+\.\d{3} s each", text)


@pytest.mark.slow
def test_budget_bench_measures_the_floor_and_the_estimate(digits_dir, tmp_path):
    """benchmarks.budget on tiny data: (b) the default config alone as a timed run, and a search without a budget
    run to its end against the estimate it printed first; each a row with its test accuracy and wall-clock."""
    from tests.test_search import write_space

    space = write_space(tmp_path, samples=2, max_epochs=1, grace=1, space="  lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    r = subprocess.run([sys.executable, "-m", "benchmarks.budget", "--budget", "40s", "--data-dir", str(digits_dir),
                        "--split", "digits", "--samples", "2", "--config", str(space), "--variants", "b,estimate",
                        "--storage", str(tmp_path / "bench")], capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "native bf16:" in r.stdout and "budget 40s (40 s)" in r.stdout
    rows = {ln.split(" | ")[0]: ln for ln in r.stdout.splitlines() if ln.startswith("| (")}
    acc = r"[01]\.\d{4} \[[01]\.\d{4}, [01]\.\d{4}\]"  # (tiny data: 1.0000 happens)
    assert re.search(rf"default config alone, 10 s of training \(\d+ threads\) \| {acc} \| 1 \|", rows["| (b)"]), rows
    assert re.search(r"no budget, 2 samples, run to the end \| [01]\.\d{4} .* min, estimated .* before it started "
                     r"\([+-]\d+ %\) \|$", rows["| (estimate)"]), rows
    bad = subprocess.run([sys.executable, "-m", "benchmarks.budget", "--data-dir", "x", "--variants", "a,z"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "--variants takes" in bad.stderr


@pytest.mark.slow
def test_portfolio_bench_prints_runs_pairs_and_every_core(digits_dir, tmp_path):
    """benchmarks.portfolio on tiny data: each configuration's timed run, a second seed of the first two, every pair
    averaged on validation against the best on every core, test reported."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.portfolio", "--data-dir", str(digits_dir), "--split",
                        "digits", "--seconds", "1", "--configs", "width=0.5; width=1.0 lr=0.003", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("width=0.5", "width=1.0 lr=0.003", "width=0.5 seed=1", "width=1.0 lr=0.003 seed=1"):
        assert re.search(rf"^  {re.escape(name)} +val 0\.\d{{4}}  test [01]\.\d{{4}}$", r.stdout, re.M), r.stdout
    assert len(re.findall(r"^  .+ \+ .+: [01]\.\d{4}$", r.stdout, re.M)) == 6  # 4 runs: 6 pairs
    assert re.search(r"on \d+ threads: [01]\.\d{4}$", r.stdout, re.M), r.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.portfolio", "--data-dir", "x", "--configs", "model=nope"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "model must be one of" in bad.stderr


@pytest.mark.slow
def test_precision_bench_prints_each_precision_and_compile_seconds():
    """benchmarks.precision: bf16 against fp32 per model with what `auto` picks; --compile: torch.compile's
    seconds, the compiled step against the eager one, and when it would pay for itself."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.precision", "--models", "small_cnn", "--steps", "2",
                        "--repeats", "1", "--batch", "32"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"^small_cnn +[\d,]+ +[\d,]+ +[\d.]+x  (bf16|fp32)$", r.stdout, re.M), r.stdout
    c = subprocess.run([sys.executable, "-m", "benchmarks.precision", "--models", "small_cnn", "--steps", "2",
                        "--repeats", "1", "--batch", "32", "--compile"], capture_output=True, text=True, timeout=900,
                       cwd=REPO)
    assert c.returncode == 0, c.stdout[-2000:] + c.stderr[-2000:]
    assert re.search(r"^small_cnn +[\d.]+ +[\d,]+ +[\d,]+ +[\d.]+x  (\d+ s|never)$", c.stdout, re.M), c.stdout
