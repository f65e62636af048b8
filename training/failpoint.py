"""Failpoints: named places where the fault tests stop or fail a process on purpose, so that a kill
lands exactly where the test says it does (and the test fails when it did not), instead of racing
a timer. Off unless the environment names one; nothing else reads these variables.

  EMNIST_TUNE_STOP_AT="<point>[#<n>]=<marker>"
      At `point` (its n-th arrival, counted in <marker>.count; default the first) the process writes
      its pid to `marker` and stops itself (SIGSTOP). The test waits for the marker, sees the process
      stopped there, and SIGKILLs or interrupts it. Once per marker: a resumed run passes through.
  EMNIST_TUNE_FAULT_ONCE="<marker>:<epoch>[:<n1>,<n2>,...]"
      A trial raises a transient error after training `epoch` (search/trainable.py). The first
      trial to get there fails n1 times, the second n2 times, the others never (default: 1, the
      first trial once). `marker` holds one line per failure, naming the trial.

Points: "write:<file name>" (training.checkpoint.write_atomic: the temporary file is written and
synced, the rename not done), "search:before-fit" (search/tuner.py: Ray is up, search.json is
written, Ray's first snapshot is not), "trial:mid-run" (search/trainable.py: a trial has reported
an epoch with its checkpoint and has epochs left to train).
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

STOP_ENV = "EMNIST_TUNE_STOP_AT"
FAULT_ENV = "EMNIST_TUNE_FAULT_ONCE"


def stop_here(point: str) -> None:
    """SIGSTOP this process at `point` when the environment asks for it (see the module's text)."""
    spec = os.environ.get(STOP_ENV)
    if not spec:
        return
    want, sep, marker = spec.partition("=")
    want, _, nth = want.partition("#")
    if not sep or want != point:
        return
    if nth:  # (the processes that arrive here take turns: the tests run one trial at a time)
        with open(f"{marker}.count", "a+") as f:
            f.write(".")
            f.seek(0)
            if len(f.read()) != int(nth):
                return
    try:  # O_EXCL: the first process to arrive stops; later ones (and a resumed run) go on
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGSTOP)


def fail_after_epoch(epoch: int, trial: str) -> None:
    """Raise a transient error in `trial` after `epoch` when the environment asks for it."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    m = re.fullmatch(r"(.+):(\d+)(?::(\d+(?:,\d+)*))?", spec)
    if m is None:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <marker>:<epoch>[:<times>,...]")
    marker, at, times = Path(m[1]), int(m[2]), [int(n) for n in (m[3] or "1").split(",")]
    if epoch != at:
        return
    failed = marker.read_text().split() if marker.exists() else []
    order = list(dict.fromkeys(failed))  # trials in the order they first failed
    index = order.index(trial) if trial in order else len(order)
    if failed.count(trial) < (times[index] if index < len(times) else 0):
        with open(marker, "a") as f:
            f.write(f"{trial}\n")
        raise RuntimeError(f"injected transient failure at epoch {epoch}")
