"""What is on disk of an experiment's final stage: summary.json's "final" object and final/model.pt, read
for the final-model page and for the predictor page (which offers final/model.pt first).

summary.json is untrusted (old, partial, damaged or hand-edited): read_final never raises for what is
on disk, it says what is wrong. Only the files at their fixed places under the experiment are read
(never a path named inside summary.json), each re-checked to be inside the results root (`safe_file`),
each bounded in size.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dashboard.common import UnsafePath, safe_child, safe_file
from search.final_report import SUMMARY_KEY, FinalReport, ReportError
from search.layout import FINAL_DIR, MODEL_FILE, SUMMARY_FILE

MAX_SUMMARY_BYTES = 32 * 2**20  # a summary is a few hundred kB even for 47 classes and many trials


@dataclass
class FinalState:
    """What is on disk of an experiment's final stage. `final` is summary.json's "final" object when
    it is one; otherwise `problem` names what is wrong and `message` says it in a sentence."""

    exp_dir: Path | None = None
    final: dict | None = None
    problem: str = ""  # "", "unsafe", "no_summary", "unreadable", "absent", "malformed"
    message: str = ""
    model: Path | None = None  # final/model.pt (real path, inside the root), when it is a file
    # False: final/model.pt is not the file summary.json reports on (its sha256 differs: a final stage stopped
    # between writing the report and the model, or a file replaced by hand). None: not known (older summaries).
    model_matches: bool | None = None
    # Which of the tested models final/model.pt is: the record's delivered_kind (search.final_report.FinalReport),
    # when `final` is a whole record; None for an older, partial or hand-edited entry (the page then shows what
    # it can of it, and goes by its words: dashboard.final_figures.delivered_key).
    kind: str | None = None


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of a file, cached by its path, mtime and size (a new model.pt is hashed again)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def model_matches(model: Path | None, final: dict | None) -> bool | None:
    """Whether final/model.pt is the model summary.json's "final" reports on (see FinalState.model_matches)."""
    want = (final or {}).get("model_sha256")
    if model is None or not isinstance(want, str):
        return None
    try:
        st_ = model.stat()
        return _file_sha256(str(model), st_.st_mtime_ns, st_.st_size) == want
    except OSError:
        return None

def file_inside(root: Path, exp_dir: Path, *parts: str) -> Path | None:
    """exp_dir/parts as a real path inside root when it is a regular file (a FIFO would block the
    reader, a folder is not a file); None when missing or outside root."""
    try:
        path = safe_file(root, exp_dir.joinpath(*parts), parts[-1])
    except UnsafePath:
        return None
    return path if path.is_file() else None


def read_final(root: Path, name: str) -> FinalState:
    """The final stage of experiment `name` under root, never raising for what is on disk."""
    try:
        exp_dir = safe_child(root, name)
    except UnsafePath as e:
        return FinalState(problem="unsafe", message=f"Cannot open this experiment: {e}.")
    state = FinalState(exp_dir=exp_dir, model=file_inside(root, exp_dir, FINAL_DIR, MODEL_FILE))
    summary_path = exp_dir / SUMMARY_FILE
    if not summary_path.exists():
        state.problem, state.message = "no_summary", (
            "This experiment has no summary.json yet: the search is still running, was interrupted, "
            "or ran before summaries were written.")
        return state
    summary, why = _read_summary(root, summary_path)
    if summary is None:
        state.problem, state.message = "unreadable", f"summary.json cannot be read: {why}."
        return state
    if SUMMARY_KEY not in summary:
        state.problem, state.message = "absent", (
            "This experiment has no final model yet: its summary.json has no \"final\" entry (an older "
            "search, a search run with --no-final, or a final stage that has not finished).")
        return state
    if not isinstance(summary[SUMMARY_KEY], dict):
        state.problem, state.message = "malformed", (
            f"summary.json's \"final\" entry is damaged (a {type(summary[SUMMARY_KEY]).__name__}, not an object), "
            "so the final model's results cannot be shown.")
        return state
    state.final = summary[SUMMARY_KEY]
    try:
        state.kind = FinalReport.from_json(state.final, SUMMARY_FILE).delivered_kind
    except ReportError:
        pass
    state.model_matches = model_matches(state.model, state.final)
    return state


def _read_summary(root: Path, path: Path) -> tuple[dict | None, str]:
    """(summary.json as a dict, "") or (None, why not)."""
    try:
        real = safe_file(root, path, SUMMARY_FILE)
        if not real.is_file():
            return None, "it is not a regular file"
        if real.stat().st_size > MAX_SUMMARY_BYTES:
            return None, f"it is larger than {MAX_SUMMARY_BYTES // 2**20} MB"
        value = json.loads(real.read_bytes())
    except UnsafePath:
        return None, "it leads outside the results root"
    except OSError as e:
        return None, e.strerror or type(e).__name__
    except (ValueError, RecursionError):
        return None, "it is not valid JSON (damaged, or written by hand)"
    if not isinstance(value, dict):
        return None, "it is not a JSON object"
    return value, ""


def delivered_words(final: dict | None) -> str:
    """summary.json's description of final/model.pt ("refit ensemble of 3"), plain and short."""
    text = (final or {}).get("delivered")
    return " ".join(str(text).split())[:80] if isinstance(text, str) and text.strip() else ""
