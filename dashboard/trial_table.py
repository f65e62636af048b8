"""How the figures and analyses read a `search.results` trials table: which `config/*` columns are the
searched hyperparameters, which trials have a result, which values are numbers and which categories.

Pure pandas (no Streamlit, no plotly). Every function accepts what a search that is still running
produces: empty tables, NaN values (trials without results, conditional parameters), a single trial.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

METRIC = "best_val_acc"
CONFIG = "config/"
USABLE_STATUSES = ("finished", "stopped", "budget")


def param_name(column: str) -> str:
    return column.removeprefix(CONFIG)


def config_column(param: str) -> str:
    return param if param.startswith(CONFIG) else CONFIG + param


def hashable(values: pd.Series) -> pd.Series:
    """Lists/dicts (not expected in configs, but possible) as JSON text so they can be compared."""
    if values.dtype == object and values.map(lambda v: isinstance(v, list | dict | set | tuple)).any():
        return values.map(lambda v: json.dumps(v, sort_keys=True, default=str)
                          if isinstance(v, list | dict | set | tuple) else v)
    return values


def is_categorical(values: pd.Series) -> bool:
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


def numeric(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").astype(float)


def is_log_scale(values: pd.Series) -> bool:
    """Positive numbers spanning at least two decades (lr, weight_decay): a log axis reads better."""
    if is_categorical(values):
        return False
    v = numeric(values).dropna()
    v = v[np.isfinite(v)]
    return bool(len(v) >= 2 and (v > 0).all() and v.max() / v.min() >= 100)


def with_config(trials: pd.DataFrame) -> pd.DataFrame:
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
    rows = with_config(trials)
    out = []
    for c in (c for c in trials.columns if c.startswith(CONFIG)):
        if hashable(rows[c]).nunique(dropna=False) > 1:
            out.append(c)
    return out


def with_metric(trials: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Trials with a finite `metric` (best_val_acc)."""
    if trials is None or trials.empty or metric not in trials:
        return pd.DataFrame(columns=list(getattr(trials, "columns", [])))
    acc = numeric(trials[metric])
    return trials[np.isfinite(acc.to_numpy())]


def usable_trials(trials: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Finished or ASHA-stopped trials with a finite `metric`."""
    rows = with_metric(trials, metric)
    return rows[rows["status"].isin(USABLE_STATUSES)] if "status" in rows else rows

