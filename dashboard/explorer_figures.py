"""Figures of the trial explorer: pure functions of `search.results` tables (the trials' hyperparameters
against their accuracy, learning curves, ASHA's successive halving, hyperparameter importance).

No Streamlit here, so every function can be tested directly. Each one accepts what a search that is
still running produces: empty tables, NaN values (trials without results, conditional parameters),
trials without history, a single trial. Where there is nothing to draw, a figure says so in its middle
instead of raising.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from dashboard.figure_helpers import empty_figure
from dashboard.importance_study import BOOTSTRAP_LEVEL, Importance, importance, importance_inputs, importance_label
from dashboard.trial_table import (
    METRIC,
    config_column,
    hashable,
    is_categorical,
    is_log_scale,
    numeric,
    param_name,
    usable_trials,
    varying_params,
    with_metric,
)

STATUS_COLORS = {
    "finished": "#2ca02c",
    "stopped": "#ff7f0e",
    "budget": "#9467bd",
    "diverged": "#d62728",
    "error": "#8c1c13",
    "running": "#1f77b4",
    "pending": "#7f7f7f",
    "terminated": "#17becf",
    "paused": "#bcbd22",
}
METRIC_LABELS = {"val_acc": "validation accuracy", "val_loss": "validation loss", "train_loss": "training loss",
                 "train_acc": "training accuracy", "lr": "learning rate"}
MAX_EPOCH_TICKS = 40  # one tick per epoch up to this many epochs, then plotly's own spacing
MAX_BARS = 60  # bars of the ASHA figure: one per epoch up to this many, else one per epoch some trial stopped at
PARCOORDS_DEFAULT_AXES = 8  # more axes than this cannot be read; the page lets the user add others


def _categories(values: pd.Series) -> tuple[pd.Series, list[str]]:
    """Category codes 0..k-1 (sorted labels; a missing value is its own category, last)."""
    labels = values.map(lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    order = sorted(set(labels) - {"n/a"}) + (["n/a"] if (labels == "n/a").any() else [])
    codes = labels.map({label: i for i, label in enumerate(order)})
    return codes.astype(int), order


# ---------------------------------------------------------------- trial comparison


def parallel_coordinates(trials: pd.DataFrame, params: Sequence[str] | None = None, metric: str = METRIC,
                         label: str | None = None) -> go.Figure:
    """One line per trial with a result across the hyperparameters (`params`, default those that vary),
    coloured by `metric` (default best_val_acc; the page passes the val acc at a budget every trial
    reached, `label` names it). Categorical parameters become integer codes labelled with their values;
    parameters spanning two decades or more are drawn on a log10 axis labelled with the real values."""
    label = label or "best validation accuracy"
    rows = with_metric(trials, metric)
    title = f"Hyperparameters of each trial, coloured by {label}"
    if metric != METRIC:
        rows = usable_trials(rows, metric)
        title += f" ({len(rows)} trials)"
    if rows.empty:
        return empty_figure("No trial has a validation result yet." if metric == METRIC else
                            f"No finished or ASHA-stopped trial has a {label} yet.", title)
    params = varying_params(trials) if params is None else [config_column(p) for p in params
                                                            if config_column(p) in trials]
    acc = numeric(rows[metric])
    dims = []
    for c in params:
        values = hashable(rows[c])
        name = param_name(c)
        if is_categorical(values):
            codes, order = _categories(values)
            dims.append({"label": name, "values": codes.tolist(), "tickvals": list(range(len(order))),
                         "ticktext": order, "range": [-0.5, len(order) - 0.5] if len(order) == 1 else None})
        elif is_log_scale(values):
            v = numeric(values)
            logs = np.log10(v.where(v > 0))
            lo, hi = float(np.nanmin(logs)), float(np.nanmax(logs))
            ticks = np.linspace(lo, hi, 5)
            dims.append({"label": f"{name} (log)", "values": logs.tolist(), "tickvals": ticks.tolist(),
                         "ticktext": [f"{10 ** t:.2g}" for t in ticks]})
        else:
            dims.append({"label": name, "values": numeric(values).tolist()})
    dims.append({"label": metric if metric == METRIC else label, "values": acc.tolist()})
    dims = [{k: v for k, v in d.items() if v is not None} for d in dims]
    line = {"color": acc.tolist(), "colorscale": "Viridis", "showscale": True,
            "colorbar": {"title": {"text": "best val acc" if metric == METRIC else label}}}
    if acc.min() == acc.max():  # one trial or a tie: a flat colour scale still needs a range
        line.update(cmin=float(acc.min()) - 1e-6, cmax=float(acc.max()) + 1e-6)
    fig = go.Figure(go.Parcoords(dimensions=dims, line=line))
    note = "" if params else " (no hyperparameter differs between trials)"
    fig.update_layout(title=f"{title}{note}", height=450, margin={"l": 60, "r": 60, "t": 90, "b": 30})
    return fig


def param_vs_metric(trials: pd.DataFrame, param: str) -> go.Figure:
    """One hyperparameter against best_val_acc, a point per trial, one colour per status."""
    col = config_column(param)
    name = param_name(col)
    title = f"{name} vs best validation accuracy"
    if trials is None or trials.empty or col not in trials:
        return empty_figure(f"No trial has a value for {name}.", title)
    rows = with_metric(trials)
    rows = rows[rows[col].notna()]
    if rows.empty:
        return empty_figure(f"No trial with a value for {name} has a validation result yet.", title)
    values = hashable(rows[col])
    categorical = is_categorical(values)
    data = pd.DataFrame({"x": values.astype(str) if categorical else numeric(values),
                         "y": numeric(rows[METRIC]), "status": rows["status"].astype(str),
                         "trial": rows["trial_id"].astype(str)})
    statuses = sorted(data["status"].unique(), key=lambda s: (s not in STATUS_COLORS, s))
    fig = px.scatter(data, x="x", y="y", color="status", hover_name="trial", color_discrete_map=STATUS_COLORS,
                     category_orders={"status": statuses}, log_x=not categorical and is_log_scale(values),
                     labels={"x": name, "y": "best val acc"}, title=title, height=400)
    fig.update_traces(marker={"size": 10, "line": {"width": 1, "color": "white"}},
                      hovertemplate=f"trial %{{hovertext}}<br>{name}=%{{x}}<br>best val acc=%{{y:.4f}}")
    if categorical:
        fig.update_xaxes(type="category", categoryorder="category ascending")
    return fig


def learning_curves(histories: Mapping[str, pd.DataFrame], trial_ids: Iterable[str], metric: str) -> go.Figure:
    """`metric` (val_acc, val_loss, ...) per epoch, one line per chosen trial. A diverged epoch's
    missing/infinite value is a gap; trials without any value yet are named in the title."""
    label = METRIC_LABELS.get(metric, metric)
    parts, missing = [], []
    for tid in trial_ids:
        h = histories.get(tid) if histories else None
        y = numeric(h[metric]) if h is not None and not h.empty and metric in h else pd.Series(dtype=float)
        y = y.where(np.isfinite(y))
        if y.isna().all():
            missing.append(str(tid))
            continue
        x = numeric(h["epoch"]) if "epoch" in h else pd.Series(np.arange(1, len(h) + 1), index=h.index, dtype=float)
        parts.append(pd.DataFrame({"trial": str(tid), "epoch": x, "y": y}).sort_values("epoch", kind="stable"))
    title = f"{label} per epoch"
    if not parts:
        msg = "No trial chosen." if not missing else "The chosen trials have no " + label + " yet."
        return empty_figure(msg, title)
    if missing:
        title += f" (no {metric} yet: {', '.join(missing)})"
    data = pd.concat(parts, ignore_index=True)
    last = data["epoch"][np.isfinite(data["epoch"])].max()
    fig = px.line(data, x="epoch", y="y", color="trial", markers=True, title=title, height=400,
                  labels={"y": metric})
    fig.update_traces(connectgaps=False, hovertemplate="trial %{fullData.name}<br>epoch %{x}<br>"
                      f"{metric}=%{{y:.4f}}<extra></extra>")
    fig.update_xaxes(dtick=1 if last <= MAX_EPOCH_TICKS else None)
    return fig


def asha_milestones(trials: pd.DataFrame, histories: Mapping[str, pd.DataFrame] | None = None) -> go.Figure:
    """How many trials reached each epoch: ASHA's successive halving, one bar per epoch
    (count of trials with epochs_run >= e). A trial without epochs_run falls back to its history."""
    title = "Trials reaching each epoch (ASHA keeps the promising ones going)"
    if trials is None or trials.empty:
        return empty_figure("No trials yet.", title)
    runs = []
    for _, row in trials.iterrows():
        e = pd.to_numeric(pd.Series([row.get("epochs_run")]), errors="coerce").iloc[0]
        if (pd.isna(e) or e == 0) and histories:
            h = histories.get(str(row["trial_id"]))
            if h is not None and not h.empty and "epoch" in h:
                e = numeric(h["epoch"]).max()
        runs.append(int(e) if np.isfinite(e) and e > 0 else 0)
    runs = np.array(runs)
    budget = numeric(trials["max_epochs"]).max() if "max_epochs" in trials else float("nan")
    budget = int(budget) if np.isfinite(budget) and budget > 0 else 0
    last = int(max(runs.max(initial=0), budget))
    if last < 1:
        return empty_figure("No trial has finished an epoch yet.", title)
    if last <= MAX_BARS:
        epochs, xaxis = list(range(1, last + 1)), {"dtick": 1}
    else:  # a huge epoch count (a long search, or a bloated result file): the epochs trials stopped at
        epochs = sorted({int(r) for r in runs if r > 0} | ({budget} if budget else set()))
        if len(epochs) > MAX_BARS:
            epochs = [epochs[round(i * (len(epochs) - 1) / (MAX_BARS - 1))] for i in range(MAX_BARS)]
        xaxis = {"type": "category"}
    counts = [int((runs >= e).sum()) for e in epochs]
    fig = go.Figure(go.Bar(x=epochs, y=counts, text=counts, textposition="outside", marker_color="#1f77b4",
                           hovertemplate="epoch %{x}: %{y} trials<extra></extra>"))
    fig.update_layout(title=title, xaxis={"title": {"text": "epoch"}, **xaxis},
                      yaxis={"title": {"text": "trials"}, "range": [0, len(trials) * 1.15 + 0.5]}, height=350)
    return fig


# ---------------------------------------------------------------- importance (importance_study.py computes it)


def param_importance(trials: pd.DataFrame, metric: str = METRIC, label: str | None = None,
                     params: Sequence[str] | None = None, values: Mapping[str, float] | None = None,
                     result: Importance | None = None) -> go.Figure | None:
    """Horizontal bars of hyperparameter importance for `metric` (most important on top), each with the
    BOOTSTRAP_LEVEL interval of its value over resamples of the trials (a line) and its rank's interval in
    its hover text; a conditional parameter's bar says among how many of the trials it was measured. None
    with fewer than 3 usable trials or no varying parameter; `importance_inputs` says why. Bars that are no
    supported ranking (Importance.caveat) are pale and the title says so; otherwise only settled places
    are drawn in full colour. `result`: the `importance` of the same arguments, when already computed
    (`values` alone: bars without intervals)."""
    if result is None and values is not None:
        n = len(importance_inputs(trials, metric, params)[0])
        result = Importance(dict(values), dict(values), dict(values), {}, {}, {}, n, 0, [], None)
    result = importance(trials, metric, params) if result is None else result
    if result is None or not result.values:
        return None
    names = list(result.values)[::-1]
    imp = [result.values[n] for n in names]
    labels = [importance_label(n, result) for n in names]
    ranks = [f"rank {result.rank_low[n]}–{result.rank_high[n]}" if n in result.rank_low else "" for n in names]
    among = [f"measured among the {result.sampled_in.get(n, result.n_trials)} of {result.n_trials} trials that "
             "sampled it" if result.sampled_in.get(n, result.n_trials) < result.n_trials else
             f"all {result.n_trials} trials" for n in names]
    sure = [result.supported and n in result.settled for n in names]
    fig = go.Figure(go.Bar(x=imp, y=labels, orientation="h", marker_color=["#9467bd" if s else "#cdb9e0" for s in sure],
                           text=[f"{v:.2f}" for v in imp], textposition="auto",
                           customdata=np.array([ranks, among, [result.low[n] for n in names],
                                                [result.high[n] for n in names]], dtype=object).T,
                           hovertemplate="%{y}: %{x:.3f}" + (
                               f"<br>{BOOTSTRAP_LEVEL:.0%} of {result.resamples} resamples: %{{customdata[2]:.3f}}–"
                               "%{customdata[3]:.3f}, %{customdata[0]}" if result.resamples else "")
                           + "<br>%{customdata[1]}<extra></extra>", name="importance"))
    if result.resamples:
        xs, ys = [], []
        for n, lab in zip(names, labels, strict=True):
            xs += [result.low[n], result.high[n], None]
            ys += [lab, lab, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", line={"color": "#333333", "width": 2},
                                 marker={"symbol": "line-ns-open", "size": 10, "color": "#333333"},
                                 hoverinfo="skip", name=f"{BOOTSTRAP_LEVEL:.0%} of {result.resamples} resamples"))
    what = (f"lines: {BOOTSTRAP_LEVEL:.0%} of {result.resamples} resamples" if result.resamples else "")
    verdict = "" if result.supported else "<br><sup>not a supported ranking: see below</sup>"
    fig.update_layout(title=f"Hyperparameter importance for {label or 'best val acc'}<br><sup>({result.n_trials} "
                            f"trials, Optuna PED-ANOVA{'; ' + what if what else ''})</sup>{verdict}",
                      xaxis={"title": {"text": "importance (sums to 1)"}}, showlegend=False,
                      height=max(250, 80 + 40 * len(names)))
    return fig
