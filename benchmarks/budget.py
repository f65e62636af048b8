"""Benchmark: what a time budget buys on this machine, side by side in one run, and how well it is kept.

    python -m benchmarks.budget --budget 30m --data-dir ../shared/emnist [--split bymerge] [--samples 50]
                                [--variants a,b,c] [--config configs/search/default.yaml] [--storage /tmp/bb]
    python -m benchmarks.budget --budget 5m --config configs/search/smoke.yaml --variants a,sigint,sigkill ...
    python -m benchmarks.budget --variants estimate --config configs/search/smoke.yaml --samples 12 ...

  (a) this project: `search/run.py --samples N --time-budget B` (search, refit, ensemble, TTA, report);
  (b) the floor a search must beat: the default training config (configs/train.yaml) trained alone, on the
      whole machine, for the same wall-clock (a timed run: its schedule spread over the budget less its start-up
      and test evaluation);
  (c) what a Ray Tune user gets: the search without a budget (epoch rungs, the space's own ASHA, the default
      config first and no portfolio), cut off by Ray's own `TuneConfig(time_budget_s=B)`, then the best trial's
      best checkpoint on the test split;
  sigint, sigkill: (a) interrupted (Ctrl+C, or killed outright) at --cut of the budget, then `--resume`d as the
      first run printed (sigint) or with its name (sigkill): both commands' wall-clock against the budget, and the
      restart's overhead (what the two took beyond the budget);
  estimate: the search without a budget, run to its end: the estimate it printed before its first trial against
      its measured wall-clock.

Each is measured as the delivered model's accuracy on the test split with its 95 % Wilson interval, the trials it
ran and its wall-clock from the command's start to its end. They run one after the other on the same machine
(the same data, the same budget), and the machine, its CPU and whether it has native bf16 are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("a", "b", "c", "sigint", "sigkill", "estimate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from search.budget import parse_duration
    from training.config import ConfigError

    p = argparse.ArgumentParser(description="Test accuracy a time budget buys: project vs default config vs Ray.")
    p.add_argument("--budget", default="30m", help="e.g. 5m, 10m, 30m")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--split", default="bymerge")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "search" / "default.yaml",
                   help="search space of (a), (c), sigint, sigkill and estimate")
    p.add_argument("--variants", default="a,b,c", help=",".join(VARIANTS))
    p.add_argument("--cut", type=float, default=0.5, help="sigint/sigkill: the interruption, as a share of the budget")
    p.add_argument("--storage", type=Path, default=Path("/tmp/budget-bench"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="(b): threads of the lone training run")
    a = p.parse_args(argv)
    try:
        a.budget_s = parse_duration(a.budget)
    except ConfigError as e:
        p.error(str(e))
    a.variants = a.variants.split(",")
    if any(v not in VARIANTS for v in a.variants):
        p.error(f"--variants takes {','.join(VARIANTS)}, got {a.variants}")
    if not 0 < a.cut < 1:
        p.error(f"--cut must be between 0 and 1, got {a.cut}")
    return a


def wilson(acc: float, n: int) -> tuple[float, float]:
    from training.metrics import wilson_interval

    return wilson_interval(round(acc * n), n)


def _env() -> dict:
    return {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}


def _run(cmd: list, log: Path, timeout: float, **env) -> tuple[int, float]:
    t0 = time.time()
    with log.open("w") as f:
        try:
            rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**_env(), **env}, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - t0


def _search_cmd(a, out: Path, name: str) -> list:
    return [sys.executable, "search/run.py", "--samples", a.samples, "--time-budget", a.budget, "--config", a.config,
            "--data-dir", a.data_dir, "--split", a.split, "--storage", out, "--name", name]


def _delivered(out: Path, name: str, rc: int) -> dict:
    path = out / name / "summary.json"
    summary = json.loads(path.read_text()) if rc == 0 and path.is_file() else {}
    final = summary.get("final") or {}
    test = final.get("delivered_test") or {}
    return {"test_acc": test.get("accuracy"), "n": test.get("n"), "delivered": final.get("delivered"),
            "trials": sum((summary.get("trials") or {}).values()), "spent": (summary.get("budget") or {})}


def variant_a(a, out: Path) -> dict:
    rc, wall = _run(_search_cmd(a, out, "a"), out / "a.log", a.budget_s * 2 + 600)
    return {"variant": "a", "what": "this project, --time-budget", "rc": rc, "wall_s": wall, **_delivered(out, "a", rc)}


def _interrupted(a, out: Path, how: str) -> dict:
    """(a) with an interruption at `cut` of the budget, then --resume: both commands' wall-clock."""
    name = how
    log = (out / f"{name}.log").open("w")
    t0 = time.time()
    proc = subprocess.Popen([str(c) for c in _search_cmd(a, out, name)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, env=_env(), start_new_session=True)
    cut_at = t0 + a.cut * a.budget_s
    while time.time() < cut_at and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is None:
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
        else:  # the driver and everything it started, outright (a machine that lost power keeps nothing either)
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = time.time() - t0
    log.close()
    text = (out / f"{name}.log").read_text()
    if how == "sigint" and "Continue with:\n" in text:
        cmd = shlex.split(text.split("Continue with:\n")[1].splitlines()[0])
        cmd = [sys.executable, *cmd[1:]]
    else:
        cmd = [sys.executable, "search/run.py", "--name", name, "--storage", out, "--resume"]
    time.sleep(3 if how == "sigkill" else 0)  # (the reaper's grace: the killed driver's Ray is gone)
    rc, second = _run(cmd, out / f"{name}-resume.log", a.budget_s * 2 + 600)
    d = _delivered(out, name, rc)
    return {"variant": how, "what": f"(a) interrupted by {how.upper()} at {a.cut:.0%} of the budget, then --resume",
            "rc": rc, "wall_s": first + second, "first_s": first, "resume_s": second,
            "overhead_s": first + second - a.budget_s, **d}


def variant_sigint(a, out: Path) -> dict:
    return _interrupted(a, out, "sigint")


def variant_sigkill(a, out: Path) -> dict:
    return _interrupted(a, out, "sigkill")


def variant_b(a, out: Path) -> dict:
    """The default config alone, a timed run over the budget less its start-up and test evaluation (measured on
    the 2-core machine: ~25 s)."""
    seconds = max(10.0, a.budget_s - 30.0)
    rc, wall = _run([sys.executable, "training/train.py", "--config", "configs/train.yaml", "--data-dir", a.data_dir,
                     "--split", a.split, "--out", out / "b", "--json", "--set", f"train_seconds={seconds:.0f}",
                     "--set", "hist_every=0"], out / "b.log", a.budget_s * 3 + 600, OMP_NUM_THREADS=str(a.threads))
    last = (out / "b.log").read_text().strip().splitlines()[-1] if rc == 0 else "{}"
    result = json.loads(last) if last.startswith("{") else {}
    return {"variant": "b", "what": f"default config alone, {seconds:.0f} s of training ({a.threads} threads)",
            "rc": rc, "wall_s": wall, "test_acc": result.get("test_acc"), "n": _test_n(a), "trials": 1}


DRIVER_C = """
import json, sys, time
from pathlib import Path
from search.space import load_search_spec
from search.resources import Resources
from search.tuner import run_search
from search.summary import finish_experiment
from training.data import load_for_config
config, budget, data_dir, split, samples, storage, started = sys.argv[1:]
spec = load_search_spec(config)
spec.fixed["split"] = split
spec.start = []  # what a Ray Tune user has: the default config first, then the searcher (no portfolio)
data = load_for_config(spec.trial_base(), data_dir)
left = float(budget) - (time.time() - float(started)) - 30  # (the summary's test evaluation after it)
out = run_search(spec, data, storage + "/c", "c", storage, int(samples), res=Resources(), ray_time_budget_s=left)
sys.exit(finish_experiment(storage + "/c", data_dir))
"""


def variant_c(a, out: Path) -> dict:
    rc, wall = _run([sys.executable, "-c", DRIVER_C, a.config, a.budget_s, a.data_dir, a.split, a.samples, out,
                     time.time()], out / "c.log", a.budget_s * 2 + 600)
    summary = json.loads((out / "c" / "summary.json").read_text()) if (out / "c" / "summary.json").is_file() else {}
    return {"variant": "c", "what": "the search cut by Ray's time_budget_s (epoch rungs), best checkpoint",
            "rc": rc, "wall_s": wall, "test_acc": summary.get("test_acc"), "n": summary.get("test_n"),
            "trials": sum((summary.get("trials") or {}).values())}


def variant_estimate(a, out: Path) -> dict:
    """The search without a budget to its end: its estimate (the first line it prints) against its wall-clock."""
    from search.budget import parse_duration

    rc, wall = _run([sys.executable, "search/run.py", "--samples", a.samples, "--config", a.config, "--data-dir",
                     a.data_dir, "--split", a.split, "--storage", out, "--name", "estimate"],
                    out / "estimate.log", 24 * 3600)
    line = next((x for x in (out / "estimate.log").read_text().splitlines() if x.startswith("estimated ")), "")
    try:
        est = parse_duration(line.removeprefix("estimated ").split(" on this machine")[0].replace(" ", ""))
    except ValueError:
        est = None
    d = _delivered(out, "estimate", rc)
    return {"variant": "estimate", "what": f"no budget, {a.samples} samples, run to the end", "rc": rc,
            "wall_s": wall, "estimate_s": est, **d}


def _test_n(a) -> int:
    from training.data import check_split

    return check_split(a.split, "test", a.data_dir)


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.train import device_name

    a = parse_args(argv)
    out = a.storage / f"{a.budget.replace(' ', '')}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    bf16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    print(f"device {device_name(torch.device('cpu'))}, native bf16: {bf16}; budget {a.budget} ({a.budget_s:.0f} s); "
          f"{a.split} in {a.data_dir}; space {a.config.name}, {a.samples} samples; logs in {out}", flush=True)
    rows = []
    for v in a.variants:
        row = globals()[f"variant_{v}"](a, out)
        rows.append(row)
        _print_row(row, a.budget_s)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| variant | what | test accuracy [95 % interval] | trials | wall-clock |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(_table_row(r, a.budget_s))
    return 0


def _acc_text(r: dict) -> str:
    if r.get("test_acc") is None or not r.get("n"):
        return f"- (exit {r['rc']})"
    lo, hi = wilson(r["test_acc"], r["n"])
    return f"{r['test_acc']:.4f} [{lo:.4f}, {hi:.4f}]"


def _wall_text(r: dict, budget_s: float) -> str:
    from search.budget import clock

    if r["variant"] == "estimate":
        est = r.get("estimate_s")
        return (f"{r['wall_s'] / 60:.1f} min, estimated {clock(est)} before it started "
                f"({(est / r['wall_s'] - 1) * 100:+.0f} %)" if est else f"{r['wall_s'] / 60:.1f} min, no estimate")
    text = f"{r['wall_s'] / 60:.1f} min ({(r['wall_s'] / budget_s - 1) * 100:+.1f} % of the budget)"
    if "first_s" in r:
        text += (f": {r['first_s']:.0f} s until the {r['variant'].upper()}, then {r['resume_s']:.0f} s resumed; "
                 f"restart overhead {r['overhead_s']:+.0f} s beyond the budget")
    return text


def _table_row(r: dict, budget_s: float) -> str:
    return f"| ({r['variant']}) | {r['what']} | {_acc_text(r)} | {r['trials']} | {_wall_text(r, budget_s)} |"


def _print_row(r: dict, budget_s: float) -> None:
    spent = r.get("spent") or {}
    where = ", ".join(f"{k} {v:.0f} s" for k, v in (spent.get("phases") or {}).items())
    print(f"({r['variant']}) {r['what']}: test {_acc_text(r)}, {r['trials']} trial(s), {_wall_text(r, budget_s)}"
          + (f"; delivered {r['delivered']}" if r.get("delivered") else "") + (f"; time: {where}" if where else ""),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
