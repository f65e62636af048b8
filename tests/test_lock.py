"""One driver per experiment: the lock itself (the search-level test is in test_faults.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from search.lock import LOCK_FILE, ExperimentLock, LockedError

REPO = Path(__file__).resolve().parents[1]


def test_lock_is_released_when_its_driver_dies(tmp_path):
    """The kernel drops the lock of a dead process, however it died: no stale lock blocks --resume."""
    exp = tmp_path / "exp"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from search.lock import ExperimentLock; ExperimentLock(sys.argv[2]).acquire(); "
                               "print('locked', flush=True); time.sleep(600)", str(REPO), str(exp)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            ExperimentLock(exp).acquire()
    finally:
        holder.kill()
        holder.wait()
    with ExperimentLock(exp):  # SIGKILLed holder: free at once
        with pytest.raises(LockedError):  # and exclusive within one process too
            ExperimentLock(exp).acquire()
    ExperimentLock(exp).acquire().release()


def test_lock_file_names_the_holder_and_is_emptied_on_release(tmp_path):
    lock = ExperimentLock(tmp_path / "exp").acquire()
    text = (tmp_path / "exp" / LOCK_FILE).read_text()
    assert '"pid"' in text and '"host"' in text
    lock.release()
    assert (tmp_path / "exp" / LOCK_FILE).read_text() == ""
    lock.release()  # twice is harmless


def test_cloud_experiment_is_locked_on_this_machine(tmp_path, monkeypatch):
    """No locks in object storage: a cloud experiment is locked in a local folder keyed by its URI,
    which keeps a second driver on this machine out (and says so in search/lock.py)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with ExperimentLock("s3://bucket/results/exp"):
        with pytest.raises(LockedError, match="s3://bucket/results/exp is in use"):
            ExperimentLock("s3://bucket/results/exp").acquire()
        ExperimentLock("s3://bucket/results/other").acquire().release()
    assert list((tmp_path / "cache" / "emnist-tune" / "locks").glob("*.lock"))


def test_unwritable_place_is_an_os_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        ExperimentLock(tmp_path / "file" / "exp").acquire()


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "hard link", "foreign file", "fifo", "folder"])
def test_a_lock_path_that_is_not_our_lock_file_is_refused_and_never_written(tmp_path, kind):
    """A link planted at .driver.lock (to /etc/passwd, say: drivers often run as root), another file or a FIFO:
    refused with a clear message, and the file it points to keeps every byte."""
    import os

    exp = tmp_path / "exp"
    exp.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("root:x:0:0:root:/root:/bin/bash\n")
    before = target.read_bytes()
    lock = exp / LOCK_FILE
    if kind == "symlink":
        lock.symlink_to(target)
    elif kind == "dangling symlink":
        lock.symlink_to(tmp_path / "nothing-here")
    elif kind == "hard link":
        os.link(target, lock)
    elif kind == "foreign file":
        lock.write_text("some,csv,data\n")
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    with pytest.raises((LockedError, OSError)) as e:
        ExperimentLock(exp).acquire()
    if kind != "folder":
        assert isinstance(e.value, LockedError) and "not this project's lock file" in str(e.value)
    assert target.read_bytes() == before
    assert not (tmp_path / "nothing-here").exists()
    if kind == "foreign file":
        assert lock.read_text() == "some,csv,data\n"


def test_the_cli_refuses_a_symlinked_lock_and_leaves_its_target_whole(tmp_path):
    """search/run.py and search/final.py: exit 2 with one line; the target keeps its content."""
    exp = tmp_path / "results" / "exp"
    exp.mkdir(parents=True)
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0::/root:/bin/sh\n")
    (exp / LOCK_FILE).symlink_to(target)
    for cmd in (["search/final.py", "--name", "exp"], ["search/run.py", "--name", "exp", "--resume"]):
        r = subprocess.run([sys.executable, *cmd, "--storage", str(tmp_path / "results")], capture_output=True,
                           text=True, cwd=REPO, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "symbolic link" in r.stderr and "Traceback" not in r.stderr
        assert target.read_text() == "root:x:0:0::/root:/bin/sh\n"


def test_a_folder_the_lock_made_for_a_refused_start_is_removed(tmp_path):
    lock = ExperimentLock(tmp_path / "new").acquire()
    lock.release(discard=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()  # a folder that was there before is never removed
    ExperimentLock(tmp_path / "old").acquire().release(discard=True)
    assert (tmp_path / "old").is_dir()
