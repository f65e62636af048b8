"""search/storage.py: a --storage or --name that cannot be used is refused in one line before Ray starts (a file,
a read-only or unwritable folder, a name too long for the file system, unreachable cloud storage, a probe that
hangs), and a good storage passes without anything being created."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.helpers import SEARCH, one_line_error, one_trial_space, run
from training.config import ConfigError


def _search_with_storage(refuse, tmp_path, digits_dir, storage, name="exp", extra=()):
    return refuse(SEARCH, "--config", one_trial_space(tmp_path / "cfg"), "--data-dir", digits_dir, "--storage", storage,
                  "--name", name, *extra)


def test_storage_that_is_a_file(tmp_path, digits_dir, refuse):
    f = tmp_path / "results.txt"
    f.write_text("not a folder")
    assert "is a file, not a folder" in one_line_error(_search_with_storage(refuse, tmp_path, digits_dir, f))
    assert "which is a file" in one_line_error(_search_with_storage(refuse, tmp_path, digits_dir, f / "sub" / "dir"))
    assert f.read_text() == "not a folder"


def test_name_longer_than_the_filesystem_allows(tmp_path, digits_dir, refuse):
    name = "n" * 300
    for extra in ([], ["--resume"]):
        line = one_line_error(_search_with_storage(refuse, tmp_path, digits_dir, tmp_path / "results", name, extra))
        assert "--name is 300 bytes long" in line
    line = one_line_error(_search_with_storage(refuse, tmp_path, digits_dir, tmp_path / ("s" * 300) / "results"))
    assert "300 bytes long" in line


def test_storage_that_is_not_writable(tmp_path, digits_dir, monkeypatch, refuse):
    from search import storage

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(storage.tempfile, "mkstemp", read_only)
        line = one_line_error(_search_with_storage(refuse, tmp_path, digits_dir, tmp_path / "ro"))
    assert line.startswith("error: --storage") and "Read-only file system" in line
    # a real folder no one may write in, root included (root ignores a folder's mode bits): sysfs
    assert Path("/sys/kernel").is_dir()
    line = one_line_error(_search_with_storage(refuse, tmp_path, digits_dir, "/sys/kernel"))
    assert line.startswith("error: --storage /sys/kernel is not writable: /sys/kernel:"), line


def test_unreachable_cloud_storage(tmp_path, digits_dir):
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_EC2_METADATA_DISABLED": "true",
           "EMNIST_TUNE_STORAGE_TIMEOUT_S": "60"}
    for uri in ("s3://bucket/emnist?endpoint_override=127.0.0.1:1&scheme=http", "nosuchfs://bucket/emnist"):
        line = one_line_error(run(SEARCH, "--config", one_trial_space(tmp_path / "cfg"), "--data-dir", digits_dir,
                                  "--storage", uri, "--name", "exp", timeout=120, env=env))
        assert line.startswith(f"error: cannot reach storage {uri}: "), line


def test_storage_probe_that_hangs_times_out(monkeypatch):
    from search import storage

    monkeypatch.setattr(storage, "_PROBE", "import time; time.sleep(60)")
    monkeypatch.setattr(storage, "STORAGE_TIMEOUT_S", 1.0)
    with pytest.raises(ConfigError, match="cannot reach storage s3://b/x: no answer within 1 s"):
        storage.check_storage("s3://b/x", "exp")


def test_good_storage_passes(tmp_path):
    from search.storage import check_storage

    check_storage(str(tmp_path / "new" / "results"), "my experiment")  # created later, by the driver
    assert not (tmp_path / "new").exists()  # the check creates nothing
    check_storage(str(tmp_path), "exp")
