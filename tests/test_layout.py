"""search/layout.py: where an experiment's files are and how each is read (the page that shows them:
tests/test_dashboard_explorer.py)."""

from __future__ import annotations

import json

from search.layout import read_result_rows


def test_a_result_line_cut_in_the_middle_is_not_counted_as_malformed(tmp_path):
    path = tmp_path / "result.json"
    rows = [{"epoch": i, "training_iteration": i, "val_acc": 0.5} for i in range(1, 201)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + '{"epoch": 201, "val_')  # still being written
    got, notes = read_result_rows(path)
    assert [r["epoch"] for r in got] == list(range(1, 201)) and notes == []
    # a file above the byte limit: its head and tail, cut at whole lines, no line counted as malformed
    got, notes = read_result_rows(path, max_bytes=2000)
    epochs = [r["epoch"] for r in got]
    assert epochs[0] == 1 and epochs[-1] == 200 and 10 < len(epochs) < 60 and epochs == sorted(epochs)
    assert len(notes) == 1 and "first and last" in notes[0]
