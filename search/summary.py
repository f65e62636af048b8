"""End of a search: evaluate the best trial's best checkpoint on the test split (only now),
write summary.json, trials.csv and best.pt, and print a short report."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from search.layout import BEST_FILE, FINAL_DIR, REPORT_FILE, SUMMARY_FILE, TRIALS_FILE, is_uri, read_sessions
from search.results import Experiment, load_experiment
from search.settings import saved_space
from training.checkpoint import load_checkpoint, save_checkpoint
from training.fileio import read_json, write_atomic
from training.metrics import format_pairs

TOP_N = 5


def write_best(src: Path, dst: Path) -> None:
    """best.pt for the predictor: weights, config, classes, epoch and metrics (no optimizer state)."""
    ckpt = load_checkpoint(src)
    keep = ("model", "config", "classes", "epoch", "split", "metrics")
    save_checkpoint(dst, {k: ckpt[k] for k in keep if k in ckpt})


def _config_of(exp: Experiment, trial_id: str) -> dict:
    row = exp.trials.set_index("trial_id").loc[trial_id]
    return {k.removeprefix("config/"): _plain(v) for k, v in row.items() if k.startswith("config/") and v == v}


def _sampled_names(exp_dir: Path):
    """config -> the names the search sampled for that trial (a conditional parameter only where
    its branch was chosen), from the space saved in search.json; None where that is unknown."""
    from search.space import DefineByRun, sampled_params

    spec, _, _ = saved_space(exp_dir)  # (the experiment's own copy; None when neither it nor the file is usable)
    if spec is None:
        return lambda config: None
    space = DefineByRun(spec)
    return lambda config: set(sampled_params(space, config) or ()) or None


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def finish_experiment(exp_dir: str | Path, data_dir=None, device: str = "auto") -> int:
    """Summarise a finished search: test accuracy of the best trial, summary.json, trials.csv, best.pt.
    The search's wall-clock is the sum of its driver sessions (a run and its resumes) in sessions.json."""
    from training.evaluate import evaluate_checkpoint

    if is_uri(exp_dir):
        print(f"results are in {exp_dir}; sync the experiment to local disk to summarise it "
              "(python -m search.summary <local experiment dir>)")
        return 0
    exp_dir = Path(exp_dir)
    exp = load_experiment(exp_dir)
    # The search is over: folders of trials a killed driver started but never recorded are not trials.
    trials = exp.trials[~exp.trials["trial_id"].isin(exp.orphans)]
    # whole or not at all: a driver killed while it writes them leaves no half file (--resume writes them again)
    write_atomic(exp_dir / TRIALS_FILE, lambda f: f.write(trials.to_csv(index=False).encode()))
    best_id = exp.best_trial
    if best_id is None:
        print("no trial produced a validation result; see the trials' error.txt files")
        return 1
    best_ckpt = exp.best_checkpoint(best_id)
    if best_ckpt is None:
        print(f"best trial {best_id} has no readable checkpoint")
        return 1
    write_best(best_ckpt, exp_dir / BEST_FILE)
    test = evaluate_checkpoint(exp_dir / BEST_FILE, data_dir, device)  # (at training.evaluate's one precision)
    per_class = sorted(test["per_class"], key=lambda r: r["f1"])
    best_row = trials.set_index("trial_id").loc[best_id]
    seconds, complete = read_sessions(exp_dir)
    wall_seconds = sum(seconds) if seconds else None
    summary = {
        "experiment": exp_dir.name,
        "best_trial": best_id,
        "config": _config_of(exp, best_id),
        "val_acc": float(best_row["best_val_acc"]),
        "test_acc": test["accuracy"],
        "test_ci95": test["ci95"],
        "test_n": test["n"],
        "test_precision": test["precision"],
        "checkpoint": str(exp_dir / BEST_FILE),
        "source_checkpoint": str(best_ckpt),
        "epochs_run": int(best_row["epochs_run"]),
        "per_class": test["per_class"],
        "most_confused": test["most_confused"],
        "trials": {s: int(n) for s, n in trials["status"].value_counts().items()},
        "search_wall_seconds": wall_seconds,
        "search_wall_complete": complete,
        "search_sessions": len(seconds),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_atomic(exp_dir / SUMMARY_FILE, lambda f: f.write(json.dumps(summary, indent=2).encode()))

    print(f"\n=== {exp_dir.name}: {len(trials)} trials ({', '.join(f'{n} {s}' for s, n in summary['trials'].items())})")
    top = trials.dropna(subset=["best_val_acc"]).sort_values("best_val_acc", ascending=False).head(TOP_N)
    # Show each trial's searched parameters (not the fixed settings, nor a conditional parameter
    # whose branch it did not take); without the space, what differs between trials.
    varying = {c.removeprefix("config/") for c in trials if c.startswith("config/") and trials[c].nunique() > 1}
    sampled = _sampled_names(exp_dir)
    for _, r in top.iterrows():
        cfg = _config_of(exp, r["trial_id"])
        shown = sampled(cfg) or varying
        brief = ", ".join(f"{k}={_value_text(v)}" for k, v in cfg.items() if k in shown)
        print(f"  {r['trial_id']}  val {r['best_val_acc']:.4f}  {int(r['epochs_run'])} ep  {r['status']:8s}  {brief}")
    print(f"best trial {best_id}: val acc {summary['val_acc']:.4f}, test acc {test['accuracy']:.4f} "
          f"({test['n']} test images, {test['precision']})")
    print("lowest F1:  " + ", ".join(f"{r['class']} {r['f1']:.2f}" for r in per_class[:5]))
    print("highest F1: " + ", ".join(f"{r['class']} {r['f1']:.2f}" for r in per_class[::-1][:5]))
    print(f"most confused: {format_pairs(test['most_confused'])}")
    if wall_seconds is not None:
        over = f" over {len(seconds)} sessions (the first run and its resumes)" if len(seconds) > 1 else ""
        missing = "" if complete else " (incomplete: the record of earlier sessions was damaged, see damaged/)"
        print(f"search wall-clock: {wall_seconds / 60:.1f} min{over}{missing}")
    print(f"files: {exp_dir / SUMMARY_FILE}, {exp_dir / TRIALS_FILE}, {exp_dir / BEST_FILE}")
    print(f"tensorboard --logdir {shlex.quote(str(exp_dir))} --host 127.0.0.1")
    if (Path(__file__).resolve().parents[1] / "dashboard" / "app.py").is_file():
        print(f"python -m dashboard --results {shlex.quote(str(exp_dir.parent))}")
    return 0


def _value_text(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Summarise a finished experiment: summary.json, trials.csv, best.pt.")
    p.add_argument("experiment", type=Path)
    p.add_argument("--data-dir", type=Path, default=None)
    a = p.parse_args()
    sys.exit(finish_experiment(a.experiment, a.data_dir))


def add_budget(exp_dir: str | Path, spending: dict) -> list[str]:
    """How the command's time was spent (search.ledger.Ledger.summary) into summary.json["budget"] and, where the
    final stage wrote one, a section of final/report.md; returns the lines to print."""
    from search.ledger import spending_lines

    exp_dir = Path(exp_dir)
    path = exp_dir / SUMMARY_FILE
    summary = read_json(path, max_bytes=64 * 2**20) if not path.is_symlink() else None
    lines = spending_lines(spending)
    if summary is not None:
        summary["budget"] = spending
        write_atomic(path, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    report = exp_dir / FINAL_DIR / REPORT_FILE
    if report.is_file() and not report.is_symlink():
        text = report.read_text().split("\n## Time\n")[0].rstrip("\n")
        write_atomic(report, lambda f: f.write((text + "\n\n## Time\n\n" + "\n".join(lines) + "\n").encode()))
    return lines
