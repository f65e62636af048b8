"""Figures and tables of the final-model page, from summary.json's "final" object: the best single
trial, the ensemble of the top trials and the refit on the test split, how the validation split chose
between them, per-class F1 of each model.

summary.json is read from disk and may be partial, old or damaged: every function below takes the raw
"final" object and skips what does not have the expected shape instead of raising.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from dashboard.figure_helpers import as_count, empty_figure, finite_number

FINAL_MODELS = ("single", "ensemble", "refit")  # the keys of final["test"], in the order they are built
DELIVERED_COLOR = "#2ca02c"
FINAL_COLOR = "#1f77b4"
MAX_LABEL = 48  # characters of a model label on an axis
F1_TEXT_MAX_CLASSES = 24  # F1 values written in the heatmap's cells up to this many classes (digits, letters)


def as_interval(v) -> tuple[float, float] | None:
    """A [low, high] pair of finite numbers, low <= high; else None."""
    if not isinstance(v, list | tuple) or len(v) != 2:
        return None
    lo, hi = finite_number(v[0]), finite_number(v[1])
    return (lo, hi) if lo is not None and hi is not None and lo <= hi else None


def short_text(text, limit: int = MAX_LABEL) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mapping(v) -> Mapping:
    return v if isinstance(v, Mapping) else {}


def final_results(final: Mapping | None) -> list[dict]:
    """The test results of the final models that are present (single, ensemble, refit, in that
    order), each {key, label, accuracy, ci, n, members, per_class, most_confused}; a number that is
    missing or not a number is None. An entry that is not an object is left out."""
    test = _mapping(_mapping(final).get("test"))
    out = []
    for key in FINAL_MODELS:
        entry = test.get(key)
        if not isinstance(entry, Mapping):
            continue
        members = entry.get("members")
        out.append({
            "key": key,
            "label": short_text(entry.get("label") or key),
            "accuracy": finite_number(entry.get("accuracy")),
            "ci": as_interval(entry.get("ci95")),
            "n": as_count(entry.get("n")),
            "members": [str(m) for m in members] if isinstance(members, list) else [],
            "per_class": entry.get("per_class") if isinstance(entry.get("per_class"), list) else [],
            "most_confused": entry.get("most_confused") if isinstance(entry.get("most_confused"), list) else [],
        })
    return out


def delivered_key(final: Mapping | None) -> str | None:
    """Which of final["test"]'s models is final/model.pt. summary.json says it in words ("refit",
    "refit ensemble of 3", ...): a refit is a refit (one model or several), otherwise an ensemble
    or the single best trial. None when the words match no model that was tested."""
    present = {r["key"] for r in final_results(final)}
    kind = _mapping(final).get("delivered_kind")  # written by search/final.py; the words are the fallback
    if isinstance(kind, str) and kind in present:
        return kind
    text = str(_mapping(final).get("delivered") or "").lower()
    for key, words in (("refit", ("refit",)), ("ensemble", ("ensemble",)), ("single", ("single", "trial"))):
        if key in present and any(w in text for w in words):
            return key
    return None


def _ci_text(ci: tuple[float, float] | None) -> str:
    return f"{ci[0]:.4f} – {ci[1]:.4f}" if ci else "–"


def final_results_table(final: Mapping | None) -> pd.DataFrame:
    """model, what it is, test accuracy, its 95 % CI, test images, delivered: one row per final model."""
    delivered = delivered_key(final)
    rows = [{"model": r["key"], "what": r["label"], "test acc": r["accuracy"], "95 % CI": _ci_text(r["ci"]),
             "test images": r["n"], "delivered": r["key"] == delivered} for r in final_results(final)]
    df = pd.DataFrame(rows, columns=["model", "what", "test acc", "95 % CI", "test images", "delivered"])
    df["test acc"] = pd.to_numeric(df["test acc"], errors="coerce")
    df["test images"] = pd.to_numeric(df["test images"], errors="coerce").astype("Int64")
    return df


def final_accuracy_figure(final: Mapping | None) -> go.Figure:
    """Test accuracy of each final model as a point with its 95 % confidence interval (the models are
    often a few tenths of a percent apart, which bars from zero would hide); the delivered one in green."""
    title = "Test accuracy with 95 % confidence interval"
    results = [r for r in final_results(final) if r["accuracy"] is not None]
    if not results:
        return empty_figure("No final model has a test accuracy.", title)
    delivered = delivered_key(final)
    acc = [r["accuracy"] for r in results]
    lo = [r["ci"][0] if r["ci"] else a for r, a in zip(results, acc, strict=True)]
    hi = [r["ci"][1] if r["ci"] else a for r, a in zip(results, acc, strict=True)]
    names = [r["key"] + (" (delivered)" if r["key"] == delivered else "") for r in results]
    fig = go.Figure(go.Scatter(
        x=names, y=acc, mode="markers+text", text=[f"{a:.4f}" for a in acc], textposition="middle right",
        marker={"size": 14, "color": [DELIVERED_COLOR if r["key"] == delivered else FINAL_COLOR for r in results]},
        cliponaxis=False,  # the last point's value stays readable
        error_y={"type": "data", "symmetric": False, "array": [h - a for h, a in zip(hi, acc, strict=True)],
                 "arrayminus": [a - low for a, low in zip(acc, lo, strict=True)], "thickness": 2, "width": 10},
        customdata=[[r["label"], low, h, r["n"] if r["n"] is not None else "?"] for r, low, h in
                    zip(results, lo, hi, strict=True)],
        hovertemplate="%{customdata[0]}<br>test acc %{y:.4f}<br>95 % CI %{customdata[1]:.4f}–%{customdata[2]:.4f}"
                      "<br>%{customdata[3]} test images<extra></extra>",
    ))
    pad = max(0.002, (max(hi) - min(lo)) * 0.3)
    fig.update_layout(title=title, height=380, showlegend=False, margin={"r": 70},
                      xaxis={"type": "category", "title": {"text": "model"}},
                      yaxis={"title": {"text": "test accuracy"}, "tickformat": ".3f",
                             "range": [max(0.0, min(lo) - pad), min(1.0, max(hi) + pad)]})
    return fig


def selection_by_k(final: Mapping | None) -> pd.DataFrame:
    """k (members of the ensemble of top trials) and its validation accuracy, the chosen k marked."""
    selection = _mapping(_mapping(final).get("selection"))
    chosen = as_count(selection.get("chosen_k"))
    rows = []
    for k, acc in _mapping(selection.get("val_acc_by_k")).items():
        k, acc = as_count(k), finite_number(acc)
        if k is not None and acc is not None:
            rows.append({"k": k, "val acc": acc, "chosen": k == chosen})
    df = pd.DataFrame(rows, columns=["k", "val acc", "chosen"])
    return df.sort_values("k").reset_index(drop=True)


def selection_figure(final: Mapping | None) -> go.Figure:
    """Validation accuracy of the ensemble of the top k trials, for each k tried; the chosen k in green."""
    metric = short_text(_mapping(_mapping(final).get("selection")).get("metric") or "val_acc", 24)
    title = f"Ensemble of the top k trials: {metric} by k (validation split)"
    df = selection_by_k(final)
    if df.empty:
        return empty_figure("summary.json has no validation accuracy by k.", title)
    fig = go.Figure(go.Scatter(
        x=df["k"].tolist(), y=df["val acc"].tolist(), mode="lines+markers+text",
        text=[f"{a:.4f}" for a in df["val acc"]], textposition="top center", line={"color": "#7f7f7f"},
        marker={"size": [16 if c else 10 for c in df["chosen"]],
                "color": [DELIVERED_COLOR if c else FINAL_COLOR for c in df["chosen"]]},
        hovertemplate="k=%{x}: " + metric + " %{y:.4f}<extra></extra>",
    ))
    span = float(df["val acc"].max() - df["val acc"].min())
    pad = max(0.002, span * 0.4)
    fig.update_layout(title=title, height=350, showlegend=False,
                      xaxis={"title": {"text": "k (trials averaged)"}, "dtick": 1},
                      yaxis={"title": {"text": metric}, "tickformat": ".3f",
                             "range": [float(df["val acc"].min()) - pad, float(df["val acc"].max()) + pad]})
    return fig


def _f1_by_class(per_class) -> dict[str, float]:
    """{class: F1} from a per_class list ([{class, f1, ...}]) or a {class: F1} mapping."""
    if isinstance(per_class, Mapping):
        items = per_class.items()
    elif isinstance(per_class, list):
        items = ((r.get("class"), r.get("f1")) for r in per_class if isinstance(r, Mapping))
    else:
        return {}
    return {str(c): f for c, v in items if c is not None and (f := finite_number(v)) is not None}


def f1_matrix(final: Mapping | None) -> pd.DataFrame:
    """Per-class test F1, one row per model (the final models first, the delivered one marked, then the
    top trials' own best checkpoints in summary order), one column per class (the models' class order).
    A class a model has no value for is NaN."""
    delivered = delivered_key(final)
    rows: dict[str, dict[str, float]] = {}

    def add(label: str, values: dict[str, float]) -> None:
        name, i = label, 2
        while name in rows:  # two models with the same label stay two rows
            name, i = f"{label} #{i}", i + 1
        rows[name] = values

    for r in final_results(final):
        mark = " (delivered)" if r["key"] == delivered else ""
        add(f"{r['key']}{mark}: {r['label']}", _f1_by_class(r["per_class"]))
    trials = _mapping(final).get("test_trials")
    for t in trials if isinstance(trials, list) else []:
        if isinstance(t, Mapping):
            add(f"trial {short_text(t.get('trial_id', '?'), 24)}", _f1_by_class(t.get("f1")))
    classes: list[str] = []
    for values in rows.values():
        classes += [c for c in values if c not in classes]
    return pd.DataFrame([[values.get(c, np.nan) for c in classes] for values in rows.values()],
                        index=list(rows), columns=classes, dtype=float)


def hardest_classes(matrix: pd.DataFrame, n: int) -> list[str]:
    """The n classes with the lowest mean F1 over the models, in the matrix's class order."""
    if matrix.empty:
        return []
    worst = set(matrix.mean(axis=0, skipna=True).sort_values(kind="stable").index[:n])
    return [c for c in matrix.columns if c in worst]


def f1_heatmap(matrix: pd.DataFrame, title: str = "Per-class F1 on the test split") -> go.Figure:
    """Models (rows) x classes (columns), colour = F1 (red: the characters a model gets wrong).
    Values are written in the cells when the classes fit; hover always shows them. A class a model
    has no value for is an empty cell."""
    if matrix is None or matrix.empty or not len(matrix.columns) or matrix.isna().all().all():
        return empty_figure("summary.json has no per-class F1 for any model.", title)
    z = matrix.astype(float)
    z.columns, z.index = [str(c) for c in z.columns], [str(r) for r in z.index]
    fig = px.imshow(z, text_auto=".2f" if len(z.columns) <= F1_TEXT_MAX_CLASSES else False,
                    color_continuous_scale="RdYlGn", zmin=min(float(np.nanmin(z.to_numpy())), 0.99), zmax=1.0,
                    labels={"x": "class", "color": "F1"}, aspect="auto", title=title,
                    height=160 + 40 * len(z.index))
    fig.update_traces(xgap=1, ygap=1, hovertemplate="%{y}<br>class %{x}: F1 %{z:.3f}<extra></extra>")
    fig.update_xaxes(type="category", side="bottom")
    fig.update_yaxes(type="category", title=None)
    fig.update_layout(margin={"l": 10})
    return fig


def top_trials_table(final: Mapping | None) -> pd.DataFrame:
    """trial, val acc, test acc and its 95 % CI of the top trials' own best checkpoints."""
    trials = _mapping(final).get("test_trials")
    rows = [{"trial": short_text(t.get("trial_id", "?"), 24), "val acc": finite_number(t.get("val_acc")),
             "test acc": finite_number(t.get("accuracy")), "95 % CI": _ci_text(as_interval(t.get("ci95")))}
            for t in (trials if isinstance(trials, list) else []) if isinstance(t, Mapping)]
    df = pd.DataFrame(rows, columns=["trial", "val acc", "test acc", "95 % CI"])
    for c in ("val acc", "test acc"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df
