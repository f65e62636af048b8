"""Figures and tables of the trial explorer: pure functions of `search.results` tables.

No Streamlit here, so every function can be tested directly. Each one accepts what a
search that is still running produces: empty tables, NaN values (trials without results,
conditional parameters), trials without history, a single trial. Where there is nothing
to draw, a figure says so in its middle instead of raising.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

METRIC = "best_val_acc"
CONFIG = "config/"
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
IMPORTANCE_MIN_TRIALS = 3
IMPORTANCE_TOP_TRIALS = 10  # trials in the best part PED-ANOVA compares (see importance_values)
# Below this many trials the page draws no ranking (see importance): PED-ANOVA compares the best
# IMPORTANCE_TOP_TRIALS with all of them, and with fewer than twice that many the best part is half the
# trials or more, so hardly different from all of them (Optuna advises at least 5 trials in it, too).
RANKING_MIN_TRIALS = 2 * IMPORTANCE_TOP_TRIALS
BOOTSTRAP_RESAMPLES = 100  # resamples of the trials for the intervals (about 15 ms each for 30 trials) ...
BOOTSTRAP_MIN_RESAMPLES = 30  # ... fewer for a large search (bootstrap_resamples), never fewer than this
BOOTSTRAP_WORK = 200_000  # trials x parameters evaluated over all resamples: ~100 resamples take ~1.5-5 s
BOOTSTRAP_LEVEL = 0.9  # the intervals hold this share of the resamples
CHOICE_LEVELS = 12  # a parameter with at most this many values can be a choice others depend on
CONDITIONAL_ALPHA = 0.01  # chance of a false "conditional" among all pairs tested (see conditional_in_values)
MAX_EPOCH_TICKS = 40  # one tick per epoch up to this many epochs, then plotly's own spacing
MAX_BARS = 60  # bars of the ASHA figure: one per epoch up to this many, else one per epoch some trial stopped at
USABLE_STATUSES = ("finished", "stopped", "budget")
PARCOORDS_DEFAULT_AXES = 8  # more axes than this cannot be read; the page lets the user add others
BUDGET_MIN_TRIALS = 5


# ---------------------------------------------------------------- helpers


def param_name(column: str) -> str:
    return column.removeprefix(CONFIG)


def _column(param: str) -> str:
    return param if param.startswith(CONFIG) else CONFIG + param


def _hashable(values: pd.Series) -> pd.Series:
    """Lists/dicts (not expected in configs, but possible) as JSON text so they can be compared."""
    if values.dtype == object and values.map(lambda v: isinstance(v, list | dict | set | tuple)).any():
        return values.map(lambda v: json.dumps(v, sort_keys=True, default=str)
                          if isinstance(v, list | dict | set | tuple) else v)
    return values


def _is_categorical(values: pd.Series) -> bool:
    """Strings, booleans and mixed columns are categories; ints and floats are numbers."""
    values = values.dropna()
    if values.empty:
        return False
    if pd.api.types.is_bool_dtype(values.dtype):
        return True
    if pd.api.types.is_numeric_dtype(values.dtype):
        return False
    return not all(isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)
                   for v in values)


def _numeric(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").astype(float)


def is_log_scale(values: pd.Series) -> bool:
    """Positive numbers spanning at least two decades (lr, weight_decay): a log axis reads better."""
    if _is_categorical(values):
        return False
    v = _numeric(values).dropna()
    v = v[np.isfinite(v)]
    return bool(len(v) >= 2 and (v > 0).all() and v.max() / v.min() >= 100)


def _with_config(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows that have a config (a pending trial's params.json may not exist yet)."""
    cols = [c for c in trials.columns if c.startswith(CONFIG)]
    if trials.empty or not cols:
        return trials.iloc[0:0]
    return trials[trials[cols].notna().any(axis=1)]


def varying_params(trials: pd.DataFrame) -> list[str]:
    """The `config/*` columns whose value differs between trials (the searched hyperparameters).
    A conditional parameter (set in some trials, absent in others) counts as varying."""
    if trials is None or trials.empty:
        return []
    rows = _with_config(trials)
    out = []
    for c in (c for c in trials.columns if c.startswith(CONFIG)):
        if _hashable(rows[c]).nunique(dropna=False) > 1:
            out.append(c)
    return out


def _usable(trials: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Trials with a finite `metric` (best_val_acc)."""
    if trials is None or trials.empty or metric not in trials:
        return pd.DataFrame(columns=list(getattr(trials, "columns", [])))
    acc = _numeric(trials[metric])
    return trials[np.isfinite(acc.to_numpy())]


def empty_figure(message: str, title: str | None = None) -> go.Figure:
    """A blank figure with a sentence in the middle (nothing to draw yet)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 14})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=300)
    return fig


def _value_text(v) -> str:
    if isinstance(v, float | np.floating):
        return f"{v:.4g}"
    return str(v)


def _categories(values: pd.Series) -> tuple[pd.Series, list[str]]:
    """Category codes 0..k-1 (sorted labels; a missing value is its own category, last)."""
    labels = values.map(lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    order = sorted(set(labels) - {"n/a"}) + (["n/a"] if (labels == "n/a").any() else [])
    codes = labels.map({label: i for i, label in enumerate(order)})
    return codes.astype(int), order


# ---------------------------------------------------------------- what a trial searched, at which budget


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


class Searched(NamedTuple):
    trials: pd.DataFrame  # a NaN in every config cell the trial did not sample
    params: list[str]  # the searched `config/*` columns
    distributions: dict[str, Any]  # {param name: its Optuna distribution in the space}, {} without it
    note: str | None  # why the space was not used, or None
    # without the space: {column: why} of the searched parameters whose values show they were conditional
    # (conditional_in_values); importance leaves them out rather than rank their defaults
    left_out: Mapping[str, str] = {}


def only_sampled(trials: pd.DataFrame, sampled: Callable[[dict], Mapping[str, Any] | None] | None) -> Searched:
    """The trials table holds each trial's full config, so a conditional parameter (gamma of the step
    scheduler) shows its default in every other trial. `sampled(config)` gives {name: distribution} of
    what one trial sampled (search.space.sampled_params, replaying the saved space): every other config
    cell becomes NaN. Without it, or where it does not know a trial's config, the searched parameters are
    those whose value differs between the trials (the table as it is), the note says so, and `left_out`
    names those of them whose values show they were conditional (conditional_in_values)."""
    if trials is None or trials.empty:
        return Searched(trials, [], {}, None)
    cols = [c for c in trials.columns if c.startswith(CONFIG)]
    if sampled is None:
        return _as_they_are(trials, "the search space is unknown")
    keep = pd.DataFrame(False, index=trials.index, columns=cols)
    unknown, distributions = [], {}
    for idx in _with_config(trials).index:
        row = trials.loc[idx, cols]
        names = sampled({param_name(c): _plain(v) for c, v in row.items() if _present(v)})
        if names is None:
            unknown.append(str(trials.at[idx, "trial_id"]))
            continue
        distributions.update(names)
        keep.loc[idx, [c for c in cols if param_name(c) in names]] = True
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        return _as_they_are(trials, f"the saved search space does not fit the config of trial(s) "
                                    f"{', '.join(unknown[:3])}{more}")
    out = trials.copy()
    for c in cols:
        if not keep[c].all():
            values = trials[c].astype("Int64") if pd.api.types.is_integer_dtype(trials[c].dtype) else trials[c]
            out[c] = values.where(keep[c])  # an int parameter stays an int one (nullable)
    return Searched(out, [c for c in cols if keep[c].any()], distributions, None)


def _as_they_are(trials: pd.DataFrame, note: str) -> Searched:
    params = varying_params(trials)
    return Searched(trials, params, {}, note, conditional_in_values(trials, params))


def _same(v, d) -> bool:
    """A table value equals a config value (64.0 is 64; True is not 1)."""
    v = _plain(v)
    if isinstance(v, bool) or isinstance(d, bool):
        return isinstance(v, bool | np.bool_) and isinstance(d, bool) and bool(v) == d
    try:
        return bool(v == d)  # (numbers compare exactly, an int beyond float range too)
    except (TypeError, ValueError):
        return False


def _listed(values: Sequence) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def conditional_in_values(trials: pd.DataFrame, params: Sequence[str] | None = None) -> dict[str, str]:
    """{column: why} of the parameters (`params`, default those that vary) whose values show they were
    conditional, for a search whose space is unknown: the trials' configs hold every setting, so a
    parameter a trial did not sample holds its default there. The rule, over the trials with a config:

    P is conditional on C (another varying parameter with at most CHOICE_LEVELS values: a choice) when
      - P is exactly its TrainConfig default d in every trial of some values of C (each seen in at least 2
        trials): the branches not taken, n_off trials in all;
      - P takes another value in some trial with another value of C (the branches that sample it);
      - that is not chance: if P did not depend on C, n_off trials would all hold d with probability about
        f ** n_off, f the share of d among the other trials; it must be at most CONDITIONAL_ALPHA divided
        by the number of (P, C) pairs tested (Bonferroni). (A continuous parameter sampled in every trial
        repeats no value, so it is never taken for conditional; a discrete one needs many trials at d.)
    Where P and C each look conditional on the other (a two-way link), the one with more distinct values
    is the conditional one; with as many, both are named ("cannot tell which one"). A conditional parameter
    whose base config overrides its default is not recognised (its value in the other trials is not d)."""
    from training.config import make_config

    rows = _with_config(trials) if trials is not None else pd.DataFrame()
    cols = [c for c in (varying_params(rows) if params is None else params) if c in rows]
    if rows.empty or not cols:
        return {}
    defaults = make_config({}).to_dict()
    values = {c: _hashable(rows[c]).map(_plain) for c in cols}
    levels = {c: values[c].map(str).nunique() for c in cols}
    choices = [c for c in cols if 2 <= levels[c] <= CHOICE_LEVELS]
    limit = CONDITIONAL_ALPHA / max(1, len(cols) * len(choices))
    found: dict[str, tuple[str, list, int, float]] = {}  # P -> (C, C's values where P is off, n_off, chance)
    for p in cols:
        if param_name(p) not in defaults:
            continue
        d = defaults[param_name(p)]
        present = rows[p].map(lambda v: _present(v) and v is not pd.NA).astype(bool)
        at_d = values[p][present].map(lambda v, d=d: _same(v, d)).astype(bool)  # (a trial without it: no evidence)
        if at_d.sum() < 2 or at_d.all():
            continue
        for c in (c for c in choices if c != p):
            keys = values[c][present].map(str)
            off = [k for k, idx in keys.groupby(keys).groups.items() if len(idx) >= 2 and at_d[idx].all()]
            off_rows = keys.isin(off)
            if not off or off_rows.all() or at_d[~off_rows].all():
                continue
            chance = float(at_d[~off_rows].mean()) ** int(off_rows.sum())
            if chance <= limit and (p not in found or chance < found[p][3]):
                shown = sorted({values[c][i] for i in keys.index[off_rows]}, key=str)
                found[p] = (c, shown, int(off_rows.sum()), chance)
    out = {}
    for p, (c, off, n_off, _) in found.items():
        d = defaults[param_name(p)]
        if c in found and found[c][0] == p:  # each looks conditional on the other
            if levels[p] < levels[c]:
                continue  # p is the choice, c the conditional one
            if levels[p] == levels[c]:
                out[p] = (f"its values and {param_name(c)}'s go together (cannot tell which one was "
                          "conditional on the other)")
                continue
        out[p] = f"always {_value_text(d)} (its default) where {param_name(c)} is {_listed(off)} ({n_off} trials)"
    return out


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float | np.floating) and math.isnan(v))


def asha_rungs(max_epochs: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA compares trials (grace_period * reduction_factor^i), and the budget."""
    rungs, e = set(), grace_period
    while 1 <= e <= max_epochs:
        rungs.add(e)
        e *= reduction_factor
    return sorted(rungs | {max_epochs})


def usable_trials(trials: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Finished or ASHA-stopped trials with a finite `metric`."""
    rows = _usable(trials, metric)
    return rows[rows["status"].isin(USABLE_STATUSES)] if "status" in rows else rows


def metric_at_epoch(trials: pd.DataFrame, histories: Mapping[str, pd.DataFrame] | None, epoch: int,
                    metric: str = "val_acc") -> pd.Series:
    """Each trial's `metric` at `epoch` from its history (NaN where it did not get there), on trials' index."""
    out = pd.Series(np.nan, index=trials.index, dtype=float)
    for idx, tid in trials["trial_id"].astype(str).items():
        h = (histories or {}).get(tid)
        if h is None or h.empty or "epoch" not in h or metric not in h:
            continue
        values = _numeric(h[metric])[(_numeric(h["epoch"]) == epoch).to_numpy()]
        values = values[np.isfinite(values)]
        if len(values):
            out[idx] = float(values.iloc[-1])
    return out


def budget_counts(trials: pd.DataFrame, histories: Mapping[str, pd.DataFrame] | None,
                  rungs: Sequence[int] | None = None) -> dict[int, int]:
    """{epoch: finished/stopped trials with a val_acc at that epoch} for each candidate budget: ASHA's
    rungs when the space is known, else the epochs the trials stopped at. Epochs nobody reached are left out."""
    usable = usable_trials(trials)
    if usable.empty:
        return {}
    if rungs is None:
        runs = _numeric(usable["epochs_run"]) if "epochs_run" in usable else pd.Series(dtype=float)
        rungs = sorted({int(e) for e in runs if np.isfinite(e) and e >= 1})
    counts = {int(e): int(metric_at_epoch(usable, histories, int(e)).notna().sum()) for e in rungs}
    return {e: n for e, n in counts.items() if n}


def default_budget(counts: Mapping[int, int], n_usable: int) -> int | None:
    """The highest epoch that at least max(5, half of the usable trials) reached (all of them when there
    are fewer than 5): ASHA keeps about 1/reduction_factor of the trials at each rung, so the rung above
    that usually holds too few trials for importance to mean anything, while every trial compared there
    ran the same number of epochs. None when no epoch has a trial."""
    if not counts:
        return None
    need = min(n_usable, max(BUDGET_MIN_TRIALS, math.ceil(n_usable / 2)))
    enough = [e for e, n in counts.items() if n >= need]
    return max(enough) if enough else max(counts, key=lambda e: (counts[e], e))


# ---------------------------------------------------------------- trial comparison


def parallel_coordinates(trials: pd.DataFrame, params: Sequence[str] | None = None, metric: str = METRIC,
                         label: str | None = None) -> go.Figure:
    """One line per trial with a result across the hyperparameters (`params`, default those that vary),
    coloured by `metric` (default best_val_acc; the page passes the val acc at a budget every trial
    reached, `label` names it). Categorical parameters become integer codes labelled with their values;
    parameters spanning two decades or more are drawn on a log10 axis labelled with the real values."""
    label = label or "best validation accuracy"
    rows = _usable(trials, metric)
    title = f"Hyperparameters of each trial, coloured by {label}"
    if metric != METRIC:
        rows = usable_trials(rows, metric)
        title += f" ({len(rows)} trials)"
    if rows.empty:
        return empty_figure("No trial has a validation result yet." if metric == METRIC else
                            f"No finished or ASHA-stopped trial has a {label} yet.", title)
    params = varying_params(trials) if params is None else [_column(p) for p in params if _column(p) in trials]
    acc = _numeric(rows[metric])
    dims = []
    for c in params:
        values = _hashable(rows[c])
        name = param_name(c)
        if _is_categorical(values):
            codes, order = _categories(values)
            dims.append({"label": name, "values": codes.tolist(), "tickvals": list(range(len(order))),
                         "ticktext": order, "range": [-0.5, len(order) - 0.5] if len(order) == 1 else None})
        elif is_log_scale(values):
            v = _numeric(values)
            logs = np.log10(v.where(v > 0))
            lo, hi = float(np.nanmin(logs)), float(np.nanmax(logs))
            ticks = np.linspace(lo, hi, 5)
            dims.append({"label": f"{name} (log)", "values": logs.tolist(), "tickvals": ticks.tolist(),
                         "ticktext": [f"{10 ** t:.2g}" for t in ticks]})
        else:
            dims.append({"label": name, "values": _numeric(values).tolist()})
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
    col = _column(param)
    name = param_name(col)
    title = f"{name} vs best validation accuracy"
    if trials is None or trials.empty or col not in trials:
        return empty_figure(f"No trial has a value for {name}.", title)
    rows = _usable(trials)
    rows = rows[rows[col].notna()]
    if rows.empty:
        return empty_figure(f"No trial with a value for {name} has a validation result yet.", title)
    values = _hashable(rows[col])
    categorical = _is_categorical(values)
    data = pd.DataFrame({"x": values.astype(str) if categorical else _numeric(values),
                         "y": _numeric(rows[METRIC]), "status": rows["status"].astype(str),
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
        y = _numeric(h[metric]) if h is not None and not h.empty and metric in h else pd.Series(dtype=float)
        y = y.where(np.isfinite(y))
        if y.isna().all():
            missing.append(str(tid))
            continue
        x = _numeric(h["epoch"]) if "epoch" in h else pd.Series(np.arange(1, len(h) + 1), index=h.index, dtype=float)
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
                e = _numeric(h["epoch"]).max()
        runs.append(int(e) if np.isfinite(e) and e > 0 else 0)
    runs = np.array(runs)
    budget = _numeric(trials["max_epochs"]).max() if "max_epochs" in trials else float("nan")
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


# ---------------------------------------------------------------- importance


def importance_inputs(trials: pd.DataFrame, metric: str = METRIC, params: Sequence[str] | None = None
                      ) -> tuple[pd.DataFrame, list[str], str | None]:
    """(finished/stopped trials with a finite `metric`, the parameters (`params`, default those that
    vary) that take two values or more among them, why not computable or None)."""
    if trials is None or trials.empty:
        return pd.DataFrame(), [], "there are no trials yet"
    rows = usable_trials(trials, metric)
    what = "a validation result" if metric == METRIC else "a result at that epoch"
    if len(rows) < IMPORTANCE_MIN_TRIALS:
        return rows, [], (f"it needs at least {IMPORTANCE_MIN_TRIALS} finished or ASHA-stopped trials with "
                          f"{what}, and there {'is' if len(rows) == 1 else 'are'} {len(rows)}")
    candidates = varying_params(rows) if params is None else [_column(p) for p in params if _column(p) in rows]
    params = [c for c in candidates if _hashable(rows[c]).dropna().nunique() > 1]
    if not params:
        return rows, [], "no hyperparameter differs between the usable trials"
    return rows, params, None


def _distribution(values: pd.Series, given=None):
    """The Optuna distribution of a parameter's values: `given` (the space's) where it holds every one
    of them, else one spanning the values seen."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    v = values.dropna()
    if given is not None:
        try:
            holds = [_as(given, x) in given.choices if hasattr(given, "choices")
                     else given.low <= _as(given, x) <= given.high for x in v]
        except (TypeError, ValueError):
            holds = [False]  # a value of another type than the space's
        if all(holds):
            return given
    if _is_categorical(v):
        return CategoricalDistribution(sorted({_choice(x) for x in v}, key=lambda x: (str(type(x)), str(x))))
    num = _numeric(v)
    if pd.api.types.is_integer_dtype(values.dtype):
        return IntDistribution(int(num.min()), int(num.max()))
    return FloatDistribution(float(num.min()), float(num.max()), log=is_log_scale(num))


def _as(dist, v):
    """A table value as a parameter value of `dist` (the table may hold 64 as 64.0, True as numpy bool)."""
    if hasattr(dist, "choices"):
        return _choice(v)
    return int(v) if type(dist).__name__ == "IntDistribution" else float(v)


def _choice(v):
    """A value Optuna accepts as a categorical choice (None, bool, int, float, str)."""
    if isinstance(v, np.generic):
        v = v.item()
    return v if isinstance(v, bool | int | float | str) or v is None else str(v)


def importance_quantile(n_trials: int) -> float:
    """The target_quantile the page gives Optuna's PED-ANOVA for n trials: its best IMPORTANCE_TOP_TRIALS
    of them (Optuna's default, 0.1, from 100 trials on), at most half. PED-ANOVA compares the best part of
    the trials with all of them; the default leaves 3 trials of 30 in that part, and 3 points that happen
    to share a value of any of ~12 parameters outrank the one that decides the accuracy (measured:
    synthetic searches where lr decides, tests/test_dashboard_analyses.py); with 10 it ranks lr first.
    Optuna's documentation, too, advises at least 5 trials in the best part."""
    return min(0.5, max(0.1, IMPORTANCE_TOP_TRIALS / max(1, n_trials)))


def _frozen_trials(rows: pd.DataFrame, metric: str, params: Sequence[str], given: Mapping[str, Any]) -> list:
    """One Optuna trial per row: its value, and only the parameters it sampled (a NaN cell: not sampled)."""
    from optuna.trial import create_trial

    columns = {c: _hashable(rows[c]).tolist() for c in params}
    dists = {c: _distribution(_hashable(rows[c]), given.get(param_name(c))) for c in params}
    out = []
    for i, value in enumerate(_numeric(rows[metric]).tolist()):
        p, d = {}, {}
        for c in params:
            v = columns[c][i]
            if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
                continue  # conditional parameter not active in this trial
            p[param_name(c)], d[param_name(c)] = _as(dists[c], v), dists[c]
        out.append(create_trial(value=value, params=p, distributions=d))
    return out


def ped_anova(trials: Sequence, quantile: float) -> dict[str, float]:
    """Optuna's own evaluator on a study of these trials (maximised), every parameter they hold, as
    `optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(target_quantile=
    quantile))` gives it: normalised to sum to 1, descending. Its conditional PED-ANOVA (Optuna 5) measures a
    parameter that only some trials hold on those trials alone (the others are its inactive regime, which
    adds nothing), weighted by (share of the best trials among them)^2 / (share of all trials among them)."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few-trial warnings and ExperimentalWarning
            study = optuna.create_study(direction="maximize")
            study.add_trials(list(trials))
            evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
            result = optuna.importance.get_param_importances(study, evaluator=evaluator)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return {k: float(v) for k, v in result.items()}


def importance_values(trials: pd.DataFrame, metric: str = METRIC, params: Sequence[str] | None = None,
                      distributions: Mapping[str, Any] | None = None) -> dict[str, float] | None:
    """{param: importance} (normalised, descending) of `metric` by Optuna's PED-ANOVA (`ped_anova`, with
    importance_quantile) on an in-memory study built from the trials; None when it cannot be computed (see
    importance_inputs). A NaN cell is a parameter the trial did not sample: that trial has no such parameter
    in the study, and PED-ANOVA measures a conditional parameter only on the trials where it is active.
    `distributions` ({name: Optuna distribution}, from `only_sampled`): the ranges the search sampled from,
    which PED-ANOVA's density estimates span; without them (or where a value falls outside), the values'
    range. The same numbers as `importance(...).values`, without the resampling."""
    rows, params, reason = importance_inputs(trials, metric, params)
    if reason:
        return None
    return ped_anova(_frozen_trials(rows, metric, params, distributions or {}), importance_quantile(len(rows)))


class Importance(NamedTuple):
    values: dict[str, float]  # Optuna's PED-ANOVA on the trials (importance_values), descending
    low: dict[str, float]  # the BOOTSTRAP_LEVEL interval of each value over resamples of the trials
    high: dict[str, float]
    rank_low: dict[str, int]  # ... and of its rank (1 = most important; tied values share the best rank)
    rank_high: dict[str, int]
    sampled_in: dict[str, int]  # how many of the trials sampled it (n_trials unless it is conditional)
    n_trials: int
    resamples: int
    settled: list[str]  # the parameters whose place the resamples support (see `importance`)
    caveat: str | None  # why the bars are not a supported ranking, or None

    @property
    def supported(self) -> bool:
        return self.caveat is None


def bootstrap_resamples(n_trials: int, n_params: int) -> int:
    """How many resamples `importance` draws: BOOTSTRAP_RESAMPLES, fewer for a large search so that the
    work (trials x parameters per resample) stays within BOOTSTRAP_WORK, at least BOOTSTRAP_MIN_RESAMPLES
    (1000 trials of 16 parameters: 30 resamples, about 5 s). Counted, not timed: the same every time."""
    return max(BOOTSTRAP_MIN_RESAMPLES, min(BOOTSTRAP_RESAMPLES, BOOTSTRAP_WORK // max(1, n_trials * n_params)))


def importance(trials: pd.DataFrame, metric: str = METRIC, params: Sequence[str] | None = None,
               distributions: Mapping[str, Any] | None = None, resamples: int | None = None,
               seed: int = 0) -> Importance | None:
    """importance_values, and how sure each value and its rank is: the same evaluation on `resamples`
    (default bootstrap_resamples) bootstrap resamples of the trials (n drawn with replacement from n,
    seeded, so the page shows the same intervals each time), each parameter's value and rank at every
    resample (0 where a resample has no trial that sampled it), their BOOTSTRAP_LEVEL intervals (a bar may
    end outside its interval: PED-ANOVA's value moves when trials repeat). A parameter's place is settled
    when its rank stays within two neighbouring places (one, with two parameters or fewer) in that share of
    the resamples, and it is not 0 in nearly all of them (tied at 0, its place says nothing).

    The bars are no supported ranking (`caveat`) below RANKING_MIN_TRIALS trials, or when no parameter's
    place is settled: the issue's 28-trial search had most ranks spanning 1 to 9 in 30 resamples."""
    rows, cols, reason = importance_inputs(trials, metric, params)
    if reason:
        return None
    frozen = _frozen_trials(rows, metric, cols, distributions or {})
    quantile = importance_quantile(len(rows))
    values = ped_anova(frozen, quantile)
    names = list(values)
    if not names:
        return None
    resamples = bootstrap_resamples(len(rows), len(names)) if resamples is None else resamples
    sampled_in = {param_name(c): int(rows[c].notna().sum()) for c in cols if param_name(c) in values}
    rng = np.random.default_rng(seed)
    draws = np.zeros((max(0, resamples), len(names)))
    for b in range(len(draws)):
        sample = ped_anova([frozen[i] for i in rng.integers(0, len(frozen), len(frozen))], quantile)
        draws[b] = [sample.get(n, 0.0) for n in names]
    if len(draws):
        ranks = 1 + (draws[:, None, :] > draws[:, :, None]).sum(axis=2)  # [b, j]: params above j in resample b
        tail = (1 - BOOTSTRAP_LEVEL) / 2
        low, high = np.quantile(draws, tail, axis=0), np.quantile(draws, 1 - tail, axis=0)
        rank_low = np.floor(np.quantile(ranks, tail, axis=0)).astype(int)
        rank_high = np.ceil(np.quantile(ranks, 1 - tail, axis=0)).astype(int)
    else:
        low = high = np.array([values[n] for n in names])
        rank_low, rank_high = np.ones(len(names), int), np.full(len(names), len(names))
    width = max(0, min(1, len(names) - 2))
    settled = [n for j, n in enumerate(names) if len(draws) and rank_high[j] - rank_low[j] <= width and high[j] > 0]
    caveat = None
    if len(rows) < RANKING_MIN_TRIALS:
        caveat = (f"{len(rows)} trials are too few to rank the hyperparameters: it takes at least "
                  f"{RANKING_MIN_TRIALS}, as PED-ANOVA compares the best {IMPORTANCE_TOP_TRIALS} of them with all")
    elif len(names) >= 2 and not settled:
        caveat = (f"in {len(draws)} resamples of these {len(rows)} trials, every parameter's rank moves over more "
                  "than two places, so they support no order of the parameters")
    return Importance(values, dict(zip(names, map(float, low), strict=True)),
                      dict(zip(names, map(float, high), strict=True)),
                      dict(zip(names, map(int, rank_low), strict=True)),
                      dict(zip(names, map(int, rank_high), strict=True)),
                      sampled_in, len(rows), len(draws), settled, caveat)


def importance_label(name: str, result: Importance) -> str:
    """A bar's label: the name, and for a conditional parameter how many of the trials it was ranked among."""
    n = result.sampled_in.get(name, result.n_trials)
    return name if n >= result.n_trials else f"{name} · {n} of {result.n_trials} trials"


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


# ---------------------------------------------------------------- one trial's checkpoint


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
        ab, ba = _count(p.get("a_as_b")), _count(p.get("b_as_a"))
        total = _count(p.get("count"))
        rows.append({"pair": f"{a} ↔ {b}", "mistakes": total if total is not None else (ab or 0) + (ba or 0),
                     "detail": f"{_n(ab)}× {a!r} read as {b!r}, {_n(ba)}× {b!r} read as {a!r}"})
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    df["mistakes"] = pd.to_numeric(df["mistakes"], errors="coerce").astype("Int64")
    return df


def as_count(v) -> int | None:
    """A whole number from JSON (a count, an epoch, k), or None."""
    return _count(v)


def _count(v) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) else None


def _n(v: int | None) -> str:
    return "?" if v is None else str(v)


# ---------------------------------------------------------------- the final model (summary.json "final")
# summary.json is read from disk and may be partial, old or damaged: every function below takes the raw
# "final" object and skips what does not have the expected shape instead of raising.

FINAL_MODELS = ("single", "ensemble", "refit")  # the keys of final["test"], in the order they are built
DELIVERED_COLOR = "#2ca02c"
FINAL_COLOR = "#1f77b4"
MAX_LABEL = 48  # characters of a model label on an axis
F1_TEXT_MAX_CLASSES = 24  # F1 values written in the heatmap's cells up to this many classes (digits, letters)


def as_number(v) -> float | None:
    """A JSON number (bool excluded) that is finite, as a float; else None."""
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def as_interval(v) -> tuple[float, float] | None:
    """A [low, high] pair of finite numbers, low <= high; else None."""
    if not isinstance(v, list | tuple) or len(v) != 2:
        return None
    lo, hi = as_number(v[0]), as_number(v[1])
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
            "accuracy": as_number(entry.get("accuracy")),
            "ci": as_interval(entry.get("ci95")),
            "n": _count(entry.get("n")),
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
    chosen = _count(selection.get("chosen_k"))
    rows = []
    for k, acc in _mapping(selection.get("val_acc_by_k")).items():
        k, acc = _count(k), as_number(acc)
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
    return {str(c): f for c, v in items if c is not None and (f := as_number(v)) is not None}


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
    rows = [{"trial": short_text(t.get("trial_id", "?"), 24), "val acc": as_number(t.get("val_acc")),
             "test acc": as_number(t.get("accuracy")), "95 % CI": _ci_text(as_interval(t.get("ci95")))}
            for t in (trials if isinstance(trials, list) else []) if isinstance(t, Mapping)]
    df = pd.DataFrame(rows, columns=["trial", "val acc", "test acc", "95 % CI"])
    for c in ("val acc", "test acc"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df
