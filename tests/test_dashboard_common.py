"""The dashboard never opens a path outside the results root, however the name is spelled."""

from __future__ import annotations

import pytest

from dashboard.common import UnsafePath, experiment_names, open_experiment, results_root, safe_checkpoint, safe_child


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "results"
    (r / "exp1" / "trial_a").mkdir(parents=True)
    outside = tmp_path / "secret"
    (outside / "trial_b").mkdir(parents=True)
    (r / "escape").symlink_to(outside, target_is_directory=True)  # a symlink leading out of the root
    return r


@pytest.mark.parametrize("name", ["..", "../secret", "/etc", "exp1/../../secret", "%2e%2e", "%2e%2e%2fsecret",
                                  "%252e%252e", "a\\b", "", ".", "escape", "exp1\x00"])
def test_names_that_leave_the_root_are_refused(root, name):
    with pytest.raises(UnsafePath):
        safe_child(root, name)
    with pytest.raises(UnsafePath):
        open_experiment(root, name)


def test_listing_and_plain_names(root):
    assert experiment_names(root) == ["exp1"]  # the symlink out of the root is not offered
    assert safe_child(root, "exp1") == (root / "exp1").resolve()
    assert len(open_experiment(root, "exp1").trials) == 1
    with pytest.raises(UnsafePath, match="no experiment"):
        open_experiment(root, "missing")


def test_checkpoint_paths_are_rechecked(root, tmp_path):
    inside = root / "exp1" / "trial_a" / "checkpoint_000000" / "checkpoint.pt"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"x")
    assert safe_checkpoint(root, inside) == inside.resolve()
    with pytest.raises(UnsafePath):
        safe_checkpoint(root, tmp_path / "secret" / "x.pt")
    with pytest.raises(UnsafePath):
        safe_checkpoint(root, root / "escape" / "trial_b" / "x.pt")


def test_results_root_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("EMNIST_TUNE_RESULTS", raising=False)
    assert results_root(["--results", str(tmp_path)]) == tmp_path.resolve()
    monkeypatch.setenv("EMNIST_TUNE_RESULTS", str(tmp_path / "env"))
    assert results_root([]) == (tmp_path / "env").resolve()
