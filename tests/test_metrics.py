from __future__ import annotations

import pytest
import torch

from training.metrics import confusion_matrix, most_confused, per_class, summarize


def test_confusion_and_per_class_by_hand():
    classes = ["0", "O", "1"]
    y_true = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    y_pred = torch.tensor([0, 1, 1, 1, 0, 2, 2, 0])
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 2, 0], [1, 1, 0], [1, 0, 2]]
    pc = {r["class"]: r for r in per_class(cm, classes)}
    assert pc["0"]["precision"] == pytest.approx(1 / 3) and pc["0"]["recall"] == pytest.approx(1 / 3)
    assert pc["1"]["precision"] == pytest.approx(1.0) and pc["1"]["recall"] == pytest.approx(2 / 3)
    assert pc["1"]["f1"] == pytest.approx(0.8) and pc["O"]["support"] == 2
    pairs = most_confused(cm, classes, k=5)
    assert pairs[0] == {"a": "0", "b": "O", "count": 3, "a_as_b": 2, "b_as_a": 1}
    assert [(p["a"], p["b"]) for p in pairs] == [("0", "O"), ("0", "1")]
    s = summarize(y_true, y_pred, classes)
    assert s["accuracy"] == pytest.approx(4 / 8) and s["n"] == 8


def test_class_never_predicted_has_zero_precision_not_nan():
    cm = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2)
    pc = per_class(cm, ["a", "b"])
    assert pc[1]["precision"] == 0.0 and pc[1]["f1"] == 0.0
    assert most_confused(confusion_matrix(torch.tensor([0]), torch.tensor([0]), 2), ["a", "b"]) == []
