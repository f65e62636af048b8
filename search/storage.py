"""Is the experiment storage usable? Checked by search/run.py before Ray starts, so a bad
`--storage` or `--name` is one line of error instead of a traceback (or retries) from Ray.

- a filesystem path: it must be (or become) a folder we can write, and the experiment's folder
  name must fit the file system's limits (NAME_MAX per component, PATH_MAX in all);
- a URI (s3://, gs://, ...): pyarrow must open it and answer for the path within
  STORAGE_TIMEOUT_S. The probe runs in a child process that is killed at the deadline (pyarrow's
  cloud clients retry for minutes, and a hung one can block the interpreter's exit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from search.layout import is_uri
from training.config import ConfigError

STORAGE_TIMEOUT_S = float(os.environ.get("EMNIST_TUNE_STORAGE_TIMEOUT_S", "30"))
# Room the experiment needs below its folder: trial_<id>/checkpoint_<n>/.checkpoint.pt.<random>.tmp
# and Ray's own files; a path longer than PATH_MAX minus this would fail mid-search.
_DEEPEST_BELOW = 200


def check_storage(storage: str, name: str) -> None:
    """Raise ConfigError (one line) when the experiment `name` cannot be written to `storage`."""
    if is_uri(storage):
        _check_uri(storage)
    else:
        _check_folder(Path(storage).expanduser(), storage, name)


def _check_folder(root: Path, storage: str, name: str) -> None:
    """Checks without side effects: nothing is created here (the experiment lock and Ray do that)."""
    existing = root
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == root else f"is inside {existing}, which is a file"
        raise ConfigError(f"--storage {storage} {what}, not a folder")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    missing = root.relative_to(existing).parts if existing != root else ()
    for part in (*missing, name):
        size = len(os.fsencode(part))
        if size > name_max:
            which = "--name" if part == name else f"the --storage folder name {part[:20]}..."
            raise ConfigError(f"{which} is {size} bytes long, but the file system of {storage} allows at most "
                              f"{name_max} per folder name; choose a shorter one")
    exp_dir = existing.resolve().joinpath(*missing, name)
    if len(os.fsencode(str(exp_dir))) + _DEEPEST_BELOW > path_max:
        raise ConfigError(f"the experiment folder {exp_dir} is too long a path for this file system "
                          f"(at most {path_max} bytes with its trial files); use a shorter --storage or --name")
    if _exists(exp_dir) and not exp_dir.is_dir():
        raise ConfigError(f"{exp_dir} is a file, not an experiment folder; choose another --name")
    target = exp_dir if exp_dir.is_dir() else existing
    try:  # the only reliable test: a read-only file system or permissions (root ignores them) say no here
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=target)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"--storage {storage} is not writable: {target}: {e.strerror or e}") from None


def _exists(path: Path) -> bool:
    try:
        path.stat()
    except OSError:  # not there, a file on the way, or a name too long: not a usable folder
        return False
    return True


_PROBE = """
import json, sys
try:
    import pyarrow.fs as pafs
    fs, path = pafs.FileSystem.from_uri(sys.argv[1])
    info = fs.get_file_info(path)
    root = fs.get_file_info(path.split("/")[0]) if "/" in path.strip("/") else info
    print(json.dumps({"type": info.type.name, "root": root.type.name, "root_name": path.split("/")[0],
                      "local": type(fs).__name__ == "LocalFileSystem", "path": path}))
except Exception as e:
    print(json.dumps({"error": (str(e).strip().splitlines() or [type(e).__name__])[0]}))
"""


def _check_uri(uri: str) -> None:
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, uri], capture_output=True, text=True,
                           timeout=STORAGE_TIMEOUT_S)
        answer = json.loads(r.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        raise ConfigError(f"cannot reach storage {uri}: no answer within {STORAGE_TIMEOUT_S:g} s "
                          "(network, endpoint or credentials?)") from None
    except (ValueError, IndexError, OSError):
        raise ConfigError(f"cannot reach storage {uri}: the storage probe failed") from None
    if "error" in answer:
        raise ConfigError(f"cannot reach storage {uri}: {answer['error']}")
    if answer["type"] == "File":
        raise ConfigError(f"--storage {uri} is a file, not a folder")
    if not answer["local"] and answer["root"] == "NotFound":  # (a local file:// folder is created by Ray)
        raise ConfigError(f"cannot reach storage {uri}: bucket {answer['root_name']!r} does not exist "
                          "(or these credentials cannot see it)")
