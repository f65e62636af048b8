"""Classification metrics from predictions: accuracy, per-class P/R/F1, confusion, confused pairs.

Plain tensors in, plain Python out (lists, floats, strings), so results can go straight
into JSON files and weights-only checkpoints.
"""

from __future__ import annotations

import torch


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64, rows = true class, columns = predicted class."""
    idx = y_true.long().cpu() * num_classes + y_pred.long().cpu()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class(cm: torch.Tensor, classes: list[str]) -> list[dict]:
    cm = cm.double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return [
        {"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    ]


def most_confused(cm: torch.Tensor, classes: list[str], k: int = 5) -> list[dict]:
    """Unordered class pairs with the most mistakes in either direction (e.g. O/0, l/1)."""
    off = cm.clone()
    off.fill_diagonal_(0)
    both = (off + off.T).triu(1)
    n = int((both > 0).sum())
    values, flat = both.flatten().topk(min(k, n)) if n else (torch.tensor([]), torch.tensor([], dtype=torch.long))
    pairs = []
    for v, f in zip(values.tolist(), flat.tolist(), strict=True):
        a, b = divmod(f, cm.shape[0])
        pairs.append({"a": classes[a], "b": classes[b], "count": int(v),
                      "a_as_b": int(cm[a, b]), "b_as_a": int(cm[b, a])})
    return pairs


def summarize(y_true: torch.Tensor, y_pred: torch.Tensor, classes: list[str], k: int = 5) -> dict:
    cm = confusion_matrix(y_true, y_pred, len(classes))
    total = int(cm.sum())
    return {
        "accuracy": float(cm.diag().sum()) / max(total, 1),
        "n": total,
        "per_class": per_class(cm, classes),
        "confusion": cm.tolist(),
        "most_confused": most_confused(cm, classes, k),
    }


def format_pairs(pairs: list[dict]) -> str:
    return ", ".join(f"{p['a']}<->{p['b']} ({p['count']}: {p['a_as_b']}+{p['b_as_a']})" for p in pairs)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (z = 1.96) Wilson score interval of an accuracy of `correct` out of `n`: unlike the
    normal approximation it stays inside [0, 1] and is sound near 0 and 1 and for small n."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / denom
    return max(0.0, centre - half), min(1.0, centre + half)
