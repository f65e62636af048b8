"""Trial explorer page: compare a search's trials, see how ASHA pruned them, which
hyperparameters mattered, and one trial's per-class results from its best checkpoint.

Works on a search that is still running: whatever is on disk is shown as it is (trials
without results or checkpoints, half-written files). Every failure becomes a sentence on
the page; the rest of the page and the app keep working.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import analyses, explorer_figures, importance_study, trial_detail, trial_table
from dashboard.common import UnsafePath, md_text, open_experiment, safe_child
from dashboard.common import section as _section
from search.layout import CHECKPOINT_FILE, PARAMS_FILE, RESULT_FILE, SETTINGS_FILE, STATE_GLOB
from search.results import TRIAL_COLUMNS, Experiment
from search.settings import saved_space

AUTO_REFRESH_SECONDS = 15
TOP_CURVES = 5
REFRESH_KEY = "explorer_refresh"
MAX_NOTES = 20
BUDGET_COLUMN = "_val_acc_at_budget"
STATUS_WORDS = {"finished": "Finished", "stopped": "Stopped by ASHA", "budget": "Ended by the time budget",
                "diverged": "Diverged", "error": "Errors",
                "running": "Running", "pending": "Pending", "terminated": "Terminated", "paused": "Paused"}


# ---------------------------------------------------------------- loading


def _fingerprint(path: Path) -> tuple:
    """Names, sizes and modification times of every file the loader reads: a new epoch, checkpoint,
    trial or state file changes it, so the cached experiment is re-read."""
    found = []
    patterns = (STATE_GLOB, "trial_*", f"trial_*/{PARAMS_FILE}", f"trial_*/{RESULT_FILE}",
                "trial_*/error.txt", f"trial_*/checkpoint_*/{CHECKPOINT_FILE}")
    for pattern in patterns:
        for p in sorted(path.glob(pattern)):
            try:
                s = p.stat()
            except OSError:
                continue
            found.append((str(p.relative_to(path)), s.st_size if p.is_file() else -1, s.st_mtime_ns))
    return tuple(found)


@st.cache_data(max_entries=8, show_spinner=False)
def _load(root: str, name: str, fingerprint: tuple, refresh: int) -> Experiment:
    return open_experiment(Path(root), name)


@st.cache_data(max_entries=8, show_spinner=False)
def _search_space(exp_path: str, settings_stat: tuple, refresh: int):
    """(the experiment's search space, ASHA's rungs, None), or (None, None, why not): search.settings.saved_space."""
    spec, max_epochs, why = saved_space(exp_path)
    if spec is None:
        return None, None, why
    return spec, analyses.asha_rungs(max_epochs, spec.grace_period, spec.reduction_factor), None


def searched(exp: Experiment) -> tuple[analyses.Searched, list[int] | None]:
    """(the trials with only what each trial sampled, the searched `config/*` columns, their distributions
    in the space and why the space is not used or None: see analyses.only_sampled; ASHA's rungs or None)."""
    from search.space import DefineByRun, sampled_params

    settings = exp.path / SETTINGS_FILE
    try:
        stat = settings.stat()
        key = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = ()
    spec, rungs, note = _search_space(str(exp.path), key, st.session_state.get(REFRESH_KEY, 0))
    sampled = None
    if spec is not None:
        try:
            space = DefineByRun(spec)
            sampled = lambda config: sampled_params(space, config)  # noqa: E731
        except Exception as e:  # noqa: BLE001 - a space this version cannot use: the fallback
            note = f"the search space cannot be replayed ({type(e).__name__})"
    found = analyses.only_sampled(exp.trials, sampled)
    return (found if sampled is not None else found._replace(note=note)), rungs


def load(root: Path, name: str) -> Experiment:
    path = safe_child(root, name)
    if not path.is_dir():
        raise UnsafePath(f"there is no experiment named {name!r} under the results root")
    return _load(str(root), name, _fingerprint(path), st.session_state.get(REFRESH_KEY, 0))


# ---------------------------------------------------------------- page


def _bump_refresh() -> None:
    st.session_state[REFRESH_KEY] = st.session_state.get(REFRESH_KEY, 0) + 1


def render(root: Path, name: str) -> None:
    st.header(f"Trial explorer · {name}")
    left, mid, _ = st.columns([1, 2, 4], vertical_alignment="center")
    left.button("Refresh", key="explorer_refresh_button", on_click=_bump_refresh,
                help="Re-read the experiment folder (new epochs, trials and checkpoints).")
    auto = mid.toggle(f"Auto-refresh every {AUTO_REFRESH_SECONDS} s", key="explorer_auto_refresh",
                      help="For a search that is still running.")
    body = st.fragment(_body, run_every=AUTO_REFRESH_SECONDS if auto else None)
    body(root, name)


def _body(root: Path, name: str) -> None:
    try:
        exp = load(root, name)
    except UnsafePath as e:
        st.error(f"Cannot open this experiment: {e}.")
        return
    except Exception as e:  # noqa: BLE001 - the page must stay up whatever is on disk
        st.error(f"Could not read the experiment {name!r}: {type(e).__name__}: {e}")
        return
    trials = exp.trials
    st.caption(f"{len(trials)} trial(s) read from `{exp.path.name}/` at {time.strftime('%H:%M:%S')}")
    _section("reading notes", _reading_notes, exp)
    if trials.empty:
        st.info("This experiment has no trials yet. If the search has just started, press Refresh in a moment.")
        return
    _section("summary", _summary, exp)
    try:
        found, rungs = searched(exp)
    except Exception as e:  # noqa: BLE001 - the table as it is, and say so
        found = analyses.only_sampled(trials, None)._replace(note=f"{type(e).__name__}: {e}")
        rungs = None
    _section("trials table", _trials_table, trials, found.trials, found.params)
    _section("hyperparameter figures", _hyperparameters, exp, found, rungs)
    _section("learning curves", _curves, exp)
    _section("trial details", _trial_details, root, exp)


def _reading_notes(exp: Experiment) -> None:
    """What was not read: malformed entries of the experiment state, trial folders or files outside the
    results root, malformed result lines, a bloated result.json (the rest of the experiment is shown)."""
    lines = [md_text(n) for n in exp.state_notes]
    lines += [f"trial {md_text(t)} was not read: {md_text(why)}" for t, why in sorted(exp.refused.items())]
    lines += [f"trial {md_text(t)}: {md_text(n)}" for t, ns in sorted(exp.notes.items()) for n in ns]
    if not lines:
        return
    more = [f"… and {len(lines) - MAX_NOTES} more"] if len(lines) > MAX_NOTES else []
    st.warning("Parts of this experiment were left out:\n" + "\n".join(f"- {x}" for x in lines[:MAX_NOTES] + more))


def _summary(exp: Experiment) -> None:
    trials = exp.trials
    counts = trials["status"].astype(str).value_counts()
    order = [s for s in STATUS_WORDS if s in counts] + sorted(set(counts.index) - set(STATUS_WORDS))
    best = exp.best_trial
    cells = [("Trials", str(len(trials)))] + [(STATUS_WORDS.get(s, s.title()), str(int(counts[s]))) for s in order]
    if best is not None:
        acc = float(trials.loc[trials["trial_id"] == best, "best_val_acc"].iloc[0])
        cells += [("Best val acc", f"{acc:.4f}"), ("Best trial", best)]
    else:
        cells += [("Best val acc", "–"), ("Best trial", "–")]
    for col, (label, value) in zip(st.columns(len(cells)), cells, strict=True):
        col.metric(label, value)
    _budget_line(exp.path)


def _budget_line(exp_dir) -> None:
    """A budgeted search's time: spent and left (counting on while its driver runs)."""
    from search.budget import clock
    from search.ledger import read_budget

    b = read_budget(exp_dir)
    if b is None:
        return
    left = f"{clock(b['left_s'])} left" if b["left_s"] >= 0 else f"{clock(-b['left_s'])} over"
    st.caption(f"Time budget {clock(b['budget_s'])}: {clock(b['spent_s'])} spent, {left}"
               + (" (running: refresh to follow it)" if b["running"] else "") + ".")


def _trial_label(trials: pd.DataFrame):
    info = trials.set_index("trial_id")

    def label(tid: str) -> str:
        if tid not in info.index:
            return str(tid)
        row = info.loc[tid]
        acc = row["best_val_acc"]
        acc = f"{float(acc):.4f}" if pd.notna(acc) else "no result"
        return f"{tid} · {row['status']} · {acc}"

    return label


def _ranked_ids(trials: pd.DataFrame) -> list[str]:
    """Trial ids, best val acc first, trials without a result last."""
    ranked = trials.assign(_acc=pd.to_numeric(trials["best_val_acc"], errors="coerce"))
    ranked = ranked.sort_values(["_acc", "trial_id"], ascending=[False, True], na_position="last")
    return ranked["trial_id"].astype(str).tolist()


def _trials_table(trials: pd.DataFrame, masked: pd.DataFrame | None = None, params: list[str] | None = None) -> None:
    """The trials; by default the searched parameters, each blank where a trial did not sample it
    (`masked`, `params`: see `searched`); "All settings" shows every setting of every trial."""
    st.subheader("Trials")
    masked = trials if masked is None else masked
    params = trial_table.varying_params(trials) if params is None else params
    c1, c2, c3, c4 = st.columns([2, 2, 2, 1])
    statuses = sorted(trials["status"].astype(str).unique())
    chosen = c1.multiselect("Status", statuses, key="explorer_status_filter", placeholder="All statuses")
    models = []
    if "config/model" in trials and trials["config/model"].notna().any():
        options = sorted(trials["config/model"].dropna().astype(str).unique())
        models = c2.multiselect("Model", options, key="explorer_model_filter", placeholder="All models")
    min_acc = c3.slider("Min best val acc", 0.0, 1.0, 0.0, 0.01, key="explorer_min_acc",
                        help="Above 0, trials without a validation result are hidden.")
    show_all = c4.toggle("All settings", key="explorer_all_config",
                         help="Also show the settings that are the same in every trial.")

    view = trials
    if chosen:
        view = view[view["status"].astype(str).isin(chosen)]
    if models:
        view = view[view["config/model"].astype(str).isin(models)]
    if min_acc > 0:
        view = view[pd.to_numeric(view["best_val_acc"], errors="coerce") >= min_acc]

    config_cols = [c for c in trials.columns if c.startswith(trial_table.CONFIG)] if show_all else list(params)
    source = trials if show_all else masked.assign(**{c: trials[c] for c in trials if c not in params})
    if "config/model" in trials and "config/model" not in config_cols:
        config_cols = ["config/model", *config_cols]
    cols = [c for c in TRIAL_COLUMNS[:2] if c in view] + config_cols + [c for c in TRIAL_COLUMNS[2:] if c in view]
    table = source.loc[view.index, cols].copy()
    order = {t: i for i, t in enumerate(_ranked_ids(view))}
    table = table.sort_values("trial_id", key=lambda s: s.astype(str).map(order)).reset_index(drop=True)
    table = table.rename(columns={c: trial_table.param_name(c) for c in config_cols})
    st.dataframe(table, hide_index=True, key="explorer_trials_table", column_config={
        "trial_id": st.column_config.TextColumn("trial"),
        "best_val_acc": st.column_config.NumberColumn("best val acc", format="%.4f"),
        "last_val_acc": st.column_config.NumberColumn("last val acc", format="%.4f"),
        "epochs_run": st.column_config.NumberColumn("epochs run"),
        "max_epochs": st.column_config.NumberColumn("max epochs"),
        "stopped_early": st.column_config.CheckboxColumn("stopped by ASHA"),
        "diverged": st.column_config.CheckboxColumn("diverged"),
        "seconds": st.column_config.NumberColumn("duration (s)", format="%.1f"),
        "num_failures": st.column_config.NumberColumn("failures"),
        "has_checkpoint": st.column_config.CheckboxColumn("checkpoint"),
    })
    st.caption(f"{len(table)} of {len(trials)} trials shown. Click a column header to sort.")


def _budget(trials: pd.DataFrame, histories: dict, rungs: list[int] | None) -> tuple[pd.DataFrame, str, str]:
    """(the trials with the metric to compare them by, its column, its label). ASHA stopped trials after
    different numbers of epochs, so their best val acc is not comparable: they are compared at one epoch
    that all of them reached (a rung; the user picks another), from their histories."""
    counts = analyses.budget_counts(trials, histories, rungs)
    n_usable = len(trial_table.usable_trials(trials))
    enough = max(importance_study.IMPORTANCE_MIN_TRIALS, min(analyses.BUDGET_MIN_TRIALS, n_usable))
    options = [e for e in sorted(counts) if counts[e] >= enough]
    if not options:
        st.caption("No epoch was reached by enough finished or ASHA-stopped trials yet: the figures compare "
                   "best val acc, whatever the number of epochs each trial ran.")
        return trials, trial_table.METRIC, "best val acc"
    default = analyses.default_budget({e: counts[e] for e in options}, n_usable)
    epoch = st.selectbox("Compare the trials at", options, index=options.index(default), key="explorer_budget",
                         format_func=lambda e: f"val acc at epoch {e} ({counts[e]} trials)",
                         help="Trials stopped by ASHA ran fewer epochs than finished ones, so importance and "
                              "the parallel coordinates' colour use the validation accuracy at one epoch every "
                              "compared trial reached (default: the highest ASHA rung that at least half of the "
                              "usable trials, and at least 5, reached).")
    data = trials.assign(**{BUDGET_COLUMN: analyses.metric_at_epoch(trials, histories, epoch)})
    return data, BUDGET_COLUMN, f"val acc at epoch {epoch}"


@st.cache_data(max_entries=16, show_spinner="Resampling the trials…")
def _importance(data: pd.DataFrame, metric: str, params: tuple[str, ...], space: tuple, _distributions: dict):
    """importance_study.importance (Optuna's PED-ANOVA, and its intervals over resamples of the trials: about a
    second for 30 trials), once per table; `space`: the distributions as text (the cache's key for them)."""
    return importance_study.importance(data, metric, list(params), _distributions)


def _space_note(found: analyses.Searched) -> str:
    """What the figures use when the space is unknown, and which parameters importance leaves out."""
    text = (f"Which parameters each trial sampled is not known ({md_text(found.note)}), so the figures use every "
            "setting that differs between the trials: a conditional parameter also counts in the trials "
            "where its branch was not taken.")
    if not found.left_out:
        return text + (" None of them shows in its values that it was conditional (one that does not would be "
                       "ranked with its default in the trials that did not sample it).")
    lines = [f"- {md_text(trial_table.param_name(c))}: {md_text(why)}" for c, why in found.left_out.items()]
    return (text + " Hyperparameter importance leaves out those whose values show they were conditional (the "
            "trials that did not sample one hold its default) rather than rank their defaults:\n" + "\n".join(lines))


def _hyperparameters(exp: Experiment, found: analyses.Searched, rungs: list[int] | None = None) -> None:
    st.subheader("Hyperparameters")
    trials, params = found.trials, found.params
    if found.note:
        st.info(_space_note(found))
    data, metric, label = _budget(trials, exp.histories, rungs)
    ranked = [c for c in params if c not in found.left_out]
    space = tuple(sorted((k, repr(v)) for k, v in found.distributions.items()))
    result = _importance(data, metric, tuple(ranked), space, found.distributions)
    importance = result.values if result is not None else {}
    names = [trial_table.param_name(c) for c in params]
    order = [n for n in importance if n in names] + [n for n in names if n not in importance]
    shown = explorer_figures.PARCOORDS_DEFAULT_AXES
    axes = st.multiselect("Parallel-coordinates axes", order, default=order[:shown], key="explorer_parcoords_axes",
                          help=f"Default: the {shown} most important searched parameters.")
    st.plotly_chart(explorer_figures.parallel_coordinates(data, axes, metric, label), key="explorer_parcoords")
    left, right = st.columns(2)
    with left:
        if names:
            param = st.selectbox("Hyperparameter", names, key="explorer_param")
            st.plotly_chart(explorer_figures.param_vs_metric(trials, param), key="explorer_param_vs_metric")
        else:
            st.info("No hyperparameter differs between the trials yet, so there is nothing to compare.")
    with right:
        fig = explorer_figures.param_importance(data, metric, label, ranked, result=result)
        if fig is None:
            reason = importance_study.importance_inputs(data, metric, ranked)[2]
            st.info(f"Hyperparameter importance is not available yet: {reason}.")
        else:
            st.plotly_chart(fig, key="explorer_importance")
            _importance_notes(result)


def _importance_notes(result: importance_study.Importance) -> None:
    """How sure the bars are, and how a conditional parameter's bar was measured."""
    share, k = f"{importance_study.BOOTSTRAP_LEVEL:.0%}", result.resamples
    if not result.supported:
        st.info(f"These bars are not a ranking: {result.caveat}. The values are Optuna's all the same, drawn "
                f"pale; the lines show where {share} of {k} resamples of the trials put each of them.")
    else:
        places = ", ".join(f"{md_text(n)} (rank {result.rank_low[n]}–{result.rank_high[n]})" for n in result.settled)
        rest = "" if len(result.settled) == len(result.values) else (
            " The order of the other (pale) bars is not supported: their ranks move over more than two places.")
        st.caption(f"Places the trials support, in {share} of {k} resamples of them (drawn with replacement): "
                   f"{places}.{rest} Lines: where {share} of the resamples put each value.")
    conditional = [n for n in result.values if result.sampled_in.get(n, result.n_trials) < result.n_trials]
    if conditional:
        st.caption(f"A bar marked \"N of {result.n_trials} trials\" is a conditional parameter "
                   f"({md_text(', '.join(conditional))}): PED-ANOVA measures it only among the N trials that sampled "
                   "it, and weights that by (share of the best trials among them)² / (share of all trials among "
                   "them), Optuna's conditional PED-ANOVA; all the bars together sum to 1.")


def _curves(exp: Experiment) -> None:
    st.subheader("Learning curves")
    trials = exp.trials
    ranked = _ranked_ids(trials)
    with_result = [t for t in ranked if pd.notna(trials.loc[trials["trial_id"] == t, "best_val_acc"].iloc[0])]
    chosen = st.multiselect("Trials", ranked, default=with_result[:TOP_CURVES], key="explorer_curve_trials",
                            format_func=_trial_label(trials), help=f"Default: the top {TOP_CURVES} by best val acc.")
    left, right = st.columns(2)
    left.plotly_chart(explorer_figures.learning_curves(exp.histories, chosen, "val_acc"), key="explorer_curve_acc")
    right.plotly_chart(explorer_figures.learning_curves(exp.histories, chosen, "val_loss"), key="explorer_curve_loss")
    st.plotly_chart(explorer_figures.asha_milestones(trials, exp.histories), key="explorer_asha")


# ---------------------------------------------------------------- one trial


def _trial_details(root: Path, exp: Experiment) -> None:
    st.subheader("One trial in detail")
    trials = exp.trials
    ranked = _ranked_ids(trials)
    tid = st.selectbox("Trial", ranked, index=0, key="explorer_trial", format_func=_trial_label(trials),
                       help="Per-class results from this trial's best checkpoint (default: the best trial).")
    if tid is None:
        return
    trial_detail.render(root, exp, tid)
