"""search/run.py's command line: the printed resume command round-trips through the shell (names and paths with
spaces and quotes), and a name with spaces is one plain folder while names that are not are refused. No search
runs here (tests/test_search.py runs them)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from tests.helpers import one_trial_space


@pytest.mark.parametrize("storage", ["/tmp/with space/results", "s3://bucket/my results"])
def test_resume_command_round_trips_through_the_shell(storage):
    from search.run import parse_args, resume_command

    name = "my exp's \"best\" $HOME"
    args = parse_args(["--storage", storage, "--name", name, "--config", "/tmp/a dir/space.yaml",
                       "--data-dir", "/tmp/emnist data", "--samples", "3", "--seed", "1"])
    command = resume_command(args, name)
    words = shlex.split(command)
    assert words[:2] == ["python", "search/run.py"]
    again = parse_args(words[2:])
    assert again.name == name and again.storage == storage and again.resume
    if "://" in storage:  # cloud storage saves no settings: every flag is in the command
        assert again.config == Path("/tmp/a dir/space.yaml") and again.data_dir == Path("/tmp/emnist data")
        assert again.samples == 3 and again.seed == 1
    # and a shell really gets those words back
    echo = subprocess.run(["sh", "-c", f"printf '%s\\n' {command.split(' ', 2)[2]}"], capture_output=True, text=True)
    assert echo.stdout.splitlines() == words[2:]


def test_a_name_with_spaces_is_a_plain_folder_name(tmp_path):
    from search.run import check_args, experiment_dir, parse_args
    from search.space import load_search_spec
    from search.storage import check_storage
    from training.config import ConfigError

    spec = load_search_spec(one_trial_space(tmp_path / "cfg"))
    args = parse_args(["--name", "my experiment", "--storage", str(tmp_path / "with space")])
    check_args(args, spec)  # accepted...
    check_storage(args.storage, args.name)
    assert experiment_dir(args.storage, args.name) == str(tmp_path / "with space" / "my experiment")  # ...as one folder
    assert not (tmp_path / "with space").exists()  # (checked without making anything)
    for bad in ("a/b", "..", "/abs", "."):  # what is not a plain folder name is refused, naming it
        with pytest.raises(ConfigError, match="--name must be a plain folder name"):
            check_args(parse_args(["--name", bad, "--storage", str(tmp_path)]), spec)
