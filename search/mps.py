"""NVIDIA MPS for the trials of one search (`search/run.py --mps`).

Without MPS, trial processes sharing a GPU get it in turns (time slicing): four small-CNN trials
then add up to about what one does alone. The MPS server runs their kernels side by side. The
search starts a private MPS control daemon (its own pipe and log folders, so it neither needs nor
touches a system-wide one) before Ray starts, so that every trial process inherits
CUDA_MPS_PIPE_DIRECTORY and connects through it, and stops it when the search ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

CONTROL = "nvidia-cuda-mps-control"


class MpsError(RuntimeError):
    pass


def start_mps() -> Callable[[], None]:
    """Start an MPS control daemon for this process and its children; returns the function that
    stops it. Raises MpsError (one line) where MPS cannot run here."""
    exe = shutil.which(CONTROL)
    if exe is None:
        raise MpsError(f"--mps: {CONTROL} not found (it comes with the NVIDIA driver utilities); "
                       "run without --mps, or install them")
    if os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        # Already inside an MPS setup (started by the user or the cluster): use it as it is.
        return lambda: None
    folder = tempfile.mkdtemp(prefix="emnist-mps-")
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": os.path.join(folder, "pipe"),
           "CUDA_MPS_LOG_DIRECTORY": os.path.join(folder, "log")}
    os.makedirs(env["CUDA_MPS_PIPE_DIRECTORY"])
    os.makedirs(env["CUDA_MPS_LOG_DIRECTORY"])
    try:
        r = subprocess.run([exe, "-d"], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MpsError(f"--mps: could not start {CONTROL}: {e}") from None
    if r.returncode != 0:
        raise MpsError(f"--mps: {CONTROL} -d failed ({(r.stderr or r.stdout).strip() or f'exit {r.returncode}'}); "
                       "the GPU may be in a compute mode or container that forbids MPS: run without --mps")
    os.environ["CUDA_MPS_PIPE_DIRECTORY"] = env["CUDA_MPS_PIPE_DIRECTORY"]
    os.environ["CUDA_MPS_LOG_DIRECTORY"] = env["CUDA_MPS_LOG_DIRECTORY"]

    def stop() -> None:
        try:
            subprocess.run([exe], input="quit\n", env=env, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
            if os.environ.get(key) == env[key]:
                del os.environ[key]
        shutil.rmtree(folder, ignore_errors=True)

    return stop
