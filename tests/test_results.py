"""search/results.py: the tables and records read from an experiment's files (the page that shows them:
tests/test_dashboard_explorer.py)."""

from __future__ import annotations

import pytest

from training.checkpoint import CheckpointError, load_checkpoint


def test_best_checkpoint_skips_unreadable(digits_dir, tmp_path):
    """Experiment.best_checkpoint falls back to the next readable checkpoint when the best one
    is damaged after load_experiment listed it (a file that passes the cheap check)."""
    import pandas as pd

    from search.results import Experiment
    from training.checkpoint import save_checkpoint

    good = save_checkpoint(tmp_path / "a" / "checkpoint.pt", {"model": {}, "config": {}, "classes": [], "epoch": 1})
    bad = tmp_path / "b" / "checkpoint.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    gone = tmp_path / "c" / "checkpoint.pt"
    ck = pd.DataFrame([{"path": str(bad), "epoch": 2, "val_acc": 0.9}, {"path": str(gone), "epoch": 3, "val_acc": 0.8},
                       {"path": str(good), "epoch": 1, "val_acc": 0.5}])
    trials = pd.DataFrame([{"trial_id": "x", "best_val_acc": 0.9}])
    exp = Experiment(tmp_path, trials, {}, {"x": ck})
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    assert exp.best_checkpoint("x") == good
    assert exp.best_checkpoint() == good
    bad_only = Experiment(tmp_path, trials, {}, {"x": ck.iloc[:2]})
    assert bad_only.best_checkpoint("x") is None
