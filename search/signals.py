"""SIGTERM does what Ctrl+C does.

SLURM, Kubernetes, systemd and `timeout` stop a job with SIGTERM, not SIGINT. Python's default for SIGTERM is to
die at once: Ray's stack dump, exit 1, no resume command and the session's seconds never counted. Ray Tune catches
SIGINT (it saves the experiment state and returns from `fit`), so SIGTERM is handed to whatever handles SIGINT at
that moment: Ray's handler while trials run, else Python's, which raises KeyboardInterrupt where the drivers print
the command that continues.
"""

from __future__ import annotations

import signal
import threading


def _forward(signum, frame) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIG_DFL or SIG_IGN for SIGINT: stop as Ctrl+C would
        raise KeyboardInterrupt


def sigterm_as_sigint() -> None:
    """Install the forwarding (main thread only, as every signal handler must be)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _forward)
