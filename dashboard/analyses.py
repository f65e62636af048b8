"""What the explorer compares trials on, from `search.results` tables: which parameters each trial
sampled (replaying the saved search space, or read from the values when the space is unknown) and the
epoch at which trials are compared (ASHA's rungs). The importance study is importance_study.py.

No Streamlit here, so every function can be tested directly; training.config is imported by the one
function that uses it. Each one accepts what a search that is still running produces (empty tables, NaN
cells, trials without history, a single trial).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from dashboard.trial_table import CONFIG, hashable, numeric, param_name, usable_trials, varying_params, with_config

CHOICE_LEVELS = 12  # a parameter with at most this many values can be a choice others depend on
CONDITIONAL_ALPHA = 0.01  # chance of a false "conditional" among all pairs tested (see conditional_in_values)
BUDGET_MIN_TRIALS = 5


# ---------------------------------------------------------------- what each trial sampled


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
    for idx in with_config(trials).index:
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


def _value_text(v) -> str:
    if isinstance(v, float | np.floating):
        return f"{v:.4g}"
    return str(v)


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

    rows = with_config(trials) if trials is not None else pd.DataFrame()
    cols = [c for c in (varying_params(rows) if params is None else params) if c in rows]
    if rows.empty or not cols:
        return {}
    defaults = make_config({}).to_dict()
    values = {c: hashable(rows[c]).map(_plain) for c in cols}
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


# ---------------------------------------------------------------- the epoch trials are compared at


def asha_rungs(max_epochs: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA compares trials (grace_period * reduction_factor^i), and the budget."""
    rungs, e = set(), grace_period
    while 1 <= e <= max_epochs:
        rungs.add(e)
        e *= reduction_factor
    return sorted(rungs | {max_epochs})


def metric_at_epoch(trials: pd.DataFrame, histories: Mapping[str, pd.DataFrame] | None, epoch: int,
                    metric: str = "val_acc") -> pd.Series:
    """Each trial's `metric` at `epoch` from its history (NaN where it did not get there), on trials' index."""
    out = pd.Series(np.nan, index=trials.index, dtype=float)
    for idx, tid in trials["trial_id"].astype(str).items():
        h = (histories or {}).get(tid)
        if h is None or h.empty or "epoch" not in h or metric not in h:
            continue
        values = numeric(h[metric])[(numeric(h["epoch"]) == epoch).to_numpy()]
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
        runs = numeric(usable["epochs_run"]) if "epochs_run" in usable else pd.Series(dtype=float)
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
