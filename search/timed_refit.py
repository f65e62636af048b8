"""The final stage under a time budget: its refit planned as timed runs that end before the final stage's deadline,
less the seconds its report needs (search/final.py, step 2, when a budget set the deadline)."""

from __future__ import annotations

import math
import time
from pathlib import Path

from search.budget import DELIVERY_FIXED_S, RAY_START_S, REFIT_END_S, REFIT_START_S, clock
from search.layout import RESULT_FILE, read_result_rows
from search.plan import members_text
from search.resources import Resources
from search.selection import TTA_VIEWS


def _trial_costs(exp_dir: Path, trial_id: str, n_val: int) -> tuple[float, float]:
    """(seconds of training and validation the trial had, its validation images/s), from its result.json."""
    rows = read_result_rows(exp_dir / f"trial_{trial_id}" / RESULT_FILE)[0]
    seconds = max((r["run_seconds"] for r in rows if isinstance(r.get("run_seconds"), int | float)), default=0.0)
    evals = [r["eval_seconds"] for r in rows
             if isinstance(r.get("eval_seconds"), int | float) and r["eval_seconds"] > 0]
    return seconds, (n_val / (sum(evals) / len(evals)) if evals else 1000.0)



def fill_slots(members: list[dict], slots: int) -> list[dict]:
    """Under a time budget the refit runs in one round: on GPUs, fewer members than trials that run at once leave
    the GPU's share idle for the same wall-clock, so the chosen configs get more seeds (in turn) until the round is
    full (on CPUs alone the members share the cores instead: Resources.refit_share)."""
    out = list(members)
    k = 0
    while members and len(out) < slots:
        m = members[k % len(members)]
        seed = 1 + max(x["seed_index"] for x in out if x["source_trial"] == m["source_trial"])
        out.append({**m, "seed_index": seed, "train": {**m["train"], "seed": int(m["train"]["seed"]) + seed
                                                       - m["seed_index"]}})
        k += 1
    return out


def fit_refit(exp_dir: Path, members: list[dict], deadline: float, res: Resources, device: str, tta: str,
              n_candidates: int, n_val: int, n_test: int) -> tuple[list[dict], float]:
    """Under a time budget: (the refit members as timed runs that end before the final stage's deadline, or none
    when that time is shorter than the search gave their trials; the seconds kept for the report after it).

    Each member trains for the time its round has (one round: on CPUs the members share the cores, on GPUs the slots
    are filled with seeds, see fill_slots), its schedule spread over that time (training config train_seconds), on
    one report per pass over the data. Never for less time than its trial had in the search: a refit trained less
    would deliver a model worse than the search's own (measured on the smoke search with epochs cut to fit: 0.815
    against 0.846); then the search's models are delivered."""
    cpus, gpus, slots = res.refit_on_this_machine(len(members), device)
    if gpus > 0:
        members = fill_slots(members, slots)
    costs = {m["source_trial"]: _trial_costs(exp_dir, m["source_trial"], n_val) for m in members}
    # (a trial evaluated on its share of the machine; the report runs alone, on all of it)
    val_ips = min((v for _, v in costs.values()), default=1000.0) * slots
    views = TTA_VIEWS if tta == "auto" else 1
    report_s = DELIVERY_FIXED_S + (n_candidates + len(members) * views) * n_test / val_ips
    left = deadline - time.time() - RAY_START_S - report_s
    rounds = math.ceil(len(members) / slots)
    seconds = left / rounds - REFIT_START_S - REFIT_END_S
    had = max(c for c, _ in costs.values())
    if seconds < had:
        print(f"final stage within the time budget ({clock(deadline - time.time())} left): no time for the "
              f"refit ({clock(max(0.0, seconds))} a model, less than the search gave its trials, {clock(had)}): the "
              "search's models are delivered", flush=True)
        return [], report_s
    fitted = [{**m, "train": {**m["train"], "train_seconds": round(seconds, 1), "epoch_images": 0}} for m in members]
    print(f"final stage within the time budget ({clock(deadline - time.time())} left): refit of "
          f"{len(fitted)} model(s) ({members_text(fitted)}), {clock(seconds)} each"
          + (f" in {rounds} rounds" if rounds > 1 else f", {min(slots, len(fitted))} at once")
          + ("" if gpus else f" on {cpus:g} CPU(s) each"), flush=True)
    return fitted, report_s
