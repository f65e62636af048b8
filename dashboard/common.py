"""What both dashboard pages share: the results root, safe experiment lookup, cached loading.

Security: the dashboard never opens a path typed by a user. Experiments are picked from the
folders found under the results root, and every name is resolved and checked to stay inside
the root (also through symlinks) before anything is read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import unquote

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
    return Path(args.results or os.environ.get(ENV_RESULTS) or REPO_ROOT / "results").expanduser().resolve()


def safe_child(root: Path, name: str) -> Path:
    """root/name, refusing anything that escapes root: '..', absolute paths, separators,
    URL-encoded tricks, and symlinks that point outside."""
    decoded = unquote(unquote(name or ""))
    if (not decoded or decoded in (".", "..") or "/" in decoded or "\\" in decoded or "\x00" in decoded
            or os.path.isabs(decoded)):
        raise UnsafePath(f"not an experiment name: {name!r}")
    root_real = root.resolve()
    path = (root_real / decoded).resolve()
    if path.parent != root_real:
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
    return load_experiment(path)


def safe_checkpoint(root: Path, path: str | Path) -> Path:
    """A checkpoint path that came from an experiment listing, re-checked to be inside root."""
    real = Path(path).resolve()
    if root.resolve() not in real.parents:
        raise UnsafePath("checkpoint outside the results root")
    return real
