"""search.reaper: the Ray processes of a SIGKILLed driver are gone soon after it (with the real Ray),
the watchdog leaves everything else alone and exits, and it holds none of the driver's files."""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search import reaper
from search.reaper import TOKEN_VAR

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper works through /proc")

# The driver: reaper first, then a local Ray with a task worker and an actor worker; it reports and sleeps.
RAY_DRIVER = """
import json, os, sys, time
from search import reaper
reaper.start_reaper()
import ray
ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)

@ray.remote
def task():
    return os.getpid()

@ray.remote
class Actor:
    def pid(self):
        return os.getpid()

actor = Actor.remote()
workers = [ray.get(task.remote()), ray.get(actor.pid.remote())]
session = os.path.basename(ray._private.worker._global_node.get_session_dir_path())
print(json.dumps({"token": os.environ[reaper.TOKEN_VAR], "watchdog": reaper._watchdog.pid,
                  "session": session, "workers": workers}), flush=True)
time.sleep(600)
"""

# A driver without Ray that holds a lock, leaves a child behind and exits normally when told to.
PLAIN_DRIVER = """
import fcntl, json, os, subprocess, sys
from search import reaper
lock = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(lock, fcntl.LOCK_EX)
reaper.start_reaper()
token, watchdog = os.environ[reaper.TOKEN_VAR], reaper._watchdog
reaper.start_reaper()  # idempotent: same token, same watchdog
assert (os.environ[reaper.TOKEN_VAR], reaper._watchdog) == (token, watchdog)
straggler = subprocess.Popen(["sleep", "300"])
# Popen returns once execve() has closed our close-on-exec pipe, a moment before the kernel sets the new
# program's environment: /proc/<pid>/environ reads empty until then (CI caught that moment once)
while not open(f"/proc/{straggler.pid}/environ", "rb").read():
    pass
print(json.dumps({"token": token, "watchdog": watchdog.pid, "straggler": straggler.pid}), flush=True)
sys.stdin.readline()
"""


def _env() -> dict[str, str]:
    # never a token this test process may carry itself (a test that started Ray in it)
    return {k: v for k, v in os.environ.items() if k != TOKEN_VAR}


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie is dead


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _carriers(token: str) -> dict[int, str]:
    """pid -> program name (Ray's process title) of the living processes marked with this token."""
    entry = f"{TOKEN_VAR}={token}".encode()
    return {pid: _name(pid) for pid in _pids()
            if entry in _read(f"/proc/{pid}/environ").split(b"\0") and _alive(pid)}


def _name(pid: int) -> str:
    argv0 = _read(f"/proc/{pid}/cmdline").split(b"\0")[0].decode(errors="replace").strip()
    return os.path.basename(argv0.split(" ")[0]) if not argv0.startswith("ray::") else argv0.split(" ")[0]


def _of_session(session: str) -> dict[int, str]:
    """Living processes naming the Ray session on their command line (gcs_server, raylet, helpers)."""
    return {pid: _name(pid) for pid in _pids()
            if session.encode() in _read(f"/proc/{pid}/cmdline") and _alive(pid)}


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def _report(proc: subprocess.Popen, timeout: float) -> dict:
    """The driver's JSON line, without hanging on a driver that never prints it."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        pytest.fail(f"the driver printed nothing in {timeout} s: {proc.communicate()}")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"the driver ended without a report: {proc.wait()} {proc.stderr.read()[-3000:]}")
    return json.loads(line)


def _bystanders(token: str) -> list[subprocess.Popen]:
    """Processes that are not this driver's: another driver's token, a token that only begins like
    this one, none. The reaper must not touch them."""
    return [subprocess.Popen(["sleep", "300"], env={**_env(), **extra}) for extra in
            ({TOKEN_VAR: f"{os.getpid()}-another-driver"}, {TOKEN_VAR: token + "0"}, {})]


def _kill(pids) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@linux_only
def test_sigkilled_driver_leaves_no_ray_process():
    proc = subprocess.Popen([sys.executable, "-c", RAY_DRIVER], cwd=REPO, env=_env(), text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info, bystanders = {}, []
    try:
        info = _report(proc, timeout=180)
        token, session = info["token"], info["session"]
        before = _carriers(token)
        # Ray's processes inherit the mark: the daemons, both agents and the workers (titled ray::...)
        names = set(before.values())
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, before
        assert set(info["workers"]) <= set(before), (info["workers"], before)
        assert set(_of_session(session)) <= set(before), "a process of the session is not marked"
        # the watchdog: not marked (no reaper kills it), alive, in a session of its own
        watchdog = info["watchdog"]
        assert _alive(watchdog) and watchdog not in before
        assert TOKEN_VAR.encode() not in _read(f"/proc/{watchdog}/environ")
        assert os.getsid(watchdog) != os.getsid(proc.pid)
        bystanders = _bystanders(token)

        proc.kill()
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL

        # a bound for the check, not a speed requirement: without the reaper the agents stay ~60 s
        gone = _wait_for(lambda: not _carriers(token) and not _of_session(session) and not _alive(watchdog),
                         timeout=30)
        assert gone, (f"left after 30 s: marked {_carriers(token)}, of the session {_of_session(session)}, "
                      f"watchdog alive: {_alive(watchdog)}")
        assert all(b.poll() is None for b in bystanders), "the reaper killed a process that was not its driver's"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
        if info:
            _kill(_carriers(info["token"]))  # this test's leftovers only, by pid
        _kill(b.pid for b in bystanders)
        for b in bystanders:
            b.wait(timeout=10)


@linux_only
def test_normal_exit_reaps_stragglers_holds_no_file_and_spares_others(tmp_path):
    lock_file = tmp_path / "driver.lock"
    proc = subprocess.Popen([sys.executable, "-c", PLAIN_DRIVER, str(lock_file)], cwd=REPO, env=_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info, bystanders = {}, []
    try:
        info = _report(proc, timeout=60)
        watchdog = info["watchdog"]
        assert set(_carriers(info["token"])) == {info["straggler"]}  # the driver's own environ is not marked
        # the watchdog holds only its pipe from the driver and /dev/null: not the lock, not the driver's stdout
        fds = {int(fd): os.readlink(f"/proc/{watchdog}/fd/{fd}") for fd in os.listdir(f"/proc/{watchdog}/fd")}
        assert fds[0].startswith("pipe:") and fds[1] == fds[2] == "/dev/null", fds
        assert str(lock_file) not in fds.values(), fds
        assert os.readlink(f"/proc/{proc.pid}/fd/1") not in fds.values(), fds
        bystanders = _bystanders(info["token"])

        out, err = proc.communicate("exit\n", timeout=60)
        assert proc.returncode == 0, err
        # the watchdog (still in its grace period) does not keep the driver's lock
        with open(lock_file, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)

        assert _wait_for(lambda: not _alive(watchdog) and not _alive(info["straggler"]), timeout=30), \
            f"watchdog alive: {_alive(watchdog)}, straggler alive: {_alive(info['straggler'])}"
        assert all(b.poll() is None for b in bystanders), "the reaper killed a process that was not its driver's"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
        if info:
            _kill([info["straggler"], *_carriers(info["token"])])
        _kill(b.pid for b in bystanders)
        for b in bystanders:
            b.wait(timeout=10)


def test_does_nothing_without_proc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(reaper, "_watchdog", None)
    monkeypatch.delenv(TOKEN_VAR, raising=False)
    reaper.start_reaper()
    assert reaper._watchdog is None and TOKEN_VAR not in os.environ
