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
