"""What both dashboard pages share: the results root, safe experiment lookup, cached loading.

Security: the dashboard never opens a path typed by a user. Experiments are picked from the
folders found under the results root, and every name is resolved and checked to stay inside
the root (also through symlinks) before anything is read. Inside an experiment, every trial
folder and file (params.json, result.json, checkpoints, error.txt) gets the same check
(`search.layout.is_inside`, the one helper): one that leads outside the root is not opened.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import unquote

from search.layout import DEFAULT_STORAGE, is_inside
from search.results import Experiment, list_experiments, load_experiment

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_RESULTS = "EMNIST_TUNE_RESULTS"


class UnsafePath(ValueError):
    """A name that would leave the results root."""


def results_root(argv: list[str] | None = None) -> Path:
    """`streamlit run dashboard/app.py -- --results DIR`, else $EMNIST_TUNE_RESULTS, else results/."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--results", default=None)
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return Path(args.results or os.environ.get(ENV_RESULTS) or DEFAULT_STORAGE).expanduser().resolve()


def safe_child(root: Path, name: str) -> Path:
    """root/name, refusing anything that escapes root: '..', absolute paths, separators,
    URL-encoded tricks, and symlinks that point outside."""
    decoded = unquote(unquote(name or ""))
    if (not decoded or decoded in (".", "..") or "/" in decoded or "\\" in decoded or "\x00" in decoded
            or os.path.isabs(decoded)):
        raise UnsafePath(f"not an experiment name: {name!r}")
    root_real = root.resolve()
    path = (root_real / decoded).resolve()
    if not is_inside(root_real, path) or path.parent != root_real:
        raise UnsafePath(f"{name!r} leads outside the results root")
    return path


def experiment_names(root: Path) -> list[str]:
    """Experiments directly under root whose real location is inside root (newest first)."""
    out = []
    for name in list_experiments(root):
        try:
            safe_child(root, name)
        except UnsafePath:
            continue
        out.append(name)
    return out


def open_experiment(root: Path, name: str) -> Experiment:
    path = safe_child(root, name)
    if not path.is_dir():
        raise UnsafePath(f"no experiment named {name!r} under {root}")
    return load_experiment(path, root=root)


def safe_checkpoint(root: Path, path: str | Path) -> Path:
    """A checkpoint path that came from an experiment listing, re-checked to be inside root."""
    return safe_file(root, path, "checkpoint")


def safe_file(root: Path, path: str | Path, what: str = "file") -> Path:
    """The real location of a file under an experiment (checkpoint, error.txt), which must be inside
    root (and not root itself)."""
    real = Path(path).resolve()
    if real == root.resolve() or not is_inside(root, real):
        raise UnsafePath(f"{what} outside the results root")
    return real


def read_tail(path: Path, max_bytes: int = 64 * 1024) -> str:
    """The last max_bytes of a text file (error.txt can be any size)."""
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - max_bytes))
        return f.read(max_bytes).decode("utf-8", errors="replace")


def section(what: str, fn, *args) -> None:
    """Run one part of a page; a failure there (damaged or unexpected data on disk) is a message,
    the other parts still render."""
    import streamlit as st

    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        st.error(f"The {what} could not be shown: {type(e).__name__}: {e}")


_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_{}[]()<>#+-.!|~$"})


def md_text(text: str, limit: int = 200) -> str:
    """Text from disk (file and trial names) as plain text inside markdown: no links, images or code."""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.translate(_MARKDOWN)


# Why a trial has no checkpoint, by its status: one wording for every page.
NO_CHECKPOINT = {
    "pending": "has not started yet, so there is no checkpoint",
    "running": "is running and has not saved a checkpoint yet",
    "error": "failed before saving a checkpoint",
    "diverged": "diverged before saving a usable checkpoint",
}


def no_checkpoint_reason(status: str) -> str:
    return NO_CHECKPOINT.get(status, "has no checkpoint on disk (not written yet, not synced, or deleted)")
