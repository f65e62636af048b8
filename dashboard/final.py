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

import io
import re
import shlex
import warnings
from pathlib import Path

import streamlit as st
from PIL import Image

from dashboard import final_figures
from dashboard.class_figures import confused_pairs_table
from dashboard.common import md_text, section
from dashboard.figure_helpers import as_count, finite_number
from dashboard.final_summary import FinalState, delivered_words, file_inside, read_final
from search.layout import DEFAULT_STORAGE, FINAL_DIR, PAIRS_IMAGE, REPORT_FILE

MAX_REPORT_BYTES = 512 * 2**10
MAX_PNG_BYTES = 10 * 2**20
MAX_PNG_PIXELS = 16_000_000  # Streamlit decodes (and may resize) the image on the server
HARDEST = 15  # classes in the heatmap's "hardest" view
MISSING = {
    "single": "no best-single-trial result",
    "ensemble": "no ensemble (it needs at least 2 distinct trials with a checkpoint)",
    "refit": "no refit",
}


def final_command(root: Path, name: str) -> str:
    """The command that runs the final stage of this experiment (--storage only when not the default)."""
    cmd = f"python search/final.py --name {shlex.quote(name)}"
    if Path(root).resolve() != DEFAULT_STORAGE.resolve():
        cmd += f" --storage {shlex.quote(str(root))}"
    return cmd


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
    key = state.kind or final_figures.delivered_key(final)
    result = next((r for r in final_figures.final_results(final) if r["key"] == key), None)
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
    present = {r["key"] for r in final_figures.final_results(final)}
    if not present:
        st.warning("summary.json has no test results of the final models.")
        return
    missing = [MISSING[k] for k in final_figures.FINAL_MODELS if k not in present]
    if missing:
        st.caption("Not in this run: " + "; ".join(missing) + ".")
    left, right = st.columns([2, 3])
    left.plotly_chart(final_figures.final_accuracy_figure(final), key="final_accuracy")
    with right:
        st.dataframe(final_figures.final_results_table(final), hide_index=True, key="final_results", column_config={
            "test acc": st.column_config.NumberColumn("test acc", format="%.4f"),
            "delivered": st.column_config.CheckboxColumn("delivered", help="final/model.pt"),
        })
        members = [r for r in final_figures.final_results(final) if r["members"]]
        for r in members:
            st.caption(f"{r['key']} members: " + ", ".join(md_text(m, 40) for m in r["members"][:20]))
        trials = final_figures.top_trials_table(final)
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
    k = as_count(selection.get("chosen_k"))
    pays = selection.get("ensemble_pays")
    metric = selection.get("metric")
    cells = [("Metric", final_figures.short_text(metric, 30) if isinstance(metric, str) else "–"),
             ("Chosen k", str(k) if k is not None else "–"),
             ("Ensemble pays", {True: "yes", False: "no"}.get(pays, "–") if isinstance(pays, bool) else "–")]
    for col, (label, value) in zip(st.columns(len(cells)), cells, strict=True):
        col.metric(label, value)
    left, right = st.columns([3, 2])
    left.plotly_chart(final_figures.selection_figure(state.final), key="final_selection")
    with right:
        candidates = selection.get("candidates")
        candidates = [c for c in candidates if isinstance(c, dict)] if isinstance(candidates, list) else []
        rows = [{"trial": final_figures.short_text(c.get("trial_id", "?"), 40),
                 "val acc": finite_number(c.get("val_acc"))} for c in candidates]
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
    seeds = as_count(refit.get("seeds"))
    members = refit.get("members")
    members = [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []
    finished = as_count(refit.get("finished"))
    st.markdown(f"**Refit** on the whole training split: epochs {md_text(epochs if epochs is not None else '?', 30)}, "
                f"{seeds if seeds is not None else '?'} seed(s) per config, {len(members)} model(s) planned"
                + (f", {finished} finished" if finished is not None else ""))
    if members:
        rows = [{final_figures.short_text(k, 30): final_figures.short_text(v, 40) for k, v in m.items()
                 if isinstance(v, str | int | float | bool) or v is None} for m in members[:50]]
        st.dataframe(rows, hide_index=True, key="final_refit_members")


def _per_class(state: FinalState, name: str) -> None:
    st.subheader("Per-class F1: top trials and final models (test split)")
    matrix = final_figures.f1_matrix(state.final)
    if matrix.empty or matrix.isna().all().all():
        st.info("summary.json has no per-class results to compare.")
        return
    cols = list(matrix.columns)
    if len(cols) > HARDEST:
        view = st.radio("Classes", [f"All {len(cols)}", f"The {HARDEST} hardest (lowest mean F1)"], horizontal=True,
                        key=f"final_f1_classes:{name}")
        if not view.startswith("All"):
            cols = final_figures.hardest_classes(matrix, HARDEST)
    st.plotly_chart(final_figures.f1_heatmap(matrix[cols]), key="final_f1")
    st.caption("Rows: the final models (the delivered one marked), then the top trials' own best checkpoints. "
               "Red cells are the characters a model gets wrong; hover for the values.")


def _confused(root: Path, state: FinalState, name: str) -> None:
    st.subheader("Most confused pairs (test split)")
    results = [r for r in final_figures.final_results(state.final) if r["most_confused"]]
    if results:
        delivered = state.kind or final_figures.delivered_key(state.final)
        keys = [r["key"] for r in results]
        default = keys.index(delivered) if delivered in keys else 0
        key = st.selectbox("Model", keys, index=default, key=f"final_pairs_model:{name}",
                           format_func=lambda k: k + (" (delivered)" if k == delivered else ""))
        chosen = next(r for r in results if r["key"] == key)
        st.dataframe(confused_pairs_table(chosen["most_confused"]), hide_index=True, key="final_pairs")
    else:
        st.info("summary.json lists no confused pairs for the final models.")
    png = file_inside(root, state.exp_dir, FINAL_DIR, PAIRS_IMAGE)
    if png is None:
        st.caption("final/confused_pairs.png is not there.")
        return
    data, why = read_png(png)
    if data is None:
        st.warning(f"final/confused_pairs.png cannot be shown: {why}.")
    else:
        st.image(data, caption="final/confused_pairs.png")


def _report(root: Path, state: FinalState) -> None:
    path = file_inside(root, state.exp_dir, FINAL_DIR, REPORT_FILE)
    if path is None:
        st.caption("final/report.md is not there.")
        return
    with st.expander("final/report.md", expanded=False):
        st.markdown(read_report(path))
