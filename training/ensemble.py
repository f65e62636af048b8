"""The delivered model of a search (`results/<name>/final/model.pt`): one model, or several
averaged in probability space.

The file is an ordinary checkpoint (model, config, classes, epoch: what every loader reads),
whose `model`/`config` are the first member's, plus `members`: each member's weights, config
and epoch. Everything is tensors and plain containers, so `torch.load(weights_only=True)`
reads it and `training.checkpoint.load_checkpoint` checks it like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.checkpoint import save_checkpoint


class Ensemble(nn.Module):
    """Members averaged in probability space. The output is the log of the mean probabilities, so
    anything that treats it as logits (softmax, argmax, cross-entropy) sees the ensemble exactly:
    softmax(log p) = p when p sums to 1."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return probs.log()


def member_of(ckpt: dict) -> dict[str, Any]:
    """What an ensemble file keeps of a member checkpoint: weights, config, epoch, metrics."""
    keep = ("model", "config", "epoch", "metrics")
    return {k: ckpt[k] for k in keep if k in ckpt}


def save_model(path: str | Path, members: list[dict], classes: list[str], split: str,
               info: dict | None = None) -> Path:
    """Write the delivered model: `members` are loaded checkpoints (or member_of() of them), all
    trained on the same classes. One member makes a plain single-model checkpoint."""
    if not members:
        raise ValueError("save_model needs at least one member")
    members = [member_of(m) for m in members]
    first = members[0]
    state: dict[str, Any] = {"model": first["model"], "config": first["config"], "classes": list(classes),
                             "epoch": int(first["epoch"]), "split": split, "final": dict(info or {})}
    if len(members) > 1:
        state["members"] = members
    return save_checkpoint(path, state)
