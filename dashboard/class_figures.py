"""One model's per-class results: a checkpoint's validation metrics (the explorer's trial in detail)
and the most confused pairs of a final model's test results (the final-model page). Pure functions of
the JSON read from disk; where there is nothing to draw, a figure says so instead of raising.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from dashboard.figure_helpers import as_count, empty_figure

PER_CLASS_COLUMNS = ["class", "precision", "recall", "f1", "support"]
PAIR_COLUMNS = ["pair", "mistakes", "detail"]


def per_class_table(metrics_val: Mapping | None) -> pd.DataFrame:
    """class, precision, recall, f1, support: one row per class of a checkpoint's validation metrics."""
    rows = (metrics_val or {}).get("per_class") or []
    df = pd.DataFrame([r for r in rows if isinstance(r, Mapping)], columns=PER_CLASS_COLUMNS)
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=float if c != "class" else object) for c in PER_CLASS_COLUMNS})
    df["class"] = df["class"].astype(str)
    for c in ("precision", "recall", "f1"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["support"] = pd.to_numeric(df["support"], errors="coerce").astype("Int64")
    return df.reset_index(drop=True)


def confusion_heatmap(confusion: Sequence[Sequence[float]] | None, classes: Sequence[str] | None) -> go.Figure:
    """Counts, rows = true class, columns = predicted class, diagonal top-left to bottom-right.
    Hover shows the share of the true class's images."""
    title = "Confusion matrix (validation)"
    try:
        cm = np.asarray(confusion if confusion is not None else [], dtype=float)
    except (TypeError, ValueError):
        cm = np.zeros((0, 0))
    if cm.ndim != 2 or cm.size == 0 or cm.shape[0] != cm.shape[1]:
        return empty_figure("This checkpoint has no confusion matrix.", title)
    n = cm.shape[0]
    labels = [str(c) for c in classes] if classes is not None and len(classes) == n else [str(i) for i in range(n)]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    side = min(900, max(350, 40 + 22 * n))
    fig = px.imshow(cm, x=labels, y=labels, text_auto=".0f" if n <= 20 else False, color_continuous_scale="Blues",
                    labels={"x": "predicted", "y": "true", "color": "images"}, aspect="auto", title=title,
                    height=side)
    fig.update_traces(customdata=share, hovertemplate="true %{y}, predicted %{x}: %{z:.0f} "
                                                      "(%{customdata:.1%} of %{y})<extra></extra>")
    fig.update_xaxes(type="category", side="bottom")
    fig.update_yaxes(type="category")
    return fig


def confused_pairs_table(most_confused: Sequence[Mapping] | None) -> pd.DataFrame:
    """The class pairs mixed up most often (either direction), e.g. 'O ↔ 0'."""
    rows = []
    for p in most_confused or []:
        if not isinstance(p, Mapping):
            continue
        a, b = str(p.get("a", "?")), str(p.get("b", "?"))
        ab, ba = as_count(p.get("a_as_b")), as_count(p.get("b_as_a"))
        total = as_count(p.get("count"))
        rows.append({"pair": f"{a} ↔ {b}", "mistakes": total if total is not None else (ab or 0) + (ba or 0),
                     "detail": f"{_n(ab)}× {a!r} read as {b!r}, {_n(ba)}× {b!r} read as {a!r}"})
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    df["mistakes"] = pd.to_numeric(df["mistakes"], errors="coerce").astype("Int64")
    return df


def _n(v: int | None) -> str:
    return "?" if v is None else str(v)
