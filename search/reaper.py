"""Reap the local Ray instance of a driver that died without shutting it down (Linux).

A driver that is SIGKILLed, OOM-killed or crashes in native code cannot run `ray.shutdown()`.
Ray's gcs_server and raylet then go within a second or two, but `ray::DashboardAgent` and
`ray::RuntimeEnvAgent` noticed the dead raylet only after about 60 s here (Ray 2.60, 2 CPUs), and
a later `--resume`, or the next test, on the same machine runs beside them.

How: `start_reaper()`, called in the driver just before `ray.init` starts a local instance,

1. marks the driver's Ray processes: it puts a token unique to this driver process into
   `os.environ`. Ray starts gcs_server, raylet and its helpers from the driver's environment,
   and the raylet starts the agents and every worker from its own, so all of them carry it
   (tests/test_reaper.py checks this: gcs_server, raylet, both agents, idle and actor workers).
   /proc/<pid>/environ shows the environment a process was started with, until it ends, even
   after its parent died and it was re-parented to init. But Ray's process titles (`ray::IDLE`,
   `ray::DashboardAgent`) are set by a vendored setproctitle that may write the title over that
   memory: measured, the agents' token was wiped or kept depending on where the raylet had put
   it in their environment (tests/test_reaper.py failed 1 run in 3 without the fix below).
   `SPT_NOENV=1`, set with the token, tells setproctitle to keep to the argv area (titles may
   then be as long as the original command line: Ray's are long);
2. starts a small watchdog (this file run as a script) that blocks reading a pipe whose only
   writer is the driver. The kernel closes the driver's end when the driver ends, however it
   ends, so EOF means "the driver is gone". The watchdog then waits a short grace period (Ray's
   own shutdown of a normal exit has long finished; after a kill the daemons get a moment to go
   by themselves), SIGKILLs every process whose environment carries the token, repeats until
   none is left (a raylet may start a worker while it is being reaped) and exits.

Why not the alternatives: a process group is not shared (Ray gives each worker its own), a
parent-death signal (prctl) reaches only direct children (the agents are the raylet's), ancestry
is lost once a process is re-parented to init, and cgroups need privileges or systemd. An
environment variable is inherited along the whole tree and needs nothing.

Safety: the token is new for every driver process (its pid and a random uuid) and is compared as
a whole `NAME=value` entry, so the watchdog never touches another driver's Ray, a cluster this
driver joined (no reaper is started with --address) or anything else; processes whose
environment it may not read (other users') are skipped. Any other program the driver starts
after the call carries the token too and is reaped with Ray: a child left running by a dead
driver is as orphaned as Ray's. A forked child of the driver keeps the driver's end of the pipe,
so the reaping waits for it too. A driver started by another reaped driver gets its own token
(the variable is overwritten); the watchdog itself runs without the variable, so no reaper, of
this driver or of an enclosing one, kills it before it has reaped.

Elsewhere (no /proc) `start_reaper()` does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

TOKEN_VAR = "EMNIST_TUNE_REAPER_TOKEN"
GRACE_S = 2.0  # after the driver is gone, before the first kill
REAP_FOR_S = 10.0  # give up rounds of killing after this long (each round kills what it finds)

_watchdog: subprocess.Popen | None = None  # this process's watchdog, once started


def start_reaper(grace_s: float = GRACE_S) -> None:
    """Mark the Ray processes this driver starts from now on and have them SIGKILLed once the
    driver has exited, however it exits. Call it just before `ray.init` of a local instance.
    Idempotent: later calls in the same process (a second `ray.init`) reuse the token."""
    global _watchdog
    if _watchdog is not None or not sys.platform.startswith("linux") or not os.path.isdir("/proc"):
        return
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}
    try:
        _watchdog = subprocess.Popen(
            # -I: only the standard library, never a module of the search/ folder or PYTHONPATH
            [sys.executable, "-I", os.path.abspath(__file__), token, str(grace_s)],
            stdin=subprocess.PIPE,  # our end is this driver's only writer: its EOF is our death
            stdout=subprocess.DEVNULL,  # never keep the driver's stdout pipe (or terminal) open
            stderr=subprocess.DEVNULL,
            close_fds=True,  # nor the experiment lock or any other file of the driver
            start_new_session=True,  # a Ctrl+C (or SIGHUP) to the driver's terminal does not stop it
            cwd="/",
            env=env,
        )
    except OSError as e:  # the search still works, as before, without it
        print(f"warning: cannot start the Ray reaper ({e}); Ray processes may outlive a killed driver",
              file=sys.stderr)
        return
    # Only now: a driver without a watchdog should not carry a token nobody watches.
    os.environ[TOKEN_VAR] = token
    os.environ["SPT_NOENV"] = "1"  # process titles must not overwrite the token (see above)


def _carries(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def _kill_carriers(token: str) -> int:
    """SIGKILL every other process whose environment holds the token; how many were found."""
    entry = f"{TOKEN_VAR}={token}".encode()
    found = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        # A pidfd pins the process: if the pid is reused after the check, the signal cannot
        # reach the newcomer (pids wrap at 32768 on many systems).
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except OSError:  # no pidfd_open (kernel < 5.3): plain kill, a far smaller risk than leaking
            pidfd = None
        try:
            if not _carries(pid, entry):  # a zombie's environment reads empty: it is not counted
                continue
            found += 1
            try:
                if pidfd is None:
                    os.kill(pid, signal.SIGKILL)
                else:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:  # already gone, or not ours
                pass
        finally:
            if pidfd is not None:
                os.close(pidfd)
    return found


def reap(token: str, grace_s: float = GRACE_S) -> None:
    time.sleep(grace_s)
    deadline = time.monotonic() + REAP_FOR_S
    # Until two rounds in a row find nothing: killed processes take a moment to go, a new one may have started
    # meanwhile, and one caught inside execve() reads an empty environment for that moment (the kernel sets the
    # new program's environment after it has closed the old one's close-on-exec files).
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        quiet = 0 if _kill_carriers(token) else quiet + 1
        time.sleep(0.2)


def main(argv: list[str]) -> None:
    """The watchdog: `python -I search/reaper.py TOKEN [GRACE_S]`, the driver's pipe on stdin."""
    token, grace_s = argv[1], float(argv[2]) if len(argv) > 2 else GRACE_S
    try:
        while os.read(0, 4096):  # the driver never writes: this returns b"" (EOF) once it is gone
            pass
    except OSError:  # a broken pipe says the same
        pass
    reap(token, grace_s)


if __name__ == "__main__":
    main(sys.argv)
