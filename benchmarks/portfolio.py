"""Benchmark: which configurations a short CPU budget should train, and how to spend its cores.

    python -m benchmarks.portfolio --data-dir ../shared/emnist [--split bymerge] [--seconds 330]
                                   [--configs "model=small_cnn width=1.0; model=vgg width=1.0; ..."]

Each configuration (the default training config with the given keys) is trained as a timed run of --seconds
(training config train_seconds: its schedule spread over them), on one thread, two at a time, as a budgeted
search's trials run on a 2-core machine; then the first two configurations again with seed 1 (the same validation
split), and the best of them alone on every core for the same seconds. Printed: each run's validation accuracy
(and where a rung at a ninth or a third of the time would have seen it), the validation accuracy of every pair
averaged (an ensemble of two models that shared the cores) against the best on every core, and the test accuracy
of each run. Validation decides (search/budget.py's rung, the default space's `start:`,
search.resources.refit_share); the test split is only reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("model=small_cnn width=1.0; model=vgg width=1.0; model=vgg width=0.5; "
                   "model=resnet width=0.5; model=small_cnn width=0.5; model=vgg width=1.0 depth=1")

# One timed run in a process of its own (its thread count fixed before torch starts), on the search's split.
RUN = """
import json, sys, torch
from training.config import load_yaml, make_config
from training.data import load_for_config
from training.trainer import train
threads, seconds, out, split, data_dir, sets = sys.argv[1:]
torch.set_num_threads(int(threads))
base = {**load_yaml("configs/train.yaml"), "split": split, "hist_every": 0, "epoch_images": 20000,
        "train_seconds": float(seconds)}
data = load_for_config(make_config(base).to_dict(), data_dir)  # the seed-0 split, as every trial of a search
r = train({**base, **json.loads(sets)}, data, out_dir=out)
curve = [(h["run_seconds"], h["val_acc"]) for h in r.history if h.get("val_acc") is not None]
print(json.dumps({"val_acc": r.best_val_acc, "epochs": r.epochs_run, "checkpoint": r.checkpoint, "curve": curve}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from training.config import make_config, parse_set

    p = argparse.ArgumentParser(description="Timed runs of a few configurations, their pairs, one on every core.")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--split", default="bymerge")
    p.add_argument("--seconds", type=float, default=330.0)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="';'-separated, each space-separated key=value")
    p.add_argument("--out", type=Path, default=Path("/tmp/portfolio-bench"))
    a = p.parse_args(argv)
    try:
        a.configs = [parse_set(c.split()) for c in a.configs.split(";") if c.strip()]
        for c in a.configs:
            make_config({**c, "split": a.split})
    except ValueError as e:
        p.error(str(e))
    if not a.configs or a.seconds <= 0:
        p.error("--configs needs at least one configuration and --seconds must be > 0")
    return a


def _name(sets: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sets.items())


def _start(a, sets: dict, threads: int, folder: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", RUN, str(threads), str(a.seconds), str(folder), a.split,
                             str(a.data_dir), json.dumps(sets)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a timed run failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def _rungs(curve: list, seconds: float) -> str:
    """The run's validation accuracy at its first report past seconds/9 and seconds/3 (where a rung would judge it:
    search/budget.py)."""
    out = []
    for div in (9, 3):
        at = next(((t, v) for t, v in curve if t >= seconds / div), None)
        out.append(f"at {at[0]:.0f} s {at[1]:.4f}" if at else f"no report past {seconds / div:.0f} s")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.train import device_name
    from training.checkpoint import build_from_checkpoint, load_checkpoint
    from training.config import load_yaml, make_config
    from training.data import load_for_config, load_test
    from training.inference import predict_logits

    a = parse_args(argv)
    out = a.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    bf16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    cores = os.cpu_count() or 1
    print(f"device {device_name(torch.device('cpu'))}, native bf16: {bf16}; {a.split}; timed runs of "
          f"{a.seconds:.0f} s; runs in {out}", flush=True)
    seeded = [{**c, "seed": 1} for c in a.configs[:2]]  # (a second seed of the first two: a seed ensemble)
    runs = [(_name(c), c) for c in [*a.configs, *seeded]]
    results: dict[str, dict] = {}
    for i in range(0, len(runs), 2):  # two at a time, a thread each (as a budget's trials on 2 cores)
        batch = runs[i:i + 2]
        procs = [_start(a, sets, 1, out / f"run{i + j}") for j, (_, sets) in enumerate(batch)]
        for (name, _), proc in zip(batch, procs, strict=True):
            results[name] = _finish(proc)
            print(f"{name:40s} 1 thread : val {results[name]['val_acc']:.4f} ({results[name]['epochs']} reports); "
                  + _rungs(results[name]["curve"], a.seconds), flush=True)
    best_name, best = max(((n, s) for n, s in runs if "seed" not in s), key=lambda r: results[r[0]]["val_acc"])
    every = f"{best_name} on {cores} threads"
    results[every] = _finish(_start(a, best, cores, out / "every-core"))
    print(f"{every:40s}: val {results[every]['val_acc']:.4f}", flush=True)

    torch.set_num_threads(cores)
    base = {**load_yaml(REPO / "configs" / "train.yaml"), "split": a.split}
    data = load_for_config(make_config(base).to_dict(), a.data_dir)
    x_test, y_test, _ = load_test(a.split, a.data_dir)
    probs, test = {}, {}
    for name, r in results.items():
        model = build_from_checkpoint(load_checkpoint(r["checkpoint"]), torch.device("cpu"), where=r["checkpoint"])
        probs[name] = predict_logits(model, data.val_x, 1024, precision="fp32").softmax(1)
        test[name] = float((predict_logits(model, x_test, 1024, precision="fp32").argmax(1) == y_test)
                           .float().mean())
    print("\nvalidation (decides) and test (reported) accuracy of each run:")
    for name in results:
        print(f"  {name:40s} val {float((probs[name].argmax(1) == data.val_y).float().mean()):.4f}  "
              f"test {test[name]:.4f}")
    print(f"\npairs averaged (two models on a thread each) against {every}, validation:")
    singles = [n for n in results if n != every]
    for x, y in itertools.combinations(singles, 2):
        acc = float(((probs[x] + probs[y]).argmax(1) == data.val_y).float().mean())
        print(f"  {x} + {y}: {acc:.4f}")
    print(f"  {every}: {float((probs[every].argmax(1) == data.val_y).float().mean()):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
