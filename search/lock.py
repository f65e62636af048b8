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
import stat
import sys
import time
from pathlib import Path

LOCK_FILE = ".driver.lock"
MAX_LOCK_BYTES = 64 * 1024  # a holder record is a few hundred bytes


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
    folder cannot be created or written.

    The lock file is opened without following a symlink (O_NOFOLLOW) and must be a regular file with one link
    that is empty or holds a holder record this class wrote: a link planted at `.driver.lock` (to /etc/passwd,
    say: drivers often run as root) or any other file is refused and never truncated or written."""

    def __init__(self, exp_dir: str | Path):
        self.exp_dir = str(exp_dir)
        self.path = _lock_path(self.exp_dir)
        self._fd: int | None = None
        self._made_folder = False

    def acquire(self) -> ExperimentLock:
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made_folder = True
        # O_CLOEXEC (Python's default): Ray's daemons, started by this process, must not inherit
        # the lock and hold it after the driver died.
        try:  # a device or FIFO planted there is refused before it is opened (opening one can have effects)
            planted = not stat.S_ISREG(os.lstat(self.path).st_mode) and not self.path.is_symlink()
        except FileNotFoundError:
            planted = False
        if planted:
            raise LockedError(f"{self.path} is not a regular file, not this project's lock file: nothing was "
                              "written to it; remove it and start again")
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0)  # (a FIFO must not block)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EMLINK):  # (what O_NOFOLLOW gives for a symlink)
                raise LockedError(f"{self.path} is a symbolic link, not this project's lock file: remove it "
                                  "(nothing was written through it)") from None
            raise
        try:
            problem = self._not_ours(fd)
            if problem:
                raise LockedError(f"{self.path} is {problem}, not this project's lock file: nothing was written to "
                                  "it; remove it and start again")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockedError(self._held_message()) from None
            raise
        except LockedError:
            os.close(fd)
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv), "experiment": self.exp_dir}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _not_ours(fd: int) -> str | None:
        """Why the open file is not a lock file of ours (None: it is one, or new and empty)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_nlink != 1:
            return "a file with other names (a hard link)"
        if st.st_size == 0:
            return None
        if st.st_size > MAX_LOCK_BYTES:
            return "a file larger than a lock record"
        try:
            record = json.loads(os.pread(fd, MAX_LOCK_BYTES, 0))
        except (OSError, ValueError):
            return "a file that holds something else"
        if not isinstance(record, dict) or not {"pid", "host", "experiment"} <= set(record):
            return "a file that holds something else"
        return None

    def release(self, discard: bool = False) -> None:
        """Release the lock. discard: also remove the experiment folder when acquire() made it and it still
        holds nothing but the lock file (a driver that stopped on an error before writing anything)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # the file stays (removing a lock file races with a waiting driver)
            except OSError:
                pass
            if discard and self._made_folder:
                try:
                    if [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
                        self.path.unlink()
                        self.path.parent.rmdir()
                except OSError:
                    pass
            os.close(fd)  # closing the descriptor releases the flock

    def _held_message(self, wait_s: float = 3.0) -> str:
        # The holder writes its record just after it took the flock: a driver refused in that moment reads an
        # empty file, so it waits a little for the record to name the holder.
        end = time.monotonic() + wait_s
        while True:
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder or time.monotonic() >= end:
                break
            time.sleep(0.05)
        who = (f"driver pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
               f"started {holder.get('started', '?')}") if holder else "another driver"
        return (f"experiment {self.exp_dir} is in use by {who}. One driver per experiment: wait for it to end "
                f"(or stop it: Ctrl+C keeps its results), then continue with --resume; or use another --name")

    def __enter__(self) -> ExperimentLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
