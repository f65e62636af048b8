"""Files written whole or not at all, and JSON files read without ever raising.

Every file this project writes goes through `write_atomic`: a crash, a kill or a full disk mid-write
leaves the previous file (or none), never half a file. Readers of JSON return None (or skip a line) for
anything missing, cut short or hostile, because a search may still be writing, or a driver was killed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from training.failpoint import stop_here


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """`write(file)` into a temporary file beside `path`, then rename it over `path`: a crash or
    full disk mid-write leaves the previous file intact (or none), never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        stop_here(f"write:{path.name}")  # (the fault tests kill a process here: training/failpoint.py)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    return write_bytes(path, json.dumps(value, indent=indent).encode())


def parse_line(line: str | bytes) -> dict | None:
    """One JSON object, or None for anything else. ValueError covers a number too long for int()
    (Python refuses more than 4300 digits) and bad UTF-8; RecursionError very deep nesting."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def read_json_lines(path: Path) -> list[dict]:
    """Every complete JSON line; a half-written last line (a search still running) is skipped."""
    rows = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if line and (row := parse_line(line)) is not None:
            rows.append(row)
    return rows


def small_file(path: Path, max_bytes: int | None) -> bool:
    """A regular file (a FIFO or device would block the reader) of at most max_bytes (None: any size)."""
    try:
        return path.is_file() and (max_bytes is None or path.stat().st_size <= max_bytes)
    except (OSError, ValueError):  # (ValueError: a NUL byte in the path)
        return False


def read_json(path: Path, max_bytes: int | None = None) -> dict | None:
    """A JSON object file; None when missing, unreadable, not an object or (with max_bytes) larger."""
    if not small_file(path, max_bytes):
        return None
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
