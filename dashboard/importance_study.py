"""How much each hyperparameter mattered: Optuna's PED-ANOVA on the trials (only what each trial
sampled, see analyses.only_sampled), and how sure each value and its rank is, over resamples of the
trials. The explorer draws it (explorer_figures.param_importance).

No Streamlit here, so every function can be tested directly; Optuna is imported by the functions that
use it. Where the trials cannot give an importance (too few, nothing varies), the functions return None
and importance_inputs says why.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

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
)

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
    candidates = varying_params(rows) if params is None else [config_column(p) for p in params
                                                              if config_column(p) in rows]
    params = [c for c in candidates if hashable(rows[c]).dropna().nunique() > 1]
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
    if is_categorical(v):
        return CategoricalDistribution(sorted({_choice(x) for x in v}, key=lambda x: (str(type(x)), str(x))))
    num = numeric(v)
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

    columns = {c: hashable(rows[c]).tolist() for c in params}
    dists = {c: _distribution(hashable(rows[c]), given.get(param_name(c))) for c in params}
    out = []
    for i, value in enumerate(numeric(rows[metric]).tolist()):
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
