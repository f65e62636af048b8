"""The Optuna searcher, kept in step with the experiment across resumes.

Ray restores the searcher (the pickled Optuna study) and the trials (the experiment state) from
two different files. A driver killed while it was writing them can leave a study that is older
than the trial list: trials the experiment records as finished that the study never heard of.
Ray does not run finished trials again, so Optuna would never learn their results, and TPE
would model the space without them. On restore, `ResumableOptunaSearch` tells the study every
finished trial it is missing, from the experiment state Ray itself restores the trials from.
Trials it does not know that finish later (restored as running) are added when they complete.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from search import ray_private
from search.layout import ray_statuses
from search.space import replay

log = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that catches its study up with the experiment on restore (see module doc)."""

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        super().restore_from_dir(checkpoint_dir)
        caught_up = [tid for tid, t in ray_statuses(Path(checkpoint_dir)).items()
                     if t["status"] == "TERMINATED" and self._complete(tid, t["last_result"], t["config"])]
        if caught_up:
            log.warning("searcher state was older than the experiment; told Optuna %d finished trial(s): %s",
                        len(caught_up), ", ".join(caught_up))
            # The sampler's random state is as old as the study was: left alone, it would draw the
            # very values it drew for the trials above (while TPE still samples at random) and
            # suggest their configurations again.
            ray_private.optuna_study(self).sampler.reseed_rng()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # results of a trial the study never asked for: only its end counts
        if trial_id in ray_private.optuna_trials(self):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        result = result or {}
        # Ray passes the result flattened ("config/lr"); nested where it comes from the saved state
        config = result.get("config") or {k[len("config/"):]: v for k, v in result.items() if k.startswith("config/")}
        self._complete(trial_id, result, config, error)

    def _complete(self, trial_id: str, result: dict | None, config: dict, error: bool = False) -> bool:
        """Tell the study that `trial_id` ended; True if it did not know yet."""
        if trial_id in ray_private.completed_trials(self):
            return False
        if trial_id in ray_private.optuna_trials(self):
            super().on_trial_complete(trial_id, result=result, error=error)
            return True
        try:
            replayed = replay(ray_private.define_by_run(self), config)
        except KeyError as e:
            log.warning("trial %s ended but cannot be added to the Optuna study: %s", trial_id, e)
            return False
        ray_private.optuna_study(self).add_trial(replayed.finished((result or {}).get(self.metric), error))
        ray_private.completed_trials(self).add(trial_id)
        return True


class ForwardingLimiter(ConcurrencyLimiter):
    """ConcurrencyLimiter that still passes on the end of a trial it lost track of (its state is
    restored from yet another file), so that the searcher hears of every trial that ends; and that starts
    no trial after `start_until` (time.time(); a class attribute, so that it also holds for the limiter a
    resumed search restores from its pickle): under a time budget, a trial starting then could not reach
    ASHA's first rung before the search's deadline."""

    start_until: float | None = None

    def suggest(self, trial_id: str):
        if ForwardingLimiter.start_until is not None and time.time() > ForwardingLimiter.start_until:
            return Searcher.FINISHED
        return super().suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.live_trials or not ray_private.limits_concurrency(self):
            super().on_trial_complete(trial_id, result=result, error=error)
        else:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
