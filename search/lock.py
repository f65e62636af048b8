"""One driver per experiment: an exclusive lock held for the driver's whole life.

Two drivers on one experiment folder (two searches started with the same --name, or --resume
while the first is still running) would both write trials, result files and the searcher state
into it and mix or lose results. The driver therefore takes an exclusive `fcntl.flock` on
`<experiment>/.driver.lock` before it writes anything, and keeps it until it exits. The kernel
releases a flock when its process dies, however it dies (Ctrl+C, SIGKILL, a crash), so a stale
lock can never block a later --resume. The lock file records who holds it (pid, host, start
time, command) for the error message of the driver that is refused.

Shared filesystems: on NFS, Linux maps flock onto NFS byte-range locks, so drivers on different
machines exclude each other there too. Cloud storage (s3://, gs://) has no locks: the lock is
then taken in a local folder keyed by the URI (`~/.cache/emnist-tune/locks`), which protects
the experiment from a second driver on the same machine only. Run drivers of a cloud experiment
from one machine.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".driver.lock"


class LockedError(RuntimeError):
    """Another driver holds the experiment."""


def _lock_path(exp_dir: str) -> Path:
    if "://" in exp_dir:
        digest = hashlib.sha256(exp_dir.encode()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emnist-tune" / "locks"
        return cache / f"{digest}.lock"
    return Path(exp_dir) / LOCK_FILE


class ExperimentLock:
    """`with ExperimentLock(exp_dir):` or acquire()/release(). acquire() creates the experiment
    folder (a local one) if needed and raises LockedError naming the holder, or OSError when the
    folder cannot be created or written."""

    def __init__(self, exp_dir: str | Path):
        self.exp_dir = str(exp_dir)
        self.path = _lock_path(self.exp_dir)
        self._fd: int | None = None

    def acquire(self) -> ExperimentLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC (Python's default): Ray's daemons, started by this process, must not inherit
        # the lock and hold it after the driver died.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockedError(self._held_message()) from None
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv), "experiment": self.exp_dir}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # the file stays (removing a lock file races with a waiting driver)
            except OSError:
                pass
            os.close(fd)  # closing the descriptor releases the flock

    def _held_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        who = (f"driver pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
               f"started {holder.get('started', '?')}") if holder else "another driver"
        return (f"experiment {self.exp_dir} is in use by {who}. One driver per experiment: wait for it to end "
                f"(or stop it: Ctrl+C keeps its results), then continue with --resume; or use another --name")

    def __enter__(self) -> ExperimentLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
