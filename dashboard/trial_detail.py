"""The explorer's "one trial in detail" section: a trial's configuration, the tail of its error.txt when it
failed, and the per-class results of its best checkpoint (precision / recall / F1, the most confused
pairs, the confusion matrix).

Whatever is on disk is shown as it is: a trial without a checkpoint yet, a checkpoint outside the
results root (not opened), one that disappears or cannot be read, each becomes a sentence on the page.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import class_figures, trial_table
from dashboard.common import UnsafePath, no_checkpoint_reason, read_tail, safe_checkpoint, safe_file
from search.results import OUTSIDE, Experiment


@st.cache_data(max_entries=32, show_spinner="Reading the checkpoint…")
def _checkpoint_metrics(path: str, size: int, mtime_ns: int) -> dict:
    """What the page shows from a checkpoint (not the weights): val metrics, classes, epoch."""
    from training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    metrics = ckpt.get("metrics") if isinstance(ckpt.get("metrics"), dict) else {}
    return {"val": metrics.get("val"), "classes": [str(c) for c in ckpt["classes"]], "epoch": ckpt.get("epoch"),
            "val_acc": metrics.get("val_acc")}


def render(root: Path, exp: Experiment, tid: str) -> None:
    """Trial `tid` of `exp` (the explorer's selectbox chose it)."""
    trials = exp.trials
    row = trials.loc[trials["trial_id"].astype(str) == tid].iloc[0]
    config = {trial_table.param_name(k): v for k, v in row.items() if k.startswith(trial_table.CONFIG) and _present(v)}
    with st.expander("Configuration", expanded=False):
        if config:
            st.json(config)
        else:
            st.write("No params.json for this trial yet.")
    if row["status"] == "error":
        _error_file(root, exp, tid)

    path = exp.best_checkpoint(tid)
    if path is None and any(OUTSIDE in n and "checkpoint" in n for n in exp.notes.get(tid, [])):
        st.error(f"The checkpoint of trial {tid} is outside the results root, so it was not opened.")
        return
    if path is None:
        hint = " Press Refresh after its first epoch." if row["status"] == "running" else ""
        hint = " (see its error.txt below)" if row["status"] == "error" else hint
        st.info(f"Trial {tid} {no_checkpoint_reason(str(row['status']))}.{hint}")
        return
    try:
        real = safe_checkpoint(root, path)
        stat = real.stat()
        info = _checkpoint_metrics(str(real), stat.st_size, stat.st_mtime_ns)
    except UnsafePath:
        st.error(f"The checkpoint of trial {tid} is outside the results root, so it was not opened.")
        return
    except FileNotFoundError:
        st.warning(f"The checkpoint of trial {tid} disappeared while reading it. Press Refresh.")
        return
    except Exception as e:  # noqa: BLE001 - CheckpointError has a clear message; anything else too
        from training.checkpoint import CheckpointError

        if isinstance(e, CheckpointError):
            st.warning(f"Trial {tid}'s best checkpoint cannot be used: {_first_line(str(e))}")
        else:
            st.error(f"Could not read trial {tid}'s checkpoint ({real.name}): {type(e).__name__}: {e}")
        return

    val = info.get("val") if isinstance(info.get("val"), dict) else None
    if not val:
        st.info(f"Trial {tid}'s checkpoint (epoch {info.get('epoch')}) has no per-class validation metrics.")
        return
    acc = val.get("accuracy")
    st.caption(f"Best checkpoint of trial {tid}: epoch {info.get('epoch')}, "
               f"val accuracy {acc:.4f} on {val.get('n', '?')} images · `{real.parent.name}/{real.name}`"
               if isinstance(acc, int | float) else f"Best checkpoint of trial {tid}: epoch {info.get('epoch')}")
    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Per-class precision / recall / F1**")
        st.dataframe(class_figures.per_class_table(val), hide_index=True, key="explorer_per_class", column_config={
            c: st.column_config.NumberColumn(c, format="%.3f") for c in ("precision", "recall", "f1")})
    with right:
        st.markdown("**Most confused pairs**")
        pairs = class_figures.confused_pairs_table(val.get("most_confused"))
        if pairs.empty:
            st.info("No two classes were confused with each other.")
        else:
            st.dataframe(pairs, hide_index=True, key="explorer_pairs")
    st.plotly_chart(class_figures.confusion_heatmap(val.get("confusion"), info.get("classes")),
                    key="explorer_confusion")


def _present(value) -> bool:
    """A config cell that has a value (a list or dict from params.json counts, NaN/None do not)."""
    return value is not None and not (isinstance(value, float) and value != value)


def _first_line(text: str, limit: int = 400) -> str:
    """The first line of a message, cut to a readable length (torch's errors run on for lines)."""
    first = text.strip().splitlines()[0] if text.strip() else text
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def _error_file(root: Path, exp: Experiment, tid: str) -> None:
    """The tail of a failed trial's error.txt, if there is one inside the results root."""
    try:
        path = safe_file(root, exp.path / f"trial_{tid}" / "error.txt", "error.txt")
        text = read_tail(path) if path.is_file() else ""
    except (UnsafePath, OSError):
        return
    if text:
        with st.expander("error.txt (last lines)"):
            st.code("\n".join(text.strip().splitlines()[-30:]), language=None)
