"""The command-line options of search/run.py and search/final.py, each declared once: those both commands take
(where the experiments are, the Ray cluster, each trial's resources, the device, the data: `add_shared_args`),
the final stage's own, which search/run.py passes on to its final stage (`add_final_args`), and the final
stage's settings made from them (`settings_from`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.final_settings import EPOCHS_MODES, TTA_MODES, FinalSettings
from search.layout import DEFAULT_STORAGE
from search.resources import Resources


def add_shared_args(p: argparse.ArgumentParser, device_default: str | None) -> None:
    """The options of both commands: the search's trials and the final stage's refit trials run on the same
    resources, the device is the trials' in the search and the selection's and test evaluation's in the final
    stage (`device_default`: search/run.py takes a resumed search's own when none is given)."""
    p.add_argument("--storage", default=str(DEFAULT_STORAGE), help="local path, shared path or URI (s3://...)")
    p.add_argument("--address", default=None, help="Ray cluster to join: 'auto' or ray://host:10001")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="default 0.25 with CUDA, else 0")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=None, help="trials at once (default: what resources allow)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the EMNIST files (default: $EMNIST_DATA_DIR, then data/; a resumed search and the final "
                        "stage: the one the search used)")
    p.add_argument("--device", default=device_default,
                   help="the search's trials, the final stage's selection and test evaluation (auto: CUDA if present)")


def add_final_args(p: argparse.ArgumentParser) -> None:
    """The final stage's options, of search/run.py (for the final stage it runs at its end) and search/final.py."""
    from search.selection import TTA_VIEWS

    p.add_argument("--ensemble-k", type=int, default=3, help="largest ensemble of top trials considered (1 = none)")
    p.add_argument("--refit-seeds", type=int, default=1, help="refits per chosen config, each with its own seed")
    p.add_argument("--refit-epochs", choices=EPOCHS_MODES, default="best",
                   help="refit for the epochs that were best in the trial, or the full budget")
    p.add_argument("--tta", choices=TTA_MODES, default="auto",
                   help=f"auto: average the delivered model over {TTA_VIEWS} shifted/rotated views of each image "
                        "where that pays on validation")


def settings_from(a: argparse.Namespace) -> FinalSettings:
    """The final stage's settings from either command's options."""
    return FinalSettings(a.ensemble_k, a.refit_seeds, a.refit_epochs, a.tta, a.device or "auto",
                         Resources(a.gpus_per_trial, a.cpus_per_trial, a.concurrency), a.address)
