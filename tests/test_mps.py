"""search --mps: a private MPS control daemon around the search (the NVIDIA tool itself exists only on
GPU machines; here a stand-in script records how it is called)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from search.mps import CONTROL, MpsError, start_mps

REPO = Path(__file__).resolve().parents[1]


def _fake_control(folder: Path, exit_code: int = 0) -> Path:
    log = folder / "calls.txt"
    script = folder / CONTROL
    script.write_text("#!/bin/sh\nin=''\nif [ -z \"$*\" ]; then in=$(cat | tr -d '\\n'); fi\n"
                      f"echo \"args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$in\" >> {log}\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log


def test_start_and_stop_a_private_daemon(tmp_path, monkeypatch):
    log = _fake_control(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    stop = start_mps()
    pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]  # inherited by Ray's trial processes, started after
    assert Path(pipe).is_dir() and "emnist-mps-" in pipe
    stop()
    calls = log.read_text().splitlines()
    assert calls[0] == f"args=-d pipe={pipe} stdin=" and calls[1] == f"args= pipe={pipe} stdin=quit"
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not Path(pipe).exists()


def test_daemon_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    _fake_control(tmp_path, exit_code=1)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    with pytest.raises(MpsError, match="run without --mps"):
        start_mps()
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ


@pytest.mark.skipif(shutil.which(CONTROL) is not None, reason=f"{CONTROL} exists here: MPS would really start")
def test_search_without_mps_tool_stops_before_ray(tmp_path, digits_dir):
    from tests.conftest import assert_ray_never_started, ray_tmp_dir
    from tests.test_search import write_space

    space = write_space(tmp_path, 1, 1, 1, "  lr: {uniform: [0.001, 0.01]}\n")
    ray_tmp = ray_tmp_dir()  # a Ray session would write its files here
    r = subprocess.run([sys.executable, str(REPO / "search" / "run.py"), "--config", str(space), "--data-dir",
                        str(digits_dir), "--storage", str(tmp_path / "res"), "--name", "m", "--mps"],
                       capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_tmp)})
    assert r.returncode == 2 and f"{CONTROL} not found" in r.stderr, r.stderr
    assert_ray_never_started(ray_tmp)
    ray_tmp.parent.rmdir()
    # the experiment is not locked afterwards: the same command without --mps may run it
    from search.lock import ExperimentLock

    ExperimentLock(tmp_path / "res" / "m").acquire().release()
