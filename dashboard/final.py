"""Final model page: what the search delivered (`results/<name>/final/`, summary.json's "final").

It shows the best single trial, the ensemble of the top trials and the refit side by side on the
test split (accuracy with its 95 % CI, which one is final/model.pt), how the validation split chose
between them (val acc by k, whether the ensemble paid), per-class F1 of the top trials and the final
models (which characters each one gets wrong), the most confused pairs, and the stage's own
confused_pairs.png and report.md.

summary.json is untrusted (old, partial, damaged or hand-edited): whatever does not have the
expected shape is a sentence on the page, and every part of the page renders on its own. Only the
files at their fixed places under the experiment are read (never a path named inside summary.json),
each re-checked to be inside the results root (`safe_file`), each bounded in size.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from PIL import Image

from dashboard import figures
from dashboard.common import REPO_ROOT, UnsafePath, md_text, safe_child, safe_file, section

SUMMARY = "summary.json"
FINAL_DIR = "final"
MODEL = "model.pt"
REPORT = "report.md"
PAIRS_PNG = "confused_pairs.png"
MAX_SUMMARY_BYTES = 32 * 2**20  # a summary is a few hundred kB even for 47 classes and many trials
MAX_REPORT_BYTES = 512 * 2**10
MAX_PNG_BYTES = 10 * 2**20
MAX_PNG_PIXELS = 16_000_000  # Streamlit decodes (and may resize) the image on the server
HARDEST = 15  # classes in the heatmap's "hardest" view
DEFAULT_STORAGE = REPO_ROOT / "results"  # search/run.py's --storage default
MISSING = {
    "single": "no best-single-trial result",
    "ensemble": "no ensemble (it needs at least 2 distinct trials with a checkpoint)",
    "refit": "no refit",
}


# ---------------------------------------------------------------- reading


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


def final_command(root: Path, name: str) -> str:
    """The command that runs the final stage of this experiment (--storage only when not the default)."""
    cmd = f"python search/final.py --name {shlex.quote(name)}"
    if Path(root).resolve() != DEFAULT_STORAGE.resolve():
        cmd += f" --storage {shlex.quote(str(root))}"
    return cmd


def _inside(root: Path, exp_dir: Path, *parts: str) -> Path | None:
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
    state = FinalState(exp_dir=exp_dir, model=_inside(root, exp_dir, FINAL_DIR, MODEL))
    summary_path = exp_dir / SUMMARY
    if not summary_path.exists():
        state.problem, state.message = "no_summary", (
            "This experiment has no summary.json yet: the search is still running, was interrupted, "
            "or ran before summaries were written.")
        return state
    summary, why = _read_summary(root, summary_path)
    if summary is None:
        state.problem, state.message = "unreadable", f"summary.json cannot be read: {why}."
        return state
    if "final" not in summary:
        state.problem, state.message = "absent", (
            "This experiment has no final model yet: its summary.json has no \"final\" entry (an older "
            "search, a search run with --no-final, or a final stage that has not finished).")
        return state
    if not isinstance(summary["final"], dict):
        state.problem, state.message = "malformed", (
            f"summary.json's \"final\" entry is damaged (a {type(summary['final']).__name__}, not an object), "
            "so the final model's results cannot be shown.")
        return state
    state.final = summary["final"]
    state.model_matches = model_matches(state.model, state.final)
    return state


def _read_summary(root: Path, path: Path) -> tuple[dict | None, str]:
    """(summary.json as a dict, "") or (None, why not)."""
    try:
        real = safe_file(root, path, SUMMARY)
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


def read_report(path: Path) -> str:
    """report.md as markdown without images: the page shows confused_pairs.png itself, a relative
    image path would not resolve, and a remote one would be fetched by every viewer's browser."""
    with path.open("rb") as f:
        text = f.read(MAX_REPORT_BYTES + 1).decode("utf-8", errors="replace")
    cut = len(text) > MAX_REPORT_BYTES
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"(image: \1)", text[:MAX_REPORT_BYTES])
    return text + ("\n\n… (cut: report.md is longer than the page shows)" if cut else "")


def read_png(path: Path) -> tuple[bytes | None, str]:
    """(PNG bytes, "") or (None, why not): a PNG, bounded in bytes and pixels before anything decodes it."""
    try:
        if path.stat().st_size > MAX_PNG_BYTES:
            return None, f"it is larger than {MAX_PNG_BYTES // 2**20} MB"
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                if img.format != "PNG":
                    return None, "it is not a PNG image"
                if img.width * img.height > MAX_PNG_PIXELS:
                    return None, f"it is larger than {MAX_PNG_PIXELS // 1_000_000} megapixels"
                img.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None, "it is not a readable PNG image"
    return data, ""


# ---------------------------------------------------------------- page


def render(root: Path, name: str) -> None:
    st.header(f"Final model · {name}")
    state = read_final(root, name)
    if state.problem == "unsafe":
        st.error(state.message)
        return
    if state.problem:
        (st.error if state.problem in ("unreadable", "malformed") else st.info)(state.message)
        if state.problem in ("no_summary", "absent", "malformed", "unreadable"):
            st.markdown("Run the final stage (refit, ensemble, test evaluation) with:")
            st.code(final_command(root, name), language="bash")
        if state.model is not None:
            st.caption("`final/model.pt` is there: the Predictor page offers it.")
        return
    section("delivered model", _delivered, state)
    section("test results", _test_results, state)
    section("selection", _selection, state, name)
    section("per-class F1", _per_class, state, name)
    section("most confused pairs", _confused, root, state, name)
    section("report", _report, root, state)


def _delivered(state: FinalState) -> None:
    final = state.final
    words = delivered_words(final)
    key = figures.delivered_key(final)
    result = next((r for r in figures.final_results(final) if r["key"] == key), None)
    st.subheader("Delivered model")
    acc = result["accuracy"] if result else None
    ci = result["ci"] if result else None
    n = result["n"] if result else None
    st.markdown(f"**final/model.pt** is the {md_text(words) if words else 'model summary.json does not name'}"
                + (f" ({result['key']})" if result else "") + ".")
    cells = [("Test accuracy", f"{acc:.4f}" if acc is not None else "–"),
             ("95 % CI", f"{ci[0]:.4f} – {ci[1]:.4f}" if ci else "–"),
             ("Test images", f"{n:,}" if n is not None else "–")]
    for col, (label, value) in zip(st.columns([2, 3, 2, 3]), cells, strict=False):
        col.metric(label, value)
    problems = final.get("problems")
    problems = [md_text(p, 300) for p in problems if p] if isinstance(problems, list) else []
    if problems:
        st.warning("The final stage reported problems:\n" + "\n".join(f"- {p}" for p in problems[:20]))
    if result is None and state.model is None:
        st.warning("No model was delivered" + (f" ({md_text(words)})" if words else "") + ".")
    elif result is None:
        st.warning("summary.json does not say which of the tested models final/model.pt is"
                   + (f" (it says {md_text(words)!r})" if words else "") + ", or has no test result for it.")
    elif acc is None:
        st.warning(f"summary.json has no usable test accuracy for the delivered model ({result['key']}).")
    if state.model_matches is False:
        st.warning("final/model.pt is not the model this report is about (its sha256 differs from the one "
                   "summary.json records): the final stage was stopped while it delivered a new model, or the file "
                   "was replaced. Run it again to deliver and report one model: "
                   f"`{final_command(state.exp_dir.parent, state.exp_dir.name)}`.")
    if state.model is not None:
        size = state.model.stat().st_size / 2**20  # (a file the reader just found; gone now: a section error)
        st.caption(f"`final/model.pt` ({size:.1f} MB): the Predictor page offers it first. Every number on "
                   "this page is from the test split, evaluated once at the end, except the selection below "
                   "(validation split).")
    elif result is not None:
        st.warning("final/model.pt is missing (deleted, not synced, or outside the results root).")


def _test_results(state: FinalState) -> None:
    st.subheader("Best single trial vs ensemble vs refit (test split)")
    final = state.final
    present = {r["key"] for r in figures.final_results(final)}
    if not present:
        st.warning("summary.json has no test results of the final models.")
        return
    missing = [MISSING[k] for k in figures.FINAL_MODELS if k not in present]
    if missing:
        st.caption("Not in this run: " + "; ".join(missing) + ".")
    left, right = st.columns([2, 3])
    left.plotly_chart(figures.final_accuracy_figure(final), key="final_accuracy")
    with right:
        st.dataframe(figures.final_results_table(final), hide_index=True, key="final_results", column_config={
            "test acc": st.column_config.NumberColumn("test acc", format="%.4f"),
            "delivered": st.column_config.CheckboxColumn("delivered", help="final/model.pt"),
        })
        members = [r for r in figures.final_results(final) if r["members"]]
        for r in members:
            st.caption(f"{r['key']} members: " + ", ".join(md_text(m, 40) for m in r["members"][:20]))
        trials = figures.top_trials_table(final)
        if not trials.empty:
            st.markdown("**The top trials' own best checkpoints**")
            st.dataframe(trials, hide_index=True, key="final_top_trials", column_config={
                c: st.column_config.NumberColumn(c, format="%.4f") for c in ("val acc", "test acc")})


def _selection(state: FinalState, name: str) -> None:
    st.subheader("How it was chosen (validation split)")
    selection = state.final.get("selection")
    if not isinstance(selection, dict):
        st.info("summary.json has no record of the selection.")
        return
    k = figures.as_count(selection.get("chosen_k"))
    pays = selection.get("ensemble_pays")
    metric = selection.get("metric")
    cells = [("Metric", figures.short_text(metric, 30) if isinstance(metric, str) else "–"),
             ("Chosen k", str(k) if k is not None else "–"),
             ("Ensemble pays", {True: "yes", False: "no"}.get(pays, "–") if isinstance(pays, bool) else "–")]
    for col, (label, value) in zip(st.columns(len(cells)), cells, strict=True):
        col.metric(label, value)
    left, right = st.columns([3, 2])
    left.plotly_chart(figures.selection_figure(state.final), key="final_selection")
    with right:
        candidates = selection.get("candidates")
        candidates = [c for c in candidates if isinstance(c, dict)] if isinstance(candidates, list) else []
        rows = [{"trial": figures.short_text(c.get("trial_id", "?"), 40),
                 "val acc": figures.as_number(c.get("val_acc"))} for c in candidates]
        if rows:
            st.markdown("**Candidates** (top trials by validation accuracy)")
            st.dataframe(rows, hide_index=True, key="final_candidates",
                         column_config={"val acc": st.column_config.NumberColumn("val acc", format="%.4f")})
        _refit_info(state.final.get("refit"))


def _refit_info(refit) -> None:
    """The refit's settings and one row per refitted model. Its fields are shown as they come (plain
    text), so a summary written by another version of the final stage still reads."""
    if not isinstance(refit, dict):
        return
    epochs = refit.get("epochs", refit.get("epochs_mode"))
    seeds = figures.as_count(refit.get("seeds"))
    members = refit.get("members")
    members = [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []
    finished = figures.as_count(refit.get("finished"))
    st.markdown(f"**Refit** on the whole training split: epochs {md_text(epochs if epochs is not None else '?', 30)}, "
                f"{seeds if seeds is not None else '?'} seed(s) per config, {len(members)} model(s) planned"
                + (f", {finished} finished" if finished is not None else ""))
    if members:
        rows = [{figures.short_text(k, 30): figures.short_text(v, 40) for k, v in m.items()
                 if isinstance(v, str | int | float | bool) or v is None} for m in members[:50]]
        st.dataframe(rows, hide_index=True, key="final_refit_members")


def _per_class(state: FinalState, name: str) -> None:
    st.subheader("Per-class F1: top trials and final models (test split)")
    matrix = figures.f1_matrix(state.final)
    if matrix.empty or matrix.isna().all().all():
        st.info("summary.json has no per-class results to compare.")
        return
    cols = list(matrix.columns)
    if len(cols) > HARDEST:
        view = st.radio("Classes", [f"All {len(cols)}", f"The {HARDEST} hardest (lowest mean F1)"], horizontal=True,
                        key=f"final_f1_classes:{name}")
        if not view.startswith("All"):
            cols = figures.hardest_classes(matrix, HARDEST)
    st.plotly_chart(figures.f1_heatmap(matrix[cols]), key="final_f1")
    st.caption("Rows: the final models (the delivered one marked), then the top trials' own best checkpoints. "
               "Red cells are the characters a model gets wrong; hover for the values.")


def _confused(root: Path, state: FinalState, name: str) -> None:
    st.subheader("Most confused pairs (test split)")
    results = [r for r in figures.final_results(state.final) if r["most_confused"]]
    if results:
        delivered = figures.delivered_key(state.final)
        keys = [r["key"] for r in results]
        default = keys.index(delivered) if delivered in keys else 0
        key = st.selectbox("Model", keys, index=default, key=f"final_pairs_model:{name}",
                           format_func=lambda k: k + (" (delivered)" if k == delivered else ""))
        chosen = next(r for r in results if r["key"] == key)
        st.dataframe(figures.confused_pairs_table(chosen["most_confused"]), hide_index=True, key="final_pairs")
    else:
        st.info("summary.json lists no confused pairs for the final models.")
    png = _inside(root, state.exp_dir, FINAL_DIR, PAIRS_PNG)
    if png is None:
        st.caption("final/confused_pairs.png is not there.")
        return
    data, why = read_png(png)
    if data is None:
        st.warning(f"final/confused_pairs.png cannot be shown: {why}.")
    else:
        st.image(data, caption="final/confused_pairs.png")


def _report(root: Path, state: FinalState) -> None:
    path = _inside(root, state.exp_dir, FINAL_DIR, REPORT)
    if path is None:
        st.caption("final/report.md is not there.")
        return
    with st.expander("final/report.md", expanded=False):
        st.markdown(read_report(path))
