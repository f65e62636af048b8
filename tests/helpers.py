"""Helpers shared by several test files (fixtures are in conftest.py): the command lines as a user runs them,
the one-line refusal they must print, a one-trial search space, and a file cut short."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "training" / "train.py")]
SEARCH = [sys.executable, str(REPO / "search" / "run.py")]
PREDICT = [sys.executable, str(REPO / "training" / "predict.py")]


def run(cmd, *args, timeout=300, env=None):
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "RAY_ADDRESS": "local", **(env or {})})


def one_line_error(r) -> str:
    """The CLI refused with exit 2 and a single `error: ...` line on stderr (no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def one_trial_space(folder: Path, space: str = "  lr: {loguniform: [1.0e-3, 1.0e-2]}\n", fixed: str = "") -> Path:
    """A search space file (and its base.yaml) in `folder`: one sample of one epoch on digits."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text("split: digits\nbatch_size: 32\neval_batch_size: 256\nhist_every: 0\n"
                                      "scheduler: none\n")
    path = folder / "space.yaml"
    path.write_text(f"base: base.yaml\nsamples: 1\nmax_epochs: 1\nasha: {{grace_period: 1}}\n{fixed}space:\n{space}")
    return path


def truncate(path: Path) -> None:
    """Cut a file to its first 1000 bytes (a checkpoint a kill cut short)."""
    path.write_bytes(path.read_bytes()[:1000])
