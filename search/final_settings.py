"""What the final stage is asked to do (FinalSettings: from search/run.py's or search/final.py's options, see
search/options.py) and how it says it cannot (FinalError). Shared by the stage (search/final.py) and its parts
(search/refit.py, search/delivery.py), which must not import the stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from search.resources import Resources
from training.config import ConfigError

EPOCHS_MODES = ("best", "full")
TTA_MODES = ("auto", "off")


class FinalError(RuntimeError):
    """The final stage cannot go on; the message says why and what to do."""


@dataclass
class FinalSettings:
    ensemble_k: int = 3  # the largest ensemble considered (1 = never an ensemble)
    refit_seeds: int = 1
    refit_epochs: str = "best"  # best: the epoch that was best in the trial; full: the trial's budget
    tta: str = "auto"  # auto: test-time augmentation where it pays on validation; off
    device: str = "auto"  # for selection and the test evaluation (refit trials use their config's)
    res: Resources = field(default_factory=Resources)  # per refit trial, as for the search's trials
    address: str | None = None
    deadline: float | None = None  # time.time() the final stage must end by (a search's --time-budget)
    report_s: float = 0.0  # of which the test report's share (fit_refit)
    n_test: int | None = None  # the test split's size where the caller knows it (search/run.py checked its files)

    def check(self) -> None:
        if not 1 <= self.ensemble_k <= 20:
            raise ConfigError(f"--ensemble-k must be between 1 and 20, got {self.ensemble_k}")
        if not 1 <= self.refit_seeds <= 20:
            raise ConfigError(f"--refit-seeds must be between 1 and 20, got {self.refit_seeds}")
        if self.tta not in TTA_MODES:
            raise ConfigError(f"--tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        if self.refit_epochs not in EPOCHS_MODES:
            raise ConfigError(f"--refit-epochs must be one of {', '.join(EPOCHS_MODES)}, got {self.refit_epochs!r}")

    def planned(self) -> dict:
        """What a plan is made with: a resumed final stage must be asked the same."""
        return {"ensemble_k": self.ensemble_k, "refit_seeds": self.refit_seeds, "refit_epochs": self.refit_epochs,
                "tta": self.tta}

    def options(self) -> list[str]:
        """These settings as final.py's options, for a command to paste (only those that are not the default)."""
        default = FinalSettings()
        out = [f"--{k.replace('_', '-')}={v}" for k, v in self.planned().items() if v != default.planned()[k]]
        if self.device != default.device:
            out.append(f"--device={self.device}")
        return out
