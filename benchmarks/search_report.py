"""The figures of a timed search run, for benchmarks/gpu.sh: trial-epochs, summed trial throughput,
GPU utilisation, the search's own wall-clock, where its time went, and the final stage's test accuracies.

    python -m benchmarks.search_report EXP_DIR --log search.txt --wall 287 [--util gpu-util.txt]

--log is what `search/run.py` printed (its "data: SPLIT, N train / ..." line gives the training set
size), --wall the command's wall-clock in seconds, --util the output of
`nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -l 1`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from search.results import load_experiment


def budget(frames: list, wall: float, slots: int) -> list[str]:
    """Where a search's time went, from its trials' reported timings (the project's trainable):
    slot-seconds (wall-clock x trials at once) split into training, validation, checkpoint saves,
    start-up inside the trial (model, data on the device, restore, graph capture), reporting to
    Tune, and what is outside the trial functions (actor start, scheduling, idle slots)."""
    import pandas as pd

    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return ["budget: no trial reported"]
    df = pd.concat(frames, ignore_index=True)
    timed = ("epoch_seconds", "eval_seconds", "save_seconds", "setup_seconds", "capture_seconds", "recorded_wait_s")
    for col in timed:  # (a search from before a timing was reported has no column for it)
        if col not in df:
            df[col] = float("nan")
    total = {col: float(df[col].fillna(0).sum()) for col in timed}
    in_trials = sum(float(f["time_total_s"].iloc[-1]) for f in frames if "time_total_s" in f)
    training = df["epoch_seconds"].fillna(0) - df["eval_seconds"].fillna(0)  # (epoch_seconds includes validation)
    parts = {"training steps": float(training.sum()), "validation": total["eval_seconds"],
             "checkpoint saves": total["save_seconds"],
             "start-up in the trial": total["setup_seconds"] + total["recorded_wait_s"]}
    parts["reports to Tune, logs"] = max(0.0, in_trials - sum(parts.values()))
    slot_s = wall * slots
    parts["outside the trials (actor start, scheduling, idle)"] = max(0.0, slot_s - in_trials)
    lines = [f"budget: {wall:.1f} s x {slots} trials at once = {slot_s:.0f} slot-s: "
             + ", ".join(f"{k} {v:.1f} s ({100 * v / slot_s:.0f} %)" for k, v in parts.items())]
    starts, captures = df["setup_seconds"].dropna(), df["capture_seconds"].dropna()
    line = f"per trial: start-up {starts.mean():.2f} s" if len(starts) else "per trial: start-up not reported"
    line += f" (graph capture {captures.mean():.2f} s of it)" if len(captures) else " (no graph capture)"
    first, later = training[df["epoch"] == 1], training[df["epoch"] > 1]
    if len(first) and len(later):
        line += f"; first epoch's training {first.mean():.2f} s vs later ones' {later.mean():.2f} s (warm-up)"
    n = len(df)
    return lines + [line, f"{n} trial-epochs: training {parts['training steps'] / n:.2f} s, validation "
                          f"{total['eval_seconds'] / n:.3f} s, checkpoint save {total['save_seconds'] / n:.3f} s each"]


def report(exp_dir: Path, log: str, wall_seconds: float, util: str = "") -> list[str]:
    lines = []
    samples = [float(x) for x in util.split() if re.fullmatch(r"\d+(\.\d+)?", x)]
    if samples:
        lines.append(f"GPU utilisation during the search: mean {sum(samples) / len(samples):.0f} % "
                     f"over {len(samples)} s")
    exp = load_experiment(exp_dir)
    done = exp.trials.dropna(subset=["best_val_acc"])
    epochs = int(exp.trials["epochs_run"].sum())
    best = f"{done['best_val_acc'].max():.4f}" if len(done) else "none"
    lines.append(f"{len(exp.trials)} trials, {epochs} trial-epochs, best val_acc {best}")
    summary = json.loads((exp_dir / "summary.json").read_text())
    search_s = summary.get("search_wall_seconds")
    if search_s:
        lines.append(f"search alone (before its final stage): {search_s:.0f} s")
    found = re.search(r"^data: \S+, (\d+) train", log, re.MULTILINE)
    if found:
        # Over the search's own wall-clock: the final stage's refits are not trial-epochs.
        seconds, what = (search_s, "search wall-clock") if search_s else (wall_seconds, "command wall-clock")
        rate = epochs * int(found.group(1)) / seconds
        lines.append(f"summed trial throughput: {rate:,.0f} img/s (trial-epochs x training images / {what}; "
                     f"target >= 160k)")
    else:
        lines.append("summed trial throughput: unknown (no 'data: ... train' line in the search's output)")
    for key, r in (summary.get("final") or {}).get("test", {}).items():  # target: the delivered model >= 0.910
        lines.append(f"final stage, {key}: test acc {r['accuracy']:.4f} [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] "
                     f"({r['label']})")
    waits = [h["recorded_wait_s"].dropna().sum() for h in exp.histories.values() if "recorded_wait_s" in h]
    if waits:
        lines.append(f"trial start-up waiting for the experiment snapshot: {sum(waits):.1f} s in all, "
                     f"{max(waits):.1f} s at most")
    slots = re.search(r"^experiment \S+: .*, (\d+) at once", log, re.MULTILINE)
    if search_s and slots:
        lines += budget(list(exp.histories.values()), search_s, int(slots.group(1)))
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp_dir", type=Path)
    ap.add_argument("--log", type=Path, required=True, help="what search/run.py printed")
    ap.add_argument("--wall", type=float, required=True, help="the command's wall-clock, seconds")
    ap.add_argument("--util", type=Path, help="nvidia-smi utilisation samples, one per second")
    a = ap.parse_args(argv)
    util = a.util.read_text() if a.util is not None and a.util.is_file() else ""
    print("\n".join(report(a.exp_dir, a.log.read_text(), a.wall, util)))


if __name__ == "__main__":
    main()
